"""Transformer test-model corpus for `surgery` (attention heads, GQA/MQA, MLPs).

Small, deterministic (seeded) float32 ONNX models with the coupling patterns of
transformer blocks.  Two families, named like tests/corpus.py:

* Hugging Face ``transformers`` models (``<name>-dynamo`` / ``<name>-legacy``),
  built from tiny configs with random weights (never downloaded), wrapped so the
  graph has one output (``last_hidden_state``), in eval mode, and exported with
  ``torch.onnx.export(..., dynamo=True)`` (torch.export ``dynamic_shapes``; opset
  20, the exporter's default) and with the legacy TorchScript exporter
  (``dynamo=False``, opset 17, ``dynamic_axes``).  Batch and sequence dims are
  symbolic ("batch", "seq"); ViT has a symbolic batch only (images are 32x32).
  Models use ``attn_implementation="eager"``; the ``*_sdpa`` variants use
  ``"sdpa"``, which both exporters lower differently (see below).
* hand-built graphs (``<name>-ir``) made with ``onnx.helper`` (opset 17): single
  attention / MLP blocks whose input is ``hidden_states`` float [batch, seq, E].

Weights follow the HF init (normal * 0.02); in addition every bias is drawn from
normal * 0.02 and every norm gamma from 1 + normal * 0.1.  The extra draws are
not cosmetic: the dynamo exporter's optimizer deduplicates equal initializers,
so with HF's zero biases / unit gammas every layer would share one bias tensor
(named after the first one) and the graph would not show per-layer parameters.

What the exporters emit (torch 2.13, onnxscript 0.7, transformers 5.x):

* No fused ``Attention`` op at the default opsets (dynamo 20, legacy 17): always
  MatMul(q, Transpose(k)) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul(v).
  ``sdpa`` adds IsNaN/Where after the Softmax and (dynamo) scales q and k each by
  D**-0.25 and transposes k via Reshape [-1,S,D] -> Transpose -> Reshape.  At
  opset 23 dynamo emits ``Attention`` for sdpa (case ``bert_sdpa_op23-dynamo``).
* Head split: dynamo ``Reshape(x, Concat(Shape(attention_mask, 0:1),
  Shape(attention_mask, 1:2), [-1], [D]))`` -- the head count is -1 and the
  batch/seq dims come from a graph input's Shape, not from x; legacy
  ``Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [-1], [D])``.
  ViT (static token count) gets constant targets [-1, 17, H, D] in dynamo.
* Llama/Mistral ``repeat_kv``: Unsqueeze(axis 2) -> Expand([B, Hkv, n_rep, S, D])
  -> Reshape([B, H, S, D]), targets Concat'ed from Shape slices and literals
  (legacy: the Expand target goes through a Where(Equal(shape, -1)) guard and H
  is Mul(Hkv, n_rep)).
* GPT-2's Conv1D is Gemm on a [-1, E] view, the fused c_attn output is split
  with Split(axis=2, num_outputs=3) (dynamo) / Split (legacy).
* nn.Linear weights lose their names in both exporters (the transpose is folded
  into a new initializer: ``val_N`` / ``onnx::MatMul_N``); biases, norms,
  embeddings and Conv1D weights keep them.  Dynamo nodes carry the module path in
  ``metadata_props["pkg.torch.onnx.name_scopes"]``.

Usage::

    from corpus_transformers import TCASES, build
    model = build("llama_gqa-dynamo")        # a fresh copy every call
    module = torch_module("llama_gqa-dynamo")  # the same torch model (same weights)
    feeds = make_inputs("llama_gqa-dynamo", batch=2, seq=5)
"""

from __future__ import annotations

from surgery.frontends.torch_export import quiet as _quiet

from corpus import _G as _BaseG
from corpus_registry import Registry

import functools
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["TCase", "TCASES", "build", "case", "names", "torch_module", "make_inputs", "SKIPPED_EXPORTS",
           "draw_biases_and_norms"]


@dataclass(frozen=True)
class TCase:
    name: str
    build: Callable[[], onnx.ModelProto]
    meta: dict = field(hash=False, compare=False)
    tags: frozenset[str] = frozenset()


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------
# Specs are plain data so that TCASES can be listed without importing torch or
# transformers.  "inputs": the graph inputs, in order.  "dims": the example
# (batch, seq) used for export; ViT's seq is the token count (patches + 1).

_VOCAB = 128
_MAXPOS = 64

