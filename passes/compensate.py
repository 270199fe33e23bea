"""Compensation: re-fit each consumer of removed channels so its output moves less.

A *consumer* is a Conv / MatMul / Gemm whose activation input ``X`` loses channels
(passes/stats.py, ``find_consumers``). Write its output as ``y = W f + b`` with ``f``
the consumer's input features per output position: the channels of ``X`` (Gemm,
MatMul), or the im2col patch, channel-major then kernel tap, of a Conv (so a kernel's
zero padding is accounted for exactly). ``r`` are the removed features, ``k`` the kept
ones; only the consumer's kept outputs count. All statistics come from the *original*
model's activations (layer-wise reconstruction), per output position, in float64.

- ``bias`` (FLAP): fold the removed features' mean contribution into the bias,
  ``b' = b + W[:, r] @ mean(f_r)``. Exact when the removed inputs are constant over
  the data. A consumer without a bias gets one (Conv input B, Gemm input C); a MatMul
  gets it in the ``Add`` that follows it when that Add adds a constant only it uses,
  else in a new ``Add`` node after it.
- ``lstsq``: re-fit the kept weights and the bias by ridge-regularized least squares
  so the output matches the original. With ``a = [f, 1]``, ``A = E[a a^T]`` (from the
  Gram matrix of the features, their sums and the count) and ``Theta = [W, b]``:
  ``Theta'_kk = (A_kk,kk + lambda*I_k)^-1 A_kk,all Theta^T`` (kk: the kept features
  plus the bias; the bias is not regularized; ``lambda = LSTSQ_DAMP * mean diag
  A_kk``). Needs the Gram matrix, so at most ``MAX_GRAM`` features.

In sequential pruning (surgery/sequential.py) the target is not the consumer's own
output on its (already changed) inputs but the dense model's output of the same node on
the same samples (:class:`Reference`); one-shot, the two are the same.

Compensation must never make a layer worse: every ``HOLDOUT_EVERY``-th calibration
sample is held back, the fit uses the others, and a consumer is changed only when its
reconstruction error on the held-back samples, ``E || y - y' ||^2`` = ``tr(D H D^T)``
(``D = Theta - Theta'``, ``H`` the held-back ``E[a a^T]``; for ``bias``, from the
held-back means and the energy of the removed contribution), goes down. Every other
consumer is reported with the reason it was skipped.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from surgery.errors import SurgeryError
from surgery.passes.cut import new_initializer
from surgery.passes.stats import (
    HOLDOUT_EVERY, MAX_GRAM, Calibration, Consumer, channels_last, find_consumers, passes, run_calibration,
)

MODES = ("bias", "lstsq")
LSTSQ_DAMP = 1e-3
_CHUNK = 2**21  # feature entries per chunk of rows


# ---------------------------------------------------------------------------
# features of a consumer's input
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # begin..., end...; None: auto_pad SAME_* (computed per input)
    auto_pad: str


def _conv_geometry(node: ir.Node, w_shape) -> _ConvGeometry:
    def attr(name, default):
        a = node.attributes.get(name)
        return default if a is None else a.value

    k = tuple(int(d) for d in (attr("kernel_shape", None) or w_shape[2:]))
    nd = len(k)
    auto = attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = tuple(int(p) for p in (attr("pads", None) or [0] * (2 * nd)))
    if auto == "VALID":
        pads = (0,) * (2 * nd)
    return _ConvGeometry(k, tuple(int(s) for s in (attr("strides", None) or [1] * nd)),
                         tuple(int(d) for d in (attr("dilations", None) or [1] * nd)),
                         None if auto in ("SAME_UPPER", "SAME_LOWER") else pads, auto)


def conv_patches(x: np.ndarray, geo: _ConvGeometry, width: int | None = None):
    """Yield (rows, C * taps) chunks of the im2col matrix of a Conv input x (N, C, *spatial),
    features ordered channel-major then kernel tap (W.reshape(O, -1)'s column order).
    Chunks are sized for ``width`` features (default C * taps): two inputs of the same
    spatial shape chunked with one width give the same rows."""
    nd = len(geo.kernel)
    win = [(k - 1) * d + 1 for k, d in zip(geo.kernel, geo.dilations)]
    if geo.pads is None:
        pb, pe = [], []
        for L, s, w in zip(x.shape[2:], geo.strides, win):
            out = -(-L // s)
            total = max((out - 1) * s + w - L, 0)
            lo = total // 2 if geo.auto_pad == "SAME_UPPER" else total - total // 2
            pb.append(lo)
            pe.append(total - lo)
    else:
        pb, pe = list(geo.pads[:nd]), list(geo.pads[nd:])
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pb, pe)))
    v = sliding_window_view(xp, win, axis=tuple(range(2, 2 + nd)))  # N, C, *pos, *win
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in geo.strides)
          + tuple(slice(None, None, d) for d in geo.dilations)]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    v = v.transpose(perm)  # N, *pos, C, *k
    n_feat = int(np.prod(v.shape[1 + nd :]))
    if v.shape[1] == 0:
        return
    per_row = (width or n_feat) * int(np.prod(v.shape[2 : 1 + nd]))
    step = max(1, _CHUNK // max(per_row, 1))
    for b in range(v.shape[0]):
        for i in range(0, v.shape[1], step):
            yield np.ascontiguousarray(v[b, i : i + step], dtype=np.float64).reshape(-1, n_feat)


def _features(c: Consumer, x: np.ndarray, geo, width: int | None = None):
    if geo is not None:
        yield from conv_patches(x, geo, width)
        return
    f = channels_last(x, c.x_axis)
    step = max(1, _CHUNK // max(width or f.shape[1], 1))
    for i in range(0, f.shape[0], step):
        yield np.asarray(f[i : i + step], dtype=np.float64)


# ---------------------------------------------------------------------------
# preparation (on the original model, before the cut)
# ---------------------------------------------------------------------------


class _Acc:
    def __init__(self, F: int, gram: bool, cross: int | None = None) -> None:
        self.n = 0.0
        self.s = np.zeros(F)
        self.G = np.zeros((F, F)) if gram else None
        self.rs = None  # bias mode: sum of the residual r = y - y_cut per kept output
        self.rr = 0.0  # bias mode: sum of ||r||^2
        self.C = np.zeros((F + 1, cross)) if cross is not None and gram else None  # reference: sum [f, 1] y^T
        self.yy = 0.0  # reference: sum of ||y||^2

    def aug(self) -> np.ndarray:
        """E[a a^T] for a = [f, 1]."""
        F = len(self.s)
        A = np.empty((F + 1, F + 1))
        A[:F, :F] = self.G
        A[:F, F] = A[F, :F] = self.s
        A[F, F] = self.n
        return A / max(self.n, 1.0)


@dataclasses.dataclass
class Reference:
    """The dense model that sequential pruning fits every consumer back to.

    One-shot compensation fits a consumer's kept weights so that, on the inputs it sees,
    its output matches its own original output (``y = W f + b``). In a sequential prune
    the inputs ``f~`` come from a model whose earlier layers are already pruned, and
    matching the current layer's own output on them would carry every earlier error
    forward. With a reference the target is the *dense* model's output of the same node
    on the same samples, ``y = W_dense f_dense + b_dense`` (the OBC/SparseGPT objective
    with the accumulated error corrected): ``Theta' = (E[a~ a~^T] + lambda)^-1 E[a~ y^T]``
    over the kept features, ``a~ = [f~, 1]``, and the held-back check compares
    ``E||y - Theta a~||^2`` before and after. ``bias`` folds the mean of
    ``y - y_cut`` into the bias.

    ``present``: (weight, axis) -> the original indices still in the current model, to
    map the current consumer's outputs onto the dense one's. ``outside_bias``: per
    MatMul node, the bias earlier steps added after it (original output indices), so a
    second fit of the same node does not count it twice."""

    analysis: object  # Analysis of the dense model
    present: dict
    outside_bias: dict = dataclasses.field(default_factory=dict)
    _session: object = None
    _fetch: list = dataclasses.field(default_factory=list)
    _by_name: dict | None = None

    def consumer(self, name: str) -> Consumer | None:
        if self._by_name is None:
            self._by_name = {c.name: c for c in find_consumers(self.analysis)}
        return self._by_name.get(name)

    def out_indices(self, c: Consumer, n_out: int) -> np.ndarray:
        have = self.present.get((c.w, _out_axis(c)))
        return np.arange(n_out) if have is None else have

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The dense model's tensors ``names`` on ``feeds``; one probe session, exposing
        the input of every consumer, serves every step."""
        from surgery.passes.stats import probe_model
        from surgery.verify import session

        model = self.analysis.model
        inputs = {v.name for v in model.graph.inputs}
        if self._session is None:
            self._fetch = sorted({c.x for c in find_consumers(self.analysis)} - inputs)
            self._session = session(probe_model(model, self._fetch))
        got = dict(zip(self._fetch, self._session.run(self._fetch, feeds)))
        return {n: (feeds[n] if n in inputs else got[n]) for n in names}


@dataclasses.dataclass
class _Target:
    c: Consumer
    n_removed: int
    W: np.ndarray  # (kept outputs, F) current effective weight
    b: np.ndarray  # (kept outputs,) current effective bias (a MatMul's: what earlier steps added after it)
    removed: np.ndarray  # removed features
    kept: np.ndarray  # kept features
    geo: _ConvGeometry | None
    acc: dict | None  # {held back: _Acc} while its statistics are gathered
    # reference: (dense consumer, its Theta = [W, b] over our kept outputs, its conv geometry,
    # those outputs' dense indices, the dense output count)
    ref: tuple | None = None
    solution: tuple | str | None = None  # (new W or None, bias change, error before, after) or why not

    def dense_output(self, fd: np.ndarray) -> np.ndarray:
        """The dense model's output of this node (our kept outputs) on its features ``fd``."""
        Th = self.ref[1]
        return fd @ Th[:, :-1].T + Th[:, -1]


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _why_not(c: Consumer, mode: str, inits) -> str | None:
    node, op = c.node, c.op
    W = node.inputs[1].const_value
    if np.dtype(W.dtype.numpy()).kind != "f":
        return "weight is not floating point"
    if op == "ConvTranspose":
        return "ConvTranspose scatters its input; not compensated"
    if op == "Conv" and int(_attr(node, "group", 1)) != 1:
        return "grouped convolution; not compensated"
    if op == "MatMul" and len(W.shape) != 2:
        return f"MatMul weight of rank {len(W.shape)}; not compensated"
    bias_in = {"Conv": 2, "Gemm": 2}.get(op)
    if bias_in is not None and len(node.inputs) > bias_in and node.inputs[bias_in] is not None:
        bv = node.inputs[bias_in]
        if bv.const_value is None:
            return "its bias is computed at run time"
        if op == "Gemm":
            shape = tuple(bv.const_value.shape)
            n_out = W.shape[0] if _attr(node, "transB", 0) else W.shape[1]
            if int(np.prod(shape)) not in (1, n_out) or (len(shape) == 2 and shape[0] != 1):
                return f"Gemm bias of shape {shape} is not one value per output"
    if mode == "lstsq" and len(list(node.inputs[1].uses())) > 1:
        return "its weight is shared with another node"
    return None


def _effective(c: Consumer) -> tuple[np.ndarray, np.ndarray]:
    """(W as outputs x features, b as outputs) of the original consumer."""
    node, op = c.node, c.op
    W = node.inputs[1].const_value.numpy().astype(np.float64)
    if op == "Conv":
        Wf = W.reshape(W.shape[0], -1)
        b = node.inputs[2].const_value.numpy().astype(np.float64) if len(node.inputs) > 2 and node.inputs[2] is not None \
            else np.zeros(W.shape[0])
        return Wf, b
    if op == "MatMul":
        return W.T, np.zeros(W.shape[1])
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    Wf = alpha * (W if _attr(node, "transB", 0) else W.T)
    b = np.zeros(Wf.shape[0])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        C = node.inputs[2].const_value.numpy().astype(np.float64).reshape(-1)
        b = beta * np.broadcast_to(C, (Wf.shape[0],))
    return Wf, b.copy()


def _out_axis(c: Consumer) -> int:
    if c.op == "Conv":
        return 0
    if c.op == "MatMul":
        return 1
    return 0 if _attr(c.node, "transB", 0) else 1


class Compensation:
    """Prepared on the original model (statistics, original weights); ``apply`` on the cut one."""

    def __init__(self, mode: str, targets: list[_Target], skipped: list[dict], calib: Calibration,
                 reference: Reference | None = None) -> None:
        self.mode = mode
        self.targets = targets
        self.skipped = skipped
        self.calib = calib
        self.reference = reference

    # -- solving -----------------------------------------------------------
    def settle(self, t: _Target) -> None:
        """``t.solution``: (new W or None, bias change, held-back error before, after), or the
        reason it is not applied. Run once its statistics are complete; frees them."""
        t.solution = self._check(t)
        t.acc = None

    def _check(self, t: _Target):
        if t.acc[True].n == 0:
            return (f"no held-back samples to check it on (every {HOLDOUT_EVERY}th sample is held back; "
                    f"give at least {HOLDOUT_EVERY})")
        if t.acc[False].n == 0:
            return "no calibration samples to fit it on"
        newW, db, e0, e = self._solve(t)
        if not np.isfinite(e) or not np.all(np.isfinite(db)) or (newW is not None and not np.all(np.isfinite(newW))):
            return "the fit is not finite"
        if e > e0:
            return f"it would raise the held-back reconstruction error from {e0:.4g} to {e:.4g}"
        if not e < e0:
            return f"it would not lower the held-back reconstruction error ({e0:.4g})"
        return newW, db, e0, e

    def _solve(self, t: _Target):
        """(new W over kept features or None, bias change, held-back error before, after)."""
        fit, hold = t.acc[False], t.acc[True]
        W, b, r, k = t.W, t.b, t.removed, t.kept
        if self.mode == "bias":  # the mean residual y - y_cut, folded into the bias
            db = fit.rs / fit.n
            e0 = hold.rr / hold.n
            e = e0 - 2.0 * float(db @ (hold.rs / hold.n)) + float(db @ db)
            return None, db, e0, e
        F = W.shape[1]
        A, H = fit.aug(), hold.aug()
        Theta = np.concatenate([W, b[:, None]], axis=1)
        kk = np.concatenate([k, [F]])
        lam = LSTSQ_DAMP * float(np.mean(np.diag(A)[k])) + 1e-12
        M = A[np.ix_(kk, kk)] + np.diag(np.r_[np.full(len(k), lam), 0.0])
        R = fit.C[kk] / fit.n if t.ref is not None else A[kk, :] @ Theta.T  # E[a_kk y^T]
        try:
            Th = np.linalg.solve(M, R).T
        except np.linalg.LinAlgError:
            Th = np.linalg.lstsq(M, R, rcond=None)[0].T
        new = np.zeros_like(Theta)
        new[:, kk] = Th
        cut = Theta.copy()
        cut[:, r] = 0.0
        if t.ref is None:  # target = Theta a: the error is tr(D H D^T), D = Theta - Theta'
            D0, D = Theta - cut, Theta - new
            return Th[:, :-1], Th[:, -1] - b, float(np.sum((D0 @ H) * D0)), float(np.sum((D @ H) * D))
        Ch, yy = hold.C / hold.n, hold.yy / hold.n  # E||y - Theta a||^2 = yy - 2 tr(Theta C) + tr(Theta H Theta^T)

        def err(T):
            return yy - 2.0 * float(np.sum(T * Ch.T)) + float(np.sum((T @ H) * T))

        return Th[:, :-1], Th[:, -1] - b, err(cut), err(new)

    def apply(self, model: ir.Model) -> dict:
        """Change the (cut) model's consumers in place; the report entry."""
        applied, skipped = [], list(self.skipped)
        for t in self.targets:
            name = t.c.name
            if isinstance(t.solution, str):
                skipped.append({"consumer": name, "why": t.solution})
                continue
            newW, db, e0, e = t.solution
            why = _write(model, t, newW, db)
            if why:
                skipped.append({"consumer": name, "why": why})
                continue
            if t.ref is not None and t.c.op == "MatMul":  # the bias now after it, for a later fit of it
                ob = self.reference.outside_bias.setdefault(name, np.zeros(t.ref[4]))
                ob[t.ref[3]] += db
            applied.append({"consumer": name, "op": t.c.op, "removed_inputs": t.n_removed,
                            "error_before": e0, "error_after": e})
        return {"mode": self.mode, "applied": applied, "skipped": skipped}


def prepare(analysis, removed: dict[int, np.ndarray], calib: Calibration, mode: str,
            reference: Reference | None = None) -> Compensation:
    """Find the consumers of removed channels, snapshot their weights, and gather their input
    statistics over the calibration data (run before the cut). With a ``reference`` (the
    dense model, in sequential pruning) each consumer is fitted to the dense model's output
    of the same node instead of its own (see :class:`Reference`)."""
    if mode not in MODES:
        raise SurgeryError(f"--compensate must be one of {', '.join(MODES)}, got {mode!r}")
    inits = analysis.model.graph.initializers
    targets, skipped = [], []
    for c in find_consumers(analysis):
        rem = removed.get(c.x_axis_id)
        if rem is None or not len(rem):
            continue
        t, why = _target(analysis, c, rem, removed, mode, inits, reference)
        if why:
            skipped.append({"consumer": c.name, "why": why})
        else:
            targets.append(t)

    comp = Compensation(mode, targets, skipped, calib, reference)
    gram = mode == "lstsq"
    # Gram matrices (fit and held-back) of at most MAX_GRAM_BYTES at once: more take more passes
    for part in passes(targets, lambda t: 16 * (t.W.shape[1] + 1) ** 2 if gram else 0) if targets else []:
        for t in part:
            cross = len(t.W) if t.ref is not None else None
            t.acc = {False: _Acc(t.W.shape[1], gram, cross), True: _Acc(t.W.shape[1], gram, cross)}

        def take(outs: dict[str, np.ndarray], held: bool, dense: dict[str, np.ndarray] | None = None,
                 part=part) -> None:
            for t in part:
                _accumulate(t, t.acc[held], outs, dense)

        refs = [t for t in part if t.ref is not None]
        run_calibration(analysis.model, calib, sorted({t.c.x for t in part}), take,
                        reference=(reference.run, sorted({t.ref[0].x for t in refs})) if refs else None)
        for t in part:
            comp.settle(t)
    return comp


def _target(analysis, c: Consumer, rem: np.ndarray, removed: dict[int, np.ndarray], mode: str, inits,
            reference: Reference | None) -> tuple[_Target | None, str | None]:
    """(what to fit for consumer c, which loses input channels ``rem``, None), or (None, why not)."""
    dims = analysis.dims
    why = _why_not(c, mode, inits)
    if why:
        return None, why
    W, b = _effective(c)
    geo = None
    taps = 1
    if c.op == "Conv":
        geo = _conv_geometry(c.node, c.node.inputs[1].const_value.shape)
        taps = int(np.prod(geo.kernel))
    F = W.shape[1]
    if F != dims.axes[c.x_axis_id].size * taps:
        return None, f"its weight has {F} input features, its input {dims.axes[c.x_axis_id].size} x {taps}"
    if mode == "lstsq" and F > MAX_GRAM:
        return None, f"{F} input features: the Gram matrix would exceed {MAX_GRAM} x {MAX_GRAM}"
    out_id = dims.find(("value", c.w, _out_axis(c)))
    rem_out = removed.get(out_id, np.zeros(0, np.int64)) if out_id is not None else np.zeros(0, np.int64)
    keep_out = np.setdiff1d(np.arange(W.shape[0]), rem_out)
    ref = None
    if reference is not None:
        ref, why = _dense_counterpart(reference, c, W.shape[0], keep_out)
        if why:
            return None, why
        if c.op == "MatMul":  # what earlier steps added after it is part of its current bias
            orig_out = reference.out_indices(c, W.shape[0])
            b = reference.outside_bias.get(c.name, np.zeros(int(orig_out.max(initial=-1)) + 1))[orig_out]
    feat_removed = (np.asarray(rem)[:, None] * taps + np.arange(taps)[None, :]).ravel()
    feat_kept = np.setdiff1d(np.arange(F), feat_removed)
    return _Target(c, len(rem), W[keep_out], b[keep_out], np.sort(feat_removed), feat_kept, geo, None, ref), None


def _accumulate(t: _Target, acc: _Acc, outs: dict[str, np.ndarray], dense: dict[str, np.ndarray] | None) -> None:
    """Add one calibration run's features of target t (and, with a reference, the dense
    model's output it is fitted to) to its statistics ``acc``."""
    need_y = acc.G is None or acc.C is not None  # bias mode, or a dense target
    Wk = t.W[:, t.kept] if t.ref is not None else None
    width = None
    fds = itertools.repeat(None)
    if t.ref is not None:
        dc, _, dgeo = t.ref[:3]
        width = max(t.W.shape[1], t.ref[1].shape[1] - 1)
        fds = _features(dc, dense[dc.x], dgeo, width)
    for f, fd in zip(_features(t.c, outs[t.c.x], t.geo, width), fds):
        acc.n += f.shape[0]
        acc.s += f.sum(axis=0)
        if acc.G is not None:
            acc.G += f.T @ f
        if not need_y:
            continue
        if acc.C is not None:
            y = t.dense_output(fd)
            acc.C[:-1] += f.T @ y
            acc.C[-1] += y.sum(axis=0)
            acc.yy += float(np.sum(np.square(y)))
            continue
        if t.ref is None:  # our own output: the residual is what the removed features add
            r = f[:, t.removed] @ t.W[:, t.removed].T
        else:
            r = t.dense_output(fd) - f[:, t.kept] @ Wk.T - t.b
        acc.rs = r.sum(axis=0) + (0.0 if acc.rs is None else acc.rs)
        acc.rr += float(np.sum(np.square(r)))


def _dense_counterpart(reference: Reference, c: Consumer, n_out: int, keep_out: np.ndarray):
    """((dense consumer, its [W, b] rows for our kept outputs, its conv geometry), None),
    or (None, why not)."""
    dc = reference.consumer(c.name)
    if dc is None or dc.op != c.op:
        return None, "no node of that name reads a weight in the dense model"
    Wd, bd = _effective(dc)
    orig_out = reference.out_indices(c, n_out)
    if len(orig_out) != n_out or (len(orig_out) and orig_out.max() >= Wd.shape[0]):
        return None, "its outputs do not map onto the dense model's"
    dgeo = _conv_geometry(dc.node, dc.node.inputs[1].const_value.shape) if dc.op == "Conv" else None
    rows = orig_out[keep_out]
    return (dc, np.concatenate([Wd[rows], bd[rows, None]], axis=1), dgeo, rows, Wd.shape[0]), None


# ---------------------------------------------------------------------------
# writing (on the cut model)
# ---------------------------------------------------------------------------


def _set_const(model: ir.Model, node: ir.Node, i: int, array: np.ndarray, base: str) -> None:
    """Give node input i the value ``array``: in place when only this node reads it, else a new initializer."""
    cur = node.inputs[i] if i < len(node.inputs) else None
    if cur is not None and cur.name in model.graph.initializers and len(list(cur.uses())) == 1:
        cur.const_value = ir.tensor(array, name=cur.name)
        cur.shape = ir.Shape(array.shape)
        return
    v = new_initializer(model, base, array)
    if len(node.inputs) <= i:
        node.resize_inputs(i + 1)
    node.replace_input_with(i, v)


def _write(model: ir.Model, t: _Target, newW, db) -> str | None:
    node, op = t.c.node, t.c.op
    Wv = node.inputs[1]
    dt = Wv.const_value.numpy().dtype
    cur = Wv.const_value.numpy()
    O = t.W.shape[0]
    if newW is not None:
        if op == "Conv":
            shaped = newW.reshape(O, -1, *cur.shape[2:])
        elif op == "MatMul":
            shaped = newW.T
        else:
            alpha = float(_attr(node, "alpha", 1.0))
            shaped = (newW if _attr(node, "transB", 0) else newW.T) / (alpha if alpha else 1.0)
        if shaped.shape != cur.shape:
            return f"re-fitted weight {shaped.shape} does not match the cut weight {cur.shape}"
    b_new = t.b + db
    if op == "Conv":
        if len(b_new) != cur.shape[0]:
            return "bias size does not match the cut weight"
        _set_const(model, node, 2, b_new.astype(dt), f"{node.name}_bias_comp")
    elif op == "Gemm":
        beta = float(_attr(node, "beta", 1.0))
        if beta == 0.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            beta = 1.0
        _set_const(model, node, 2, (b_new / beta).astype(dt), f"{node.name}_bias_comp")
    else:
        _matmul_bias(model, node, db.astype(dt))
    if newW is not None:
        Wv.const_value = ir.tensor(np.ascontiguousarray(shaped.astype(dt)), name=Wv.name)
    return None


def _matmul_bias(model: ir.Model, node: ir.Node, db: np.ndarray) -> None:
    """Add ``db`` to a MatMul's output: into the constant of the Add that follows it when
    only that Add reads both, else through a new Add node."""
    out = node.outputs[0]
    uses = list(out.uses())
    graph_outs = [o for o in model.graph.outputs if o is out]
    if len(uses) == 1 and not graph_outs and uses[0].node.op_type == "Add" and uses[0].node.domain in ("", "ai.onnx"):
        add = uses[0].node
        other = 1 - uses[0].idx
        c = add.inputs[other]
        if c is not None and c.name in model.graph.initializers and c.const_value is not None \
                and len(list(c.uses())) == 1:
            arr = c.const_value.numpy()
            if arr.size == len(db) and arr.shape[-1:] == (len(db),) and all(d == 1 for d in arr.shape[:-1]):
                c.const_value = ir.tensor((arr + db.reshape(arr.shape)).astype(arr.dtype), name=c.name)
                return
    bias = new_initializer(model, f"{node.name}_bias_comp", db)
    add = ir.Node("", "Add", inputs=[out, bias], name=f"{node.name}_bias_comp_add", num_outputs=1)
    new = add.outputs[0]
    new.type, new.shape = out.type, out.shape
    for u in uses:
        u.node.replace_input_with(u.idx, new)
    for i, o in enumerate(model.graph.outputs):
        if o is out:
            model.graph.outputs[i] = new
    old = out.name
    out.name = f"{old}_nobias"
    new.name = old
    model.graph.insert_after(node, add)


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def output_diffs(reference: onnx.ModelProto, others: list[onnx.ModelProto], calib: Calibration) -> list[float]:
    """Max |output difference| of each of ``others`` against ``reference`` over the calibration inputs."""
    from surgery.verify import compare, session

    ref = session(reference)
    sess = [session(p) for p in others]
    worst = [0.0] * len(others)
    for feeds, _ in calib.runs():
        try:
            base = ref.run(None, feeds)
            for i, s in enumerate(sess):
                worst[i] = max(worst[i], compare(base, s.run(None, feeds)))
        except SurgeryError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SurgeryError(f"onnxruntime cannot run on the calibration inputs: {str(e).splitlines()[0]}") from e
    return worst
