"""Calibration data and activation statistics, gathered by running the model in onnxruntime.

**Calibration data** (:class:`Calibration`) is one of

- a path to an ``.npz`` file, or a mapping, holding one array per graph input name whose
  first axis indexes samples. An array of the input's rank is read along the model's
  batch axis (axis 0): sample ``i`` is ``arr[i:i+1]``, and samples are concatenated
  into runs of ``batch`` (dynamic batch axis) or of exactly the static batch size.
  An array of one more dimension than the input holds whole feeds: sample ``i`` is
  ``arr[i]``;
- any iterable of input dicts (``{input name: array}``), each one whole feed (one
  sample for ``samples`` and the hold-out). A one-shot iterator (a generator) is read
  once and kept in memory, since the data are read more than once; pass a list, a
  path or a mapping to stream.

Every ``HOLDOUT_EVERY``-th sample (the 5th, 10th, ...) is *held back*: runs never mix
held-back and other samples, so every statistic exists for the two parts separately
(compensation is fitted on one and checked on the other; criteria use both).

**Statistics** (:func:`collect`): a *probe* copy of the graph exposes, as extra
outputs, the tensors the groups' consumers read: the activation ``X`` of every
Conv / ConvTranspose / MatMul / Gemm whose weight is an initializer
(:func:`find_consumers`), whose channel axis is the one contracted with the weight
(Conv W axis 1, ConvTranspose W axis 0, MatMul B axis -2, Gemm B axis per transB).
For a group no such consumer reads (query/key channels meeting only another
activation), the activations its channels live in are exposed instead. Per exposed
tensor and channel, in float64: the count of non-channel positions ``n``, sums of
``x``, ``x**2`` and ``|x|`` and, when asked, the Gram matrix ``X^T X``
(channels x channels; only up to ``MAX_GRAM`` channels). Memory is bounded by one
run's outputs plus the Gram matrices, never by the size of the data set.

Channels map to a group's units with the analysis: ``Stats.units(group, axis_id)`` is
the sparse (channels x units) matrix whose column u marks the channels unit u removes
on that axis (the same columns of ``Analysis._removes_csc`` that ``Group.slices``
reads for weights), so per-unit sums are one sparse product.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import itertools
import os
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import scipy.sparse as sp
from onnx import helper

from surgery.errors import SurgeryError
from surgery.passes.rules import CONSUMERS, op_key  # filled by @consumer in the family files

HOLDOUT_EVERY = 5  # every 5th sample is held back (20%)
MAX_GRAM = 4096  # widest consumer input (channels or features) whose Gram matrix is kept
MAX_GRAM_BYTES = 2 * 1024**3  # Gram matrices held at once; more take more passes over the data


# ---------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------


class Calibration:
    """Calibration samples, read in runs (see the module docstring)."""

    def __init__(self, source: Any, model: ir.Model, *, samples: int | None = None, batch: int = 16) -> None:
        if samples is not None and samples < 1:
            raise SurgeryError(f"--calib-samples must be >= 1, got {samples}")
        if batch < 1:
            raise SurgeryError(f"calibration batch must be >= 1, got {batch}")
        self.samples = samples
        self.batch = batch
        self._inputs = [(v.name, _np_dtype(v.dtype), v.shape) for v in model.graph.inputs]
        self._names = [n for n, _, _ in self._inputs]
        self._arrays: dict[str, np.ndarray] | None = None
        self._feeds: Iterable[dict] | None = None
        self.label = "calibration data"
        if isinstance(source, (str, os.PathLike)):
            self.label = os.fspath(source)
            self._arrays = read_npz(self.label)
        elif isinstance(source, cabc.Mapping):
            self._arrays = {str(k): np.asarray(v) for k, v in source.items()}
        elif isinstance(source, cabc.Iterable):
            if iter(source) is source:  # one-shot: read it once, keep it
                source = list(itertools.islice(source, samples) if samples else source)
            self._feeds = source
        else:
            raise SurgeryError(
                f"calibration data must be an .npz path, a dict of arrays or an iterable of input dicts, "
                f"got {type(source).__name__}"
            )
        if self._arrays is not None:
            self._check_arrays()
        # filled by the last full pass
        self.n_samples = self.n_held = self.n_dropped = self.n_runs = 0

    # -- validation --------------------------------------------------------
    def _check_names(self, keys, where: str) -> None:
        missing = [n for n in self._names if n not in keys]
        if missing:
            raise SurgeryError(f"{where} has no array for input '{missing[0]}' (model inputs: {', '.join(self._names)})")
        extra = sorted(set(keys) - set(self._names))
        if extra:
            raise SurgeryError(f"{where} names '{extra[0]}', which is not an input of the model "
                               f"(model inputs: {', '.join(self._names)})")

    def _check_arrays(self) -> None:
        a = self._arrays
        self._check_names(a.keys(), self.label)
        counts = {n: a[n].shape[0] if a[n].ndim else -1 for n in self._names}
        if any(c < 0 for c in counts.values()):
            bad = next(n for n, c in counts.items() if c < 0)
            raise SurgeryError(f"{self.label}: array '{bad}' is a scalar; its first axis must index samples")
        if len(set(counts.values())) > 1:
            raise SurgeryError(f"{self.label}: inputs have different sample counts "
                               + ", ".join(f"{n}:{c}" for n, c in counts.items()))
        self._whole_feeds = {}
        for name, _, shape in self._inputs:
            r = len(shape) if shape is not None else a[name].ndim
            if a[name].ndim == r:
                self._whole_feeds[name] = False
            elif a[name].ndim == r + 1:
                self._whole_feeds[name] = True
            else:
                raise SurgeryError(f"{self.label}: array '{name}' has shape {a[name].shape}; the input has rank {r} "
                                   f"(give rank {r} with samples along the batch axis, or rank {r + 1} of whole feeds)")
        if len(set(self._whole_feeds.values())) > 1:
            raise SurgeryError(f"{self.label}: mix of per-sample and whole-feed arrays; give all inputs one form")

    # -- samples and runs --------------------------------------------------
    def _sample_stream(self) -> Iterator[dict[str, np.ndarray]]:
        if self._arrays is not None:
            a = self._arrays
            n = a[self._names[0]].shape[0]
            whole = next(iter(self._whole_feeds.values()), False)
            for i in range(n):
                yield {k: (a[k][i] if whole else a[k][i : i + 1]) for k in self._names}
        else:
            for j, feed in enumerate(self._feeds):
                if not isinstance(feed, cabc.Mapping):
                    raise SurgeryError(f"calibration item #{j} is a {type(feed).__name__}, not a dict of input arrays")
                self._check_names(feed.keys(), f"calibration item #{j}")
                yield {k: np.asarray(feed[k]) for k in self._names}

    def _cast(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, dt, _ in self._inputs:
            x = sample[name]
            out[name] = x if x.dtype == dt else x.astype(dt)
        return out

    def _run_size(self) -> int | None:
        """Rows per run along axis 0: the static batch size, or None (dynamic: up to ``batch`` samples)."""
        static = set()
        for _, _, shape in self._inputs:
            if shape is None or len(shape) == 0:
                return 0  # no batch axis: one sample per run
            d = shape[0]
            if isinstance(d, int):
                static.add(d)
        if len(static) > 1:
            return 0
        return static.pop() if static else None

    def runs(self) -> Iterator[tuple[dict[str, np.ndarray], bool]]:
        """(feeds, held_back) for every run; held-back samples never share a run with others.
        Samples are batched with samples of the same shape only (variable-length text:
        each length gets its own runs), so nothing is padded."""
        size = self._run_size()
        buf: dict[tuple, list] = {}
        rows: dict[tuple, int] = {}
        n = held = dropped = runs = 0

        def flush(key):
            nonlocal runs
            items = buf.pop(key)
            rows.pop(key, None)
            runs += 1
            if len(items) == 1:
                return items[0]
            return {k: np.concatenate([s[k] for s in items], axis=0) for k in self._names}

        for sample in self._sample_stream():
            if self.samples is not None and n >= self.samples:
                break
            part = n % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            n += 1
            held += part
            sample = self._cast(sample)
            key = (part, tuple(np.shape(sample[k])[1:] for k in self._names))
            buf.setdefault(key, []).append(sample)
            if size == 0:  # cannot concatenate
                yield flush(key), part
                continue
            k = next(iter(sample.values())).shape[0] if sample else 1
            rows[key] = rows.get(key, 0) + k
            if size is None:
                if len(buf[key]) >= self.batch:
                    yield flush(key), part
            elif rows[key] == size:
                yield flush(key), part
            elif rows[key] > size:
                raise SurgeryError(f"calibration samples of {k} rows do not fit the model's static batch size {size}")
        for key in list(buf):
            if size:  # an incomplete static batch cannot run
                dropped += len(buf.pop(key))
            else:
                yield flush(key), key[0]
        if n == 0:
            raise SurgeryError(f"{self.label}: no calibration samples")
        self.n_samples, self.n_held, self.n_dropped, self.n_runs = n, held, dropped, runs

    def summary(self) -> dict:
        return {"samples": self.n_samples, "held_back": self.n_held, "dropped": self.n_dropped, "runs": self.n_runs}


def as_calibration(source, model: ir.Model, *, samples: int | None = None, batch: int = 16) -> Calibration:
    if isinstance(source, Calibration):
        return source
    return Calibration(source, model, samples=samples, batch=batch)


def read_npz(path) -> dict[str, np.ndarray]:
    """One numeric array per input name from an .npz, or a one-line SurgeryError naming the problem."""
    path = str(path)
    if not os.path.isfile(path):
        raise SurgeryError(f"calibration file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"{path} is not an .npz file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SurgeryError(f"{path} is a single .npy array; give an .npz with one array per input name")
    out = {}
    with z:
        for k in z.files:
            try:
                a = z[k]
            except Exception as e:  # noqa: BLE001 - object arrays, corrupt members
                raise SurgeryError(f"array {k!r} in {path} cannot be read without pickle: {str(e).splitlines()[0]}") from e
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                raise SurgeryError(f"array {k!r} in {path} has dtype {a.dtype}; calibration data must be numeric")
            out[k] = a
    return out


_NP = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8,
}


def _np_dtype(dt) -> np.dtype:
    return np.dtype(_NP.get(dt, np.float32))


# ---------------------------------------------------------------------------
# running the probe
# ---------------------------------------------------------------------------


def probe_model(model: ir.Model, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names``."""
    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
    values = {o.name: o for n in model.graph for o in n.outputs}
    for name in names:
        if name in have:
            continue
        v = values.get(name)
        elem = v.dtype.value if v is not None and v.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        have.add(name)
    return proto