_HF_SPECS: dict[str, dict] = {
    "bert": dict(
        cls="BertModel", cfg="BertConfig", kwargs={"add_pooling_layer": False},
        config=dict(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=_MAXPOS, type_vocab_size=2),
        meta=dict(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, intermediate=64, family="bert"),
        inputs=("input_ids", "attention_mask"),
        tags={"attention", "gelu", "layernorm", "embedding"},
    ),
    "distilbert": dict(
        cls="DistilBertModel", cfg="DistilBertConfig", kwargs={},
        config=dict(vocab_size=_VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=96,
                    max_position_embeddings=_MAXPOS),
        meta=dict(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, intermediate=96, family="distilbert"),
        inputs=("input_ids", "attention_mask"),
        tags={"attention", "gelu", "layernorm", "embedding"},
    ),
    "gpt2": dict(
        cls="GPT2Model", cfg="GPT2Config", kwargs={},
        # Conv1D c_attn: one [E, 3E] projection split into q, k, v
        config=dict(vocab_size=_VOCAB, n_embd=48, n_layer=2, n_head=4, n_inner=128, n_positions=_MAXPOS,
                    bos_token_id=1, eos_token_id=2),
        meta=dict(layers=2, heads=4, kv_heads=4, head_dim=12, hidden=48, intermediate=128, family="gpt2"),
        inputs=("input_ids", "attention_mask"),
        tags={"attention", "gelu", "layernorm", "embedding", "fused_qkv", "causal"},
    ),
    "llama_gqa": dict(
        cls="LlamaModel", cfg="LlamaConfig", kwargs={},
        config=dict(vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=_MAXPOS),
        meta=dict(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128, family="llama"),
        inputs=("input_ids", "attention_mask"),
        tags={"attention", "gqa", "rope", "swiglu", "rmsnorm", "embedding", "causal"},
    ),
    "mistral_gqa": dict(
        cls="MistralModel", cfg="MistralConfig", kwargs={},
        # input_ids only: the causal (sliding-window) mask is built from the sequence length alone
        config=dict(vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=_MAXPOS,
                    sliding_window=_MAXPOS),
        meta=dict(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=64, family="mistral"),
        inputs=("input_ids",),
        tags={"attention", "gqa", "rope", "swiglu", "rmsnorm", "embedding", "causal"},
    ),
    "vit": dict(
        cls="ViTModel", cfg="ViTConfig", kwargs={"add_pooling_layer": False},
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_channels=3),
        meta=dict(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, intermediate=64, family="vit",
                  image_size=32, patches=16),
        inputs=("pixel_values",),
        tags={"attention", "gelu", "layernorm", "vit", "conv"},
    ),
}

# Export variants: case base name -> (model, attn_implementation, dynamo opset).
# Every model is exported with eager attention.  sdpa lowers differently for every
# model here (extra IsNaN/Where after Softmax, q and k each scaled by D**-0.25, k
# transposed through Reshape/Transpose/Reshape in dynamo); to keep the build time
# down one encoder (bert), the GQA decoder (llama) and the vision model get an
# sdpa variant.  "_op23": the dynamo exporter at opset 23 turns sdpa into the
# ONNX ``Attention`` op (and, for Llama, RMSNormalization and RotaryEmbedding).
_VARIANTS: dict[str, tuple[str, str, int | None]] = {}
for _m in _HF_SPECS:
    _VARIANTS[_m] = (_m, "eager", None)
    if _m in ("bert", "llama_gqa", "vit"):
        _VARIANTS[f"{_m}_sdpa"] = (_m, "sdpa", None)
_VARIANTS["bert_sdpa_op23"] = ("bert", "sdpa", 23)

# Export variants that are not in the corpus, as (base name, "dynamo"|"legacy") -> reason.
# With torch 2.13 / onnxscript 0.7 / transformers 5.x every model exports both ways;
# only the opset-23 variants are dynamo-only, and Llama's does not run.
SKIPPED_EXPORTS: dict[tuple[str, str], str] = {
    ("bert_sdpa_op23", "legacy"): "the legacy exporter stops at opset 20 (no Attention op)",
    ("llama_gqa_sdpa_op23", "dynamo"): (
        "exports (Attention, RMSNormalization, RotaryEmbedding) but onnxruntime 1.32 rejects the "
        "RotaryEmbedding for batch > 1: \"Inputs 'cos_cache' and 'sin_cache' are expected to have "
        "the same shape as input 'x', got 1 and 5\" (cos/sin caches are exported with batch 1)"
    ),
}


