"""Checks on the transformer test-model corpus itself (tests/corpus_transformers.py)."""

from __future__ import annotations

import collections
import os
import re
import sys

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

try:  # tests/ as a package or as a plain directory on sys.path
    from tests import corpus_transformers as ct
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(__file__))
    import corpus_transformers as ct

REQUIRED_TAGS = {
    "attention", "gqa", "mqa", "rope", "swiglu", "gelu", "layernorm", "rmsnorm",
    "fused_qkv", "vit", "embedding",
}
META_KEYS = {"layers", "heads", "kv_heads", "head_dim", "hidden", "intermediate", "family", "inputs"}
HF_MODELS = ("bert", "distilbert", "gpt2", "llama_gqa", "mistral_gqa", "vit")
SHAPES = [(1, 8), (2, 5)]  # (batch, seq)
TOL = 1e-4

NAMES = [c.name for c in ct.TCASES]
TORCH_NAMES = ct.names("torch")


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    out = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else "?"))
    return out


def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _shapes(name: str) -> list[tuple[int, int]]:
    static = ct.case(name).meta.get("static")
    return [tuple(static)] if static else SHAPES


def _expected_shape(name: str, batch: int, seq: int) -> tuple[int, int, int]:
    meta = ct.case(name).meta
    if "pixel_values" in meta["inputs"]:
        return (batch, meta["patches"] + 1, meta["hidden"])
    return (batch, seq, meta["hidden"])


def _torch_ref(module, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in ct.case(name).meta["inputs"])).numpy()


# ---------------------------------------------------------------------------
# corpus shape
# ---------------------------------------------------------------------------


def test_case_names_unique_and_suffixed():
    assert len(NAMES) == len(set(NAMES))
    for n in NAMES:
        assert n.endswith(("-dynamo", "-legacy", "-ir")), n


def test_tag_coverage():
    covered = set().union(*(c.tags for c in ct.TCASES))
    missing = REQUIRED_TAGS - covered
    assert not missing, f"corpus misses tags: {sorted(missing)}"


def test_meta_complete():
    for c in ct.TCASES:
        assert META_KEYS <= set(c.meta), (c.name, META_KEYS - set(c.meta))
        m = c.meta
        if m["heads"] is not None:
            assert m["heads"] * m["head_dim"] == m["hidden"] or "ir" in c.tags, c.name
            assert m["heads"] % m["kv_heads"] == 0, c.name
        if "gqa" in c.tags:
            assert 1 < m["kv_heads"] < m["heads"], c.name
        if "mqa" in c.tags:
            assert m["kv_heads"] == 1, c.name


def test_every_hf_model_exported_both_ways():
    for model in HF_MODELS:
        for variant in ("dynamo", "legacy"):
            assert f"{model}-{variant}" in NAMES or (model, variant) in ct.SKIPPED_EXPORTS, (model, variant)
    assert {"eager", "sdpa"} <= set().union(*(ct.case(n).tags for n in TORCH_NAMES))


# ---------------------------------------------------------------------------
# every case: checker, onnxruntime at two shapes, torch parity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_case_builds_checks_and_runs(name):
    model = ct.build(name)
    onnx.checker.check_model(model, full_check=True)
    for t in model.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
        if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            pytest.fail(f"{name}: non-float32 weight {t.name}")

    meta = ct.case(name).meta
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    assert [i.name for i in inputs] == list(meta["inputs"])
    for vi in inputs:
        dims = _dims(vi)
        if meta.get("static"):
            assert all(isinstance(d, int) for d in dims), (vi.name, dims)
        elif vi.name == "pixel_values":
            assert dims == ["batch", 3, meta["image_size"], meta["image_size"]], dims
        else:
            assert dims[:2] == ["batch", "seq"], (vi.name, dims)
    (out_vi,) = model.graph.output
    assert out_vi.name == "last_hidden_state"
    assert out_vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    sess = _session(model)
    module = ct.torch_module(name) if "torch" in ct.case(name).tags else None
    for batch, seq in _shapes(name):
        feeds = ct.make_inputs(name, batch, seq, seed=batch * 100 + seq)
        (out,) = sess.run(None, feeds)
        assert out.dtype == np.float32
        assert out.shape == _expected_shape(name, batch, seq), (out.shape, batch, seq)
        declared = _dims(out_vi)
        assert [out.shape[i] if isinstance(d, str) else d for i, d in enumerate(declared)] == list(out.shape)
        assert np.all(np.isfinite(out)), f"{name}: non-finite output at {(batch, seq)}"
        assert float(np.abs(out).max()) > 0.0
        if module is not None:
            ref = _torch_ref(module, name, feeds)
            err = float(np.abs(ref - out).max())
            assert err <= TOL, f"{name} {(batch, seq)}: max |onnx - torch| = {err:.3g}"


