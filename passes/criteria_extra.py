"""More criteria, registered in ``surgery.passes.criteria_core.CRITERIA`` on import.

Data-free (weights only):

- ``bn-scale``: per unit, sum of |gamma| over its channels of every BatchNormalization /
  normalization scale in the group (Network Slimming). A group with no such scale is
  an error, not a silent fallback.
- ``fpgm``: per unit, the sum of Euclidean distances from its weight rows (every weight
  entry it removes, all coupled layers, concatenated) to those of the other units of
  the group; units near the geometric median are the most replaceable and go first
  (He et al. 2019). Over ``FPGM_REFERENCES`` units, distances are summed to a seeded
  random subset of that many.
- ``lamp``: layer-adaptive magnitude (Lee et al. 2021) per unit: ``s_u / sum_{v: s_v >=
  s_u} s_v`` with ``s`` the group-L2 norm squared. Scores lie in (0, 1], the largest unit
  of each group scores 1, so they compare across groups.

Data-aware (need calibration data; ``needs_stats`` says what ``surgery.prune`` collects,
see passes/stats.py). ``x_c`` is channel c of the activation a consumer (a
Conv/ConvTranspose/MatMul/Gemm) reads, ``W[o, c, t]`` the weight entry that multiplies
it into output o (kernel tap t); sums run over the unit's channels and over every
consumer reading the group:

- ``activation``: mean over the unit's channels of ``E|x_c|``.
- ``wanda`` (structured Wanda, Sun et al. 2023): ``sum_c sum_{o,t} |W[o,c,t]| *
  sqrt(E x_c^2)``, the RMS standing in for Wanda's ``||X_c||_2`` so consumers that see
  different numbers of positions compare.
- ``flap`` (An et al. 2024): fluctuation ``sum_c Var(x_c) * sum_{o,t} W[o,c,t]^2``, then
  standardized within the group, ``z = (F - mean F) / std F``, and returned as
  ``FLAP_SHIFT + z``: every group's scores then have the same mean, so the policy's
  per-group mean normalization keeps the standardized (global) order.
- ``obs`` (Optimal Brain Surgeon on each consumer's layer-wise reconstruction error):
  with ``H = G/n + lambda*I`` (``G = X^T X`` over the consumer input's channels,
  ``lambda = OBS_DAMP * mean diag(G/n)``), removing the unit's channel set S and
  re-fitting the remaining weights optimally raises the error by
  ``sum_t tr( ([H^-1]_SS)^-1 W_S,t^T W_S,t )`` (``W_S,t``: the consumer's columns for
  S at tap t; per single channel ``sum_{o,t} W[o,c,t]^2 / [H^-1]_cc``). Kernel taps share
  the channel Gram (cross-tap correlations are ignored); grouped convolutions and
  inputs wider than ``MAX_GRAM`` channels use the diagonal of H
  (``sum W^2 * H_cc``).

- ``obs-greedy``: the same cost, with the units removed greedily in up to ``OBS_ROUNDS``
  rounds, every consumer's remaining weights and inverse Hessian updated after each
  round (OBS), so two correlated units are not both kept (or both removed) on the same
  evidence; scores are the costs at removal, non-decreasing in removal order. Measured
  on MiniLM at 50% (bench/README.md): level with ``obs`` one-shot, better in sequential
  pruning.

A group no consumer reads through a weight (attention query/key channels, which meet
only another activation) is scored from its own activations: ``activation`` as
above; ``wanda`` = group-L2 of its weights x RMS of its activations; ``flap`` = group
L2^2 x activation variance; ``obs`` = group L2^2 x mean square.
"""

from __future__ import annotations

import numpy as np

from surgery.analysis import Group
from surgery.errors import SurgeryError
from surgery.passes.criteria_core import CriterionContext, criterion, l2, per_index
from surgery.passes.rules import NORM_SCALE  # filled by @norm_scale in passes/rules/norm.py
from surgery.passes.stats import MAX_GRAM, Stats

