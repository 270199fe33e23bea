"""Targets: remove units until the kept parameters (or FLOPs) reach a fraction of the model's.

``surgery prune --target-params 0.5`` (or ``--target-flops``) ranks the units of all
groups together, as ``--global`` does (scores normalized by their group's mean), and
removes them lowest first, stopping at the first one after which the kept count is at
most the target. Finding that point without cutting the model takes three steps:

1. **Estimate** (first order, one sparse product). A count is a sum of *terms*, each
   a product of axis sizes: a float initializer of shape S has prod(S) entries; a
   Conv/MatMul/Gemm costs 2 x MACs = 2 x prod(output) x prod(weight[1:]) (or x K),
   as in surgery/metrics.py. Removing index i of a term's axis removes term/size of
   it, so every element of that axis gets the value term/size, and
   ``Analysis.atom_sums`` gives every unit its cost. Summing unit costs counts twice
   what two removed units share: the entry of a conv weight whose output channel goes
   with one group and its input channel with another, or an element of a product axis
   (hidden = heads x head_dim) both factors remove. So the estimate over-states what a
   removal saves, and under-states what is kept; it is an upper bound of every unit's
   real saving, whatever else is removed (this is what "one unit's worth" means).
2. **Exact count** from the removed indices: kept = sum over terms of the product of
   (size - removed along that axis). This has no double counting; it is monotone in the
   number of units removed, so a bisection started at the estimate's stopping point
   finds the first prefix at or under the target in O(log n) counts.
3. **Final check**: cut a copy of the model and count it with surgery/metrics.py. If
   that differs from step 2 by more than one unit per pruned group, or misses a target
   step 2 says is met, the bisection is redone on cut-and-counted copies (slow, and not
   expected to happen: it would mean a size the cut rewrites that the terms do not see;
   on every corpus model the two counts are equal).

``info`` (``report["target"]`` in the API) carries the first-order estimate, the exact
count and the check, as fractions of the model's count.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable

import numpy as np
import onnx_ir as ir

from surgery.errors import SurgeryError
from surgery.passes.rules import flop_terms

KINDS = ("params", "flops")
_LABEL = {"params": "parameters", "flops": "FLOPs"}


# --------------------------------------------------------------------------
# what is counted: terms
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Terms:
    """A count as a sum of products: ``sum_t coef[t] * prod_j kept[axes[t, j]]``."""

    coef: np.ndarray  # int64, per term: product of the sizes no cut can change
    axes: np.ndarray  # int64, terms x width; padded with the sentinel len(sizes)
    sizes: np.ndarray  # int64, per axis id of the dim graph: its static size
    elem_axis: np.ndarray  # int64, per element: its axis id

    @property
    def total(self) -> int:
        return self.kept(np.zeros(len(self.sizes), dtype=np.int64))

    def kept(self, removed_per_axis: np.ndarray) -> int:
        k = np.append(self.sizes - removed_per_axis, 1)
        return int((self.coef * np.prod(k[self.axes], axis=1)).sum()) if len(self.coef) else 0

    def kept_after(self, analysis, removed: dict[int, np.ndarray]) -> int:
        atoms = [a for a in removed.values() if len(a)]
        if not atoms:
            return self.total
        mask = analysis.coupling.removed_elements(np.concatenate(atoms))
        counts = np.bincount(self.elem_axis[mask], minlength=len(self.sizes))
        return self.kept(counts[: len(self.sizes)])

    def unit_costs(self, analysis) -> np.ndarray:
        """Per atom, first order: what removing it alone saves (see the module docs)."""
        vec = np.zeros(analysis.dims.n_elements, dtype=np.float64)
        s = np.append(self.sizes, 1).astype(np.float64)
        full = self.coef.astype(np.float64) * np.prod(s[self.axes], axis=1)
        for t in range(len(self.coef)):
            for a in self.axes[t]:
                if a == len(self.sizes) or self.sizes[a] <= 0:
                    continue
                ax = analysis.dims.axes[a]
                vec[ax.offset : ax.offset + ax.size] += full[t] / self.sizes[a]
        return np.asarray(analysis.atom_sums(vec), dtype=np.float64).ravel()


def terms(analysis, kind: str) -> Terms:
    """The params or FLOPs of ``analysis.model`` as terms over the dim graph's axes."""
    cache = analysis.derived.setdefault("target_terms", {})
    if kind in cache:
        return cache[kind]
    dims = analysis.dims
    n_axes = len(dims.axes)
    sizes = np.array([max(ax.size, 0) for ax in dims.axes], dtype=np.int64)
    elem_axis = np.full(dims.n_elements, n_axes, dtype=np.int64)
    for i, ax in enumerate(dims.axes):
        if ax.offset >= 0:
            elem_axis[ax.offset : ax.offset + ax.size] = i
    rows: list[tuple[int, list[int]]] = []

    def factor(v: ir.Value, keep_axes) -> tuple[int, list[int]] | None:
        """(coef, tracked axis ids) of prod(v.shape[k] for k in keep_axes); symbolic dims count 1."""
        if v is None or v.shape is None:
            return None
        coef, ids = 1, []
        for k in keep_axes:
            d = v.shape[k]
            if not isinstance(d, int):
                continue
            a = dims.find(("value", v.name, k))
            if a is not None and dims.axes[a].offset >= 0 and dims.axes[a].size == d:
                ids.append(a)
            else:
                coef *= d
        return coef, ids

    def add(coef: int, *parts) -> None:
        if any(p is None for p in parts):
            return
        ids: list[int] = []
        for c, i in parts:
            coef *= c
            ids += i
        rows.append((coef, ids))

    if kind == "params":
        for v in analysis.model.graph.initializers.values():
            t = v.const_value
            if t is None or not t.dtype.is_floating_point():
                continue
            add(1, factor(v, range(len(t.shape))))
    elif kind == "flops":  # the formulas surgery.metrics.count_flops sums (passes/rules)
        for node in analysis.model.graph:
            for coef, parts in flop_terms(node):
                add(coef, *(factor(v, axes) for v, axes in parts))
    else:
        raise SurgeryError(f"target kind must be one of {KINDS}, got {kind!r}")
    total = sum(c * math.prod(int(sizes[a]) for a in ids) for c, ids in rows)  # python ints
    if total >= 2**63:  # every count below is int64: one past it would wrap silently
        raise SurgeryError(f"the model's {_LABEL[kind]} ({total}, from its declared sizes) are too many to "
                           f"search a target in; use --ratio")
    width = max((len(i) for _, i in rows), default=0)
    axes = np.full((len(rows), max(width, 1)), n_axes, dtype=np.int64)
    for t, (_, ids) in enumerate(rows):
        axes[t, : len(ids)] = ids
    out = Terms(np.array([c for c, _ in rows], dtype=np.int64), axes, sizes, elem_axis)
    cache[kind] = out
    return out


