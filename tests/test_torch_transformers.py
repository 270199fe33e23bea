"""transformers models in and out: BERT, GPT-2 and Llama (GQA) built from small configs
(random weights, nothing downloaded), heads and MLP pruned, checked against the pruned
ONNX model, trained, reloaded (surgery.torch_api.save/load and save_pretrained /
from_pretrained)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from surgery import SurgeryError  # noqa: E402
from surgery.frontends.torch_export import onnx_feeds  # noqa: E402
from surgery.torch_api import load, prune_module, save  # noqa: E402
from surgery.verify import run  # noqa: E402

HEADS_MLP = dict(ratio=0.0, head_ratio=0.5, mlp_ratio=0.5, hidden_ratio=0.0)
MLP_ONLY = dict(ratio=0.0, head_ratio=0.0, mlp_ratio=0.5, hidden_ratio=0.0)


def _config(name):
    common = dict(vocab_size=100, num_hidden_layers=2, attn_implementation="eager")
    if name == "bert":
        return transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=32, **common)
    if name == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_head=4, n_inner=64, n_positions=32, bos_token_id=0,
                                       eos_token_id=0, **common)
    return transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                    max_position_embeddings=32, **common)


CLASSES = {"bert": "BertModel", "gpt2": "GPT2Model", "llama": "LlamaModel"}


def _build(name, seed=0):
    torch.manual_seed(seed)
    return getattr(transformers, CLASSES[name])(_config(name)).eval()


def _inputs(name, length=8):
    ids = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 2:] = 0  # right padding in the second row
    out = {"input_ids": ids, "attention_mask": mask}
    if name != "bert":
        out["use_cache"] = False
    return out


def _hidden(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@functools.lru_cache(maxsize=None)
def _pruned(name, mode="heads+mlp", gqa="kv"):
    model = _build(name)
    kw = dict(HEADS_MLP if mode == "heads+mlp" else MLP_ONLY, gqa=gqa)
    if name != "llama" and mode == "heads+mlp":
        kw["strict_config"] = False  # their config cannot state removed heads (see test below)
    return model, prune_module(model, _inputs(name), **kw)


def _attn_mlp(model, name, layer):
    if name == "bert":
        lay = model.encoder.layer[layer]
        return lay.attention.self, lay.intermediate.dense.out_features
    if name == "gpt2":
        blk = model.h[layer]
        return blk.attn, blk.mlp.c_fc.nf
    lay = model.layers[layer]
    return lay.self_attn, lay.mlp.up_proj.out_features


def _heads(attn, name):
    if name == "bert":
        return attn.num_attention_heads, attn.attention_head_size
    if name == "gpt2":
        return attn.num_heads, attn.head_dim
    return attn.q_proj.out_features // attn.head_dim, attn.head_dim


# --------------------------------------------------------------------------- #
# heads 50% + MLP 50%
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_heads_and_mlp_pruned_module_matches_onnx(name):
    model, res = _pruned(name)
    inputs = _inputs(name)
    assert type(res.module) is type(model) and res.module is not model
    t = res.report["torch"]
    assert t["params_after"] < t["params_before"] == sum(p.numel() for p in model.parameters())
    assert res.report["pruned_by_kind"].get("mlp", 0) == 2 * 32  # 2 layers x 32 of 64
    assert res.report["verify"]["exact"] in (True, None)
    for layer in range(2):
        attn, width = _attn_mlp(res.module, name, layer)
        assert width == 32
        assert _heads(attn, name) == (2, 8)  # half the heads, head_dim unchanged
    # positions stay: the embedding rows the example's length leaves unused are not cut
    pos = {"bert": lambda m: m.embeddings.position_embeddings, "gpt2": lambda m: m.wpe}.get(name)
    if pos is not None:
        assert pos(res.module).num_embeddings == pos(res.module).weight.shape[0] == 32
    # the pruned module matches the pruned ONNX model
    got = _hidden(res.module, inputs).numpy()
    ref = run(res.onnx, onnx_feeds(res.onnx, inputs))[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # the original keeps its own sizes and config
    assert _heads(_attn_mlp(model, name, 0)[0], name) == (4, 8) and model.config.num_attention_heads == 4


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_heads_and_mlp_train_and_reload(name, tmp_path):
    model, res = _pruned(name)
    inputs = _inputs(name)
    # another sequence length: no size was tied to the example's
    longer = _inputs(name, length=12)
    assert _hidden(res.module, longer).shape == (2, 12, 32)
    # surgery's own checkpoint, replayed on a fresh model from the original config
    save(res, tmp_path / "pruned.pt")
    rebuilt = load(tmp_path / "pruned.pt", build=lambda: _build(name, seed=5))
    assert torch.equal(_hidden(rebuilt, inputs), _hidden(res.module, inputs))
    # one optimizer step
    m = copy.deepcopy(res.module).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in m.parameters()]
    out = m(**inputs).last_hidden_state
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters() if p.grad is not None)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_llama_heads_and_mlp_from_pretrained(tmp_path):
    """The user promise: save_pretrained, then from_pretrained, gives the pruned model."""
    model, res = _pruned("llama")
    cfg = res.module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 1, 8, 32)
    assert res.report["torch"]["config"]["from_pretrained"] is True
    for layer in range(2):
        attn = res.module.layers[layer].self_attn
        assert attn.k_proj.out_features == 8 and attn.num_key_value_groups == 2
    res.module.save_pretrained(tmp_path)
    again = transformers.LlamaModel.from_pretrained(tmp_path, attn_implementation="eager")
    inputs = _inputs("llama")
    assert torch.allclose(_hidden(again, inputs), _hidden(res.module, inputs), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in again.parameters()) == res.report["torch"]["params_after"]


def test_llama_gqa_query_keeps_kv_heads(tmp_path):
    """gqa="query": query heads go evenly from every key/value group; num_key_value_heads stays."""
    _, res = _pruned("llama", gqa="query")
    cfg = res.module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 8)
    assert res.report["pruned_by_kind"].get("q_per_kv", 0) == 2  # per layer: one query head in each kv group
    attn = res.module.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 16 and attn.num_key_value_groups == 1
    inputs = _inputs("llama")
    ref = run(res.onnx, onnx_feeds(res.onnx, inputs))[0]
    assert np.abs(_hidden(res.module, inputs).numpy() - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    res.module.save_pretrained(tmp_path)
    again = transformers.LlamaModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.allclose(_hidden(again, inputs), _hidden(res.module, inputs), atol=1e-6, rtol=0)


def test_llama_gqa_kv_removes_whole_kv_heads():
    """gqa="kv" (the default): whole key/value heads go with the query heads sharing them."""
    _, res = _pruned("llama")
    assert res.report["pruned_by_kind"].get("kv_heads", 0) == 2  # one of two per layer
    assert res.report["pruned_by_kind"].get("q_per_kv", 0) == 0
    attn = res.module.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
    assert attn.o_proj.in_features == 16


# --------------------------------------------------------------------------- #
# what from_pretrained cannot represent
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_heads_of_bert_and_gpt2_cannot_go_through_from_pretrained(name):
    """BertSelfAttention / GPT2Attention derive the head size from hidden_size /
    num_attention_heads: a config cannot state 2 heads of 8 in a 32-wide model."""
    _, res = _pruned(name)  # strict_config=False: the module is kept, the report says why
    conf = res.report["torch"]["config"]
    assert conf["from_pretrained"] is False and "num_attention_heads" in conf["why"]
    with pytest.raises(SurgeryError, match=r"from_pretrained cannot represent the pruned .*strict_config=False.*"
                                           r"head_ratio=0"):
        prune_module(_build(name), _inputs(name), **HEADS_MLP)


def test_layers_that_differ_are_refused():
    """A global ranking can prune layers unevenly; one config value cannot describe it."""
    model = _build("llama")
    with torch.no_grad():  # make layer 0's MLP units far more important than layer 1's
        for p in model.layers[0].mlp.parameters():
            p.mul_(4.0)
    with pytest.raises(SurgeryError, match=r"from_pretrained cannot represent.*layers now differ.*intermediate_size"):
        prune_module(model, _inputs("llama"), global_rank=True, **MLP_ONLY)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_mlp_only_round_trips_through_from_pretrained(name, tmp_path):
    model, res = _pruned(name, mode="mlp")
    cfg = res.module.config
    assert (cfg.n_inner if name == "gpt2" else cfg.intermediate_size) == 32
    assert cfg.num_attention_heads == 4
    assert res.report["torch"]["config"]["from_pretrained"] is True
    res.module.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path, attn_implementation="eager")
    inputs = _inputs(name)
    assert torch.allclose(_hidden(again, inputs), _hidden(res.module, inputs), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in again.parameters()) == res.report["torch"]["params_after"]


def test_llama_taylor_with_calibration_batches(tmp_path):
    """criterion="taylor" on a transformer: gradients of a next-token loss over two batches."""
    model = _build("llama")

    def next_token_loss(out, batch):  # an LM loss on the hidden states, through the (fixed) embedding table
        logits = out.last_hidden_state[:, :-1] @ model.embed_tokens.weight.detach().T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    batches = [_inputs("llama"), {**_inputs("llama"), "input_ids": torch.randint(0, 100, (2, 8))}]
    res = prune_module(model, _inputs("llama"), criterion="taylor", calib=batches, loss=next_token_loss, **HEADS_MLP)
    assert res.report["torch"]["taylor"]["batches"] == 2
    mlp = [v for k, v in res.importance.items() if k.startswith("layers.0.mlp")]
    assert mlp and (mlp[0] > 0).all()
    assert res.report["torch"]["config"]["from_pretrained"] is True
    inputs = _inputs("llama")
    ref = run(res.onnx, onnx_feeds(res.onnx, inputs))[0]
    assert np.abs(_hidden(res.module, inputs).numpy() - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
