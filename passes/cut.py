"""The cut engine: remove channels, slice weights, fix sizes written into the graph.

Given the removed indices per axis (from the analysis), this pass
1. calls every node's rewrite (``@rewrite`` in the op's family file in passes/rules/:
   conv groups, reshape/expand targets, split sizes, slice bounds, gather indices,
   resize sizes, group-norm groups, attention head counts), while the shapes are old,
2. slices every initializer along each cut axis, and
3. updates the static shapes recorded on every value.
It changes the model in place; the caller keeps a copy when it needs one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from surgery.analysis import Analysis
from surgery.passes.rules import REWRITES
from surgery.passes.rules.base import op_key
from surgery.passes.rules.cut_context import CutContext, new_initializer

__all__ = ["CutContext", "apply_cut", "new_initializer"]


def apply_cut(analysis: Analysis, removed: dict[int, np.ndarray]) -> None:
    ctx = CutContext(analysis, removed)
    model = analysis.model
    dims = analysis.dims
    # 1. nodes first: their rewrites read the old shapes
    for node in list(model.graph):
        fn = REWRITES.get(op_key(node))
        if fn is not None:
            fn(ctx, node)
    # 2. weights
    by_value: dict[str, list[tuple[int, np.ndarray]]] = {}
    for i, idx in removed.items():
        kind, name, k = dims.axes[i].key
        if kind == "value":
            by_value.setdefault(name, []).append((k, idx))
    inits = model.graph.initializers
    for name, cuts in by_value.items():
        if name not in inits:
            continue
        v = inits[name]
        arr = v.const_value.numpy()
        for k, idx in cuts:
            arr = np.delete(arr, idx, axis=k)
        # ir.Tensor, not ir.tensor: the convenience constructor's protocol isinstance checks
        # cost more than the slicing, once per weight
        # (strings, as numpy bytes or objects, go back into a StringTensor)
        arr = np.ascontiguousarray(arr)
        v.const_value = ir.StringTensor(arr, name=name) if arr.dtype.kind in "OS" else ir.Tensor(arr, name=name)
    # 3. shapes recorded on values
    values = _values_by_name(model)
    for name, cuts in by_value.items():
        v = values.get(name)
        if v is not None and v.shape is not None:
            dims_ = list(v.shape)
            for k, idx in cuts:
                if isinstance(dims_[k], int):
                    dims_[k] = dims_[k] - len(idx)
                else:  # a symbol like 4*batch no longer holds: runtimes trust equal names
                    dims_[k] = ir.SymbolicDim(None)
            v.shape = ir.Shape(dims_)


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    """The main graph's values by name (an initializer before a graph input before a node
    output of that name), built once per cut: after the rewrites, which may add nodes."""
    g = model.graph
    out = {o.name: o for node in g for o in node.outputs}
    out.update({v.name: v for v in g.inputs})
    out.update(g.initializers)
    return out
