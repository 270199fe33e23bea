"""The ONNX pipeline: load, analyze, score, plan, cut, compensate, verify, report.

surgery.api dispatches to it (and to surgery.sequential and surgery.torch_api, which
build on it); nothing here imports those, so there is no cycle."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from surgery.analysis import Analysis, refuse_nonfinite
from surgery.errors import SurgeryError
from surgery.metrics import count_flops, count_params
from surgery.options import PruneOptions
from surgery.plan import Plan, atoms_from_plan, build_plan, read_plan
from surgery.verify import VerifyResult, random_feeds, verify


@dataclasses.dataclass
class Result:
    model: ir.Model  # the pruned model
    plan: Plan
    report: dict
    analysis: Analysis

    @property
    def onnx(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def save(self, path, *, external_data: bool | None = None) -> None:
        save(self.model, path, external_data=external_data)


def load(source, *, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ir.Model:
    """Load an ONNX path or ModelProto into the IR, normalized for analysis."""
    from surgery.frontends.onnx_loader import load_onnx

    return load_onnx(source, input_shapes=input_shapes)


def save(model: ir.Model, path, *, external_data: bool | None = None) -> None:
    from surgery.backends.onnx_writer import save_onnx

    save_onnx(model, path, external_data=external_data)


def analyze(source) -> Analysis:
    model = source if isinstance(source, ir.Model) else load(source)
    return Analysis(model)


def protected_atoms(analysis: Analysis, keep: Iterable[str]) -> set[int]:
    names = list(keep)
    if not names:
        return set()
    nodes = {n.name: n for n in analysis.model.graph}
    groups = {g.name: g for g in analysis.groups}
    axes: list[int] = []
    atoms: set[int] = set()
    for name in names:
        if name in nodes:
            for v in [*nodes[name].inputs, *nodes[name].outputs]:
                if v is not None:
                    axes.extend(analysis.value_axes.get(v.name, []))
        elif name in analysis.value_axes:
            axes.extend(analysis.value_axes[name])
        elif name in groups:  # a group name from `surgery analyze`: just that group
            atoms.update(groups[name].atoms.tolist())
        else:
            raise SurgeryError(f"--keep '{name}' is neither a node, a tensor nor a group of this model")
    return analysis.atoms_touching(axes) | atoms


def is_torch_module(obj) -> bool:
    import sys

    torch = sys.modules.get("torch")  # a module can only exist if torch was imported
    return torch is not None and isinstance(obj, torch.nn.Module)


def prune_onnx(source, example_inputs=None, **options) -> Result:
    """One-shot ONNX prune with ``surgery.prune``'s keyword options (see its docstring)."""
    return run_onnx(source, PruneOptions.from_kwargs("prune", **options), example_inputs)


def run_onnx(source, o: PruneOptions, example_inputs=None) -> Result:
    """The one-shot stages on an ONNX model: load and analyze, score, plan, then
    cut, verify, compensate and report (``execute``)."""
    if example_inputs is not None or o.loss is not None:
        raise SurgeryError("example_inputs and loss are for PyTorch modules; an ONNX model declares its inputs")
    from surgery.passes.criteria import get_criterion
    from surgery.passes import targets

    target = targets.parse(o.ratio, o.target_params, o.target_flops)  # targets: kept fraction instead of a ratio
    crit = get_criterion(o.criterion)
    need, cal = calibration_checks(crit, o.calib, o.compensate)  # calibration
    analysis, t, t0 = load_and_analyze(source, o.input_shapes)
    if o.calib is not None:  # calibration: passes/stats.py
        from surgery.passes.stats import as_calibration

        cal = as_calibration(o.calib, analysis.model, samples=o.calib_samples, batch=o.calib_batch)
    scores = score_groups(analysis, [g for g in analysis.groups if g.prunable], crit, need, cal, o.seed, t)
    t1 = time.perf_counter()
    removed = plan_removal(analysis, scores, o, target, getattr(crit, "scores_comparable", False))
    t["plan"] = time.perf_counter() - t1
    return targets.finish(execute(analysis, removed, t, t0, o.seed, o.input_shapes, o.verify_result,
                                  calib=cal if (need or o.compensate) else None, compensate=o.compensate), target)