@pytest.mark.parametrize("name", [n for n in TORCH_NAMES if "attention_mask" in ct.case(n).meta["inputs"]])
def test_padding_mask_matches_torch(name):
    """The attention mask really is an input (not folded into a constant): pad two tokens."""
    batch, seq = 2, 7
    feeds = ct.make_inputs(name, batch, seq, seed=7)
    feeds["attention_mask"][0, -2:] = 0
    (out,) = _session(ct.build(name)).run(None, feeds)
    ref = _torch_ref(ct.torch_module(name), name, feeds)
    assert np.abs(ref - out).max() <= TOL
    # the mask reaches the graph: padding changes row 0's first token (every model
    # here lets it attend to the padded positions, except the causal ones)...
    feeds_unpadded = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    (out_unpadded,) = _session(ct.build(name)).run(None, feeds_unpadded)
    if "causal" not in ct.case(name).tags:
        assert np.abs(out[0, 0] - out_unpadded[0, 0]).max() > 1e-6
    # ...and leaves row 1, which has no padding, alone
    np.testing.assert_allclose(out[1], out_unpadded[1], atol=TOL)


# ---------------------------------------------------------------------------
# corpus mechanics
# ---------------------------------------------------------------------------


def test_build_returns_independent_copies():
    a = ct.build("fused_qkv-ir")
    a.graph.ClearField("node")
    b = ct.build("fused_qkv-ir")
    assert len(b.graph.node) > 0 and a is not b


@pytest.mark.parametrize("name", ["gqa-ir", "bert-legacy"])
def test_builders_are_deterministic(name):
    assert ct.case(name).build().SerializeToString() == ct.build(name).SerializeToString()


def test_torch_module_is_deterministic():
    a, b = ct.torch_module("llama_gqa-dynamo"), ct.torch_module("llama_gqa-legacy")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


def test_unknown_name():
    with pytest.raises(KeyError):
        ct.build("nope-ir")


# ---------------------------------------------------------------------------
# the patterns the corpus is meant to contain
# ---------------------------------------------------------------------------


def _ops(name: str) -> collections.Counter:
    return collections.Counter(n.op_type for n in ct.build(name).graph.node)


def test_dynamo_keeps_per_layer_parameter_names():
    """Norm gammas and biases are randomized, so the exporter's initializer
    deduplication does not merge them across layers."""
    model = ct.build("bert-dynamo")
    names = {t.name for t in model.graph.initializer}
    assert "m.embeddings.word_embeddings.weight" in names
    for i in range(2):
        assert f"m.encoder.layer.{i}.attention.self.query.bias" in names
        assert f"m.encoder.layer.{i}.output.LayerNorm.weight" in names
    gammas = {n.input[1] for n in model.graph.node if n.op_type == "LayerNormalization"}
    assert len(gammas) == 5  # embeddings + 2 per layer
    llama = {n.input[0] for n in ct.build("llama_gqa-dynamo").graph.node if n.op_type == "Mul"}
    assert {f"m.layers.{i}.{w}.weight" for i in range(2) for w in ("input_layernorm", "post_attention_layernorm")} <= llama


def test_attention_lowering():
    for name in ("bert-dynamo", "llama_gqa-dynamo", "bert-legacy", "llama_gqa-legacy", "vit_sdpa-dynamo"):
        ops = _ops(name)
        assert ops["Softmax"] == 2 and ops["Attention"] == 0, (name, ops)
    assert _ops("bert_sdpa_op23-dynamo")["Attention"] == 2
    assert _ops("bert_sdpa_op23-dynamo")["Softmax"] == 0
    assert _ops("llama_gqa_sdpa-dynamo")["IsNaN"] == 2
    assert _ops("gpt2-dynamo")["Split"] == 2  # fused c_attn
    # repeat_kv: Unsqueeze -> Expand -> Reshape on k and v of every layer
    model = ct.build("llama_gqa-dynamo")
    prod = {o: n for n in model.graph.node for o in n.output}
    repeat = [n for n in model.graph.node if n.op_type == "Reshape" and prod[n.input[0]].op_type == "Expand"
              and prod[prod[n.input[0]].input[0]].op_type == "Unsqueeze"]
    assert len(repeat) == 4


def test_ir_weight_shapes():
    def weights(name):  # initializer "q_proj_w_12" -> "q_proj_w"
        return {re.sub(r"_\d+$", "", t.name): tuple(t.dims) for t in ct.build(name).graph.initializer
                if len(t.dims) == 2}

    assert weights("fused_qkv-ir")["qkv_w"] == (32, 96)
    assert weights("fused_qkv_gather-ir")["qkv_w"] == (32, 96)
    w = weights("mqa-ir")
    assert w["q_proj_w"] == (32, 32) and w["k_proj_w"] == (32, 8) and w["v_proj_w"] == (32, 8)
    w = weights("gqa-ir")
    assert w["q_proj_w"] == (64, 64) and w["k_proj_w"] == (64, 32) and w["o_proj_w"] == (64, 64)
    w = weights("swiglu-ir")
    assert w["gate_proj_w"] == (32, 96) and w["up_proj_w"] == (32, 96) and w["down_proj_w"] == (96, 32)
    assert _ops("fused_qkv_static-ir")["Shape"] == 0
    assert _ops("fused_qkv_gather-ir")["Gather"] >= 3
