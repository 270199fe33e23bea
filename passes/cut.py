"""The rewrite that removes channels: slice weights, fix sizes written into the graph.

Given the removed indices per axis (from the analysis), this pass
1. slices every initializer along each cut axis,
2. rewrites the node attributes and constant inputs that spell out a size
   (conv groups, reshape/expand targets, split sizes, slice bounds, gather
   indices, resize sizes, group-norm groups), and
3. updates the static shapes recorded on every value.
It changes the model in place; the caller keeps a copy when it needs one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from surgery.analysis import Analysis
from surgery.passes.rules.base import Unsupported, const_array, value_shape, where_guarded
from surgery.passes.rules.shape import slice_params

REWRITES: dict[str, Callable[["CutContext", ir.Node], None]] = {}


def rewrite(*ops: str):
    def deco(fn):
        for op in ops:
            REWRITES[op] = fn
        return fn

    return deco


class CutContext:
    def __init__(self, analysis: Analysis, removed: dict[int, np.ndarray]) -> None:
        self.a = analysis
        self.removed = removed
        self.opset = _opset(analysis.model)

    def removed_on(self, key: tuple) -> np.ndarray | None:
        i = self.a.dims.find(key)
        if i is None:
            return None
        return self.removed.get(i)

    def value_removed(self, v: ir.Value, k: int) -> np.ndarray | None:
        return self.removed_on(("value", v.name, k))

    def kept_size(self, key: tuple) -> int | None:
        i = self.a.dims.find(key)
        if i is None:
            return None
        ax = self.a.dims.axes[i]
        if ax.size < 0:
            return None
        r = self.removed.get(i)
        return ax.size - (0 if r is None else len(r))

    def set_const_input(self, node: ir.Node, i: int, array: np.ndarray) -> None:
        """Give ``node`` its own constant for input i (the old one may be shared)."""
        node.replace_input_with(i, new_initializer(self.a.model, f"{node.name}_{i}_cut", array))


def new_initializer(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array``, named ``base`` (``base1``, ``base2``, ... if taken)."""
    graph = model.graph
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}{k}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    v.const_value = ir.tensor(array, name=name)
    graph.register_initializer(v)
    return v


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def apply_cut(analysis: Analysis, removed: dict[int, np.ndarray]) -> None:
    ctx = CutContext(analysis, removed)
    model = analysis.model
    dims = analysis.dims
    # 1. nodes first: their rewrites read the old shapes
    for node in list(model.graph):
        fn = REWRITES.get(node.op_type)
        if fn is not None:
            fn(ctx, node)
    # 2. weights
    by_value: dict[str, list[tuple[int, np.ndarray]]] = {}
    for i, idx in removed.items():
        kind, name, k = dims.axes[i].key
        if kind == "value":
            by_value.setdefault(name, []).append((k, idx))
    inits = model.graph.initializers
    for name, cuts in by_value.items():
        if name not in inits:
            continue
        v = inits[name]
        arr = v.const_value.numpy()
        for k, idx in cuts:
            arr = np.delete(arr, idx, axis=k)
        v.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
    # 3. shapes recorded on values
    for name, cuts in by_value.items():
        for v in _values_named(model, name):
            if v.shape is None:
                continue
            dims_ = list(v.shape)
            for k, idx in cuts:
                if isinstance(dims_[k], int):
                    dims_[k] = dims_[k] - len(idx)
                else:  # a symbol like 4*batch no longer holds: runtimes trust equal names
                    dims_[k] = ir.SymbolicDim(None)
            v.shape = ir.Shape(dims_)


def _values_named(model: ir.Model, name: str):
    g = model.graph
    if name in g.initializers:
        yield g.initializers[name]
        return
    for v in g.inputs:
        if v.name == name:
            yield v
            return
    cache = getattr(model, "_surgery_values", None)
    if cache is None:
        cache = {}
        for node in g:
            for o in node.outputs:
                cache[o.name] = o
        model._surgery_values = cache
    if name in cache:
        yield cache[name]


# -- per-op rewrites ------------------------------------------------------


@rewrite("Conv", "ConvTranspose")
def _conv(ctx: CutContext, node: ir.Node) -> None:
    g = ctx.kept_size(("virtual", node.name, "groups"))
    if g is not None and node.attributes.get("group") is not None:
        node.attributes["group"] = ir.AttrInt64("group", g)