def _model_key(name: str) -> tuple[str, str, int | None, str]:
    """'llama_gqa_sdpa-dynamo' -> ('llama_gqa', 'sdpa', None, 'dynamo')."""
    base, variant = name.rsplit("-", 1)
    model, impl, opset = _VARIANTS[base]
    return model, impl, opset, variant


def draw_biases_and_norms(hf, seed: int) -> None:
    """Redraw, in place, every bias and cls/mask token of the HF model ``hf`` from
    normal * 0.02 and every norm gamma from 1 + normal * 0.1 (see the module docstring).

    ``seed`` is the one the model was built with (``torch.manual_seed(seed)``); the
    draws come, in ``hf.named_parameters()`` order, from a generator seeded with
    ``seed + 1``, so they are the same on every call.  Also used by
    bench/transformer_latency.py.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            owner = hf.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else hf
            is_norm = "norm" in type(owner).__name__.lower()
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif is_norm and pname.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif "cls_token" in pname or "mask_token" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _hf_module(model: str, impl: str):
    """The wrapped, seeded, eval-mode torch model (deterministic: same weights every call)."""
    import torch
    import transformers

    spec = _HF_SPECS[model]
    cfg = getattr(transformers, spec["cfg"])(**spec["config"])
    cfg._attn_implementation = impl
    seed = _seed(model)  # same weights for eager/sdpa and both exporters
    torch.manual_seed(seed)
    hf = getattr(transformers, spec["cls"])(cfg, **spec["kwargs"])
    assert hf.config._attn_implementation == impl, (model, hf.config._attn_implementation)

    draw_biases_and_norms(hf, seed)
    hf.eval()

    # Explicit forward signatures: torch.export keys dynamic_shapes by argument name.
    class _Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.m = inner

    class TextWithMask(_Wrapped):
        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Text(_Wrapped):
        def forward(self, input_ids):
            return self.m(input_ids=input_ids).last_hidden_state

    class Vision(_Wrapped):
        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state

    wrapper = {("input_ids", "attention_mask"): TextWithMask, ("input_ids",): Text, ("pixel_values",): Vision}
    w = wrapper[tuple(spec["inputs"])](hf)
    w.eval()
    return w


def torch_module(name: str):
    """The torch model behind a ``-dynamo``/``-legacy`` case (a fresh module, same weights)."""
    if name not in _BY_NAME or "torch" not in _BY_NAME[name].tags:
        raise KeyError(f"{name!r} is not a torch-exported case")
    model, impl, _, _ = _model_key(name)
    return _hf_module(model, impl)


def make_inputs(name: str, batch: int = 1, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a case: input_ids in [0, vocab), attention_mask ones, pixel_values /
    hidden_states standard normal.  ``seq`` is ignored for ViT (fixed image size)."""
    rng = np.random.default_rng(seed)
    meta = _BY_NAME[name].meta
    feeds: dict[str, np.ndarray] = {}
    for inp in meta["inputs"]:
        if inp == "input_ids":
            feeds[inp] = rng.integers(0, meta["vocab"], size=(batch, seq), dtype=np.int64)
        elif inp == "attention_mask":
            feeds[inp] = np.ones((batch, seq), dtype=np.int64)
        elif inp == "pixel_values":
            s = meta["image_size"]
            feeds[inp] = rng.standard_normal((batch, 3, s, s)).astype(np.float32)
        elif inp == "hidden_states":
            feeds[inp] = rng.standard_normal((batch, seq, meta["hidden"])).astype(np.float32)
        else:  # pragma: no cover
            raise KeyError(inp)
    return feeds


