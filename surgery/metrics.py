"""Parameter and FLOP counts from the IR's static shapes (symbolic dims count as 1)."""

from __future__ import annotations

import math

import onnx_ir as ir

from surgery.passes.rules import flop_terms


def _dims(v: ir.Value | None) -> list[int] | None:
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in v.shape]


def count_params(model: ir.Model) -> int:
    return int(sum(v.const_value.size for v in model.graph.initializers.values()
                   if v.const_value is not None and v.const_value.dtype.is_floating_point()))


def count_flops(model: ir.Model) -> int:
    """The FLOPs of every op family with a formula (``@flops`` in passes/rules: Conv,
    ConvTranspose, MatMul and Gemm count 2 x multiply-accumulates), symbolic dims counted as 1."""
    total = 0
    for node in model.graph:
        for coef, parts in flop_terms(node):
            for v, axes in parts:
                dims = _dims(v)
                coef *= math.prod(dims[k] for k in axes)  # python ints: declared sizes overflow int64
            total += coef
    return int(total)