@rewrite("Attention")
def _attention(ctx: CutContext, node: ir.Node) -> None:
    """Head counts in attributes, and the default scale 1/sqrt(head_dim) made explicit
    when head_dim shrinks (the cut must not change it)."""
    if "scale" not in node.attributes:  # read head_dim before the head counts change
        q = node.inputs[0]
        d = q.shape[-1] if len(q.shape) == 4 else q.shape[-1] // node.attributes["q_num_heads"].value
        if isinstance(d, int):
            node.attributes["scale"] = ir.AttrFloat32("scale", float(d) ** -0.5)
    for attr, tag in (("q_num_heads", "q_heads"), ("kv_num_heads", "kv_heads")):
        if attr in node.attributes:
            n = ctx.kept_size(("virtual", node.name, tag))
            if n is None and tag == "kv_heads":
                n = ctx.kept_size(("virtual", node.name, "q_heads"))
            if n is not None:
                node.attributes[attr] = ir.AttrInt64(attr, n)


@rewrite("GroupNormalization")
def _group_norm(ctx: CutContext, node: ir.Node) -> None:
    g = ctx.kept_size(("virtual", node.name, "groups"))
    if g is not None:
        node.attributes["num_groups"] = ir.AttrInt64("num_groups", g)


def _new_target(ctx: CutContext, out: ir.Value, old: list[int | None], right_aligned: bool) -> list[int | None] | None:
    """A shape tensor's entries after the cut (None: computed at run time, left alone)."""
    r = len(out.shape)
    new = list(old)
    changed = False
    for pos, entry in enumerate(old):
        k = pos + (r - len(old) if right_aligned else 0)
        rem = ctx.value_removed(out, k)
        if entry is None or rem is None or not len(rem):
            continue
        if entry in (-1, 0) or (right_aligned and entry == 1):
            continue  # inferred, copied or broadcast: follows the cut by itself
        new[pos] = entry - len(rem)
        changed = True
    return new if changed else None


def _rewrite_shape_input(ctx: CutContext, node: ir.Node, i: int, right_aligned: bool) -> None:
    shape_v = node.inputs[i]
    out = node.outputs[0]
    c = const_array(shape_v)
    if c is not None:
        new = _new_target(ctx, out, [int(x) for x in c.tolist()], right_aligned)
        if new is not None:
            ctx.set_const_input(node, i, np.asarray(new, dtype=np.int64))
        return
    prod = shape_v.producer() if shape_v is not None else None
    inner = where_guarded(prod) if prod is not None else None
    if inner is not None:  # Where(Equal(s, -1), ones, s): rewrite s, drop the guard
        prod = inner.producer()
    while prod is not None and (prod.op_type in ("Identity", "Cast") or (
            prod.op_type == "Reshape" and len(prod.outputs[0].shape or ()) == 1)):
        prod = prod.inputs[0].producer()  # a 1-D view of the same entries
    if prod is None or prod.op_type != "Concat":
        return
    # literal pieces of a Concat-built shape (the analysis blocked the run-time ones)
    full: list[int | None] = []
    pieces: list[tuple[int, int, np.ndarray | None]] = []  # (input index, start, literal)
    for j, piece in enumerate(prod.inputs):
        pc = const_array(piece)
        n = value_shape(piece)[0]
        pieces.append((j, len(full), pc))
        full.extend([int(x) for x in np.atleast_1d(pc).tolist()] if pc is not None else [None] * n)
    new = _new_target(ctx, out, full, right_aligned)
    if new is None:
        return
    edits = [(j, np.asarray(new[st : st + pc.size], dtype=pc.dtype).reshape(pc.shape))
             for j, st, pc in pieces if pc is not None and new[st : st + pc.size] != full[st : st + pc.size]]
    if not edits:
        return
    if inner is not None and -1 in [e for e in new if e is not None]:
        return  # the guard still matters; the analysis blocked what this would need
    # the Concat may feed other reshapes (Q, K and V share one): edit a private copy
    mine = ir.Node(prod.domain, "Concat", inputs=list(prod.inputs), attributes=list(prod.attributes.values()),
                   name=f"{prod.name}_for_{node.name}", num_outputs=1)
    mine.outputs[0].name = f"{shape_v.name}_for_{node.name}"
    mine.outputs[0].shape = shape_v.shape
    mine.outputs[0].type = shape_v.type
    ctx.a.model.graph.insert_before(node, mine)
    node.replace_input_with(i, mine.outputs[0])
    for j, arr in edits:
        ctx.set_const_input(mine, j, arr)