FPGM_REFERENCES = 2048
FLAP_SHIFT = 1000.0
OBS_DAMP = 0.01
OBS_ROUNDS = 128  # obs-greedy: at most this many removal rounds per group

def data_aware(kind: str):
    """Mark a criterion as needing calibration statistics: "moments" or "gram"."""

    def deco(fn):
        fn.needs_stats = kind
        return fn

    return deco


# ---------------------------------------------------------------------------
# data-free
# ---------------------------------------------------------------------------


@criterion("bn-scale")
def bn_scale(group: Group, ctx: CriterionContext) -> np.ndarray:
    score = np.zeros(len(group.atoms))
    found = False
    for s in group.slices:
        uses = [(u.node.domain if u.node.domain != "ai.onnx" else "", u.node.op_type, u.idx) for u in s.value.uses()]
        if not any(NORM_SCALE.get((d, op)) == i for d, op, i in uses):
            continue
        found = True
        g = np.abs(s.array.astype(np.float64))
        other = tuple(j for j in range(g.ndim) if j != s.axis)
        score += s.units @ (g.sum(axis=other) if other else g)
    if not found:
        raise SurgeryError(f"criterion 'bn-scale': group '{group.name}' has no BatchNormalization or normalization "
                           f"scale; use another criterion (e.g. l2) or protect the group (--keep '{group.name}')")
    return score


def _unit_rows(group: Group) -> np.ndarray:
    """(units, d): every weight entry each unit removes, concatenated over the group's slices."""
    n = len(group.atoms)
    parts = []
    for s in group.slices:
        arr = s.array
        if arr.dtype.kind != "f":
            continue
        A = np.moveaxis(arr.astype(np.float32), s.axis, 0)
        A = A.reshape(A.shape[0], -1)
        U = s.units.tocsr()
        U.sort_indices()
        counts = np.diff(U.indptr)
        m = int(counts.max()) if n else 0
        if m == 0:
            continue
        idx = np.zeros((n, m), dtype=np.int64)
        valid = np.zeros((n, m), dtype=bool)
        for u in range(n):
            row = U.indices[U.indptr[u] : U.indptr[u + 1]]
            idx[u, : len(row)] = row
            valid[u, : len(row)] = True
        rows = A[idx] * valid[:, :, None]
        parts.append(rows.reshape(n, -1))
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)


