"""Fold shape arithmetic that is static: ``Shape(x)`` entries whose dims are known become
constants, so exporters' computed reshape targets and slice bounds (legacy torch export:
Shape -> Gather -> Div -> Concat) turn into literals the cut can rewrite.
Dynamic dims (a symbolic batch) stay computed at run time."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _static_entries(node: ir.Node) -> tuple[list[int | None], int, int] | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    dims = [d if isinstance(d, int) else None for d in x.shape]
    r = len(dims)
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else r
    start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
    start, end = max(0, min(start, r)), max(0, min(end, r))
    return dims[start:end], start, end


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, k = name, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64))
    v.const_value = ir.tensor(array.astype(np.int64), name=name)
    graph.register_initializer(v)
    return v


def fold_static_shapes(model: ir.Model) -> int:
    """Replace fully static Shape outputs, and Gathers of static entries of any Shape,
    by constants. Returns how many values it replaced."""
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    done = 0
    for node in list(graph):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            continue
        got = _static_entries(node)
        if got is None:
            continue
        entries, _, _ = got
        out = node.outputs[0]
        if id(out) in outputs:
            continue
        if all(e is not None for e in entries):
            c = _const(graph, f"{out.name}_static", np.asarray(entries, dtype=np.int64))
            out.replace_all_uses_with(c)
            done += 1
            continue
        for use, _ in list(out.uses()):
            if use.op_type != "Gather" or id(use.outputs[0]) in outputs:
                continue
            idx = use.inputs[1].const_value if len(use.inputs) > 1 and use.inputs[1] is not None else None
            if idx is None:
                continue
            ia = np.asarray(idx.numpy()) % max(len(entries), 1)
            vals = [entries[int(i)] for i in ia.ravel()]
            if any(v is None for v in vals):
                continue
            c = _const(graph, f"{use.outputs[0].name}_static", np.asarray(vals, dtype=np.int64).reshape(ia.shape))
            use.outputs[0].replace_all_uses_with(c)
            done += 1
    return done