def plan_removal(analysis: Analysis, scores: dict, o: PruneOptions, target, comparable: bool) -> dict[int, np.ndarray]:
    """Group id -> the atoms to remove: per-kind ratios (uniform or global), or the
    global ranking until a params/FLOPs target is reached; --keep and --round-to apply."""
    from surgery.passes.policy import select, select_target

    ratio = 1.0 if target else (0.5 if o.ratio is None else o.ratio)  # targets: 1.0 = the group may lose units
    protected = protected_atoms(analysis, o.keep)
    by_kind = kind_ratios(analysis, ratio, o.head_ratio, o.mlp_ratio, o.hidden_ratio, o.head_dim_ratio, o.gqa)
    ratios = {g.id: by_kind[g.kind] for g in analysis.groups}
    if target:
        return select_target(analysis, scores, target.kind, target.wanted, eligible=ratios, round_to=o.round_to,
                             comparable=comparable, protected=protected, info=target.info)
    return select(analysis.groups, scores, ratios, global_rank=o.global_rank, round_to=o.round_to,
                  protected=protected, comparable=comparable)


def score_groups(analysis: Analysis, groups, crit, need: str | None, cal, seed: int, t: dict) -> dict[int, np.ndarray]:
    """Group id -> the criterion's score per unit, for ``groups``; a data-aware criterion
    (``need``: "moments" or "gram") first gets their statistics over ``cal`` (timed in
    ``t["calibrate"]``)."""
    from surgery.passes.criteria import CriterionContext

    stats = None
    if need:
        from surgery.passes.stats import collect

        t1 = time.perf_counter()
        stats = collect(analysis, cal, groups, gram=need == "gram")
        t["calibrate"] = t.get("calibrate", 0.0) + time.perf_counter() - t1
    ctx = CriterionContext(rng=np.random.default_rng(seed), stats=stats, analysis=analysis)
    return {g.id: crit(g, ctx) for g in groups}


def kind_ratios(analysis: Analysis, ratio: float, head_ratio: float | None, mlp_ratio: float | None,
                 hidden_ratio: float | None, head_dim_ratio: float, gqa: str) -> dict[str, float]:
    """The fraction of units removed from each kind of group (see ``prune``)."""
    head = ratio if head_ratio is None else head_ratio
    # multi-query attention has one key/value head: only its query heads can go
    kv_mode = gqa == "kv" and any(g.kind == "kv_heads" and g.prunable for g in analysis.groups)
    return {
        "heads": head, "kv_heads": head if kv_mode else 0.0, "q_per_kv": 0.0 if kv_mode else head,
        "head_dim": head_dim_ratio, "mlp": ratio if mlp_ratio is None else mlp_ratio,
        "hidden": ratio if hidden_ratio is None else hidden_ratio, "channel": ratio,
    }


def calibration_checks(crit, calib, compensate):
    """(the statistics the criterion needs, None): data-aware criteria and compensation
    need calibration data, and never fall back to random inputs."""
    from surgery.passes.criteria import needs_stats

    need = needs_stats(crit)
    if need and calib is None:
        raise SurgeryError(f"criterion '{crit.name}' is data-aware: it needs calibration data (--calib data.npz, "
                           f"or calib= in the API); surgery never scores it on random inputs")
    if compensate and calib is None:
        raise SurgeryError(f"--compensate {compensate} needs calibration data (--calib data.npz, or calib= in the API)")
    return need, None


def apply(source, plan, *, seed: int = 0, input_shapes=None, verify_result: bool = True) -> Result:
    """Replay a saved (possibly hand-edited) plan on a model."""
    data = read_plan(plan)
    analysis, t, t0 = load_and_analyze(source, input_shapes)
    t1 = time.perf_counter()
    removed = atoms_from_plan(analysis, data)
    t["plan"] = time.perf_counter() - t1
    return execute(analysis, removed, t, t0, seed, input_shapes, verify_result)