@criterion("fpgm")
def fpgm(group: Group, ctx: CriterionContext) -> np.ndarray:
    W = _unit_rows(group).astype(np.float64)
    n = len(W)
    ref = np.arange(n)
    if n > FPGM_REFERENCES:
        ref = np.sort(ctx.rng.choice(n, FPGM_REFERENCES, replace=False))
    R = W[ref]
    sq = np.einsum("ij,ij->i", W, W)
    rsq = sq[ref]
    out = np.zeros(n)
    step = max(1, 2**22 // max(len(ref), 1))
    for i in range(0, n, step):
        d2 = sq[i : i + step, None] + rsq[None, :] - 2.0 * (W[i : i + step] @ R.T)
        out[i : i + step] = np.sqrt(np.maximum(d2, 0.0)).sum(axis=1)
    return out


@criterion("lamp")
def lamp(group: Group, ctx: CriterionContext) -> np.ndarray:
    s = per_index(group, "sumsq", np.square).astype(np.float64)
    order = np.argsort(-s, kind="stable")
    desc = s[order]
    csum = np.cumsum(desc)
    last = np.searchsorted(-desc, -s, side="right") - 1  # last unit not smaller than s_u
    denom = csum[last]
    return np.divide(s, denom, out=np.zeros_like(s), where=denom > 0)


lamp.scores_comparable = True


# ---------------------------------------------------------------------------
# data-aware
# ---------------------------------------------------------------------------


def _stats(ctx: CriterionContext, name: str) -> Stats:
    if not isinstance(ctx.stats, Stats):
        raise SurgeryError(f"criterion '{name}' is data-aware: it needs calibration data "
                           f"(--calib data.npz, or calib= in the API)")
    return ctx.stats


def _own_activations(stats: Stats, group: Group, name: str):
    """Per unit, over the activations the group's channels live in: (mean |x|, mean x^2, Var x),
    each averaged over the unit's channels."""
    tens = stats.tensors(group)
    if not tens:
        raise SurgeryError(f"criterion '{name}': group '{group.name}' has no activation onnxruntime can measure")
    n = len(group.atoms)
    acc = np.zeros((3, n))
    den = np.zeros(n)
    for t, k, U in tens:
        m = stats.moments(t, k)
        acc += np.stack([U.T @ m.mean_abs, U.T @ m.mean_sq, U.T @ m.var])
        den += U.T @ np.ones(U.shape[0])
    return acc / np.maximum(den, 1.0)


@criterion("activation")
@data_aware("moments")
def activation(group: Group, ctx: CriterionContext) -> np.ndarray:
    return _own_activations(_stats(ctx, "activation"), group, "activation")[0]


@criterion("wanda")
@data_aware("moments")
def wanda(group: Group, ctx: CriterionContext) -> np.ndarray:
    st = _stats(ctx, "wanda")
    cons = st.consumers(group)
    if not cons:
        return l2(group, ctx) * np.sqrt(_own_activations(st, group, "wanda")[1])
    out = np.zeros(len(group.atoms))
    for c, U in cons:
        m = st.moments(c.x, c.x_axis)
        out += U.T @ (c.col_abs * np.sqrt(m.mean_sq))
    return out


@criterion("flap")
@data_aware("moments")
def flap(group: Group, ctx: CriterionContext) -> np.ndarray:
    st = _stats(ctx, "flap")
    cons = st.consumers(group)
    if not cons:
        F = per_index(group, "sumsq", np.square) * _own_activations(st, group, "flap")[2]
    else:
        F = np.zeros(len(group.atoms))
        for c, U in cons:
            m = st.moments(c.x, c.x_axis)
            F += U.T @ (m.var * c.col_sq)
    F = np.asarray(F, dtype=np.float64)
    sd = F.std()
    z = (F - F.mean()) / sd if sd > 0 else np.zeros_like(F)
    return FLAP_SHIFT + z


flap.scores_comparable = True


@criterion("obs")
@data_aware("gram")
def obs(group: Group, ctx: CriterionContext) -> np.ndarray:
    return _obs_scores(group, ctx, "obs", lambda cons: sum(obs_increase(c, m, U) for c, m, U in cons))


def _obs_scores(group: Group, ctx: CriterionContext, name: str, from_consumers) -> np.ndarray:
    """``from_consumers([(consumer, its input's moments, channels x units)])``; a group no
    consumer reads is scored from its own activations."""
    st = _stats(ctx, name)
    cons = st.consumers(group)
    if not cons:
        return per_index(group, "sumsq", np.square) * _own_activations(st, group, name)[1]
    return from_consumers([(c, st.moments(c.x, c.x_axis), U) for c, U in cons])


def obs_increase(c, m, U) -> np.ndarray:
    """Per unit (column of U): the rise of consumer c's reconstruction error when the unit's
    channels are removed and the remaining weights re-fitted (OBS; see the module docstring)."""
    H, lam = _hessian(c, m)
    if H is None:
        return U.T @ (c.col_sq * (m.mean_sq + lam))
    Hinv = np.linalg.inv(H)
    W = c.dense_weight()  # (O, C, T)
    Uc = U.tocsc()
    counts = np.diff(Uc.indptr)
    out = np.zeros(U.shape[1])
    single = np.flatnonzero(counts == 1)
    if len(single):
        ch = Uc.indices[Uc.indptr[single]]
        out[single] = c.col_sq[ch] / np.diag(Hinv)[ch]
    for u in np.flatnonzero(counts > 1):
        S = Uc.indices[Uc.indptr[u] : Uc.indptr[u + 1]]
        WS = W[:, S, :]  # (O, |S|, T)
        Q = np.einsum("oit,ojt->ij", WS, WS)
        out[u] = float(np.trace(np.linalg.solve(Hinv[np.ix_(S, S)], Q)))
    return out


@criterion("obs-greedy")
@data_aware("gram")
def obs_greedy_criterion(group: Group, ctx: CriterionContext) -> np.ndarray:
    return _obs_scores(group, ctx, "obs-greedy", lambda cons: obs_greedy(cons, len(group.atoms)))


def _hessian(c, m):
    """(H = G/n + lambda I, lambda), or (None, lambda) where only its diagonal is used."""
    diag = m.mean_sq
    lam = OBS_DAMP * float(diag.mean()) + 1e-12
    grouped = c.op in ("Conv", "ConvTranspose") and int(c._attr("group", 1)) > 1
    if m.gram is None or grouped or len(diag) > MAX_GRAM:
        return None, lam
    return m.gram / max(m.n, 1.0) + lam * np.eye(len(diag)), lam


def obs_greedy(cons, n_units: int) -> np.ndarray:
    """Per unit: the rise of the consumers' reconstruction error when it is removed, with
    the units removed greedily, ``ceil(n / OBS_ROUNDS)`` per round, lowest total cost
    first, and after each round every consumer's remaining weights and inverse Hessian
    updated as OBS prescribes (``W -= W_S [H^-1]_SS^-1 [H^-1]_S:``, ``H^-1 -=
    [H^-1]_:S [H^-1]_SS^-1 [H^-1]_S:``). Unlike scoring every unit against the full
    layer, two correlated units are then not both kept (or both removed) on the strength
    of the same evidence. Scores are the costs at removal, made non-decreasing in removal
    order, so the lowest ``k`` are the first ``k`` removed."""
    static = np.zeros(n_units)
    states = []
    for c, m, U in cons:
        H, lam = _hessian(c, m)
        if H is None:
            static += U.T @ (c.col_sq * (m.mean_sq + lam))
            continue
        W = c.dense_weight()  # (O, C, T): every tap a row of outputs
        W2 = np.ascontiguousarray(W.transpose(0, 2, 1).reshape(-1, W.shape[1]))
        Uc = U.tocsc()
        sets = [Uc.indices[Uc.indptr[u] : Uc.indptr[u + 1]] for u in range(n_units)]
        states.append([np.linalg.inv(H), W2, sets])
    alive = np.arange(n_units)
    scores = np.zeros(n_units)
    level = -np.inf
    per_round = max(1, -(-n_units // OBS_ROUNDS))
    while len(alive):
        cost = static[alive].copy()
        for Hinv, W2, sets in states:
            d = np.maximum(np.diag(Hinv), 1e-300)
            col = np.einsum("ij,ij->j", W2, W2) / d
            for i, u in enumerate(alive):
                S = sets[u]
                if len(S) == 1:
                    cost[i] += col[S[0]]
                elif len(S) > 1:
                    WS = W2[:, S]
                    cost[i] += float(np.trace(np.linalg.solve(Hinv[np.ix_(S, S)], WS.T @ WS)))
        order = np.argsort(cost, kind="stable")[:per_round]
        for i in order:
            level = max(level, float(cost[i]))
            scores[alive[i]] = level
        gone = alive[order]
        alive = np.delete(alive, order)
        if not len(alive):
            break
        for st in states:
            Hinv, W2, sets = st
            S = np.concatenate([sets[u] for u in gone]).astype(np.int64)
            if not len(S):
                continue
            try:
                K = np.linalg.solve(Hinv[np.ix_(S, S)], Hinv[S, :])  # [H^-1]_SS^-1 [H^-1]_S:
            except np.linalg.LinAlgError:
                K = np.linalg.lstsq(Hinv[np.ix_(S, S)], Hinv[S, :], rcond=None)[0]
            st[1] = W2 - W2[:, S] @ K
            st[0] = Hinv - Hinv[:, S] @ K
            st[1][:, S] = 0.0
            st[0][S, :] = 0.0
            st[0][:, S] = 0.0
            st[0][S, S] = 1.0  # removed: no cost, no coupling (never scored again)
    return scores
