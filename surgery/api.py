"""The Python API: load, analyze, prune, apply a plan, save."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from surgery.analysis import Analysis
from surgery.errors import SurgeryError
from surgery.metrics import count_flops, count_params
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


def _protected(analysis: Analysis, keep: Iterable[str]) -> set[int]:
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


def prune(
    source,
    *,
    ratio: float = 0.5,
    criterion: str = "l2",
    global_rank: bool = False,
    round_to: int = 1,
    keep: Iterable[str] = (),
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    verify_result: bool = True,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    head_dim_ratio: float = 0.0,
    gqa: str = "kv",
) -> Result:
    """Remove ``ratio`` of the units of every prunable group (channels, heads, ...), lowest
    ``criterion`` score first. ``ratio`` counts units, not parameters.

    Per kind of group: ``head_ratio`` (attention heads; default ``ratio``), ``mlp_ratio``
    (units between two linear layers; default ``ratio``), ``hidden_ratio`` (the residual
    stream, inexact; default ``ratio``), ``head_dim_ratio`` (channels inside every head;
    default 0). ``gqa="kv"`` removes whole key/value heads with the query heads that
    share them; ``gqa="query"`` removes query heads evenly from every key/value group."""
    from surgery.passes.criteria import CriterionContext, get_criterion
    from surgery.passes.policy import select

    for flag, r in (("ratio", ratio), ("head-ratio", head_ratio), ("mlp-ratio", mlp_ratio),
                    ("hidden-ratio", hidden_ratio), ("head-dim-ratio", head_dim_ratio)):
        if r is not None and not (isinstance(r, (int, float)) and 0 <= r < 1):
            raise SurgeryError(f"--{flag} must be in [0, 1), got {r}")
    if gqa not in ("kv", "query"):
        raise SurgeryError(f"--gqa must be 'kv' or 'query', got {gqa!r}")
    if round_to < 1:
        raise SurgeryError(f"--round-to must be >= 1, got {round_to}")
    crit = get_criterion(criterion)
    analysis, t, t0 = _load_and_analyze(source, input_shapes)
    t1 = time.perf_counter()
    protected = _protected(analysis, keep)
    ctx = CriterionContext(rng=np.random.default_rng(seed))
    scores = {g.id: crit(g, ctx) for g in analysis.groups if g.prunable}
    head = ratio if head_ratio is None else head_ratio
    # multi-query attention has one key/value head: only its query heads can go
    kv_mode = gqa == "kv" and any(g.kind == "kv_heads" and g.prunable for g in analysis.groups)
    by_kind = {
        "heads": head, "kv_heads": head if kv_mode else 0.0, "q_per_kv": 0.0 if kv_mode else head,
        "head_dim": head_dim_ratio, "mlp": ratio if mlp_ratio is None else mlp_ratio,
        "hidden": ratio if hidden_ratio is None else hidden_ratio, "channel": ratio,
    }
    ratios = {g.id: by_kind[g.kind] for g in analysis.groups}
    removed = select(analysis.groups, scores, ratios, global_rank=global_rank, round_to=round_to, protected=protected)
    t["plan"] = time.perf_counter() - t1
    return _execute(analysis, removed, t, t0, seed, input_shapes, verify_result)


def apply(source, plan, *, seed: int = 0, input_shapes=None, verify_result: bool = True) -> Result:
    """Replay a saved (possibly hand-edited) plan on a model."""
    data = read_plan(plan)
    analysis, t, t0 = _load_and_analyze(source, input_shapes)
    t1 = time.perf_counter()
    removed = atoms_from_plan(analysis, data)
    t["plan"] = time.perf_counter() - t1
    return _execute(analysis, removed, t, t0, seed, input_shapes, verify_result)


def _load_and_analyze(source, input_shapes) -> tuple[Analysis, dict, float]:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model = source if isinstance(source, ir.Model) else load(source, input_shapes=input_shapes)
    t["load"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    analysis = Analysis(model)
    t["analysis"] = time.perf_counter() - t1
    return analysis, t, t0


def _execute(analysis: Analysis, removed: dict[int, np.ndarray], t: dict, t0: float, seed: int,
             input_shapes, verify_result: bool) -> Result:
    from surgery.frontends.onnx_loader import concrete_input_shapes
    from surgery.passes.cut import apply_cut

    model = analysis.model
    shapes = concrete_input_shapes(model, input_shapes)
    params_before, flops_before = count_params(model), count_flops(model)
    t1 = time.perf_counter()
    plan = build_plan(analysis, removed)
    if verify_result:
        # verification runs from memory: relative external-data paths must not matter
        ir.external_data.load_to_model(model)
    original = ir.to_proto(model) if verify_result else None
    all_atoms = np.concatenate([a for a in removed.values()]) if removed else np.zeros(0, np.int64)
    apply_cut(analysis, analysis.removed_indices(all_atoms))
    t["emit"] = time.perf_counter() - t1
    inexact = sorted({g.inexact_reason for g in analysis.groups if g.id in removed and g.inexact_reason})
    result_v = VerifyResult(None, None, "not verified (--no-verify)")
    if verify_result:
        t1 = time.perf_counter()
        pruned = ir.to_proto(model)
        try:
            onnx.checker.check_model(pruned)
        except onnx.checker.ValidationError as e:
            raise SurgeryError(f"internal error: the pruned model fails onnx.checker: {str(e).splitlines()[0]}") from e
        feeds = random_feeds(model, shapes, seed)
        result_v = verify(original, pruned, plan.tensor_cuts(), feeds, "; ".join(inexact) or None)
        t["verify"] = time.perf_counter() - t1
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
    return Result(model, plan, report, analysis)
