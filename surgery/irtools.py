"""Small onnx-ir helpers shared by the frontends and the passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_ir as ir

# Weights up to this size stay attached for shape inference (data propagation
# needs Reshape/Slice/... constants); bigger ones are detached and become typed inputs.
_INFERENCE_KEEP_BYTES = 1024
_INFERENCE_KEEP_INT_BYTES = 64 * 1024


@contextlib.contextmanager
def weights_detached(model: ir.Model) -> Iterator[None]:
    """Temporarily turn big main-graph initializers into typed graph inputs.

    Serializing then neither reads lazy external data nor copies big tensors,
    and the proto stays far below protobuf's 2 GB limit.
    """
    graph = model.graph
    saved_initializers = list(graph.initializers.values())
    saved_inputs = list(graph.inputs)
    detached: list[tuple[ir.Value, ir.TensorProtocol | None]] = []
    try:
        input_ids = {id(v) for v in saved_inputs}
        for value in saved_initializers:
            tensor = value.const_value
            if tensor is not None and _keep_for_inference(tensor):
                continue
            if tensor is not None:
                if value.shape is None:
                    value.shape = tensor.shape
                if value.dtype is None:
                    value.dtype = tensor.dtype
            detached.append((value, tensor))
            graph.initializers.pop(value.name)
            value.const_value = None
            if id(value) not in input_ids:
                graph.inputs.append(value)
        yield
    finally:
        for value, tensor in detached:
            value.const_value = tensor
        graph.inputs.clear()
        graph.inputs.extend(saved_inputs)
        graph.initializers.clear()
        for value in saved_initializers:
            graph.initializers.add(value)


def _keep_for_inference(tensor: ir.TensorProtocol) -> bool:
    nbytes = tensor.nbytes
    if nbytes <= _INFERENCE_KEEP_BYTES:
        return True
    return tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32) and (
        nbytes <= _INFERENCE_KEEP_INT_BYTES
    )


