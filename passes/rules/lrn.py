"""LRN (LocalResponseNormalization): every channel divided by a statistic of the channels
in a window around it,

    y[n, c, ...] = x[n, c, ...] / (bias + alpha / size * sum(x[n, c', ...] ** 2)) ** beta

over c' in [c - floor((size - 1) / 2), c + ceil((size - 1) / 2)] (clipped to the channels).

Everything surgery knows about the op: its channel rule and FLOP formula. It needs no
rewrite (``size`` is a window, not a channel count: it stays valid after a cut), plays no
consumer or normalization-scale role (no weight input), and has no torch module rule
(``nn.LocalResponseNorm`` holds no parameter and no channel count: nothing to slice).
"""

from __future__ import annotations

import onnx_ir as ir

from .base import RuleContext, all_axes, flops, rule, shapes_known


@rule("LRN")
def lrn(ctx: RuleContext) -> None:
    """Shape-preserving: every axis of X ties to the same axis of Y, so batch and spatial
    axes pass through and the channel axis follows the producer's channel group.

    The channel axis may be cut, but never exactly (the exactness model of the
    normalizations in norm.py: a statistic that spans the cut axis is allowed and marked
    inexact). A kept channel's window is positional: after a cut it covers other
    channels (the removed ones' neighbours move in), so even the masked original, whose
    removed channels are zero, differs from the pruned model. With ``size == 1`` the
    window is the channel itself: a pointwise op, exact. The kind stays the producer's
    (``channel`` under a Conv): LRN adds no role."""
    x, y = ctx.input(0), ctx.output(0)
    ctx.tie_same(x, y)
    if int(ctx.attr("size")) > 1:
        ctx.inexact(ctx.ax(x, 1), f"normalized over a window of {int(ctx.attr('size'))} neighbouring channels, "
                                  "which a cut changes")


@flops("LRN")
def lrn_flops(node: ir.Node) -> list:
    """(size + 4) per output element: a square of each element, size - 1 additions for its
    window's sum, then the scale by alpha / size, the bias, the power and the division."""
    y = node.outputs[0]
    if not shapes_known(y):
        return []
    size = int(node.attributes["size"].value)
    return [(size + 4, [(y, all_axes(y))])]
