"""Sequential pruning (``surgery prune --sequential``, ``surgery.prune(..., sequential=True)``).

One-shot pruning scores every group, and fits every compensation, on the activations
of the *dense* model. Sequential pruning, as OBC and SparseGPT do, takes the prunable
groups one at a time in graph order (``Group.id`` order: the position of each group's
first weight) and, before deciding and compensating each one, re-collects its
statistics from the model in which every earlier group is already pruned (and
compensated): later layers are scored and re-fitted on the inputs they will see.

Compensation fits each consumer, on those inputs, to the **dense** model's output of the
same node (passes/compensate.py, ``Reference``), not to its own output: every layer also
corrects what the layers before it left. The dense model runs beside the pruned one.

**How many** units each group loses is decided once, on the dense model: the counts of a
one-shot prune with the same ratios (``floor(ratio x units)``, ``round_to``, per-kind
ratios), or, with ``global_rank``, of the one-shot global ranking (the criterion's
scores on the dense model, ranked per kind). The steps decide **which** units. Groups
are disjoint, so pruning one never changes another's unit count.

Each step analyzes the current (in-memory) model, collects the statistics of that one
group, scores it, cuts the chosen units, verifies the cut (mask-equivalence of the
uncompensated cut) and compensates, through the same code as a one-shot prune. The
model is loaded once; nothing is read from disk again. Group names are derived
from weight tensor names and stay the same across steps; a group whose name changed (a
group pruned to one unit stops being one, so a ``#2`` suffix or a grouped convolution's
``(groups of ...)`` label can go) is found again by its first weight axis, kind and unit
count.

The result:

- ``result.model``: the sequentially pruned (and compensated) model;
- ``result.plan``: a :class:`SequentialPlan` in the ORIGINAL model's tensor indices
  (each step's removed indices refer to the tensors after the earlier steps; they are
  mapped back through the indices still present), checked to be a set of whole units
  of the original model; ``plan.as_dict()`` has ``"sequential": true`` and
  ``"compensate"``. ``surgery apply`` of it reproduces the structure (the same
  initializer shapes), not compensated weights;
- ``result.report``: params/FLOPs before (original) and after (final),
  ``report["sequential"]`` (one entry per step: ``group`` (the original's name; plus
  ``name_in_step`` if it differed), ``kind``, ``units``, ``units_removed``, ``verify``,
  ``compensation`` (that step's applied/skipped consumers), ``params_after``,
  ``flops_after``, ``seconds``), ``report["verify"]`` (exact only if
  every step is exact, ``null`` if any step is not exact by construction or not
  verified, ``false`` if any step failed), ``report["compensate"]``; without
  compensation the composed plan is also verified against the original
  (``report["verify_composed"]``); with it, ``report["compensation"]`` gathers every
  step's applied/skipped consumers and ``uncompensated_output_diff`` is the plan
  replayed on the original without compensation, ``report["compensated_output_diff"]``
  the final model, both max |output diff| vs the original on the calibration data;
- ``result.analysis``: the analysis of the original model (the one the plan refers to).

An ``onnx_ir`` Model passed in is left as it is (a one-shot prune cuts it in place): the
steps work on a copy sharing its weight tensors (cuts and fits replace tensors, never
write into them).

Cost per step: an analysis of the current model, one calibration pass for the group's
statistics (data-aware criteria), with compensation one more for the fit (and the dense
model's run), and the verification.

Targets (``target_params``/``target_flops``) search the global ranking for a prefix that
meets a count; they are refused (give ratios, with ``global_rank`` to spread them).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from surgery import pipeline
from surgery.analysis import Analysis, Group, refuse_nonfinite
from surgery.errors import SurgeryError
from surgery.metrics import count_flops, count_params
from surgery.options import PruneOptions
from surgery.passes.criteria import get_criterion
from surgery.passes.policy import select, select_counts
from surgery.passes.targets import clone, cut_copy
from surgery.plan import Plan, build_plan


@dataclasses.dataclass
class SequentialPlan(Plan):
    """A plan made by sequential pruning: the structure, in the original model's indices."""

    compensate: str | None = None

    def as_dict(self) -> dict:
        d = super().as_dict()
        d["sequential"] = True
        d["compensate"] = self.compensate  # `surgery apply` reproduces the cut, not compensated weights
        return d