@rewrite("Reshape")
def _reshape(ctx: CutContext, node: ir.Node) -> None:
    _rewrite_shape_input(ctx, node, 1, right_aligned=False)


@rewrite("Expand")
def _expand(ctx: CutContext, node: ir.Node) -> None:
    _rewrite_shape_input(ctx, node, 1, right_aligned=True)


@rewrite("Split")
def _split(ctx: CutContext, node: ir.Node) -> None:
    x = node.inputs[0]
    r = len(x.shape)
    axis = node.attributes["axis"].value % r if "axis" in node.attributes else 0
    if ctx.value_removed(x, axis) is None:
        return
    sizes = []
    for o in node.outputs:
        rem = ctx.value_removed(o, axis)
        sizes.append(o.shape[axis] - (0 if rem is None else len(rem)))
    sizes = np.asarray(sizes, dtype=np.int64)
    if ctx.opset >= 13:
        if "num_outputs" in node.attributes:
            del node.attributes["num_outputs"]
        if len(node.inputs) >= 2 and node.inputs[1] is not None:
            ctx.set_const_input(node, 1, sizes)
        else:
            name = f"{node.name}_split_cut"
            v = ir.Value(name=name, shape=ir.Shape([len(sizes)]), type=ir.TensorType(ir.DataType.INT64))
            v.const_value = ir.tensor(sizes, name=name)
            ctx.a.model.graph.register_initializer(v)
            if len(node.inputs) < 2:
                node.resize_inputs(2)
            node.replace_input_with(1, v)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())


@rewrite("Slice")
def _slice(ctx: CutContext, node: ir.Node) -> None:
    x = node.inputs[0]
    r = len(x.shape)

    try:
        params = slice_params(node, ctx.opset, r)
    except Unsupported:
        return  # run-time bounds: the analysis blocked every axis they touch
    starts, ends = [], []
    changed = False
    for axis, s, e, st in params:
        n = x.shape[axis]
        rem = ctx.value_removed(x, axis)
        if rem is None or not isinstance(n, int):
            starts.append(s)
            ends.append(e)
            continue
        sel = np.arange(n)[slice(int(s), int(e), int(st))]
        keep = np.setdiff1d(sel, rem)
        kept_before = np.setdiff1d(np.arange(n), rem)
        new_s = int(np.searchsorted(kept_before, keep[0])) if len(keep) else 0
        starts.append(new_s)
        ends.append(new_s + len(keep))
        changed = True
    if not changed:
        return
    if ctx.opset >= 10:
        ctx.set_const_input(node, 1, np.asarray(starts, dtype=np.int64))
        ctx.set_const_input(node, 2, np.asarray(ends, dtype=np.int64))
    else:
        node.attributes["starts"] = ir.AttrInt64s("starts", starts)
        node.attributes["ends"] = ir.AttrInt64s("ends", ends)


@rewrite("Gather")
def _gather(ctx: CutContext, node: ir.Node) -> None:
    data, ind = node.inputs[0], node.inputs[1]
    r = len(data.shape)
    axis = node.attributes["axis"].value % r if "axis" in node.attributes else 0
    rem = ctx.value_removed(data, axis)
    c = const_array(ind)
    if rem is None or c is None or c.ndim != 1:
        return
    n = data.shape[axis]
    c = c % n
    new_pos = np.cumsum(~np.isin(np.arange(n), rem)) - 1
    out_rem = ctx.value_removed(node.outputs[0], axis)
    keep = np.ones(len(c), bool)
    if out_rem is not None:
        keep[out_rem] = False
    ctx.set_const_input(node, 1, new_pos[c[keep]].astype(c.dtype))


@rewrite("Resize")
def _resize(ctx: CutContext, node: ir.Node) -> None:
    if len(node.inputs) < 4 or node.inputs[3] is None:
        return
    rem = ctx.value_removed(node.outputs[0], 1)
    sizes = const_array(node.inputs[3])
    if rem is None or sizes is None:
        return
    sizes = sizes.copy()
    sizes[1] -= len(rem)
    ctx.set_const_input(node, 3, sizes)