def load_and_analyze(source, input_shapes) -> tuple[Analysis, dict, float]:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model = source if isinstance(source, ir.Model) else load(source, input_shapes=input_shapes)
    t["load"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    analysis = Analysis(model)
    refuse_nonfinite(analysis)
    t["analysis"] = time.perf_counter() - t1
    return analysis, t, t0


def _verify_cut(model: ir.Model, original: onnx.ModelProto, plan: Plan, shapes, seed: int, inexact: list[str],
                t: dict) -> VerifyResult:
    """The cut model checked by onnx.checker, then against the original masked by the plan."""
    t1 = time.perf_counter()
    pruned = ir.to_proto(model)
    try:
        onnx.checker.check_model(pruned)
    except onnx.checker.ValidationError as e:
        raise SurgeryError(f"internal error: the pruned model fails onnx.checker: {str(e).splitlines()[0]}") from e
    feeds = random_feeds(model, shapes, seed)
    result_v = verify(original, pruned, plan.tensor_cuts(), feeds, "; ".join(inexact) or None)
    t["verify"] = time.perf_counter() - t1
    return result_v


def _compensate(comp, model: ir.Model, original: onnx.ModelProto, calib, output_diffs: bool, t: dict):
    """Refit the cut model's consumers (prepared before the cut): (the compensation report,
    the compensated model's max output diff on the calibration data, or None)."""
    from surgery.passes.compensate import output_diffs as diffs

    comp_diff = None
    t1 = time.perf_counter()
    uncompensated = ir.to_proto(model) if output_diffs else None
    comp_report = comp.apply(model)
    compensated = ir.to_proto(model)
    try:
        onnx.checker.check_model(compensated)
    except onnx.checker.ValidationError as e:
        raise SurgeryError(f"internal error: the compensated model fails onnx.checker: {str(e).splitlines()[0]}") from e
    if output_diffs:
        comp_report["uncompensated_output_diff"], comp_diff = diffs(original, [uncompensated, compensated], calib)
    t["compensate"] = t.get("compensate", 0.0) + time.perf_counter() - t1
    return comp_report, comp_diff


def execute(analysis: Analysis, removed: dict[int, np.ndarray], t: dict, t0: float, seed: int,
             input_shapes, verify_result: bool, *, calib=None, compensate: str | None = None,
             reference=None, output_diffs: bool = True) -> Result:
    """Cut ``removed`` (group id -> atoms), verify, compensate, report. ``reference`` and
    ``output_diffs=False`` are for sequential steps: fit consumers to the dense model, and
    skip the three calibration passes that measure the compensated outputs."""
    from surgery.frontends.onnx_loader import concrete_input_shapes
    from surgery.passes.cut import apply_cut

    model = analysis.model
    shapes = concrete_input_shapes(model, input_shapes)
    params_before, flops_before = count_params(model), count_flops(model)
    t1 = time.perf_counter()
    plan = build_plan(analysis, removed)
    if verify_result or compensate:
        # verification runs from memory: relative external-data paths must not matter
        ir.external_data.load_to_model(model)
    original = ir.to_proto(model) if (verify_result or compensate) else None
    all_atoms = np.concatenate([a for a in removed.values()]) if removed else np.zeros(0, np.int64)
    removed_idx = analysis.removed_indices(all_atoms)
    comp = None
    if compensate:  # compensation: the original consumers' input statistics, before the cut
        from surgery.passes.compensate import prepare

        t1c = time.perf_counter()
        comp = prepare(analysis, removed_idx, calib, compensate, reference)
        t["compensate"] = time.perf_counter() - t1c
    apply_cut(analysis, removed_idx)
    t["emit"] = time.perf_counter() - t1
    inexact = sorted({g.inexact_reason for g in analysis.groups if g.id in removed and g.inexact_reason})
    result_v = VerifyResult(None, None, "not verified (--no-verify)")
    if verify_result:
        result_v = _verify_cut(model, original, plan, shapes, seed, inexact, t)
    # compensation: after verifying the uncompensated cut (report["verify"] is about the cut alone)
    comp_report, comp_diff = None, None
    if comp is not None:
        comp_report, comp_diff = _compensate(comp, model, original, calib, output_diffs, t)
    groups = analysis.groups
    report = {
        "params_before": params_before,
        "params_after": count_params(model),
        "flops_before": flops_before,
        "flops_after": count_flops(model),
        "groups_total": len(groups),
        "groups_prunable": sum(g.prunable for g in groups),
        "groups_pruned": len(plan.groups),
        "seconds": time.perf_counter() - t0,
        "verify": result_v.as_dict(),
        "timings": t,
        "inexact_groups": [g.name for g in groups if g.id in removed and g.inexact_reason],
        "pruned_by_kind": {k: sum(len(removed[g.id]) for g in groups if g.id in removed and g.kind == k)
                           for k in sorted({g.kind for g in groups})},
    }
    if calib is not None:  # calibration
        report["calibration"] = calib.summary()
    if comp_report is not None:
        report["compensation"] = comp_report
        if comp_diff is not None:
            report["compensated_output_diff"] = comp_diff
    return Result(model, plan, report, analysis)
