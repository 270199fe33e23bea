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


def _candidates(groups: list[Group], scores: dict[int, np.ndarray], per: dict[int, float],
                protected: set[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Group id -> (its unprotected units, their scores), for every prunable group asked for."""
    cand: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in groups:
        if not g.prunable or per.get(g.id, 0.0) <= 0:
            continue
        mask = np.array([a not in protected for a in g.atoms], dtype=bool)
        if mask.sum() == 0:
            continue
        cand[g.id] = (g.atoms[mask], np.asarray(scores[g.id], dtype=np.float64)[mask])
    return cand


def _global_order(cand: dict[int, tuple[np.ndarray, np.ndarray]], by_id: dict[int, Group],
                  comparable: bool = False) -> list[int]:
    """The global ranking: scores normalized by their group's mean (unless the criterion
    already makes them comparable across groups, as lamp and flap do), all units sorted
    together, lowest first; one entry (the group id) per unit taken, never a group's last."""
    pool = []
    for gid, (atoms, sc) in cand.items():
        norm = sc if comparable else (sc / (np.mean(sc) + 1e-12) if len(sc) else sc)
        pool.extend((float(s), gid) for s in norm)
    pool.sort()
    taken: dict[int, int] = {gid: 0 for gid in cand}
    caps = {gid: _cap(by_id[gid], len(cand[gid][0]), len(cand[gid][0])) for gid in cand}
    order = []
    for _, gid in pool:
        if taken[gid] < caps[gid]:
            taken[gid] += 1
            order.append(gid)
    return order


def _finalize(cand: dict[int, tuple[np.ndarray, np.ndarray]], by_id: dict[int, Group],
              n_remove: dict[int, int], round_to: int) -> dict[int, np.ndarray]:
    """Counts per group -> the removed atoms: rounded to --round-to, never all, lowest first."""
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


def select(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    ratio: float | dict[int, float],
    *,
    global_rank: bool = False,
    round_to: int = 1,
    protected: set[int] = frozenset(),
    comparable: bool = False,
) -> dict[int, np.ndarray]:
    """Group id -> removed atoms. ``ratio`` is the fraction of units removed per group
    (a float, or one per group id); every group keeps >= 1.

    With ``global_rank`` the ratio is of all units of one kind, ranked together: the
    channels of a CNN compete with each other, attention heads with heads and MLP units
    with MLP units (a head and an MLP unit are not the same amount of anything, so
    ``head_ratio=0.5, mlp_ratio=0.5`` removes half the heads and half the MLP units of
    the model, spread over the layers by score)."""
    per = ratio if isinstance(ratio, dict) else {g.id: ratio for g in groups}
    cand = _candidates(groups, scores, per, protected)
    by_id = {g.id: g for g in groups}
    n_remove: dict[int, int] = {}
    if not global_rank:
        for gid, (atoms, _) in cand.items():
            n_remove[gid] = _cap(by_id[gid], len(atoms), math.floor(per[gid] * len(atoms) + 1e-9))
    else:
        n_remove = {gid: 0 for gid in cand}
        for kind in sorted({by_id[gid].kind for gid in cand}):
            part = {gid: c for gid, c in cand.items() if by_id[gid].kind == kind}
            r = max(per[gid] for gid in part)
            budget = math.floor(r * sum(len(a) for a, _ in part.values()) + 1e-9)
            for gid in _global_order(part, by_id, comparable)[:budget]:
                n_remove[gid] += 1
    return _finalize(cand, by_id, n_remove, round_to)


def select_counts(groups: list[Group], scores: dict[int, np.ndarray], counts: dict[int, int], *,
                  round_to: int = 1, protected: set[int] = frozenset()) -> dict[int, np.ndarray]:
    """Group id -> removed atoms: the ``counts[id]`` lowest-scored units of each group
    (rounded and capped as ``select`` does; sequential pruning decides the counts first)."""
    cand = _candidates(groups, scores, {gid: 1.0 for gid, n in counts.items() if n > 0}, protected)
    by_id = {g.id: g for g in groups}
    n_remove = {gid: _cap(by_id[gid], len(atoms), counts[gid]) for gid, (atoms, _) in cand.items()}
    return _finalize(cand, by_id, n_remove, round_to)


def select_target(
    analysis,
    scores: dict[int, np.ndarray],
    kind: str,
    wanted: float,
    *,
    eligible: dict[int, float] | None = None,
    round_to: int = 1,
    protected: set[int] = frozenset(),
    info: dict | None = None,
    comparable: bool = False,
) -> dict[int, np.ndarray]:
    """Group id -> removed atoms (as ``select`` returns) so that the kept ``kind``
    ("params" or "flops") is at most ``wanted`` x the model's, removing units in the
    global ranking (``select(..., global_rank=True)``) lowest first and no more than
    needed; every group keeps >= 1 unit. ``eligible``: group id -> nonzero for the groups
    that may lose units (default: all). ``info``, when given, receives how the target
    was met (see passes/targets.py)."""
    from surgery.passes.targets import search

    groups = analysis.groups
    per = eligible if eligible is not None else {g.id: 1.0 for g in groups}
    cand = _candidates(groups, scores, per, protected)
    by_id = {g.id: g for g in groups}
    order = _global_order(cand, by_id, comparable)

    def removal(m: int) -> dict[int, np.ndarray]:
        n_remove = {gid: 0 for gid in cand}
        for gid in order[:m]:
            n_remove[gid] += 1
        return _finalize(cand, by_id, n_remove, round_to)

    return search(analysis, kind, wanted, order, cand, removal, info=info)


def _cap(g: Group, n_free: int, want: int) -> int:
    """Never remove every unit of a group: something must still flow."""
    fixed = len(g.atoms) - n_free + len(g.blocked_atoms)
    return max(0, min(want, n_free - (0 if fixed else 1)))