def _export_hf(name: str) -> onnx.ModelProto:
    import torch

    model, impl, opset, variant = _model_key(name)
    spec = _HF_SPECS[model]
    module = _hf_module(model, impl)
    input_names = list(spec["inputs"])
    batch, seq = 2, 8
    gen = torch.Generator().manual_seed(_seed(name))
    args = []
    for inp in input_names:
        if inp == "input_ids":
            args.append(torch.randint(0, _VOCAB, (batch, seq), generator=gen))
        elif inp == "attention_mask":
            args.append(torch.ones(batch, seq, dtype=torch.int64))
        else:
            s = spec["meta"]["image_size"]
            args.append(torch.randn(batch, 3, s, s, generator=gen))
    vision = input_names == ["pixel_values"]

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        path = os.path.join(tmp, "model.onnx")
        if variant == "dynamo":
            B = torch.export.Dim("batch", min=1, max=64)
            S = torch.export.Dim("seq", min=1, max=_MAXPOS)
            dyn = {n: ({0: B} if vision else {0: B, 1: S}) for n in input_names}
            torch.onnx.export(
                module, tuple(args), path, dynamo=True, verbose=False, opset_version=opset,
                input_names=input_names, output_names=["last_hidden_state"], dynamic_shapes=dyn,
            )
        else:
            axes = {n: ({0: "batch"} if vision else {0: "batch", 1: "seq"}) for n in input_names}
            axes["last_hidden_state"] = {0: "batch"} if vision else {0: "batch", 1: "seq"}
            torch.onnx.export(
                module, tuple(args), path, dynamo=False, opset_version=17, verbose=False,
                input_names=input_names, output_names=["last_hidden_state"], dynamic_axes=axes,
            )
        proto = onnx.load(path, load_external_data=True)
    # The legacy exporter may declare a made-up symbolic hidden dim on the output
    # (GPT-2: "Reshapelast_hidden_state_dim_2"); pin it to [batch, seq|tokens, hidden].
    meta = spec["meta"]
    out_dims = ["batch", meta["patches"] + 1 if vision else "seq", meta["hidden"]]
    shape = proto.graph.output[0].type.tensor_type.shape
    shape.ClearField("dim")
    for d in out_dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = d
    proto.graph.name = name
    return proto


# ---------------------------------------------------------------------------
# hand-built graphs
# ---------------------------------------------------------------------------


class _G(_BaseG):
    """The CNN corpus's graph builder, with HF-style blocks and this corpus's seeds (opset 17)."""

    def __init__(self, name: str, opset: int = 17):
        super().__init__(name, opset)
        self.rng = np.random.default_rng(_seed(name))

    def ints(self, values, prefix: str = "i") -> str:
        return self.init(np.asarray(values, dtype=np.int64), prefix)

    def scalar(self, v: float, prefix: str = "s") -> str:
        return self.init(np.array(v, dtype=np.float32), prefix)

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    # layers -----------------------------------------------------------------
    def linear(self, x, fin: int, fout: int, prefix: str, bias: bool = True):
        w = self.init((self.rng.standard_normal((fin, fout)) * 0.02).astype(np.float32), f"{prefix}_w")
        y = self.op("MatMul", [x, w])
        if bias:
            b = self.init((self.rng.standard_normal(fout) * 0.02).astype(np.float32), f"{prefix}_b")
            y = self.op("Add", [y, b])
        return y

    def layernorm(self, x, e: int, prefix: str = "ln"):
        gamma = self.init((1.0 + self.rng.standard_normal(e) * 0.1).astype(np.float32), f"{prefix}_gamma")
        beta = self.init((self.rng.standard_normal(e) * 0.02).astype(np.float32), f"{prefix}_beta")
        return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)

    def rmsnorm(self, x, e: int, prefix: str = "rms"):
        """Decomposed like the exporters: x * 1/sqrt(mean(x^2) + eps) * gamma."""
        sq = self.op("Pow", [x, self.scalar(2.0, "two")])
        ms = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)  # opset 17: axes attribute
        r = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.scalar(1e-6, "eps")])])])
        gamma = self.init((1.0 + self.rng.standard_normal(e) * 0.1).astype(np.float32), f"{prefix}_gamma")
        return self.op("Mul", [gamma, self.op("Mul", [x, r])])

    def dims(self, x, axes=(0, 1)) -> list[str]:
        """[d] (1-D int64) for each axis of x, via Shape -> Gather."""
        shp = self.op("Shape", [x])
        return [self.op("Gather", [shp, self.ints([a], "axis")], axis=0) for a in axes]

    def target(self, parts) -> str:
        """Reshape/Expand target: ints become literal 1-D constants, strings are tensors."""
        ins = [p if isinstance(p, str) else self.ints([p], "lit") for p in parts]
        return self.op("Concat", ins, axis=0)

    def sdpa(self, q, k, v, d: int):
        """q, k, v: [B, H, S, D] -> context [B, H, S, D]."""
        kt = self.op("Transpose", [k], perm=[0, 1, 3, 2])
        s = self.op("Mul", [self.op("MatMul", [q, kt]), self.scalar(1.0 / np.sqrt(d), "scale")])
        p = self.op("Softmax", [s], axis=-1)
        return self.op("MatMul", [p, v])

    def model(self, e: int, static: tuple[int, int] | None = None) -> onnx.ModelProto:
        shape = [*(static or ("batch", "seq")), e]
        out = self.nodes[-1].output[0]
        self.nodes.append(helper.make_node("Identity", [out], ["last_hidden_state"], name=self.fresh("Identity_out")))
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, shape)],
            initializer=self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                                 producer_name="surgery-tests-corpus")