# --------------------------------------------------------------------------
# ground truth: cut a copy and count it
# --------------------------------------------------------------------------


def cut_copy(analysis, removed: dict[int, np.ndarray]) -> ir.Model:
    """A pruned copy of ``analysis.model`` (which is left as it is)."""
    from surgery.passes.cut import apply_cut

    copy = clone(analysis.model)
    atoms = [a for a in removed.values() if len(a)]
    if atoms:
        # the cut reads only the model and the dim graph, keyed by names the copy shares
        apply_cut(types.SimpleNamespace(model=copy, dims=analysis.dims),
                  analysis.removed_indices(np.concatenate(atoms)))
    return copy


def clone(model: ir.Model) -> ir.Model:
    """A copy of the graph sharing the weight tensors (the cut replaces them, never writes
    into them), so external data stays where it is and nothing is duplicated."""
    if hasattr(model, "clone"):  # onnx_ir >= 0.1.14
        return model.clone()
    copy = ir.from_proto(ir.to_proto(model))
    for name, v in copy.graph.initializers.items():
        v.const_value = model.graph.initializers[name].const_value
    return copy


def count(model: ir.Model, kind: str) -> int:
    from surgery.metrics import count_flops, count_params

    return count_params(model) if kind == "params" else count_flops(model)


# --------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------


