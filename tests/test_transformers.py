"""Transformers: heads, grouped key/value heads, head_dim, MLP units and the hidden size.

For every exported or hand-built transformer in the corpus: heads and MLP units cut at
several ratios are exact; the pruned model runs at other batch sizes and sequence
lengths; the head count the graph now computes equals the heads kept; GQA stays
integral in both modes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import surgery
from corpus_transformers import TCASES, build, make_inputs

NAMES = [c.name for c in TCASES]
META = {c.name: c.meta for c in TCASES}
HEAD_KINDS = ("heads", "kv_heads", "q_per_kv")


def _session(proto: onnx.ModelProto, extra_outputs=()):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for name in extra_outputs:
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(name: str, proto: onnx.ModelProto, batch: int, seq: int):
    if name.endswith("-ir"):
        e = META[name]["hidden"]
        static = META[name].get("static")
        if static:
            batch, seq = static
        x = np.random.default_rng(batch * 10 + seq).standard_normal((batch, seq, e)).astype(np.float32)
        return {proto.graph.input[0].name: x}
    return make_inputs(name, batch=batch, seq=seq)


def _softmax_heads(proto: onnx.ModelProto, feeds) -> list[int]:
    """Head counts the graph computes: axis 1 of every attention-probability tensor."""
    outs = [n.output[0] for n in proto.graph.node if n.op_type == "Softmax"]
    if not outs:
        return []
    got = _session(proto, outs).run(outs, feeds)
    return sorted({int(a.shape[1]) for a in got if a.ndim == 4})


def _has_static_shapes(name: str) -> bool:
    return bool(META[name].get("static"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_heads_and_mlp_cuts_are_exact_and_run_at_other_shapes(name, ratio):
    proto = build(name)
    res = surgery.prune(proto, ratio=0.0, head_ratio=ratio, mlp_ratio=ratio, hidden_ratio=0.0)
    v = res.report["verify"]
    assert v["exact"] is True, v
    meta = META[name]
    by_kind = res.report["pruned_by_kind"]
    heads = meta.get("heads")
    # every attention kind that exists must lose heads at ratio 0.5 (a ratio of 0.25 of
    # 2 kv heads rounds down to 0)
    if ratio == 0.5 and heads and meta.get("layers", 1) and "mlp_only" not in meta:
        assert sum(by_kind.get(k, 0) for k in HEAD_KINDS) > 0, by_kind
    pruned = res.onnx
    shapes = [(1, 8), (2, 5)] if not _has_static_shapes(name) else [None]
    for shp in shapes:
        b, s = shp if shp else (1, 8)
        feeds = _feeds(name, proto, b, s)
        want = _session(proto).run(None, feeds)[0]
        got = _session(pruned).run(None, feeds)[0]
        assert got.shape == want.shape
        assert np.isfinite(got).all()


def _expected_heads(meta: dict, ratio: float, gqa: str) -> int:
    h, hkv = meta["heads"], meta.get("kv_heads", meta["heads"])
    if hkv == h:
        return h - math.floor(ratio * h)
    rep = h // hkv
    if hkv == 1 or gqa == "query":
        return hkv * (rep - min(rep - 1, math.floor(ratio * rep)))
    return (hkv - min(hkv - 1, math.floor(ratio * hkv))) * rep


@pytest.mark.parametrize("name", [n for n in NAMES if META[n].get("heads") and n != "bert_sdpa_op23-dynamo"])
@pytest.mark.parametrize("gqa", ["kv", "query"])
def test_graph_computes_exactly_the_heads_kept(name, gqa):
    meta = META[name]
    if gqa == "query" and meta.get("kv_heads", meta["heads"]) == meta["heads"]:
        pytest.skip("no grouped key/value heads")
    proto = build(name)
    res = surgery.prune(proto, ratio=0.0, head_ratio=0.5, gqa=gqa, verify_result=False)
    b, s = (1, 8) if not _has_static_shapes(name) else META[name]["static"]
    feeds = _feeds(name, proto, 2 if not _has_static_shapes(name) else b, 6 if not _has_static_shapes(name) else s)
    assert _softmax_heads(proto, feeds) == [meta["heads"]]
    assert _softmax_heads(res.onnx, feeds) == [_expected_heads(meta, 0.5, gqa)]


@pytest.mark.parametrize("name", ["llama_gqa-dynamo", "mistral_gqa-legacy", "gqa-ir"])
def test_gqa_stays_integral_in_both_modes(name):
    meta = META[name]
    for gqa in ("kv", "query"):
        res = surgery.prune(build(name), ratio=0.0, head_ratio=0.5, gqa=gqa)
        assert res.report["verify"]["exact"] is True
        by_kind = res.report["pruned_by_kind"]
        if gqa == "kv":
            assert by_kind.get("kv_heads", 0) > 0 and by_kind.get("q_per_kv", 0) == 0
        else:
            assert by_kind.get("q_per_kv", 0) > 0 and by_kind.get("kv_heads", 0) == 0
        kept_q = _expected_heads(meta, 0.5, gqa)
        kept_kv = meta["kv_heads"] if gqa == "query" else kept_q // (meta["heads"] // meta["kv_heads"])
        assert kept_q % kept_kv == 0


@pytest.mark.parametrize("name", ["llama_gqa-dynamo", "llama_gqa-legacy", "bert-dynamo", "gpt2-legacy"])
def test_head_dim_cuts_are_exact_and_keep_rope_pairs(name):
    res = surgery.prune(build(name), ratio=0.0, head_dim_ratio=0.5)
    assert res.report["verify"]["exact"] is True
    assert res.report["pruned_by_kind"].get("head_dim", 0) > 0
    if "llama" in name:
        # a rotary unit is a pair (d, d + D/2): the q projection loses whole pairs
        for g in res.plan.groups:
            if any(t.get("tensor") == "m.rotary_emb.inv_freq" for t in g.tensors):
                inv = [t for t in g.tensors if t["tensor"] == "m.rotary_emb.inv_freq"][0]
                assert inv["removed"]  # frequencies of the removed pairs go too


def _lm(vocab=50, e=16, inter=32):
    """Embedding -> LayerNorm -> MLP with residual -> LayerNorm -> LM head: a hidden size
    that is not a graph output, so it can be cut (inexactly: LayerNorm statistics)."""
    rng = np.random.default_rng(0)

    def w(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"]),
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "w1"], ["h"]),
        helper.make_node("Gelu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["m"]),
        helper.make_node("Add", ["x", "m"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["n2"], axis=-1),
        helper.make_node("MatMul", ["n2", "head"], ["logits"]),
    ]
    inits = [w("emb", vocab, e), w("g1", e) , w("b1", e), w("w1", e, inter), w("w2", inter, e),
             w("g2", e), w("b2", e), w("head", e, vocab)]
    g = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    return m


def _rms_lm():
    """_lm with its norms decomposed as exporters write RMSNorm: x * 1/sqrt(mean(x^2) + eps) * g."""
    m = _lm()
    nodes = []
    for n in m.graph.node:
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        x, g, _ = n.input
        y = n.output[0]
        nodes += [
            helper.make_node("Pow", [x, "two"], [f"{y}_sq"]),
            helper.make_node("ReduceMean", [f"{y}_sq", "last"], [f"{y}_ms"], keepdims=1),
            helper.make_node("Add", [f"{y}_ms", "eps"], [f"{y}_v"]),
            helper.make_node("Sqrt", [f"{y}_v"], [f"{y}_s"]),
            helper.make_node("Div", [x, f"{y}_s"], [f"{y}_n"]),
            helper.make_node("Mul", [f"{y}_n", g], [y]),
        ]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                                numpy_helper.from_array(np.array([-1], np.int64), "last"),
                                numpy_helper.from_array(np.array(1e-6, np.float32), "eps")])
    return m


@pytest.mark.parametrize("make", [_lm, _rms_lm])
def test_hidden_size_cut_is_reported_inexact_with_its_reason(make):
    proto = make()
    res = surgery.prune(proto, ratio=0.0, hidden_ratio=0.5)
    assert res.report["pruned_by_kind"]["hidden"] == 8
    v = res.report["verify"]
    assert v["exact"] is None and ("LayerNormalization" in v["why"] or "ReduceMean" in v["why"])
    assert v["max_abs_diff"] > 0  # the report still gives the output error
    init = res.model.graph.initializers
    assert init["emb"].const_value.shape == (50, 8) and init["head"].const_value.shape == (8, 50)
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    assert _session(res.onnx).run(None, {"ids": ids})[0].shape == (1, 3, 50)


def test_mlp_units_alone_are_exact_and_hidden_untouched():
    res = surgery.prune(_lm(), ratio=0.0, mlp_ratio=0.5)
    assert res.report["verify"]["exact"] is True
    assert res.report["pruned_by_kind"] == {"hidden": 0, "mlp": 16}


def _attention_op_model(r: int, hq: int, hkv: int, d: int = 4):
    """x -> q/k/v projections -> ONNX Attention (rank r) -> output projection."""
    rng = np.random.default_rng(1)
    e = 16
    nodes, inits = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))

    for n, h in (("q", hq), ("k", hkv), ("v", hkv)):
        w(f"w{n}", e, h * d)
        nodes.append(helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}3"]))
        if r == 4:
            inits.append(numpy_helper.from_array(np.array([0, 0, h, d], np.int64), f"s{n}"))
            nodes.append(helper.make_node("Reshape", [f"{n}3", f"s{n}"], [f"{n}r"]))
            nodes.append(helper.make_node("Transpose", [f"{n}r"], [n], perm=[0, 2, 1, 3]))
        else:
            nodes.append(helper.make_node("Identity", [f"{n}3"], [n]))
    attrs = {} if r == 4 else {"q_num_heads": hq, "kv_num_heads": hkv}
    nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["att"], **attrs))
    if r == 4:
        nodes.append(helper.make_node("Transpose", ["att"], ["at"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "so"))
        nodes.append(helper.make_node("Reshape", ["at", "so"], ["a3"]))
    else:
        nodes.append(helper.make_node("Identity", ["att"], ["a3"]))
    w("wo", hq * d, e)
    nodes.append(helper.make_node("MatMul", ["a3", "wo"], ["y"]))
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", e])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", e])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_onnx_attention_op_heads_and_head_dim(rank, hq, hkv):
    proto = _attention_op_model(rank, hq, hkv)
    for kw in ({"head_ratio": 0.5}, {"head_dim_ratio": 0.5}, {"head_ratio": 0.5, "gqa": "query"}):
        res = surgery.prune(proto, ratio=0.0, **kw)
        assert res.report["verify"]["exact"] is True, (kw, res.report["verify"])
        assert res.report["params_after"] < res.report["params_before"]
        x = np.random.default_rng(2).standard_normal((2, 3, 16)).astype(np.float32)
        assert _session(res.onnx).run(None, {"x": x})[0].shape == (2, 3, 16)


def test_uneven_head_cut_runs_where_sdpa_merges_batch_with_heads():
    """Layers losing different numbers of heads: symbols like 4*batch on cut axes must not
    survive (onnxruntime assumes equal names are equal sizes)."""
    name = "vit_sdpa-dynamo"
    heads = [g.name for g in surgery.analyze(build(name)).groups if g.kind == "heads"]
    res = surgery.prune(build(name), ratio=0.0, head_ratio=0.5, keep=[heads[-1]])
    assert res.report["verify"]["exact"] is True and res.report["pruned_by_kind"]["heads"] > 0
    feeds = _feeds(name, build(name), 2, 8)
    assert _session(res.onnx).run(None, feeds)[0].shape == _session(build(name)).run(None, feeds)[0].shape