def run_calibration(model: ir.Model, calib: Calibration, names: list[str],
                    fn: Callable[..., None], reference: tuple[Callable, list[str]] | None = None) -> None:
    """Run the probe over every calibration run; ``fn({name: array}, held_back)``. With
    ``reference = (run, names)``, also ``run(feeds, names)`` (another model on the same
    feeds) and ``fn(outs, held_back, reference outs)``."""
    from surgery.verify import session

    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        ir.external_data.load_to_model(model)
    inputs = {v.name for v in model.graph.inputs}
    fetch = [n for n in dict.fromkeys(names) if n not in inputs]
    sess = session(probe_model(model, fetch))
    for feeds, held in calib.runs():
        try:
            outs = sess.run(fetch, feeds) if fetch else []
        except Exception as e:  # noqa: BLE001
            shapes = ", ".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in feeds.items())
            raise SurgeryError(f"onnxruntime cannot run the model on calibration inputs {shapes}: "
                               f"{str(e).splitlines()[0]}") from e
        got = dict(zip(fetch, outs))
        for n in names:
            if n in inputs:
                got[n] = feeds[n]
        if reference is None:
            fn(got, held)
        else:
            fn(got, held, reference[0](feeds, reference[1]))


# ---------------------------------------------------------------------------
# moments
# ---------------------------------------------------------------------------


