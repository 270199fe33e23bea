"""MatMul and Gemm: the contraction ties A's last axis to B's first; free axes pass through."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from surgery.dims import NOT_CHANNEL

from .base import RuleContext, Unsupported, all_axes, consumer, flops, node_attr, rule, shapes_known


@rule("MatMul")
def matmul(ctx: RuleContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra == 1 and rb == 1:
        ctx.tie(a, 0, b, 0)
        return
    if ra == 1:  # (K) @ (..., K, N) -> (..., N)
        ctx.tie(a, 0, b, -2)
        ctx.tie(b, -1, y, -1)
        _batch(ctx, b, rb - 2, y, ry - 1)
        return
    if rb == 1:  # (..., M, K) @ (K) -> (..., M)
        ctx.tie(a, -1, b, 0)
        ctx.tie(a, -2, y, -1)
        _batch(ctx, a, ra - 2, y, ry - 1)
        return
    ctx.tie(a, -1, b, -2)
    ctx.tie(a, -2, y, -2)
    ctx.tie(b, -1, y, -1)
    _batch(ctx, a, ra - 2, y, ry - 2)
    _batch(ctx, b, rb - 2, y, ry - 2)
    if not ctx.from_weights(a) and not ctx.from_weights(b) and ry >= 3:
        # activation x activation (attention scores, attention x values): batch axes
        # carry heads, the inner axes head_dim
        for k in range(ry - 2):
            ctx.role(y, k, "head")
        for v, k in ((a, -1), (b, -1)):
            ctx.role(v, k, "head_dim")


def _batch(ctx: RuleContext, v, nb: int, y, ny: int) -> None:
    """Batch axes broadcast against the output's batch axes (right aligned)."""
    sv, sy = ctx.shape(v), ctx.shape(y)
    for k in range(nb):
        j = k + ny - nb
        if sv[k] == 1 and sy[j] != 1:
            ctx.g.block(ctx.ax(v, k), f"MatMul broadcast ({NOT_CHANNEL})")
        else:
            ctx.tie(v, k, y, j)


@rule("Gemm")
def gemm(ctx: RuleContext) -> None:
    a, b, c, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    if ctx.rank(a) != 2 or ctx.rank(b) != 2:
        raise Unsupported("Gemm inputs must be 2-D")
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    m_ax, k_ax = (1, 0) if ta else (0, 1)
    kb_ax, n_ax = (1, 0) if tb else (0, 1)
    ctx.tie(a, k_ax, b, kb_ax)
    ctx.tie(a, m_ax, y, 0)
    ctx.tie(b, n_ax, y, 1)
    if c is not None:
        ctx.broadcast([c], y)


@flops("MatMul", "Gemm")
def matmul_flops(node) -> list:
    """2 x MACs: every output element is a dot product over A's contraction axis."""
    a, y = node.inputs[0], node.outputs[0]
    if not shapes_known(a, y) or not len(a.shape):
        return []
    k = len(a.shape) - 1
    if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
        k = 0
    return [(2, [(y, all_axes(y)), (a, [k])])]


# -- consumer role: what the data-aware criteria and compensation read through a matrix --


@consumer("MatMul", axes=lambda node, xr, wr: (xr - 1, wr - 2 if wr >= 2 else 0))
def matmul_dense_weight(node: ir.Node, W: np.ndarray) -> np.ndarray:
    """(outputs, K, 1); the batch axes of B count as outputs."""
    if W.ndim == 1:
        return W[None, :, None]
    Wk = np.moveaxis(W, -2, 0)
    return Wk.reshape(Wk.shape[0], -1).T[:, :, None]


def _gemm_axes(node: ir.Node, xr: int, wr: int) -> tuple[int, int]:
    return (0 if node_attr(node, "transA") else 1), (1 if node_attr(node, "transB") else 0)


@consumer("Gemm", axes=_gemm_axes)
def gemm_dense_weight(node: ir.Node, W: np.ndarray) -> np.ndarray:
    """alpha x B as (N, K, 1)."""
    alpha = float(node_attr(node, "alpha", 1.0))
    Wm = W if int(node_attr(node, "transB", 0)) else W.T
    return (alpha * Wm)[:, :, None]
