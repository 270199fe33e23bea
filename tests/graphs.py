"""Tiny hand-built graphs for unit tests of the coupling engine."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_rng = np.random.default_rng(0)


def w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((_rng.standard_normal(shape) * scale).astype(np.float32), name)


def i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def model(nodes, inits, x_shape, y_shape, opset: int = 17, x="x", y="y", extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
        inits,
    )
    ops = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 8
    return m


def conv(x, wname, y, **kw):
    return helper.make_node("Conv", [x, wname], [y], **kw)
