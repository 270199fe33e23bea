"""Parameter and FLOP counts from the IR's static shapes (symbolic dims count as 1)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _dims(v: ir.Value | None) -> list[int] | None:
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in v.shape]


def count_params(model: ir.Model) -> int:
    return int(sum(v.const_value.size for v in model.graph.initializers.values()
                   if v.const_value is not None and v.const_value.dtype.is_floating_point()))


def count_flops(model: ir.Model) -> int:
    """2 x multiply-accumulates of Conv, ConvTranspose, MatMul and Gemm."""
    total = 0
    for node in model.graph:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            y, w = _dims(node.outputs[0]), _dims(node.inputs[1])
            x = _dims(node.inputs[0])
            if y is None or w is None or x is None:
                continue
            if op == "Conv":  # every output element: (Cin/g) x kernel MACs
                total += 2 * int(np.prod(y)) * int(np.prod(w[1:]))
            else:  # every input element scatters Cout/g x kernel MACs
                total += 2 * int(np.prod(x)) * int(np.prod(w[1:]))
        elif op in ("MatMul", "Gemm"):
            a, y = _dims(node.inputs[0]), _dims(node.outputs[0])
            if a is None or y is None or not a:
                continue
            k = a[-1]
            if op == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
                k = a[0]
            total += 2 * int(np.prod(y)) * k
    return int(total)