class Moments:
    """Per-channel sums over every non-channel position, in float64."""

    def __init__(self, c: int, gram: bool) -> None:
        self.n = 0.0
        self.s1 = np.zeros(c)
        self.s2 = np.zeros(c)
        self.sa = np.zeros(c)
        self.gram = np.zeros((c, c)) if gram else None

    def add(self, x: np.ndarray) -> None:
        """x: (positions, channels)."""
        x = np.asarray(x, dtype=np.float64)
        self.n += x.shape[0]
        self.s1 += x.sum(axis=0)
        self.s2 += np.einsum("ij,ij->j", x, x)
        self.sa += np.abs(x).sum(axis=0)
        if self.gram is not None:
            self.gram += x.T @ x

    def __sub__(self, other: "Moments") -> "Moments":
        """The moments of what ``self`` holds beyond ``other`` (no Gram matrix)."""
        out = Moments(len(self.s1), False)
        out.n = self.n - other.n
        out.s1, out.s2, out.sa = self.s1 - other.s1, self.s2 - other.s2, self.sa - other.sa
        return out

    # per channel
    @property
    def mean(self) -> np.ndarray:
        return self.s1 / max(self.n, 1.0)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.s2 / max(self.n, 1.0)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sa / max(self.n, 1.0)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.mean_sq - self.mean**2, 0.0)


def channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """(positions, channels) view of x with ``axis`` as the channel axis."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------
# consumers: the layers that read a group's channels through a weight
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Consumer:
    node: ir.Node
    x: str  # the activation it reads
    x_axis: int  # X's channel (contraction) axis, non-negative
    x_axis_id: int  # that axis in the analysis
    w: str  # the weight initializer
    w_axis: int  # W's contraction axis, non-negative

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op_type

    def _attr(self, key, default):
        a = self.node.attributes.get(key)
        return default if a is None else a.value

    def dense_weight(self) -> np.ndarray:
        """W as (outputs, X channels, taps): entry [o, c, t] multiplies channel c of X
        (at kernel tap t) into output o (the op's ``@consumer`` in its family file says how)."""
        W = self.node.inputs[1].const_value.numpy().astype(np.float64)
        return CONSUMERS[op_key(self.node)].dense_weight(self.node, W)

    @cached_property
    def col_sq(self) -> np.ndarray:
        """Per X channel: the sum of W**2 over every weight entry that reads it."""
        return np.square(self.dense_weight()).sum(axis=(0, 2))

    @cached_property
    def col_abs(self) -> np.ndarray:
        return np.abs(self.dense_weight()).sum(axis=(0, 2))


def find_consumers(analysis) -> list[Consumer]:
    """Every consumer (an op with a ``@consumer`` role: Conv, ConvTranspose, MatMul, Gemm)
    whose weight (input 1) is an initializer, with the axis of its activation input that
    the weight contracts."""
    cache = analysis.derived.get("consumers")
    if cache is not None:
        return cache
    inits = analysis.model.graph.initializers
    out = []
    for node in analysis.model.graph:
        role = CONSUMERS.get(op_key(node))
        if role is None or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or w.name not in inits or w.const_value is None or x.name in inits:
            continue
        wr = len(w.const_value.shape)
        xr = len(x.shape) if x.shape is not None else None
        if xr is None:
            continue
        xa, wa = role.axes(node, xr, wr)
        aid = analysis.dims.find(("value", x.name, xa))
        if aid is None or analysis.dims.axes[aid].offset < 0:
            continue
        out.append(Consumer(node, x.name, xa, aid, w.name, wa))
    analysis.derived["consumers"] = out
    return out


def unit_matrix(analysis, atoms: np.ndarray, axis_id: int) -> sp.csr_matrix:
    """(axis length x units): column u marks the indices atom ``atoms[u]`` removes on that axis."""
    ax = analysis.dims.axes[axis_id]
    if ax.offset < 0 or not len(atoms):
        return sp.csr_matrix((max(ax.size, 0), len(atoms)))
    sub = analysis._removes_csc[:, atoms][ax.offset : ax.offset + ax.size]
    m = sp.csr_matrix(sub, dtype=np.float64)
    m.data[:] = 1.0
    return m


def group_tensors(analysis, group, limit: int = 4) -> list[tuple[str, int, int]]:
    """(value, axis, axis id) of activations the group's channels live in (no weights,
    no graph inputs), for groups no weight consumer reads."""
    inits = analysis.model.graph.initializers
    inputs = {v.name for v in analysis.model.graph.inputs}
    out = []
    for a in sorted(group.axes):
        kind, name, k = analysis.dims.axes[a].key
        if kind != "value" or name in inits or name in inputs or analysis.dims.axes[a].offset < 0:
            continue
        out.append((name, k, a))
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------
# the statistics object criteria see as ``ctx.stats``
# ---------------------------------------------------------------------------


class Stats:
    """Moments of the tensors the groups' consumers read: over all calibration samples (with
    the Gram matrix when asked), and over the held-back ones (without)."""

    def __init__(self, analysis, calib: Calibration | None) -> None:
        self.analysis = analysis
        self.calib = calib
        self.parts: dict[tuple[str, int], dict[str, Moments]] = {}  # {"all": ..., "held": ...}
        self.gram_wanted: set[tuple[str, int]] = set()

    def moments(self, name: str, axis: int, part: str = "all") -> Moments | None:
        """part: "all", "held" (the held-back samples) or "fit" (the others; no Gram)."""
        p = self.parts.get((name, axis))
        if p is None:
            return None
        if part == "fit":
            return p["all"] - p["held"]
        return p[part]

    def has(self, name: str, axis: int) -> bool:
        return (name, axis) in self.parts

    def consumers(self, group) -> list[tuple[Consumer, sp.csr_matrix]]:
        """The group's consumers with measured inputs, each with its (X channels x units) map."""
        axes = set(group.axes)
        out = []
        for c in find_consumers(self.analysis):
            if c.x_axis_id in axes and self.has(c.x, c.x_axis):
                out.append((c, unit_matrix(self.analysis, group.atoms, c.x_axis_id)))
        return out

    def tensors(self, group) -> list[tuple[str, int, sp.csr_matrix]]:
        """The activations the group's channels live in, with their (channels x units) map:
        the inputs its consumers read, else the group's own activations."""
        seen, out = set(), []
        for c, U in self.consumers(group):
            if (c.x, c.x_axis) not in seen:
                seen.add((c.x, c.x_axis))
                out.append((c.x, c.x_axis, U))
        if not out:
            for name, k, a in group_tensors(self.analysis, group):
                if self.has(name, k):
                    out.append((name, k, unit_matrix(self.analysis, group.atoms, a)))
        return out


def wanted_tensors(analysis, groups, gram: bool) -> dict[tuple[str, int], bool]:
    """(value, axis) -> whether its Gram matrix is wanted, for scoring ``groups``."""
    consumers = find_consumers(analysis)
    want: dict[tuple[str, int], bool] = {}
    inits = analysis.model.graph.initializers
    for g in groups:
        axes = set(g.axes)
        mine = [c for c in consumers if c.x_axis_id in axes]
        for c in mine:
            size = analysis.dims.axes[c.x_axis_id].size
            want[(c.x, c.x_axis)] = want.get((c.x, c.x_axis), False) or (gram and size <= MAX_GRAM)
        if not mine:
            for name, k, _ in group_tensors(analysis, g):
                if name not in inits:
                    want.setdefault((name, k), False)
    return want


def collect(analysis, calib: Calibration, groups=None, *, gram: bool = False) -> Stats:
    """Run the calibration data through a probe of ``analysis.model`` and gather the
    moments (and, with ``gram``, the Gram matrices) of what ``groups`` need."""
    groups = [g for g in analysis.groups if g.prunable] if groups is None else list(groups)
    stats = Stats(analysis, calib)
    want = wanted_tensors(analysis, groups, gram)
    sizes = {}
    for (name, k) in want:
        a = analysis.dims.find(("value", name, k))
        sizes[(name, k)] = analysis.dims.axes[a].size
    for key, g in want.items():
        stats.parts[key] = {"all": Moments(sizes[key], g), "held": Moments(sizes[key], False)}
        if g:
            stats.gram_wanted.add(key)

    def gather(keys):
        def take(outs: dict[str, np.ndarray], held: bool) -> None:
            for name, k in keys:
                parts = stats.parts[(name, k)]
                x = outs[name]
                if x.shape[k] != sizes[(name, k)]:
                    raise SurgeryError(f"calibration run gives '{name}' {x.shape[k]} channels on axis {k}, "
                                       f"the analysis expects {sizes[(name, k)]}")
                xs = channels_last(x, k)
                parts["all"].add(xs)
                if held:
                    parts["held"].add(xs)

        return take

    for keys in passes(list(want), lambda key: 8 * sizes[key] ** 2 if want[key] else 0):
        run_calibration(analysis.model, calib, sorted({n for n, _ in keys}), gather(keys))
    return stats


def passes(items: list, gram_bytes: Callable[[Any], int]) -> list[list]:
    """``items`` split into passes over the calibration data whose Gram matrices together
    take at most ``MAX_GRAM_BYTES`` (one item over it gets a pass of its own); the items
    without a Gram matrix go with the first. Memory then stays bounded by the budget and
    one run's outputs, whatever the number of layers."""
    out: list[list] = [[]]
    used = 0
    for item in sorted(items, key=lambda i: gram_bytes(i) > 0):
        b = gram_bytes(item)
        if b and used and used + b > MAX_GRAM_BYTES:
            out.append([])
            used = 0
        out[-1].append(item)
        used += b
    return [p for p in out if p] or [[]]
