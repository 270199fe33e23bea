"""Convolutions, pooling, resizing and pixel shuffles (channel axis 1, spatial axes 2..)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from surgery.dims import NOT_CHANNEL

from .base import (RuleContext, Unsupported, all_axes, const_array, consumer, flops, node_attr, rewrite, rule,
                   shapes_known)
from .cut_context import CutContext

SPATIAL = "spatial axis (" + NOT_CHANNEL + ")"


def _spatial_block(ctx: RuleContext, *values) -> None:
    for v in values:
        if v is None:
            continue
        for k in range(2, ctx.rank(v)):
            ctx.block(v, k, SPATIAL)


def _grouped(ctx: RuleContext, chan: int, groups: int, tag: str) -> tuple[int, int]:
    """Split a channel axis into groups x per-group (virtual axes); returns their ids."""
    size = ctx.g.axes[chan].size
    if groups < 1:
        raise Unsupported(f"group={groups} is not a positive count")
    if size < 0 or size % groups:
        raise Unsupported(f"channels ({size}) not divisible by groups ({groups})")
    G = ctx.virtual("groups", groups)
    P = ctx.virtual(tag, size // groups)
    ctx.product(chan, [G, P])
    return G, P


@rule("Conv")
def conv(ctx: RuleContext) -> None:
    x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    g = int(ctx.attr("group", 1))
    ctx.tie(x, 0, y, 0)
    if g == 1:
        ctx.tie(x, 1, w, 1)
    else:
        _, J = _grouped(ctx, ctx.ax(x, 1), g, "in_per_group")
        ctx.tie(w, 1, J, None)
        _grouped(ctx, ctx.ax(w, 0), g, "out_per_group")
    ctx.tie(w, 0, y, 1)
    if b is not None:
        ctx.tie(b, 0, y, 1)
    ctx.role(y, 1, "channel")
    _spatial_block(ctx, x, w, y)


@rule("ConvTranspose")
def conv_transpose(ctx: RuleContext) -> None:
    x, w, b, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    g = int(ctx.attr("group", 1))
    ctx.tie(x, 0, y, 0)
    ctx.tie(x, 1, w, 0)
    if g == 1:
        ctx.tie(w, 1, y, 1)
    else:
        _grouped(ctx, ctx.ax(w, 0), g, "in_per_group")
        _, K = _grouped(ctx, ctx.ax(y, 1), g, "out_per_group")
        ctx.tie(w, 1, K, None)
    if b is not None:
        ctx.tie(b, 0, y, 1)
    _spatial_block(ctx, x, w, y)


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx: RuleContext) -> None:
    x = ctx.input(0)
    for out in ctx.node.outputs:
        if out is None or out.shape is None:
            continue
        ctx.tie(x, 0, out, 0)
        ctx.tie(x, 1, out, 1)
        _spatial_block(ctx, out)
    if len(ctx.node.outputs) > 1 and ctx.output(1) is not None and ctx.output(1).uses():
        # MaxPool indices are flat offsets over N x C x H x W: a channel cut changes them
        ctx.block(ctx.output(1), 1, "indices encode channel offsets")
    _spatial_block(ctx, x)


@rule("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    for v in ctx.node.inputs[1:]:
        if v is not None:
            ctx.param(v)  # roi / scales / sizes; a `sizes` input is rewritten by the cut
    if ctx.size(x, 1) != ctx.size(y, 1):
        raise Unsupported("resizes the channel axis")
    ctx.tie(x, 0, y, 0)
    ctx.tie(x, 1, y, 1)
    _spatial_block(ctx, x, y)


def _pixel_shuffle(ctx: RuleContext, deep, shallow, crd: bool) -> None:
    """DepthToSpace / SpaceToDepth: the deep side's channels are blocks x channels of the
    shallow side; the block factors move into spatial axes, so only channels are cut."""
    b = int(ctx.attr("blocksize"))
    c = ctx.size(shallow, 1)
    if c is None:
        raise Unsupported("channel count unknown")
    B1, B2, C = ctx.virtual("b1", b), ctx.virtual("b2", b), ctx.virtual("c", c)
    ctx.product(ctx.ax(deep, 1), [C, B1, B2] if crd else [B1, B2, C])
    ctx.tie(C, None, shallow, 1)
    ctx.tie(deep, 0, shallow, 0)
    _spatial_block(ctx, deep, shallow)
    for blk in (B1, B2):
        ctx.block(blk, None, "moved into a spatial axis")


@rule("DepthToSpace")
def depth_to_space(ctx: RuleContext) -> None:
    _pixel_shuffle(ctx, ctx.input(0), ctx.output(0), ctx.attr("mode", "DCR") == "CRD")


@rule("SpaceToDepth")
def space_to_depth(ctx: RuleContext) -> None:
    _pixel_shuffle(ctx, ctx.output(0), ctx.input(0), False)


@rule("Pad")
def pad(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    r = ctx.rank(x)
    if ctx.opset >= 11:
        pads = ctx.const_required(ctx.input(1), "the pads")
        for v in ctx.node.inputs[1:]:
            ctx.param(v)
        axes_v = ctx.input(3)
        axes = list(range(r)) if axes_v is None else [int(a) % r for a in ctx.const_required(axes_v, "the pad axes")]
    else:
        pads = np.asarray(ctx.attr("pads"))
        axes = list(range(r))
    n = len(axes)
    begin, end = dict(zip(axes, pads[:n].tolist())), dict(zip(axes, pads[n:].tolist()))
    for k in range(r):
        pb, pe = int(begin.get(k, 0)), int(end.get(k, 0))
        if pb == 0 and pe == 0:
            ctx.tie(x, k, y, k)
        elif pb < 0 or pe < 0:
            ctx.block(x, k, "cropped")
            ctx.block(y, k, "cropped")
        else:
            n_in = ctx.size(x, k)
            if n_in is None:
                raise Unsupported("padded axis of unknown size")
            ctx.tie(x, k, y, k, None, range(pb, pb + n_in))
            ctx.block(y, k, "padding", range(pb))
            ctx.block(y, k, "padding", range(pb + n_in, pb + n_in + pe))


@flops("Conv", "ConvTranspose")
def conv_flops(node) -> list:
    """2 x MACs: a Conv does (Cin/g) x kernel MACs per output element; a ConvTranspose
    scatters (Cout/g) x kernel MACs from every input element."""
    if len(node.inputs) < 2 or not shapes_known(node.inputs[0], node.inputs[1], node.outputs[0]):
        return []
    w = node.inputs[1]
    big = node.outputs[0] if node.op_type == "Conv" else node.inputs[0]
    return [(2, [(big, all_axes(big)), (w, list(range(1, len(w.shape))))])]


@rewrite("Conv", "ConvTranspose")
def _conv(ctx: CutContext, node: ir.Node) -> None:
    g = ctx.kept_size(("virtual", node.name, "groups"))
    if g is not None and node.attributes.get("group") is not None:
        node.attributes["group"] = ir.AttrInt64("group", g)


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


# -- consumer role: what the data-aware criteria and compensation read through a kernel --


@consumer("Conv", axes=lambda node, xr, wr: (1, 1))
def conv_dense_weight(node: ir.Node, W: np.ndarray) -> np.ndarray:
    """(O, Cin, taps); a grouped kernel is expanded with zeros to all Cin channels."""
    g = int(node_attr(node, "group", 1))
    O, P = W.shape[0], W.shape[1]
    Wr = W.reshape(O, P, -1)
    if g == 1:
        return Wr
    out = np.zeros((O, P * g, Wr.shape[2]))
    og = O // g
    for i in range(g):
        out[i * og : (i + 1) * og, i * P : (i + 1) * P] = Wr[i * og : (i + 1) * og]
    return out


@consumer("ConvTranspose", axes=lambda node, xr, wr: (1, 0))
def conv_transpose_dense_weight(node: ir.Node, W: np.ndarray) -> np.ndarray:
    """(Cout, Cin, taps) from the (Cin, Cout/g, ...) kernel; groups expanded with zeros."""
    g = int(node_attr(node, "group", 1))
    C, Og = W.shape[0], W.shape[1]
    Wr = W.reshape(C, Og, -1).transpose(1, 0, 2)  # (Og, C, K)
    if g == 1:
        return Wr
    out = np.zeros((Og * g, C, Wr.shape[2]))
    cg = C // g
    for i in range(g):
        out[i * Og : (i + 1) * Og, i * cg : (i + 1) * cg] = Wr[:, i * cg : (i + 1) * cg]
    return out
