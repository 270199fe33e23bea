"""Shape completion: fill shapes onnx's inference leaves unknown where the op keeps its
input's shape (newer or contrib normalization ops), so analysis can see the channels."""

from __future__ import annotations

import onnx_ir as ir

SAME_SHAPE = {
    ("", "GroupNormalization"), ("", "RMSNormalization"), ("", "LayerNormalization"),
    ("com.microsoft", "SimplifiedLayerNormalization"), ("com.microsoft", "LayerNormalization"),
    ("com.microsoft", "FastGelu"), ("com.microsoft", "QuickGelu"), ("com.microsoft", "Gelu"),
    ("com.microsoft", "BiasGelu"),
}


def complete_shapes(model: ir.Model) -> int:
    """Returns how many output shapes it filled."""
    filled = 0
    for node in model.graph:
        dom = "" if node.domain in ("", "ai.onnx") else node.domain
        if (dom, node.op_type) not in SAME_SHAPE:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is not None and x.shape is not None and y.shape is None:
            y.shape = ir.Shape(list(x.shape))
            if y.type is None and x.type is not None:
                y.type = x.type
            filled += 1
    return filled