def prune_sequential(source, example_inputs=None, **options):
    """``surgery.prune`` one group at a time (see the module docstring); the same keyword
    arguments, with ``surgery.prune``'s defaults."""
    o = PruneOptions.from_kwargs("prune_sequential", **options)
    _check_options(source, example_inputs, o)
    crit = get_criterion(o.criterion)
    need, _ = pipeline.calibration_checks(crit, o.calib, o.compensate)

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    original, orig, ratios, user_protected = _load(source, o, timings)
    cal = None
    if o.calib is not None:  # read once (a generator too); every step streams the same samples
        from surgery.passes.stats import as_calibration

        cal = as_calibration(o.calib, original, samples=o.calib_samples, batch=o.calib_batch)
    counts = _allocate(orig, ratios, user_protected, o, crit, need, cal, timings)
    order = [g for g in orig.groups if counts.get(g.id, 0) > 0]
    if not order:  # nothing to do one group at a time: the one-shot prune says so
        res = pipeline.run_onnx(original, o)
        res.plan = SequentialPlan(res.plan.groups, compensate=o.compensate)
        res.report.update(sequential=[], compensate=o.compensate)
        return res

    run = _Steps(original, orig, o, crit, need, cal, timings)
    for g in order:
        run.step(g, counts[g.id])
    chosen, plan, replay = _composed_plan(run, order)
    verify_composed, comp_diffs = _final_check(run, chosen, plan, replay)
    report = _report(run, t0, chosen, plan, verify_composed, comp_diffs)
    return pipeline.Result(run.work, plan, report, orig)


def _check_options(source, example_inputs, o: PruneOptions) -> None:
    if pipeline.is_torch_module(source):
        raise SurgeryError("--sequential is for ONNX models; a PyTorch module is pruned in one shot")
    if example_inputs is not None or o.loss is not None:
        raise SurgeryError("example_inputs and loss are for PyTorch modules; an ONNX model declares its inputs")
    if o.target_params is not None or o.target_flops is not None:
        raise SurgeryError("--target-params/--target-flops search the global ranking on the dense model; "
                           "--sequential prunes one group at a time: give --ratio (and per-kind ratios), "
                           "with --global to spread them over the layers")


