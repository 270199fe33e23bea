"""Reductions and softmax: the reduced axes are blocked (a cut there changes the result)."""

from __future__ import annotations

import numpy as np

from .base import RuleContext, rule

REDUCE = "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare".split()


def _axes(ctx: RuleContext, rank: int):
    axes = None
    if ctx.op == "ReduceSum" and ctx.opset >= 13 or ctx.opset >= 18:
        v = ctx.input(1)
        if v is not None:
            ctx.param(v)
            axes = ctx.const_required(v, "the reduction axes").tolist()
    if axes is None:
        axes = ctx.attr("axes", None)
    if axes is None or len(axes) == 0:
        if ctx.attr("noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(int(a) % rank for a in np.atleast_1d(axes))


def _reduced(ctx: RuleContext, axes: list[int], why: str) -> None:
    """Kept axes pass through; reduced ones are blocked (and size 1 when kept)."""
    x, y = ctx.input(0), ctx.output(0)
    keep = ctx.attr("keepdims", 1)
    j = 0
    for k in range(ctx.rank(x)):
        if k in axes:
            ctx.block(x, k, why)
            if keep:
                ctx.ax(y, j)
                j += 1
            continue
        ctx.tie(x, k, y, j)
        j += 1


@rule(*REDUCE)
def reduce(ctx: RuleContext) -> None:
    x = ctx.input(0)
    r = ctx.rank(x)
    axes = _axes(ctx, r)
    if ctx.op == "ReduceMean" and axes == [r - 1] and r >= 2 and ctx.attr("keepdims", 1):
        # a normalization's statistic (decomposed LayerNorm / RMSNorm over the hidden
        # size): cutting is allowed, but changes the statistic, so it is never exact
        y = ctx.output(0)
        for k in range(r - 1):
            ctx.tie(x, k, y, k)
        ctx.ax(y, r - 1)
        ctx.inexact(ctx.ax(x, r - 1), "statistics over the cut axis")
        ctx.role(x, r - 1, "hidden")
        return
    _reduced(ctx, axes, "reduced over this axis")


@rule("ArgMax", "ArgMin")
def argreduce(ctx: RuleContext) -> None:
    _reduced(ctx, [ctx.attr("axis", 0) % ctx.rank(ctx.input(0))], "arg-reduced over this axis")


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    r = ctx.rank(x)
    axis = ctx.attr("axis", -1 if ctx.opset >= 13 else 1) % r
    # before opset 13 the op normalizes over all axes from `axis` on
    covered = [axis] if ctx.opset >= 13 else list(range(axis, r))
    for k in range(r):
        ctx.tie(x, k, y, k)
        if k in covered:
            ctx.block(x, k, "normalized over this axis")