def _first_at_most(f: Callable[[int], int], goal: float, start: int, n: int) -> int:
    """Smallest m in [0, n] with f(m) <= goal (f non-increasing, f(n) <= goal), starting near ``start``."""
    start = min(max(start, 0), n)
    if f(start) <= goal:  # gallop down to a prefix above the goal
        hi, step = start, 1
        lo = hi - step
        while lo >= 0 and f(lo) <= goal:
            hi, step = lo, step * 2
            lo = hi - step
        lo = max(lo, -1)  # f(-1) counts as above the goal
    else:  # gallop up to a prefix at or under it
        lo, step = start, 1
        hi = lo + step
        while hi < n and f(hi) > goal:
            lo, step = hi, step * 2
            hi = lo + step
        hi = min(hi, n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return hi


def search(
    analysis,
    kind: str,
    wanted: float,
    order: list[int],
    cand: dict[int, tuple[np.ndarray, np.ndarray]],
    removal: Callable[[int], dict[int, np.ndarray]],
    *,
    check: bool = True,
    info: dict | None = None,
) -> dict[int, np.ndarray]:
    """The removal of the shortest prefix of ``order`` (one group id per unit, global
    ranking) whose kept ``kind`` is at most ``wanted`` x the model's; all of it when the
    target cannot be reached. ``removal(m)`` turns a prefix length into removed atoms."""
    if kind not in KINDS:
        raise SurgeryError(f"target kind must be one of {KINDS}, got {kind!r}")
    T = terms(analysis, kind)
    total = T.total
    goal = wanted * total
    n = len(order)

    # 1. first-order estimate: unit costs summed along the order
    costs, est_kept = _estimated_kept(analysis, T, order, cand)
    m_est = int(np.searchsorted(-est_kept, -goal, side="left"))  # first prefix with est_kept <= goal
    m_est = min(m_est, n)

    # 2. exact count from the removed indices
    memo: dict[int, int] = {}

    def exact(m: int) -> int:
        if m < 0:
            return total + 1
        if m not in memo:
            memo[m] = T.kept_after(analysis, removal(m))
        return memo[m]

    reachable = exact(n) <= goal
    m = _first_at_most(exact, goal, m_est, n) if reachable else n
    removed = removal(m)
    exact_kept = exact(m)

    # 3. final check: cut a copy and count it
    checked = None
    note = None
    if check and total:
        base = count(analysis.model, kind)
        checked = count(cut_copy(analysis, removed), kind)
        unit = max((costs[a].max() for a in removed.values() if len(a)), default=0.0)
        tol = unit * max(1, len(removed))
        if base != total or abs(checked - exact_kept) > tol or (reachable and checked > wanted * base):
            note = (f"exact count off by {checked - exact_kept:+,} (model {base:,} vs terms {total:,}); "
                    "target re-searched on cut copies")
            reachable, m, checked = _search_cut_copies(analysis, kind, wanted * base, base, m, n, removal)
            removed = removal(m)
            total, exact_kept = base, exact(m)

    if info is not None:
        info.update(_search_info(kind, wanted, reachable, removed, n, est_kept[m], exact_kept, checked, total, costs,
                                 note))
    return removed


def _estimated_kept(analysis, T: Terms, order: list[int], cand: dict) -> tuple[np.ndarray, np.ndarray]:
    """(cost of every atom, the kept count estimated per prefix length 0..n): unit costs
    summed along the order, each group's units taken lowest score first."""
    costs = T.unit_costs(analysis)
    sorted_atoms = {gid: atoms[np.argsort(sc, kind="stable")] for gid, (atoms, sc) in cand.items()}
    nth = {gid: 0 for gid in cand}
    step_cost = np.zeros(len(order))
    for i, gid in enumerate(order):
        step_cost[i] = costs[sorted_atoms[gid][nth[gid]]]
        nth[gid] += 1
    return costs, T.total - np.concatenate([[0.0], np.cumsum(step_cost)])


def _search_cut_copies(analysis, kind: str, goal: float, base: int, m: int, n: int,
                       removal: Callable[[int], dict[int, np.ndarray]]) -> tuple[bool, int, int]:
    """The search again, counting cut copies (when the terms disagree with the model):
    (reachable, prefix length, its count)."""
    memo_cut: dict[int, int] = {}

    def cut_kept(mm: int) -> int:
        if mm < 0:
            return base + 1
        if mm not in memo_cut:
            memo_cut[mm] = count(cut_copy(analysis, removal(mm)), kind)
        return memo_cut[mm]

    reachable = cut_kept(n) <= goal
    m = _first_at_most(cut_kept, goal, m, n) if reachable else n
    return reachable, m, cut_kept(m)


def _search_info(kind, wanted, reachable, removed, n, est_kept_m, exact_kept, checked, total, costs, note) -> dict:
    """What ``search`` reports in its ``info``."""
    info = {
        "kind": kind,
        "wanted": float(wanted),
        "reachable": bool(reachable),
        "units_removed": int(sum(len(a) for a in removed.values())),
        "units_available": n,
        "estimated": float(est_kept_m / total) if total else 1.0,
        "exact": float(exact_kept / total) if total else 1.0,
        "checked": float(checked / total) if checked is not None and total else None,
        "unit_max": float(max((costs[a].max() for a in removed.values() if len(a)), default=0.0) / total)
        if total else 0.0,
    }
    if not reachable:
        note = "; ".join(filter(None, [note, "not reachable: every unit that may go is gone (each group keeps "
                                       "one, protected and blocked units stay)"]))
    if note:
        info["note"] = note
    return info


# --------------------------------------------------------------------------
# the API side: --target-params / --target-flops
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    kind: str
    wanted: float
    info: dict = dataclasses.field(default_factory=dict)


def parse(ratio: float | None, target_params: float | None, target_flops: float | None) -> Target | None:
    """The target asked for, if any; a SurgeryError when it conflicts with a ratio or is out of range."""
    given = [(k, v) for k, v in (("params", target_params), ("flops", target_flops)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise SurgeryError("--target-params and --target-flops are mutually exclusive: give one")
    kind, wanted = given[0]
    if ratio:
        raise SurgeryError(f"--target-{kind} and --ratio are mutually exclusive (got --ratio {ratio}): "
                           "a target chooses how many units go")
    if isinstance(wanted, bool) or not isinstance(wanted, (int, float)) or not 0 < wanted <= 1:
        raise SurgeryError(f"--target-{kind} is the fraction of {_LABEL[kind]} KEPT, in (0, 1]; got {wanted}")
    return Target(kind, float(wanted))


def finish(result, target: Target | None):
    """Add ``report["target"]`` (``reached`` counted on the pruned model) and return ``result``."""
    if target is None:
        return result
    rep = result.report
    before, after = rep[f"{target.kind}_before"], rep[f"{target.kind}_after"]
    info = dict(target.info)
    info["reached"] = after / before if before else 1.0
    rep["target"] = {"kind": target.kind, "wanted": target.wanted, "reached": info.pop("reached"), **{
        k: v for k, v in info.items() if k not in ("kind", "wanted")}}
    return result
