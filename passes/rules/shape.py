"""Ops that move data between axes: reshapes, transposes, concat, split, slice, gather."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .base import RuleContext, Unsupported, const_array, dim_keys, rewrite, rule, shape_sources, value_shape, where_guarded
from .cut_context import CutContext


def _same(a, b) -> bool:
    return a is not None and a == b


def reshape_map(ctx: RuleContext, x, y) -> None:
    """Tie or factor the axes of x and y, which hold the same elements in row-major order."""
    dx, dy = dim_keys(x, ctx.filled.get(x.name)), dim_keys(y, ctx.filled.get(y.name))
    i = 0
    while i < len(dx) and i < len(dy) and _same(dx[i], dy[i]):
        ctx.tie(x, i, y, i)
        i += 1
    jx, jy = len(dx), len(dy)
    while jx > i and jy > i and _same(dx[jx - 1], dy[jy - 1]):
        ctx.tie(x, jx - 1, y, jy - 1)
        jx, jy = jx - 1, jy - 1
    mx, my = dx[i:jx], dy[i:jy]
    if not mx and not my:
        return
    if any(not isinstance(d, int) for d in mx + my):
        # batch/seq of unknown size merged or split (a [-1, E] view): refine the longest
        # static tails that hold the same elements; the unknown-size heads are no channels
        tx, ty = _static_tail(mx, my)
        for v, side, base in ((x, mx, i), (y, my, i)):
            for k in range(len(side) - (tx if v is x else ty)):
                ctx.block(v, base + k, "reshape over axes of unknown size")
        i_x, i_y = i + len(mx) - tx, i + len(my) - ty
        mx, my = mx[len(mx) - tx:], my[len(my) - ty:]
        if not mx and not my:
            return
        _refine(ctx, x, mx, i_x, y, my, i_y)
        return
    if math.prod(mx) != math.prod(my):  # python ints: declared sizes can overflow int64
        raise Unsupported("reshape with inconsistent sizes")
    _refine(ctx, x, mx, i, y, my, i)


def _static_tail(mx: list, my: list) -> tuple[int, int]:
    """Lengths of the longest static suffixes of mx and my with equal products."""
    def tail(side):
        n = 0
        while n < len(side) and isinstance(side[len(side) - 1 - n], int):
            n += 1
        return n

    best = (0, 0)
    for a in range(tail(mx) + 1):
        pa = math.prod(mx[len(mx) - a:])
        for b in range(tail(my) + 1):
            pb = math.prod(my[len(my) - b:])
            if pa == pb and a + b > sum(best):
                best = (a, b)
    return best


def _refine(ctx: RuleContext, x, mx: list[int], bx: int, y, my: list[int], by: int) -> None:
    """Common refinement of two static axis runs holding the same elements in row-major
    order: virtual factor axes, each side's axis tied to one factor or their product."""
    cuts = set()
    for side in (mx, my):
        p = 1
        for d in side:
            p *= d
            cuts.add(p)
    cuts = sorted(cuts)
    prev = 1
    factors = []
    for c in cuts:
        if c % prev:
            raise Unsupported("reshape mixes axes that do not factor into each other")
        if c != prev:
            factors.append((prev, c))
        prev = c
    fids = [ctx.virtual(f"f{k}", hi // lo) for k, (lo, hi) in enumerate(factors)]
    for v, side, base in ((x, mx, bx), (y, my, by)):
        p = 1
        for k, d in enumerate(side):
            lo, hi = p, p * d
            p = hi
            a = ctx.ax(v, base + k)
            if d == 1:
                continue
            cover = [f for f, (flo, fhi) in zip(fids, factors) if flo >= lo and fhi <= hi]
            if len(cover) == 1:
                ctx.tie(a, None, cover[0], None)
            else:
                ctx.product(a, cover)


def _runtime_shape_guard(ctx: RuleContext, y, shape_v, right_aligned: bool = False) -> None:
    """Entries read from ``Shape(t)[k]`` follow t's axis k by themselves: tie the output
    axis to it. Other run-time entries cannot be rewritten: block the axes they size."""
    if shape_v is None or ctx.const(shape_v) is not None:
        return
    src = shape_sources(shape_v)
    sy = ctx.shape(y)
    off = len(sy) - len(src) if (src is not None and right_aligned) else 0
    for j, s in enumerate(sy):
        e = src[j - off] if src is not None and 0 <= j - off < len(src) else None
        if isinstance(e, int):
            continue
        if isinstance(e, tuple) and e[1].shape is not None:
            ctx.tie(e[1], e[2], y, j)
            continue
        if s is not None and s > 1:
            ctx.block(y, j, "reshape target computed at run time")


@rule("Reshape")
def reshape(ctx: RuleContext) -> None:
    x, shape_v, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ctx.param(shape_v)
    _runtime_shape_guard(ctx, y, shape_v)
    reshape_map(ctx, x, y)


@rule("Flatten", "Squeeze", "Unsqueeze")
def flatten_like(ctx: RuleContext) -> None:
    for v in ctx.node.inputs[1:]:
        ctx.param(v)
    reshape_map(ctx, ctx.input(0), ctx.output(0))


@rule("Transpose")
def transpose(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    r = ctx.rank(x)
    perm = ctx.attr("perm", None) or list(reversed(range(r)))
    for j, k in enumerate(perm):
        ctx.tie(x, int(k), y, j)


@rule("Concat")
def concat(ctx: RuleContext) -> None:
    y = ctx.output(0)
    r = ctx.rank(y)
    axis = int(ctx.attr("axis")) % r
    off = 0
    for v in ctx.node.inputs:
        n = ctx.size(v, axis)
        if n is None:
            raise Unsupported("concatenated axis of unknown size")
        for k in range(r):
            if k == axis:
                ctx.tie(v, k, y, k, None, range(off, off + n))
            else:
                ctx.tie(v, k, y, k)
        off += n


def _split_sizes(ctx: RuleContext, x, axis: int) -> list[int]:
    outs = [o for o in ctx.node.outputs]
    sizes = [ctx.size(o, axis) for o in outs]
    if any(s is None for s in sizes):
        raise Unsupported("split sizes unknown")
    return sizes


@rule("Split")
def split(ctx: RuleContext) -> None:
    x = ctx.input(0)
    r = ctx.rank(x)
    axis = int(ctx.attr("axis", 0)) % r
    ctx.param(ctx.input(1))
    off = 0
    for o, n in zip(ctx.node.outputs, _split_sizes(ctx, x, axis)):
        for k in range(r):
            if k == axis:
                ctx.tie(x, k, o, k, range(off, off + n), None)
            else:
                ctx.tie(x, k, o, k)
        off += n


def slice_params(node, opset: int, r: int):
    """(axis, start, end, step) per sliced axis, from inputs (opset >= 10) or attributes."""
    def inp(i):
        return node.inputs[i] if i < len(node.inputs) else None

    def attr(name):
        a = node.attributes.get(name)
        return None if a is None else a.value

    if opset >= 10:
        vals = [None if inp(i) is None else const_array(inp(i)) for i in range(1, 5)]
        for i, v in enumerate(vals):
            if inp(i + 1) is not None and v is None:
                raise Unsupported("slice parameters computed at run time")
        starts, ends, axes, steps = vals
    else:
        starts, ends, axes, steps = attr("starts"), attr("ends"), attr("axes"), None
    starts, ends = np.atleast_1d(starts).tolist(), np.atleast_1d(ends).tolist()
    axes = list(range(len(starts))) if axes is None else [int(a) % r for a in np.atleast_1d(axes)]
    steps = [1] * len(starts) if steps is None else np.atleast_1d(steps).tolist()
    return list(zip(axes, starts, ends, steps))


@rule("Slice")
def slice_(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    r = ctx.rank(x)
    for v in ctx.node.inputs[1:]:
        ctx.param(v)
    sliced = {a: (s, e, st) for a, s, e, st in slice_params(ctx.node, ctx.opset, r)}
    for k in range(r):
        if k not in sliced:
            ctx.tie(x, k, y, k)
            continue
        n = ctx.size(x, k)
        if n is None:
            ctx.block(y, k, "sliced axis of unknown size")
            ctx.ax(x, k)
            continue
        s, e, st = sliced[k]
        idx = range(n)[slice(int(s), int(e), int(st))]  # a range: no array as long as the axis
        if st != 1:
            ctx.block(x, k, "strided slice")
        ctx.tie(x, k, y, k, idx, None)


@rule("Gather")
def gather(ctx: RuleContext) -> None:
    data, ind, y = ctx.input(0), ctx.input(1), ctx.output(0)
    r = ctx.rank(data)
    axis = int(ctx.attr("axis", 0)) % r
    ri = ctx.rank(ind)
    for k in range(axis):
        ctx.tie(data, k, y, k)
    for k in range(axis + 1, r):
        ctx.tie(data, k, y, k - 1 + ri)
    c = ctx.const(ind)
    n = ctx.size(data, axis)
    if c is not None and n is not None and ri == 1:
        ctx.param(ind)
        ctx.tie(data, axis, y, axis, np.asarray(c) % n, None)
        return
    for k in range(ri):
        ctx.tie(ind, k, y, axis + k)
    if c is not None and n is not None:
        ctx.block(data, axis, "selected by Gather", np.unique(np.asarray(c) % n))
    else:
        ctx.block(data, axis, "indexed by run-time data")


@rule("Shape", "Size")
def shape_of(ctx: RuleContext) -> None:
    # reads sizes at run time, so it follows any cut by itself
    ctx.free(ctx.input(0))
    ctx.param(ctx.output(0))


@rule("Tile")
def tile(ctx: RuleContext) -> None:
    x, reps_v, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ctx.param(reps_v)
    reps = ctx.const_required(reps_v, "tile repeats")
    for k, rep in enumerate(np.atleast_1d(reps).tolist()):
        if rep == 1:
            ctx.tie(x, k, y, k)
        else:
            ctx.block(x, k, "tiled")
            ctx.block(y, k, "tiled")


# -- rewrites: shape targets, split sizes, slice bounds and gather indices after a cut --


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


def rewrite_shape_input(ctx: CutContext, node: ir.Node, i: int, right_aligned: bool) -> None:
    """Rewrite the shape tensor in input i of a Reshape (left-aligned) or Expand
    (right-aligned): a constant, or the literal pieces of a Concat that builds it."""
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
    rewrite_shape_input(ctx, node, 1, right_aligned=False)


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
