"""Elementwise ops: every axis passes through; broadcasting does not tie size-1 axes."""

from __future__ import annotations

import onnx_ir as ir

from .base import RuleContext, rewrite, rule
from .cut_context import CutContext
from .shape import _runtime_shape_guard, rewrite_shape_input

UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign "
    "Erf Exp Log Neg Abs Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos Atan "
    "Sinh Cosh Asinh Acosh Atanh Identity Cast Not IsNaN IsInf Mish ThresholdedRelu Shrink "
    "Swish"
).split()
BINARY = "Add Sub Mul Div Pow Max Min Sum Mean Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Mod BitwiseAnd BitwiseOr BitwiseXor PRelu".split()


@rule(*UNARY)
def unary(ctx: RuleContext) -> None:
    ctx.tie_same(ctx.input(0), ctx.output(0))


@rule("QuickGelu", "FastGelu", "Gelu", "BiasGelu", domain="com.microsoft")
def ms_unary(ctx: RuleContext) -> None:
    ctx.broadcast([v for v in ctx.node.inputs if v is not None], ctx.output(0))


@rule("Clip")
def clip(ctx: RuleContext) -> None:
    ctx.tie_same(ctx.input(0), ctx.output(0))
    for v in ctx.node.inputs[1:]:
        if v is not None:
            ctx.param(v)  # scalar min/max


@rule("CastLike")
def cast_like(ctx: RuleContext) -> None:
    ctx.tie_same(ctx.input(0), ctx.output(0))
    ctx.free(ctx.input(1))  # only its dtype is read


@rule("Dropout")
def dropout(ctx: RuleContext) -> None:
    x = ctx.input(0)
    for out in ctx.node.outputs:
        if out is not None and out.shape is not None:
            ctx.tie_same(x, out)
    for v in ctx.node.inputs[1:]:
        if v is not None:
            ctx.param(v)  # ratio, training_mode


@rule(*BINARY, "Where")
def broadcast(ctx: RuleContext) -> None:
    ctx.broadcast(list(ctx.node.inputs), ctx.output(0))


@rule("Expand")
def expand(ctx: RuleContext) -> None:
    # broadcast of the input to the target; the shape input is rewritten by the cut
    ctx.broadcast([ctx.input(0)], ctx.output(0))
    ctx.param(ctx.input(1))
    _runtime_shape_guard(ctx, ctx.output(0), ctx.input(1), right_aligned=True)


@rewrite("Expand")
def _expand(ctx: CutContext, node: ir.Node) -> None:
    rewrite_shape_input(ctx, node, 1, right_aligned=True)