X = "hidden_states"


def _attn_out(g: _G, ctx, x, e: int, to_bse, post_ln: bool = True):
    """[B,H,S,D] context -> [B,S,E] -> output projection -> residual -> LayerNorm."""
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), to_bse])
    y = g.op("Add", [x, g.linear(ctx, e, e, "o_proj")])
    return g.layernorm(y, e) if post_ln else y


def _ir_fused_qkv(mode: str, static: bool = False):
    """BERT-like post-LN self-attention with one [E, 3E] QKV projection.

    mode "split": Split(last axis, [E,E,E]) then Reshape each to [B,S,H,D].
    mode "gather": Reshape to [B,S,3,H,D] then Gather(axis=2, 0/1/2).
    static: input [1, 8, E] and constant Reshape targets (no Shape ops).
    """
    name = {"split": "fused_qkv", "gather": "fused_qkv_gather"}[mode] + ("_static" if static else "") + "-ir"
    e, h, d = 32, 4, 8
    g = _G(name)
    qkv = g.linear(X, e, 3 * e, "qkv")
    if static:
        bs, sl = _STATIC
        target = lambda dims: g.ints([bs, sl, *dims], "shape")  # noqa: E731
    else:
        b, s = g.dims(X)
        target = lambda dims: g.target([b, s, *dims])  # noqa: E731
    if mode == "split":
        parts = g.op("Split", [qkv, g.ints([e, e, e], "split")], n_out=3, axis=-1)
        to_bshd = target([h, d])
        q, k, v = (g.op("Reshape", [t, to_bshd]) for t in parts)
    else:
        r = g.op("Reshape", [qkv, target([3, h, d])])
        q, k, v = (g.op("Gather", [r, g.init(np.array(i, dtype=np.int64), "idx")], axis=2) for i in range(3))
    q, k, v = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
    _attn_out(g, g.sdpa(q, k, v, d), X, e, target([e]))
    return g.model(e, static=_STATIC if static else None)


_STATIC = (1, 8)


def _ir_mqa():
    """Multi-query attention: q has H heads, k and v one head expanded to H."""
    e, h, d = 32, 4, 8
    g = _G("mqa-ir")
    b, s = g.dims(X)
    q = g.op("Reshape", [g.linear(X, e, h * d, "q_proj"), g.target([b, s, h, d])])
    to_bs1d = g.target([b, s, 1, d])
    k = g.op("Reshape", [g.linear(X, e, d, "k_proj"), to_bs1d])
    v = g.op("Reshape", [g.linear(X, e, d, "v_proj"), to_bs1d])
    q, k, v = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B,1,S,D]
    to_bhsd = g.target([b, h, s, d])
    k = g.op("Expand", [k, to_bhsd])
    v = g.op("Expand", [v, to_bhsd])
    _attn_out(g, g.sdpa(q, k, v, d), X, e, g.target([b, s, e]))
    return g.model(e)


def _ir_gqa():
    """Llama-style pre-RMSNorm GQA attention (no bias), HF repeat_kv:
    [B,Hkv,S,D] -Unsqueeze(2)-> [B,Hkv,1,S,D] -Expand-> [B,Hkv,n_rep,S,D] -Reshape-> [B,H,S,D]."""
    e, h, hkv, d = 64, 4, 2, 16
    g = _G("gqa-ir")
    x = g.rmsnorm(X, e, "input_norm")
    b, s = g.dims(x)
    q = g.op("Reshape", [g.linear(x, e, h * d, "q_proj", bias=False), g.target([b, s, h, d])])
    to_kv = g.target([b, s, hkv, d])
    k = g.op("Reshape", [g.linear(x, e, hkv * d, "k_proj", bias=False), to_kv])
    v = g.op("Reshape", [g.linear(x, e, hkv * d, "v_proj", bias=False), to_kv])
    q, k, v = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
    expand_to = g.target([b, hkv, h // hkv, s, d])
    merge_to = g.target([b, h, s, d])
    axis2 = g.ints([2], "axes")

    def repeat_kv(t):
        return g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, axis2]), expand_to]), merge_to])

    ctx = g.sdpa(q, repeat_kv(k), repeat_kv(v), d)
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.target([b, s, e])])
    g.op("Add", [X, g.linear(ctx, h * d, e, "o_proj", bias=False)])
    return g.model(e)


