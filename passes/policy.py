"""Policy: turn per-unit scores into the units each group loses."""

from __future__ import annotations

import math

import numpy as np

from surgery.analysis import Group


def _round_keep(keep: int, n: int, unit: int, round_to: int) -> int:
    """The kept count nearest ``keep`` whose channel count is a multiple of round_to."""
    if round_to <= 1:
        return keep
    ok = [k for k in range(1, n + 1) if (k * unit) % round_to == 0]
    if not ok:
        return n
    return min(ok, key=lambda k: (abs(k - keep), -k))


def select(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    ratio: float | dict[int, float],
    *,
    global_rank: bool = False,
    round_to: int = 1,
    protected: set[int] = frozenset(),
) -> dict[int, np.ndarray]:
    """Group id -> removed atoms. ``ratio`` is the fraction of units removed per group
    (a float, or one per group id; or of all units, ranked together, with
    ``global_rank``); every group keeps >= 1."""
    per = ratio if isinstance(ratio, dict) else {g.id: ratio for g in groups}
    ratio = max(per.values(), default=0.0)
    cand: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in groups:
        if not g.prunable or per.get(g.id, 0.0) <= 0:
            continue
        mask = np.array([a not in protected for a in g.atoms], dtype=bool)
        if mask.sum() == 0:
            continue
        cand[g.id] = (g.atoms[mask], np.asarray(scores[g.id], dtype=np.float64)[mask])
    by_id = {g.id: g for g in groups}
    n_remove: dict[int, int] = {}
    if not global_rank:
        for gid, (atoms, _) in cand.items():
            n_remove[gid] = _cap(by_id[gid], len(atoms), math.floor(per[gid] * len(atoms) + 1e-9))
    else:
        pool = []
        for gid, (atoms, sc) in cand.items():
            norm = sc / (np.mean(sc) + 1e-12) if len(sc) else sc
            pool.extend((float(s), gid) for s in norm)
        pool.sort()
        budget = math.floor(ratio * len(pool) + 1e-9)
        taken: dict[int, int] = {gid: 0 for gid in cand}
        for s, gid in pool:
            if budget <= 0:
                break
            if taken[gid] < _cap(by_id[gid], len(cand[gid][0]), len(cand[gid][0])):
                taken[gid] += 1
                budget -= 1
        n_remove = taken
    out = {}
    for gid, k in n_remove.items():
        atoms, sc = cand[gid]
        g = by_id[gid]
        n = len(atoms)
        total = len(g.atoms) + len(g.blocked_atoms)
        fixed = total - n  # protected or blocked units stay whatever happens
        k = total - _round_keep(total - k, total, g.unit, round_to)
        k = max(0, min(k, n - (0 if fixed else 1)))
        if k <= 0:
            continue
        order = np.argsort(sc, kind="stable")
        out[gid] = np.sort(atoms[order[:k]])
    return out


def _cap(g: Group, n_free: int, want: int) -> int:
    """Never remove every unit of a group: something must still flow."""
    fixed = len(g.atoms) - n_free + len(g.blocked_atoms)
    return max(0, min(want, n_free - (0 if fixed else 1)))