def _load(source, o: PruneOptions, timings: dict) -> tuple[ir.Model, Analysis, dict[int, float], dict]:
    """The original model (loaded once, weights in memory when needed), its analysis, the
    ratio of every group and the atoms the user protects."""
    t0 = time.perf_counter()
    original = source if isinstance(source, ir.Model) else pipeline.load(source, input_shapes=o.input_shapes)
    if o.verify_result or o.compensate:
        ir.external_data.load_to_model(original)  # verification and compensation run from memory
    timings["load"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    orig = Analysis(original)  # names every node; the working copy shares the names
    refuse_nonfinite(orig)
    by_kind = pipeline.kind_ratios(orig, 0.5 if o.ratio is None else o.ratio, o.head_ratio, o.mlp_ratio, o.hidden_ratio,
                                   o.head_dim_ratio, o.gqa)
    ratios = {g.id: by_kind[g.kind] for g in orig.groups}
    user_protected = pipeline.protected_atoms(orig, o.keep)
    timings["analysis"] = time.perf_counter() - t1
    return original, orig, ratios, user_protected


def _allocate(orig: Analysis, ratios: dict, user_protected, o: PruneOptions, crit, need, cal,
              timings: dict) -> dict[int, int]:
    """How many units each group loses: decided once, on the dense model."""
    t1 = time.perf_counter()
    prunable = [g for g in orig.groups if g.prunable]
    if o.global_rank:  # ranked together per kind, with the criterion's scores on the dense model
        scores = pipeline.score_groups(orig, prunable, crit, need, cal, o.seed, timings)
        comparable = getattr(crit, "scores_comparable", False)
    else:  # the counts of a one-shot prune with the same ratios
        scores = {g.id: np.zeros(len(g.atoms)) for g in prunable}
        comparable = False
    counts = {gid: len(a) for gid, a in select(orig.groups, scores, ratios, global_rank=o.global_rank,
                                               round_to=o.round_to, protected=user_protected,
                                               comparable=comparable).items()}
    timings["allocate"] = time.perf_counter() - t1
    return counts


class _Steps:
    """The loop's state: the working model and, in the original's indices, what is gone."""

    def __init__(self, original: ir.Model, orig: Analysis, o: PruneOptions, crit, need, cal, timings: dict) -> None:
        self.original, self.orig, self.o = original, orig, o
        self.crit, self.need, self.cal, self.timings = crit, need, cal, timings
        self.work = clone(original)  # shares the weight tensors; every cut and fit replaces them, never writes into them
        self.orig_inits = original.graph.initializers
        self.present: dict[tuple[str, int], np.ndarray] = {}  # (tensor, axis) -> original indices still there
        self.removed_orig: dict[tuple[str, int], set[int]] = {}  # (tensor, axis) -> every index removed, original indices
        self.reference = None
        if o.compensate:  # every consumer is fitted back to the dense model's output (passes/compensate.py)
            from surgery.passes.compensate import Reference

            self.reference = Reference(orig, self.present)
        self.done: dict[int, int] = {}  # original group id -> units its step removed
        self.steps: list[dict] = []
        self.applied: list[dict] = []
        self.skipped: list[dict] = []

    def step(self, g: Group, count: int) -> None:
        """Analyze the current model, score group g on it, cut ``count`` units, compensate."""
        o, timings = self.o, self.timings
        ts = time.perf_counter()
        t1 = time.perf_counter()
        cur = Analysis(self.work)
        cg = _find(cur, g, self.orig)
        timings["analysis"] += time.perf_counter() - t1
        t_step: dict[str, float] = {}
        # this group's scores, from its statistics on the model as pruned so far
        scores = pipeline.score_groups(cur, [cg], self.crit, self.need, self.cal, o.seed, t_step)
        t1 = time.perf_counter()
        removed = select_counts(cur.groups, scores, {cg.id: count}, round_to=o.round_to,
                                protected=pipeline.protected_atoms(cur, o.keep))
        t_step["plan"] = time.perf_counter() - t1
        res = pipeline.execute(cur, removed, t_step, ts, o.seed, o.input_shapes, o.verify_result,
                               calib=self.cal if (self.need or o.compensate) else None, compensate=o.compensate,
                               reference=self.reference, output_diffs=False)
        for k, v in t_step.items():
            timings[k] = timings.get(k, 0.0) + v
        pg = res.plan.groups
        if len(pg) > 1 or (pg and pg[0].name != cg.name):
            raise SurgeryError(f"internal error: the sequential step for group '{g.name}' pruned "
                               f"{', '.join(p.name for p in pg)}")
        n_removed = len(pg[0].removed_units) if pg else 0
        if pg:
            _compose(pg[0], self.orig_inits, self.work, self.present, self.removed_orig)
            self.done[g.id] = n_removed
        self._record(g, cg, n_removed, res.report, ts)

    def _record(self, g: Group, cg: Group, n_removed: int, rep: dict, ts: float) -> None:
        comp = rep.get("compensation")
        if comp is not None:
            self.applied += [dict(a, step=len(self.steps), group=g.name) for a in comp["applied"]]
            self.skipped += [dict(s, step=len(self.steps), group=g.name) for s in comp["skipped"]]
        self.steps.append({
            "group": g.name,
            **({"name_in_step": cg.name} if cg.name != g.name else {}),
            "kind": g.kind,
            "units": int(len(cg.atoms) + len(cg.blocked_atoms)),
            "units_removed": n_removed,
            "verify": rep["verify"],
            "compensation": comp,
            "params_after": rep["params_after"],
            "flops_after": rep["flops_after"],
            "seconds": time.perf_counter() - ts,
        })


def _composed_plan(run: _Steps, order: list[Group]) -> tuple[dict[int, np.ndarray], SequentialPlan, ir.Model]:
    """The plan, in the original model's indices, checked to be whole units of it, and the
    plan replayed on the original (no compensation), checked to have the final structure."""
    orig, removed_orig = run.orig, run.removed_orig
    t1 = time.perf_counter()
    chosen = _units_removed(orig, [g for g in order if g.id in run.done], removed_orig)
    for gid, n in run.done.items():
        if len(chosen.get(gid, ())) != n:
            name = orig.groups[gid].name
            raise SurgeryError(f"internal error: group '{name}' lost {n} units in its step, but "
                               f"{len(chosen.get(gid, ()))} of the original's are gone")
    chosen = {gid: a for gid, a in chosen.items() if len(a)}
    base = build_plan(orig, chosen)
    listed = {(t, a): set(idx.tolist()) for t, cuts in base.tensor_cuts().items() for a, idx in cuts}
    if listed != {k: v for k, v in removed_orig.items() if v}:
        bad = next(k for k in sorted(set(listed) | set(removed_orig))
                   if listed.get(k, set()) != removed_orig.get(k, set()))
        raise SurgeryError(f"internal error: the sequential cuts of '{bad[0]}' axis {bad[1]} are not those of "
                           f"whole units of the original model")
    plan = SequentialPlan(base.groups, compensate=run.o.compensate)
    replay = cut_copy(orig, chosen)
    _same_structure(replay, run.work, run.orig_inits)
    run.timings["compose"] = time.perf_counter() - t1
    return chosen, plan, replay


def _final_check(run: _Steps, chosen: dict, plan: SequentialPlan, replay: ir.Model):
    """(the composed plan verified against the original, without compensation;
    (uncompensated, compensated) output diffs, with it): either may be None."""
    o, original = run.o, run.original
    verify_composed = None
    comp_diffs = None
    if not ((o.verify_result or o.compensate) and plan.groups):
        return verify_composed, comp_diffs
    t1 = time.perf_counter()
    original_proto = ir.to_proto(original)
    if o.compensate is None and o.verify_result:
        # the whole sequence against the original, masked by the composed plan
        from surgery.frontends.onnx_loader import concrete_input_shapes
        from surgery.verify import random_feeds, verify

        inexact = sorted({g.inexact_reason for g in run.orig.groups if g.id in chosen and g.inexact_reason})
        feeds = random_feeds(original, concrete_input_shapes(original, o.input_shapes), o.seed)
        verify_composed = verify(original_proto, ir.to_proto(run.work), plan.tensor_cuts(), feeds,
                                 "; ".join(inexact) or None).as_dict()
    if o.compensate is not None:
        from surgery.passes.compensate import output_diffs

        comp_diffs = output_diffs(original_proto, [ir.to_proto(replay), ir.to_proto(run.work)], run.cal)
    run.timings["final_check"] = time.perf_counter() - t1
    return verify_composed, comp_diffs


def _report(run: _Steps, t0: float, chosen: dict, plan: SequentialPlan, verify_composed, comp_diffs) -> dict:
    groups, steps = run.orig.groups, run.steps
    report = {
        "params_before": count_params(run.original),
        "params_after": count_params(run.work),
        "flops_before": count_flops(run.original),
        "flops_after": count_flops(run.work),
        "groups_total": len(groups),
        "groups_prunable": sum(g.prunable for g in groups),
        "groups_pruned": len(plan.groups),
        "seconds": time.perf_counter() - t0,
        "verify": _aggregate([s["verify"] for s in steps] + ([verify_composed] if verify_composed else []),
                             len(steps)),
        "timings": run.timings,
        "inexact_groups": [g.name for g in groups if g.id in chosen and g.inexact_reason],
        "pruned_by_kind": {k: sum(len(chosen[g.id]) for g in groups if g.id in chosen and g.kind == k)
                           for k in sorted({g.kind for g in groups})},
        "sequential": steps,
        "compensate": run.o.compensate,
    }
    if verify_composed is not None:
        report["verify_composed"] = verify_composed
    if run.cal is not None:
        report["calibration"] = run.cal.summary()
    if comp_diffs is not None:
        report["compensation"] = {"mode": run.o.compensate, "applied": run.applied, "skipped": run.skipped,
                                  "uncompensated_output_diff": comp_diffs[0]}
        report["compensated_output_diff"] = comp_diffs[1]
    return report


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _first_weight(analysis: Analysis, g: Group) -> tuple[str, int]:
    """(tensor, axis) of the weight axis a group is named after (its first matrix or kernel)."""
    inits = analysis.model.graph.initializers
    keys = {a: analysis.dims.axes[a].key for a in g.weight_axes}
    mats = [a for a in g.weight_axes if len(inits[keys[a][1]].const_value.shape) >= 2]
    _, name, k = keys[min(mats or g.weight_axes)]
    return name, int(k)


def _find(cur: Analysis, g: Group, orig: Analysis) -> Group:
    """The group of the current (partly pruned) model that is the original group ``g``: by
    name, checked by its first weight axis, kind and unit count; else by those alone (a
    group pruned to one unit stops being a group, so a ``#2`` suffix or a grouped conv's
    ``(groups of ...)`` label can go; the unit size can change, the unit count cannot)."""
    sig = _signature(orig, g)
    named = [h for h in cur.groups if h.name == g.name and _signature(cur, h) == sig]
    if named:
        return named[0]
    hits = [h for h in cur.groups if _signature(cur, h) == sig]
    if len(hits) != 1:
        raise SurgeryError(f"internal error: group '{g.name}' of the original model is "
                           f"{'ambiguous' if hits else 'not found'} after pruning the groups before it")
    return hits[0]


def _signature(analysis: Analysis, g: Group) -> tuple:
    return _first_weight(analysis, g), g.kind, len(g.atoms) + len(g.blocked_atoms)


def _compose(pg, orig_inits, work: ir.Model, present: dict, removed_orig: dict) -> None:
    """Map one step's removed indices (in the current tensors) to the original's."""
    inits = work.graph.initializers
    for t in pg.tensors:
        tensor, axis = t["tensor"], int(t["axis"])
        if tensor not in orig_inits:
            continue  # made by compensation (a new bias): the original has nothing to cut there
        key = (tensor, axis)
        have = present.get(key)
        if have is None:
            have = np.arange(orig_inits[tensor].const_value.shape[axis], dtype=np.int64)
        idx = np.asarray(t["removed"], dtype=np.int64)
        if len(idx) and idx.max() >= len(have):
            raise SurgeryError(f"internal error: step cut of '{tensor}' axis {axis} is out of range")
        removed_orig.setdefault(key, set()).update(have[idx].tolist())
        present[key] = np.delete(have, idx)
        now = inits.get(tensor)
        if now is None or now.const_value.shape[axis] != len(present[key]):
            raise SurgeryError(f"internal error: '{tensor}' axis {axis} lost track of its original indices")


def _units_removed(orig: Analysis, groups: list[Group], removed_orig: dict) -> dict[int, np.ndarray]:
    """Group id -> the original model's units whose every weight slice is gone.

    Read off the union of all steps' cuts, not group by group: where two groups cut one
    axis (attention heads and the channels inside every head), a later step removes a
    head_dim unit only from the heads still there, and an earlier step took the rest."""
    inits = orig.model.graph.initializers
    out = {}
    for g in groups:
        pick = []
        for atom in g.atoms.tolist():
            covered = False
            for aid, idx in orig.footprint(atom).items():
                kind, name, k = orig.dims.axes[aid].key
                if kind != "value" or name not in inits:
                    continue
                gone = removed_orig.get((name, int(k)))
                covered = gone is not None and set(idx.tolist()) <= gone
                if not covered:
                    break
            if covered:
                pick.append(atom)
        out[g.id] = np.array(pick, dtype=np.int64)
    return out


def _same_structure(replay: ir.Model, final: ir.Model, weights) -> None:
    """The original's weights have the same shapes in both (shape constants the cut rewrites
    are named per cut, and compensation may add biases: not compared)."""
    a, b = replay.graph.initializers, final.graph.initializers
    for name in weights:
        if name not in a and name not in b:
            continue  # a constant the cut replaced in both
        if name not in a or name not in b:
            raise SurgeryError(f"internal error: weight '{name}' is missing after the sequential cut or its replay")
        sa, sb = tuple(a[name].const_value.shape), tuple(b[name].const_value.shape)
        if sa != sb:
            raise SurgeryError(f"internal error: the composed plan gives '{name}' shape {sa}, "
                               f"the sequential result {sb}")


def _aggregate(results: list[dict], n_steps: int) -> dict:
    """Exact only if every check is; null if any is not exact by construction or not verified."""
    exacts = [r["exact"] for r in results]
    diffs = [r["max_abs_diff"] for r in results if r["max_abs_diff"] is not None]
    exact = False if any(e is False for e in exacts) else (None if any(e is None for e in exacts) else True)
    whys = list(dict.fromkeys(r["why"] for r in results if r["exact"] is not True))
    if exact is True:
        why = f"{n_steps} sequential steps, each mask-equivalent" + (
            "; the composed plan too" if len(results) > n_steps else "")
    else:
        why = "; ".join(whys) or "not verified"
    return {"max_abs_diff": max(diffs) if diffs else None, "exact": exact, "why": why}
