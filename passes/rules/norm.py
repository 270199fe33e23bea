"""Normalizations. Per-channel ones (BatchNorm, InstanceNorm) are exact to cut; ones whose
statistics span the cut axis (LayerNorm over hidden, GroupNorm inside a group) are allowed
but marked inexact."""

from __future__ import annotations

import onnx_ir as ir

from .base import RuleContext, Unsupported, norm_scale, rewrite, rule
from .cut_context import CutContext
from .conv import _grouped


@norm_scale("BatchNormalization", "InstanceNormalization", input=1)
@rule("BatchNormalization", "InstanceNormalization")
def per_channel(ctx: RuleContext) -> None:
    x = ctx.input(0)
    for out in ctx.node.outputs:
        if out is None or out.shape is None:
            continue
        if ctx.rank(out) == ctx.rank(x):
            ctx.tie_same(x, out)
        else:  # training-mode running statistics
            ctx.tie(out, 0, x, 1)
    for p in ctx.node.inputs[1:]:
        if p is not None:
            ctx.tie(p, 0, x, 1)
    if ctx.op == "InstanceNormalization" or ctx.attr("training_mode", 0):
        stat_axes = range(2, ctx.rank(x)) if ctx.op == "InstanceNormalization" else [0, *range(2, ctx.rank(x))]
        for k in stat_axes:
            ctx.inexact(ctx.ax(x, k), "statistics over the cut axis")


@norm_scale("GroupNormalization", input=1)
@rule("GroupNormalization")
def group_norm(ctx: RuleContext) -> None:
    x, scale, bias, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    ctx.tie_same(x, y)
    groups = int(ctx.attr("num_groups"))
    G, P = _grouped(ctx, ctx.ax(x, 1), groups, "per_group")
    ctx.inexact(P, "statistics over the channels of a group")
    for p in (scale, bias):
        if ctx.size(p, 0) == groups and groups != ctx.size(x, 1):
            ctx.tie(p, 0, G, None)
        else:
            ctx.tie(p, 0, x, 1)
    for k in range(2, ctx.rank(x)):
        ctx.block(x, k, "normalized over this axis")


def _last_axes_norm(ctx: RuleContext, axis: int, n_params: int) -> None:
    x = ctx.input(0)
    r = ctx.rank(x)
    axis %= r
    for out in ctx.node.outputs:
        if out is None or out.shape is None:
            continue
        if ctx.rank(out) == r:
            for k in range(r):
                if ctx.size(out, k) == ctx.size(x, k) or k < axis:
                    ctx.tie(x, k, out, k)
                else:
                    ctx.ax(out, k)  # mean / inv_std outputs with size-1 axes
    for k in range(axis, r):
        ctx.inexact(ctx.ax(x, k), "statistics over the cut axis")
        ctx.role(x, k, "hidden")
    for p in ctx.node.inputs[1 : 1 + n_params]:
        if p is None:
            continue
        rp = ctx.rank(p)
        for k in range(rp):
            ctx.tie(p, k, x, r - rp + k) if ctx.size(p, k) != 1 else ctx.ax(p, k)


@norm_scale("LayerNormalization", input=1)
@rule("LayerNormalization")
def layer_norm(ctx: RuleContext) -> None:
    _last_axes_norm(ctx, int(ctx.attr("axis", -1)), 2)


@norm_scale("RMSNormalization", input=1)
@rule("RMSNormalization")
def rms_norm(ctx: RuleContext) -> None:
    _last_axes_norm(ctx, int(ctx.attr("axis", -1)), 1)


@norm_scale("SimplifiedLayerNormalization", input=1, domain="com.microsoft")
@norm_scale("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", input=2, domain="com.microsoft")
@rule("SimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft")
def ms_layer_norm(ctx: RuleContext) -> None:
    if ctx.op.startswith("Skip"):
        raise Unsupported("fused skip-normalization is not analyzed yet")
    _last_axes_norm(ctx, int(ctx.attr("axis", -1)), 2)


@rewrite("GroupNormalization")
def _group_norm(ctx: CutContext, node: ir.Node) -> None:
    g = ctx.kept_size(("virtual", node.name, "groups"))
    if g is not None:
        node.attributes["num_groups"] = ir.AttrInt64("num_groups", g)
