"""ONNX's Attention op (opset 23): heads, grouped key/value heads and head_dim, like the
decomposed MatMul-Softmax-MatMul form. Contrib attention ops have no rule: they block."""

from __future__ import annotations

import onnx_ir as ir

from .base import RuleContext, Unsupported, rewrite, rule
from .cut_context import CutContext


def _heads(ctx: RuleContext, q_heads: int, kv_heads: int):
    """Virtual axes: query heads, and when grouped, kv heads x queries per kv head."""
    HQ = ctx.virtual("q_heads", q_heads)
    if q_heads == kv_heads:
        return HQ, HQ
    if kv_heads <= 0 or q_heads % kv_heads:
        raise Unsupported(f"{q_heads} query heads do not group over {kv_heads} key/value heads")
    KV, R = ctx.virtual("kv_heads", kv_heads), ctx.virtual("q_per_kv", q_heads // kv_heads)
    ctx.product(HQ, [KV, R])
    ctx.role(KV, None, "pre_repeat")
    ctx.role(R, None, "repeat")
    return HQ, KV


@rule("Attention")
def attention(ctx: RuleContext) -> None:
    q, k, v, mask = (ctx.input(i) for i in range(4))
    y = ctx.output(0)
    r = ctx.rank(q)
    if r == 4:  # (B, H, S, D)
        hq, hkv = ctx.size(q, 1), ctx.size(k, 1)
        HQ, KV = _heads(ctx, hq, hkv)
        ctx.tie(q, 1, HQ, None)
        ctx.tie(y, 1, HQ, None)
        ctx.tie(k, 1, KV, None)
        ctx.tie(v, 1, KV, None)
        for a, b in ((q, 3), (k, 3)):
            ctx.role(a, b, "head_dim")
        ctx.tie(q, 3, k, 3)
        ctx.tie(v, 3, y, 3)
        ctx.role(y, 3, "head_dim")
        ctx.role(y, 1, "head")
        seq_q, seq_k = (q, 2), (k, 2)
        ctx.tie(v, 2, k, 2)
    elif r == 3:  # (B, S, H*D) with q_num_heads / kv_num_heads
        hq, hkv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
        if not hq or not hkv:
            raise Unsupported("3-D Attention without head counts")
        HQ, KV = _heads(ctx, hq, hkv)
        D, DV = ctx.virtual("head_dim", ctx.size(q, 2) // hq), ctx.virtual("v_head_dim", ctx.size(v, 2) // hkv)
        ctx.product(ctx.ax(q, 2), [HQ, D])
        ctx.product(ctx.ax(k, 2), [KV, D])
        ctx.product(ctx.ax(v, 2), [KV, DV])
        ctx.product(ctx.ax(y, 2), [HQ, DV])
        ctx.role(HQ, None, "head")
        ctx.role(D, None, "head_dim")
        ctx.role(DV, None, "head_dim")
        seq_q, seq_k = (q, 1), (k, 1)
        ctx.tie(v, 1, k, 1)
    else:
        raise Unsupported(f"Attention of rank {r}")
    ctx.tie(q, 0, k, 0)
    ctx.tie(k, 0, v, 0)
    ctx.tie(q, 0, y, 0)
    ctx.tie(*seq_q, y, 1 if r == 3 else 2)
    ctx.block(*seq_k, "softmax over the key sequence")
    if mask is not None:
        sm, ry = ctx.shape(mask), 4
        for j in range(len(sm)):
            # the mask broadcasts against (B, Hq, Sq, Skv)
            pos = j + ry - len(sm)
            target = {0: (q, 0), 2: seq_q, 3: seq_k}.get(pos)
            if sm[j] == 1 or target is None:
                ctx.block(mask, j, "attention mask")
            else:
                ctx.tie(mask, j, *target)
    for extra in [*ctx.node.inputs[4:], *ctx.node.outputs[1:]]:
        if extra is not None and extra.shape is not None:
            raise Unsupported("Attention with a key/value cache or extra outputs is not analyzed yet")


@rewrite("Attention")
def _attention(ctx: CutContext, node: ir.Node) -> None:
    """Head counts in attributes, and the default scale 1/sqrt(head_dim) made explicit
    when head_dim shrinks (the cut must not change it)."""
    if "scale" not in node.attributes:  # read head_dim before the head counts change
        q = node.inputs[0]
        d = q.shape[-1] if len(q.shape) == 4 else q.shape[-1] // node.attributes["q_num_heads"].value
        if isinstance(d, int):
            node.attributes["scale"] = ir.AttrFloat32("scale", float(d) ** -0.5)
    for attr, tag in (("q_num_heads", "q_heads"), ("kv_num_heads", "kv_heads")):
        if attr in node.attributes:
            n = ctx.kept_size(("virtual", node.name, tag))
            if n is None and tag == "kv_heads":
                n = ctx.kept_size(("virtual", node.name, "q_heads"))
            if n is not None:
                node.attributes[attr] = ir.AttrInt64(attr, n)
