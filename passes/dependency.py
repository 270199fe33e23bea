"""Channel-dependency pass: run every node's channel rule to fill a DimGraph."""

from __future__ import annotations

import onnx_ir as ir

from surgery.dims import DimGraph
from surgery.passes.shapes import concrete_shapes

from .rules import RULES, RuleContext, Unsupported


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _known(v: ir.Value | None, filled: dict | None = None) -> bool:
    return v is not None and (v.shape is not None or (filled is not None and v.name in filled))


def _block_value(ctx: RuleContext, v: ir.Value, why: str) -> None:
    for k in range(len(ctx.shape(v))):
        ctx.g.block(ctx.ax(v, k), why)


def _outer_values(node: ir.Node) -> list[ir.Value]:
    """Values a node's subgraphs read from the enclosing scope."""
    out = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for sub in graphs:
            inner = set()
            for n in ir.traversal.RecursiveGraphIterator(sub):
                inner.update(id(o) for o in n.outputs)
            inner.update(id(i) for i in sub.inputs)
            for n in ir.traversal.RecursiveGraphIterator(sub):
                for v in n.inputs:
                    if v is not None and id(v) not in inner and v.graph is not sub:
                        out.append(v)
    return out


def build_dim_graph(model: ir.Model) -> DimGraph:
    g = DimGraph()
    ctx = RuleContext(g, default_opset(model), concrete_shapes(model))
    graph = model.graph
    for v in graph.inputs:
        if _known(v):
            ctx.node = None
            _block_value_plain(g, v, f"graph input '{v.name}'")
    for v in graph.outputs:
        if _known(v):
            _block_value_plain(g, v, f"graph output '{v.name}'")
    for node in graph:
        ctx.start(node)
        fn = RULES.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        try:
            if fn is None:
                raise Unsupported("no channel rule for this op")
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                raise Unsupported("has subgraphs")
            fn(ctx)
        except Exception as e:  # noqa: BLE001 - a rule that cannot follow a node blocks it, never a crash
            detail = str(e) if isinstance(e, Unsupported) else f"cannot be analyzed ({type(e).__name__}: {e})"
            why = f"{node.op_type} '{node.name}': {detail}"
            for v in [*node.inputs, *node.outputs, *_outer_values(node)]:
                if _known(v, ctx.filled):
                    _block_value(ctx, v, why)
            continue
        for v in [*node.inputs, *node.outputs]:
            if not _known(v, ctx.filled):
                continue
            for k in range(len(ctx.shape(v))):
                if (v.name, k) not in ctx.mentioned:
                    g.block(ctx.ax(v, k), f"{node.op_type} '{node.name}': its rule does not map axis {k} of '{v.name}'")
    return g


def _block_value_plain(g: DimGraph, v: ir.Value, why: str) -> None:
    for k, d in enumerate(v.shape):
        a = g.axis(("value", v.name, k), d if isinstance(d, int) else -1)
        g.block(a, why)