def _ir_attn_reshape_const():
    """Separate q/k/v projections with constant Reshape targets using 0 (copy) and
    -1 (infer) on symbolic dims: [0, 0, -1, D] and back [0, 0, -1] (what HF's
    view(*input_shape, -1, head_dim) means)."""
    e, d = 32, 8
    g = _G("attn_reshape_const-ir")
    to_bshd = g.ints([0, 0, -1, d], "shape_00m1d")
    q, k, v = (g.op("Reshape", [g.linear(X, e, e, p), to_bshd]) for p in ("q_proj", "k_proj", "v_proj"))
    q, k, v = (g.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, k, v))
    _attn_out(g, g.sdpa(q, k, v, d), X, e, g.ints([0, 0, -1], "shape_00m1"))
    return g.model(e)


def _ir_swiglu():
    """Pre-RMSNorm SwiGLU MLP: down(silu(gate(x)) * up(x)) + x, SiLU as x*Sigmoid(x)."""
    e, i = 32, 96
    g = _G("swiglu-ir")
    x = g.rmsnorm(X, e, "post_attention_norm")
    gate = g.linear(x, e, i, "gate_proj", bias=False)
    up = g.linear(x, e, i, "up_proj", bias=False)
    hidden = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    g.op("Add", [X, g.linear(hidden, i, e, "down_proj", bias=False)])
    return g.model(e)


def _ir_meta(e, h, hkv, d, inter, family, layers=1):
    return dict(layers=layers, heads=h, kv_heads=hkv, head_dim=d, hidden=e, intermediate=inter, family=family,
                inputs=("hidden_states",), static=None, opset=17)


_IR_CASES: list[tuple[str, Callable[[], onnx.ModelProto], dict, set[str]]] = [
    ("fused_qkv-ir", lambda: _ir_fused_qkv("split"), _ir_meta(32, 4, 4, 8, None, "block"),
     {"attention", "fused_qkv", "split", "layernorm"}),
    ("fused_qkv_gather-ir", lambda: _ir_fused_qkv("gather"), _ir_meta(32, 4, 4, 8, None, "block"),
     {"attention", "fused_qkv", "gather", "layernorm"}),
    ("fused_qkv_static-ir", lambda: _ir_fused_qkv("split", static=True),
     {**_ir_meta(32, 4, 4, 8, None, "block"), "static": _STATIC},
     {"attention", "fused_qkv", "split", "layernorm", "static"}),
    ("mqa-ir", _ir_mqa, _ir_meta(32, 4, 1, 8, None, "block"), {"attention", "mqa", "expand", "layernorm"}),
    ("gqa-ir", _ir_gqa, _ir_meta(64, 4, 2, 16, None, "block"), {"attention", "gqa", "expand", "rmsnorm"}),
    ("attn_reshape_const-ir", _ir_attn_reshape_const, _ir_meta(32, 4, 4, 8, None, "block"),
     {"attention", "layernorm", "reshape_const"}),
    ("swiglu-ir", _ir_swiglu, _ir_meta(32, None, None, None, 96, "block"), {"swiglu", "rmsnorm", "mlp"}),
]


def _make_cases() -> list[TCase]:
    cases: list[TCase] = []
    for base, (model, impl, opset) in _VARIANTS.items():
        spec = _HF_SPECS[model]
        for variant in ("dynamo", "legacy"):
            if (base, variant) in SKIPPED_EXPORTS:
                continue
            name = f"{base}-{variant}"
            meta = dict(spec["meta"], inputs=spec["inputs"], attn_implementation=impl, exporter=variant,
                        opset=17 if variant == "legacy" else (opset or 20),
                        vocab=None if "pixel_values" in spec["inputs"] else _VOCAB, static=None)
            tags = set(spec["tags"]) | {"torch", "hf", variant, impl}
            if opset == 23:
                tags |= {"attention_op", "opset23"}
            cases.append(TCase(name=name, build=functools.partial(_export_hf, name), meta=meta,
                               tags=frozenset(tags)))
    for name, fn, meta, tags in _IR_CASES:
        cases.append(TCase(name=name, build=fn, meta=dict(meta), tags=frozenset(tags | {"ir"})))
    return cases


TCASES: list[TCase] = _make_cases()
_REGISTRY = Registry(TCASES, "transformer corpus")
_BY_NAME = _REGISTRY.by_name
names, case, build = _REGISTRY.names, _REGISTRY.case, _REGISTRY.build
