"""Long chains of small blocks, for depth and scale: the analysis, the cut and the
plan must not recurse per node, nor take more than about linear time in the depth.

``chain(n_nodes)`` builds ``x -> block -> block -> ... -> y`` where a block is

- ``"conv"``: ``Conv(1x1, C->C, bias) -> Relu`` (2 nodes; one channel group per conv);
- ``"mlp"``: ``MatMul(C x C) -> Add(bias) -> Relu`` (3 nodes; one hidden group per matmul).

Weights are seeded, small (``channels`` x ``channels``) and scaled so activations
neither vanish nor blow up over 100,000 nodes (each block's weight is the identity
plus a small random perturbation; Relu keeps everything non-negative). Only onnx
and numpy are needed; bench/scale.py imports this file too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NODES_PER_BLOCK = {"conv": 2, "mlp": 3}


def blocks_for(n_nodes: int, kind: str = "conv") -> int:
    """The number of blocks of a chain with about ``n_nodes`` nodes (at least one)."""
    return max(1, round(n_nodes / NODES_PER_BLOCK[kind]))


def chain(n_nodes: int, kind: str = "conv", channels: int = 8, spatial: int = 2, batch: int = 1,
          seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A chain of ``blocks_for(n_nodes, kind)`` blocks (see the module docstring)."""
    if kind not in NODES_PER_BLOCK:
        raise ValueError(f"kind must be one of {sorted(NODES_PER_BLOCK)}, not {kind!r}")
    n = blocks_for(n_nodes, kind)
    rng = np.random.default_rng(seed)
    C = channels
    eye = np.eye(C, dtype=np.float32)
    nodes, inits = [], []
    prev = "x"
    for i in range(n):
        w = (eye + rng.standard_normal((C, C)) * (0.3 / np.sqrt(C))).astype(np.float32)
        b = (rng.standard_normal(C) * 0.05).astype(np.float32)
        if kind == "conv":
            inits.append(numpy_helper.from_array(w.reshape(C, C, 1, 1), f"w{i}"))
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                          kernel_shape=[1, 1]))
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    shape = [batch, C, spatial, spatial] if kind == "conv" else [batch, spatial, C]
    g = helper.make_graph(
        nodes, f"chain_{kind}_{n}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m
