"""What a rewrite sees: the analysis, the removed indices per axis, and helpers to swap a
node's constant inputs. The cut engine (passes/cut.py) builds one per cut and hands it to
every op's ``@rewrite`` (registered in the family files beside the op's channel rule).

It lives here, not in passes/cut.py, so the family files can name it without importing
the engine that imports them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class CutContext:
    """``analysis`` is the surgery.analysis.Analysis being cut (not imported here: the
    analysis imports the rules); ``removed`` maps an axis id to the indices it loses."""

    def __init__(self, analysis, removed: dict[int, np.ndarray]) -> None:
        self.a = analysis
        self.removed = removed
        self.opset = model_opset(analysis.model)

    def removed_on(self, key: tuple) -> np.ndarray | None:
        i = self.a.dims.find(key)
        if i is None:
            return None
        return self.removed.get(i)

    def value_removed(self, v: ir.Value, k: int) -> np.ndarray | None:
        return self.removed_on(("value", v.name, k))

    def kept_size(self, key: tuple) -> int | None:
        i = self.a.dims.find(key)
        if i is None:
            return None
        ax = self.a.dims.axes[i]
        if ax.size < 0:
            return None
        r = self.removed.get(i)
        return ax.size - (0 if r is None else len(r))

    def set_const_input(self, node: ir.Node, i: int, array: np.ndarray) -> None:
        """Give ``node`` its own constant for input i (the old one may be shared)."""
        node.replace_input_with(i, new_initializer(self.a.model, f"{node.name}_{i}_cut", array))


def new_initializer(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array``, named ``base`` (``base1``, ``base2``, ... if taken)."""
    graph = model.graph
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}{k}"
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    v.const_value = ir.tensor(array, name=name)
    graph.register_initializer(v)
    return v


def model_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
