"""PyTorch backend: apply a plan's cuts to the user's own ``nn.Module``.

Public API
----------
``apply_module_cuts(root, cuts) -> Applied``
    ``cuts`` maps a qualified tensor name of ``root`` (parameter, buffer or plain
    tensor attribute: ``layer1.0.conv1.weight``) to ``[(axis, removed indices)]``.
    Each tensor is sliced with ``index_select`` on the kept indices (dtype, device
    and ``requires_grad`` preserved; a parameter is replaced by a new
    ``nn.Parameter``, under every name that shares it), then every module whose
    subtree lost something is updated, children first, by the rule registered for
    its type (:func:`register_module_rule`, looked up along the MRO; classes of optional
    packages by qualified name, e.g. transformers' ``Conv1D``, GPT-2's transposed
    linear layer: ``nf``/``nx``). Modules without a rule get
    :func:`update_transformer_attributes`: attention with q/k/v/o child Linears
    (:func:`attention_rule`: BERT, Llama with GQA...) or with a fused q|k|v projection
    (:func:`fused_attention_rule`: GPT-2's ``c_attn`` + ``split_size``), whole heads
    only, ``head_dim`` never changes; MLPs (``intermediate_size``, GPT-2's ``c_fc``,
    BERT's ``*Intermediate.dense``). Rules vote for the root's ``config``
    (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``intermediate_size``; a vote lands on an alias the config has, e.g. GPT-2's
    ``n_inner``/``n_head``); a cut of the token embedding's width
    (``get_input_embeddings()``) votes ``hidden_size`` and updates every
    ``hidden_size``/``embed_dim`` attribute that stated the old width. A key is set
    when every layer agrees (``Applied.config``), else left as is
    (``Applied.conflicts``, ``Applied.notes``). A rule raises
    :class:`NotRepresentable` when the module cannot express the cut (then nothing
    is left half-changed: everything done so far is undone). ``Applied.undo()``
    restores the module.

``register_module_rule(*classes)(fn)``
    ``fn(module, cut: ModuleCut)`` updates the module's attributes after its tensors
    (and its children's) were sliced. ``cut.cuts`` holds the cuts under names relative
    to the module (``"weight"``, ``"out_proj.weight"``); ``cut.removed(name, axis)``,
    ``cut.old_shape(name)``, ``cut.blocks(name, axis, n)`` help; set attributes with
    ``cut.set(attr, value)`` so a failure can be undone; ``cut.fail(reason)`` rejects.

``check_module(module, proto, example_inputs) -> dict``
    Runs the pruned module and the pruned ONNX model (onnxruntime) on the example
    inputs; outputs must agree within ``1e-4 x max(1, max |output|)``. Otherwise raises
    :class:`SurgeryError` naming the first module that fails: the one an exception
    was raised in (a hard-coded channel count: ``x.view(-1, 64)``, a
    ``torch.zeros(1, 64, 1, 1)`` built in ``forward``), or the first module, in the
    order they finish, whose output differs in shape or value from the ONNX value its
    exported nodes produce.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from surgery.errors import SurgeryError
from surgery.frontends.torch_export import (
    NotRepresentable,
    eval_mode,
    flat_tensors,
    module_scope,
    module_tensors,
    onnx_feeds,
    split_inputs,
)

__all__ = [
    "Applied",
    "ModuleCut",
    "NotRepresentable",
    "apply_module_cuts",
    "check_module",
    "register_module_rule",
    "rule_for",
    "attention_rule",
    "heads_after",
    "is_attention",
    "is_conv1d",
    "is_fused_attention",
    "fused_attention_rule",
    "update_transformer_attributes",
]

TensorCuts = dict  # qualified tensor name -> [(axis, removed indices)]


# --------------------------------------------------------------------------- #
# rules registry
# --------------------------------------------------------------------------- #

_RULES: dict[type, Callable] = {}


def register_module_rule(*classes: type):
    """Decorator: ``@register_module_rule(MyBlock)`` on ``fn(module, cut)``."""
    if not classes:
        raise TypeError("register_module_rule needs at least one module class")

    def deco(fn):
        for c in classes:
            _RULES[c] = fn
        return fn

    return deco


def rule_for(cls: type) -> Callable | None:
    for k in cls.__mro__:
        if k in _RULES:
            return _RULES[k]
        named = _NAMED_RULES.get(f"{k.__module__}.{k.__qualname__}")
        if named is not None:
            return named
    return None


@dataclasses.dataclass
class ModuleCut:
    """What one module (with its subtree) lost; handed to its rule."""

    name: str  # qualified name ("" for the root)
    module: nn.Module
    root: nn.Module
    cuts: dict[str, list[tuple[int, np.ndarray]]]  # relative tensor name -> [(axis, removed)]
    old_shapes: dict[str, tuple[int, ...]]  # relative tensor name -> shape before the cut
    _undo: list = dataclasses.field(default_factory=list, repr=False)
    changed: dict = dataclasses.field(default_factory=dict)  # attr -> (old, new)
    votes: dict = dataclasses.field(default_factory=dict)  # config key -> {values}

    @property
    def label(self) -> str:
        return f"'{self.name or '<root>'}' ({type(self.module).__name__})"

    def removed(self, tensor: str, axis: int) -> np.ndarray:
        out = [np.asarray(idx, dtype=np.int64) for a, idx in self.cuts.get(tensor, []) if a == axis]
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def old_shape(self, tensor: str) -> tuple[int, ...] | None:
        if tensor in self.old_shapes:
            return self.old_shapes[tensor]
        t = _get_tensor(self.module, tensor)
        return tuple(t.shape) if t is not None else None

    def blocks(self, tensor: str, axis: int, n: int) -> tuple[int, list[int]]:
        """Split the old axis into ``n`` equal consecutive blocks: (blocks fully removed,
        remaining count of each surviving block)."""
        size = self.old_shape(tensor)[axis]
        if n <= 0 or size % n:
            self.fail(f"axis {axis} of '{tensor}' ({size}) does not split into {n} blocks")
        per = size // n
        counts = np.bincount(self.removed(tensor, axis) // per, minlength=n)
        remaining = per - counts
        return int((remaining == 0).sum()), [int(r) for r in remaining if r > 0]

    def set(self, attr: str, value, obj=None) -> None:
        obj = self.module if obj is None else obj
        old = getattr(obj, attr)
        if old == value:
            return
        self._undo.append(("attr", obj, attr, old))
        setattr(obj, attr, value)
        if obj is self.module:
            self.changed[attr] = (old, value)

    def vote(self, config_key: str, value) -> None:
        """Ask for ``root.config.<config_key> = value`` (applied when every module agrees)."""
        self.votes.setdefault(config_key, set()).add(value)

    def fail(self, reason: str):
        raise NotRepresentable(f"module {self.label} cannot express the cut: {reason}")


def _get_tensor(module: nn.Module, name: str):
    owner, _, attr = name.rpartition(".")
    try:
        mod = module.get_submodule(owner) if owner else module
    except AttributeError:
        return None
    t = getattr(mod, attr, None)
    return t if isinstance(t, torch.Tensor) else None


# --------------------------------------------------------------------------- #
# built-in rules
# --------------------------------------------------------------------------- #

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_module_rule(*_CONV, *_CONVT)
def _conv_rule(m, cut: ModuleCut) -> None:
    w = m.weight
    g = m.groups
    transposed = isinstance(m, _CONVT)
    # Conv: weight [out, in/g, k...], outputs grouped along axis 0.
    # ConvTranspose: weight [in, out/g, k...], inputs grouped along axis 0.
    full, remaining = cut.blocks("weight", 0, g)
    if len(set(remaining)) > 1:
        cut.fail(f"its {g} groups would keep unequal channel counts {sorted(set(remaining))}")
    g_new = g - full
    if transposed:
        cut.set("in_channels", int(w.shape[0]))
        cut.set("out_channels", int(g_new * w.shape[1]))
    else:
        cut.set("out_channels", int(w.shape[0]))
        cut.set("in_channels", int(g_new * w.shape[1]))
    cut.set("groups", int(g_new))
    if m.bias is not None and m.bias.shape[0] != m.out_channels:
        cut.fail(f"bias has {m.bias.shape[0]} entries for {m.out_channels} output channels")


@register_module_rule(nn.Linear)
def _linear_rule(m, cut: ModuleCut) -> None:
    cut.set("out_features", int(m.weight.shape[0]))
    cut.set("in_features", int(m.weight.shape[1]))


@register_module_rule(nn.Bilinear)
def _bilinear_rule(m, cut: ModuleCut) -> None:
    cut.set("out_features", int(m.weight.shape[0]))
    cut.set("in1_features", int(m.weight.shape[1]))
    cut.set("in2_features", int(m.weight.shape[2]))


def _num_features(m) -> int | None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


@register_module_rule(nn.modules.batchnorm._NormBase)  # BatchNorm*, InstanceNorm*, SyncBatchNorm
def _norm_rule(m, cut: ModuleCut) -> None:
    n = _num_features(m)
    if n is not None:
        cut.set("num_features", n)


@register_module_rule(nn.LayerNorm)
def _layernorm_rule(m, cut: ModuleCut) -> None:
    t = m.weight if m.weight is not None else m.bias
    if t is not None:
        cut.set("normalized_shape", tuple(int(d) for d in t.shape))


@register_module_rule(nn.GroupNorm)
def _groupnorm_rule(m, cut: ModuleCut) -> None:
    name = next((n for n in ("weight", "bias") if n in cut.cuts), None)
    if name is None:
        return
    full, remaining = cut.blocks(name, 0, m.num_groups)
    if len(set(remaining)) > 1:
        cut.fail(f"its {m.num_groups} groups would keep unequal channel counts {sorted(set(remaining))}")
    cut.set("num_groups", int(m.num_groups - full))
    cut.set("num_channels", int(getattr(m, name).shape[0]))


@register_module_rule(nn.Embedding, nn.EmbeddingBag)
def _embedding_rule(m, cut: ModuleCut) -> None:
    cut.set("embedding_dim", int(m.weight.shape[1]))
    cut.set("num_embeddings", int(m.weight.shape[0]))
    pad = getattr(m, "padding_idx", None)
    rows = cut.removed("weight", 0)
    if pad is not None and len(rows):
        p = pad % cut.old_shape("weight")[0]
        if p in set(rows.tolist()):
            cut.fail(f"the plan removes its padding_idx row {pad}")
        cut.set("padding_idx", int(p - (rows < p).sum()))


@register_module_rule(nn.PReLU)
def _prelu_rule(m, cut: ModuleCut) -> None:
    cut.set("num_parameters", int(m.weight.numel()))


_MHA_WHY = ("nn.MultiheadAttention ties num_heads x head_dim to the query's embed_dim (head_dim = "
            "query.size(-1) // num_heads in F.multi_head_attention_forward), so heads, head_dim and the "
            "q/k/v projections can only shrink together with the query features")


@register_module_rule(nn.MultiheadAttention)
def _mha_rule(m, cut: ModuleCut) -> None:
    E, H = m.embed_dim, m.num_heads
    own = {k for k in cut.cuts if not k.startswith("out_proj.")}
    inner_out = cut.removed("out_proj.weight", 1)
    if not own and not len(inner_out):
        return  # only the output features (out_proj rows) changed: the module allows that
    kv_inputs = {"k_proj_weight", "v_proj_weight"}
    if (not m._qkv_same_embed_dim and own <= kv_inputs and not len(inner_out)
            and all(a == 1 for n in kv_inputs for a, _ in cut.cuts.get(n, []))):
        cut.set("kdim", int(m.k_proj_weight.shape[1]))  # key/value input features (kdim/vdim)
        cut.set("vdim", int(m.v_proj_weight.shape[1]))
        return
    # the one consistent case: every q/k/v row, the query features and out_proj's input
    # lose the same indices R of the embedding
    if m._qkv_same_embed_dim:
        rows = cut.removed("in_proj_weight", 0)
        thirds = [rows[(rows >= i * E) & (rows < (i + 1) * E)] - i * E for i in range(3)]
        R = thirds[0]
        cols = {"in_proj_weight": cut.removed("in_proj_weight", 1)}
        same = all(np.array_equal(t, R) for t in thirds) and np.array_equal(cols["in_proj_weight"], R)
    else:
        R = cut.removed("q_proj_weight", 0)
        same = (all(np.array_equal(cut.removed(n, 0), R) for n in ("k_proj_weight", "v_proj_weight"))
                and np.array_equal(cut.removed("q_proj_weight", 1), R))
    same = same and np.array_equal(inner_out, R) and len(R) > 0
    if m.in_proj_bias is not None:
        b = cut.removed("in_proj_bias", 0)
        same = same and all(np.array_equal(b[(b >= i * E) & (b < (i + 1) * E)] - i * E, R) for i in range(3))
    for extra in ("bias_k", "bias_v"):
        if getattr(m, extra) is not None:
            same = same and np.array_equal(cut.removed(extra, 2), R)
    if not same:
        cut.fail(_MHA_WHY)
    per_head = np.bincount(R // (E // H), minlength=H)
    left = (E // H) - per_head
    if len(set(left[left > 0].tolist())) > 1:
        cut.fail("heads would keep unequal head_dim")
    h_new = int((left > 0).sum())
    e_new = E - len(R)
    cut.set("embed_dim", e_new)
    cut.set("num_heads", h_new)
    cut.set("head_dim", e_new // h_new)
    if m._qkv_same_embed_dim:
        cut.set("kdim", e_new)
        cut.set("vdim", e_new)
    else:
        cut.set("kdim", int(m.k_proj_weight.shape[1]))
        cut.set("vdim", int(m.v_proj_weight.shape[1]))


# --------------------------------------------------------------------------- #
# transformers-style modules: the extension point
# --------------------------------------------------------------------------- #

_Q = ("q_proj", "query", "q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "wv", "v_lin")
_O = ("o_proj", "out_proj", "wo", "out_lin")
_UP = ("up_proj", "fc1", "w1", "lin1", "c_fc")
_FUSED = ("c_attn",)  # GPT-2 style fused q|k|v projection
_FUSED_O = ("c_proj", "o_proj", "out_proj")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")
# config keys a vote may land on when the config lacks the voted key (first present wins)
CONFIG_ALIASES = {
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "num_attention_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
}


def is_conv1d(c) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer with weight [nx, nf] (transposed)."""
    return (isinstance(c, nn.Module) and isinstance(getattr(c, "nf", None), int)
            and isinstance(getattr(c, "nx", None), int) and isinstance(getattr(c, "weight", None), torch.Tensor)
            and c.weight.dim() == 2)


def _out_axis(c) -> int:
    """The weight axis that indexes the output features (Conv1D is transposed)."""
    return 1 if is_conv1d(c) else 0


def _in_axis(c) -> int:
    return 0 if is_conv1d(c) else 1


def _out_features(c) -> int:
    return int(c.weight.shape[_out_axis(c)])


def _conv1d_rule(m, cut: ModuleCut) -> None:
    cut.set("nf", int(m.weight.shape[1]))
    cut.set("nx", int(m.weight.shape[0]))
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor) and b.shape[0] != m.nf:
        cut.fail(f"bias has {b.shape[0]} entries for {m.nf} output features")


# rules for classes of optional packages, by qualified class name (no import needed)
_NAMED_RULES: dict[str, Callable] = {
    "transformers.pytorch_utils.Conv1D": _conv1d_rule,
    "transformers.modeling_utils.Conv1D": _conv1d_rule,
}


def _child(m, names, *, conv1d: bool = False):
    for n in names:
        c = getattr(m, n, None)
        if isinstance(c, nn.Linear) or (conv1d and is_conv1d(c)):
            return n, c
    return None, None


def _attr(m, names):
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return n, v
    return None, None


def is_fused_attention(m) -> bool:
    """A GPT-2 style attention: a fused q|k|v projection child (``c_attn``, Conv1D or
    Linear), an int ``split_size`` and a heads or head_dim attribute."""
    return (_child(m, _FUSED, conv1d=True)[1] is not None and isinstance(getattr(m, "split_size", None), int)
            and (_attr(m, _HEADS)[0] is not None or _attr(m, _HEAD_DIM)[0] is not None))


def is_attention(m) -> bool:
    """A transformers-style attention: a query projection child (or a fused q|k|v one,
    :func:`is_fused_attention`) and a heads or head_dim attribute."""
    return ((_child(m, _Q)[1] is not None and (_attr(m, _HEADS)[0] is not None or _attr(m, _HEAD_DIM)[0] is not None))
            or is_fused_attention(m))


def heads_after(cut: ModuleCut, proj: str, heads: int, head_dim: int) -> tuple[int, np.ndarray]:
    """(heads kept, removed head indices) of projection ``proj`` (relative name) whose
    output rows are ``heads`` x ``head_dim``; fails unless the cut removes whole heads."""
    rows = cut.removed(f"{proj}.weight", 0)
    if not len(rows):
        return heads, np.zeros(0, np.int64)
    full, remaining = cut.blocks(f"{proj}.weight", 0, heads)
    if any(r != head_dim for r in remaining):
        cut.fail(f"the cut shrinks the head_dim of '{proj}' ({head_dim} -> {sorted(set(remaining))}); the module "
                 f"keeps one head_dim for its query, key and value heads, so only whole heads can go")
    return heads - full, np.unique(rows // head_dim)


def attention_rule(m, cut: ModuleCut) -> None:
    """Whole-head pruning of a transformers-style attention (q/k/v/o projections as
    child Linears, ``head_dim`` or a heads count as attributes; GQA allowed). Updates
    ``num_heads``-like, ``num_key_value_heads``-like, ``all_head_size`` and
    ``num_key_value_groups`` attributes where they exist, and votes for ``config``
    (``num_attention_heads``, ``num_key_value_heads``, and ``head_dim``, which never
    changes: a config that derives it from ``hidden_size / num_attention_heads`` must
    now state it)."""
    qn, _ = _child(m, _Q)
    kn, k = _child(m, _K)
    vn, v = _child(m, _V)
    on, o = _child(m, _O)
    hn, H = _attr(m, _HEADS)
    dn, D = _attr(m, _HEAD_DIM)
    q_rows = cut.old_shape(f"{qn}.weight")[0]
    if D is None:
        D = q_rows // H
    H = q_rows // D
    h_new, q_gone = heads_after(cut, qn, H, D)
    kvn, _ = _attr(m, _KV_HEADS)
    KV, kv_new, kv_gone = H, h_new, q_gone
    if k is not None:
        KV = cut.old_shape(f"{kn}.weight")[0] // D
        kv_new, kv_gone = heads_after(cut, kn, KV, D)
        if v is not None:
            _, v_gone = heads_after(cut, vn, cut.old_shape(f"{vn}.weight")[0] // D, D)
            if not np.array_equal(v_gone, kv_gone):
                cut.fail(f"the cut removes key heads {kv_gone.tolist()} but value heads {v_gone.tolist()}")
    if o is not None and not np.array_equal(cut.removed(f"{on}.weight", 1), cut.removed(f"{qn}.weight", 0)):
        cut.fail(f"'{on}' loses other input features than '{qn}' loses outputs")
    if not h_new:
        cut.fail("the cut removes every head")
    if not kv_new or h_new % kv_new:
        cut.fail(f"{h_new} query heads do not share {kv_new} key/value heads evenly")
    if k is not None and KV and H % KV == 0:  # each kept query head still reads its own kv head
        rep_old, rep_new = H // KV, h_new // kv_new
        gone_q, gone_kv = set(q_gone.tolist()), set(kv_gone.tolist())
        kept_q = [h for h in range(H) if h not in gone_q]
        kept_kv = [h for h in range(KV) if h not in gone_kv]
        if any(qh // rep_old != kept_kv[i // rep_new] for i, qh in enumerate(kept_q)):
            cut.fail("the kept query heads would read other key/value heads")
    if hn is not None:
        cut.set(hn, int(h_new))
    if kvn is not None:
        cut.set(kvn, int(kv_new))
    if isinstance(getattr(m, "all_head_size", None), int):
        cut.set("all_head_size", int(h_new * D))
    if isinstance(getattr(m, "num_key_value_groups", None), int):
        cut.set("num_key_value_groups", int(h_new // kv_new))
    cut.vote("num_attention_heads", int(h_new))
    cut.vote("head_dim", int(D))
    if k is not None and KV != H:
        cut.vote("num_key_value_heads", int(kv_new))


def fused_attention_rule(m, cut: ModuleCut) -> None:
    """Whole-head pruning of a GPT-2 style attention (:func:`is_fused_attention`): the
    fused projection's outputs are [q | k | v], ``split_size`` features each, in heads of
    ``head_dim``; q, k and v must lose the same whole heads, and the output projection
    (``c_proj``) the value features. Updates the heads count and ``split_size``
    (``head_dim`` and ``embed_dim``, the model width, stay), and votes for ``config``."""
    fn, f = _child(m, _FUSED, conv1d=True)
    hn, H = _attr(m, _HEADS)
    dn, D = _attr(m, _HEAD_DIM)
    S = int(m.split_size)
    oax = _out_axis(f)
    width = cut.old_shape(f"{fn}.weight")[oax]
    rem = cut.removed(f"{fn}.weight", oax)
    if not len(rem):
        return
    if width != 3 * S:
        cut.fail(f"'{fn}' has {width} outputs, not query, key and value of split_size {S} (cross-attention)")
    if D is None:
        D = S // H
    H = S // D
    parts = [rem[(rem >= i * S) & (rem < (i + 1) * S)] - i * S for i in range(3)]
    gone = []
    for what, p in zip(("query", "key", "value"), parts):
        per = np.bincount(p // D, minlength=H)
        if ((per != 0) & (per != D)).any():
            cut.fail(f"the cut shrinks the head_dim of the {what} part of '{fn}' ({D} -> "
                     f"{sorted(set((D - per[(per != 0) & (per != D)]).tolist()))}); the module keeps one head_dim, "
                     f"so only whole heads can go")
        gone.append(np.unique(p // D))
    if not (np.array_equal(gone[0], gone[1]) and np.array_equal(gone[0], gone[2])):
        cut.fail(f"the cut removes query heads {gone[0].tolist()}, key heads {gone[1].tolist()} and value heads "
                 f"{gone[2].tolist()} of '{fn}'; the module keeps one set of heads for all three")
    on, o = _child(m, _FUSED_O, conv1d=True)
    if o is not None and not np.array_equal(cut.removed(f"{on}.weight", _in_axis(o)), parts[2]):
        cut.fail(f"'{on}' loses other input features than the value part of '{fn}' loses outputs")
    h_new = H - len(gone[0])
    if not h_new:
        cut.fail("the cut removes every head")
    if hn is not None:
        cut.set(hn, int(h_new))
    cut.set("split_size", int(h_new * D))
    cut.vote("num_attention_heads", int(h_new))
    cut.vote("head_dim", int(D))


def _mlp_up(m):
    """The up projection of an MLP module whose width a config states: a module with an
    ``intermediate_size``, a GPT-2 MLP (``c_fc`` Conv1D), or a BERT-style
    ``*Intermediate`` module (``dense``)."""
    name, up = _child(m, _UP, conv1d=True)
    if up is not None and (isinstance(getattr(m, "intermediate_size", None), int) or (name == "c_fc" and is_conv1d(up))):
        return name, up
    if type(m).__name__.endswith("Intermediate"):
        return _child(m, ("dense",))
    return None, None


def update_transformer_attributes(m, cut: ModuleCut) -> None:
    """Default for modules without a rule. Attention modules (:func:`is_attention`) go
    through :func:`attention_rule` or :func:`fused_attention_rule`; MLP modules
    (:func:`_mlp_up`) follow their up projection (``intermediate_size`` attribute, and
    a vote for ``config.intermediate_size`` or its alias, e.g. GPT-2's ``n_inner``).
    This is the extension point for transformers' classes:
    ``register_module_rule(MyAttention)(fn)`` replaces it; ``fn`` receives the module
    and the cut, and :func:`heads_after` gives the head counts."""
    if is_fused_attention(m):
        names = {_child(m, _FUSED, conv1d=True)[0], _child(m, _FUSED_O, conv1d=True)[0]} - {None}
        if any(k.split(".")[0] in names for k in cut.cuts):
            fused_attention_rule(m, cut)
    elif is_attention(m):
        names = {_child(m, n)[0] for n in (_Q, _K, _V, _O)} - {None}
        if any(k.split(".")[0] in names for k in cut.cuts):
            attention_rule(m, cut)
    un, up = _mlp_up(m)
    if up is not None and any(k.startswith(f"{un}.") for k in cut.cuts):
        if isinstance(getattr(m, "intermediate_size", None), int):
            cut.set("intermediate_size", _out_features(up))
        cut.vote("intermediate_size", _out_features(up))


# --------------------------------------------------------------------------- #
# applying cuts
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Applied:
    undo_log: list
    notes: list[str]
    changed: dict[str, dict]  # module name -> {attr: (old, new)}
    config: dict = dataclasses.field(default_factory=dict)  # root.config key -> (old, new)
    conflicts: dict = dataclasses.field(default_factory=dict)  # config key -> the differing layer values

    def undo(self) -> None:
        for entry in reversed(self.undo_log):
            kind = entry[0]
            if kind == "attr":
                _, obj, attr, old = entry
                setattr(obj, attr, old)
            else:
                _, store, attr, old = entry
                store[attr] = old
        self.undo_log.clear()


def _holders(root: nn.Module):
    """id(tensor) -> [(module, store dict or None, attr)] under every name."""
    out: dict[int, list] = {}
    for _, mod in root.named_modules(remove_duplicate=False):
        for k, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, mod._parameters, k))
        for k, b in mod._buffers.items():
            if b is not None:
                out.setdefault(id(b), []).append((mod, mod._buffers, k))
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not k.startswith("_"):
                out.setdefault(id(v), []).append((mod, None, k))
    for k in out:  # dedupe (same module reached twice)
        seen, uniq = set(), []
        for h in out[k]:
            key = (id(h[0]), h[2])
            if key not in seen:
                seen.add(key)
                uniq.append(h)
        out[k] = uniq
    return out


def _slice(t: torch.Tensor, cuts) -> torch.Tensor:
    new = t.detach()
    by_axis: dict[int, set] = {}
    for axis, idx in cuts:
        by_axis.setdefault(int(axis), set()).update(int(i) for i in np.asarray(idx).reshape(-1))
    for axis, rem in sorted(by_axis.items()):
        if axis < 0 or axis >= new.dim():
            raise SurgeryError(f"cut axis {axis} out of range for a tensor of shape {list(t.shape)}")
        keep = [i for i in range(new.shape[axis]) if i not in rem]
        if len(keep) + len(rem) != new.shape[axis] or any(i < 0 for i in rem):
            raise SurgeryError(f"cut indices out of range for axis {axis} of a tensor of shape {list(t.shape)}")
        new = new.index_select(axis, torch.as_tensor(keep, dtype=torch.long, device=t.device))
    return new.contiguous()


def _input_embedding_width(root: nn.Module, applied: Applied) -> tuple[int, int] | None:
    """(old, new) width of a transformers model's token embedding
    (``get_input_embeddings()``) when the cut changed it: the model's ``hidden_size``."""
    get = getattr(root, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except Exception:  # noqa: BLE001 - not every model implements it
        return None
    if not isinstance(emb, nn.Embedding):
        return None
    name = next((n for n, m in root.named_modules() if m is emb), None)
    if name is None or "embedding_dim" not in applied.changed.get(name, {}):
        return None
    old, new = applied.changed[name]["embedding_dim"]
    return int(old), int(new)


_WIDTH_ATTRS = ("hidden_size", "embed_dim", "d_model", "n_embd")


def _set_width_attributes(root: nn.Module, width: tuple[int, int], undo: list, applied: Applied) -> None:
    """The model width went ``old -> new``: every submodule attribute that states it
    (``hidden_size``, ``embed_dim``... equal to ``old``) follows."""
    old, new = width
    for name, mod in root.named_modules():
        for a in _WIDTH_ATTRS:
            v = mod.__dict__.get(a)
            if type(v) is int and v == old:
                undo.append(("attr", mod, a, v))
                setattr(mod, a, new)
                applied.changed.setdefault(name, {})[a] = (old, new)


def apply_module_cuts(root: nn.Module, cuts: TensorCuts, *, name_prefix: str = "") -> Applied:
    """Slice the named tensors of ``root`` and update its modules (see module doc).
    ``name_prefix``: the qualified name of ``root`` in a bigger model, for messages."""
    tensors = module_tensors(root)
    holders = _holders(root)
    undo: list = []
    applied = Applied(undo, [], {})
    by_obj: dict[int, list] = {}
    names_of: dict[int, list[str]] = {}
    for name, c in cuts.items():
        if name not in tensors:
            raise SurgeryError(f"'{name}' is not a parameter, buffer or tensor attribute of {type(root).__name__}")
        t = tensors[name][1]
        by_obj.setdefault(id(t), []).extend((int(a), np.asarray(i, dtype=np.int64)) for a, i in c)
        names_of.setdefault(id(t), []).append(name)
    try:
        with torch.no_grad():
            _swap_tensors(tensors, holders, by_obj, names_of, undo)
            config_votes = _module_rules(root, tensors, by_obj, applied, undo, name_prefix)
            _update_config(root, config_votes, applied, undo)
    except Exception:
        applied.undo()
        raise
    return applied


def _swap_tensors(tensors: dict, holders: dict, by_obj: dict[int, list], names_of: dict[int, list[str]],
                  undo: list) -> None:
    """Replace every cut tensor, in every module or store holding it, by its sliced copy."""
    for oid, c in by_obj.items():
        t = tensors[names_of[oid][0]][1]
        new = _slice(t, c)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for mod, store, attr in holders.get(oid, []):
            if store is None:
                undo.append(("attr", mod, attr, getattr(mod, attr)))
                setattr(mod, attr, new)
            else:
                undo.append(("store", store, attr, store[attr]))
                store[attr] = new


def _module_rules(root: nn.Module, tensors: dict, by_obj: dict[int, list], applied: Applied, undo: list,
                  name_prefix: str) -> dict[str, set]:
    """Run the module rule of every module holding a cut tensor, and of its parents
    (innermost first); returns the config values they vote for."""
    old_shapes: dict[str, tuple] = {}
    affected: set[str] = set()
    # every name of a cut tensor, for the rules of every module holding it
    all_names: dict[str, list] = {}
    for name, (_, t) in tensors.items():
        if id(t) in by_obj:
            all_names[name] = by_obj[id(t)]
            old_shapes[name] = tuple(t.shape)
            owner = name.rpartition(".")[0]
            parts = owner.split(".") if owner else []
            for k in range(len(parts) + 1):
                affected.add(".".join(parts[:k]))
    done: set[int] = set()
    config_votes: dict[str, set] = {}
    for mname in sorted(affected, key=lambda s: (-(s.count(".") + 1) if s else 0, s)):
        mod = root.get_submodule(mname) if mname else root
        if id(mod) in done:
            continue
        done.add(id(mod))
        prefix = f"{mname}." if mname else ""
        rel = {n[len(prefix):]: c for n, c in all_names.items() if n.startswith(prefix)}
        rel_shapes = {n[len(prefix):]: s for n, s in old_shapes.items() if n.startswith(prefix)}
        full = ".".join(n for n in (name_prefix, mname) if n)
        mc = ModuleCut(full, mod, root, rel, rel_shapes, undo)
        fn = rule_for(type(mod)) or update_transformer_attributes
        fn(mod, mc)
        if mc.changed:
            applied.changed[full] = dict(mc.changed)
        for key, vals in mc.votes.items():
            config_votes.setdefault(key, set()).update(vals)
    return config_votes


def _update_config(root: nn.Module, config_votes: dict[str, set], applied: Applied, undo: list) -> None:
    """Set the config keys every layer agrees on (and the model width, when cut); note conflicts."""
    cfg = getattr(root, "config", None)
    width = _input_embedding_width(root, applied)
    if cfg is not None and width is not None:  # the model width (residual stream) was cut
        config_votes.setdefault("hidden_size", set()).add(width[1])
        _set_width_attributes(root, width, undo, applied)
    if cfg is None or not config_votes:
        return
    for vote, vals in config_votes.items():
        key = next((k for k in CONFIG_ALIASES.get(vote, (vote,)) if hasattr(cfg, k)), None)
        if key is None:
            continue
        if len(vals) == 1:
            v = next(iter(vals))
            old = getattr(cfg, key)
            if old != v:
                undo.append(("attr", cfg, key, old))
                setattr(cfg, key, v)
                applied.config[key] = (old, v)
        else:
            applied.conflicts[key] = sorted(vals)
            applied.notes.append(f"config.{key} left as is: layers now differ ({sorted(vals)})")


# --------------------------------------------------------------------------- #
# checking the module against the pruned ONNX model
# --------------------------------------------------------------------------- #


def _tolerance(ref: list[np.ndarray]) -> float:
    scale = max((float(np.abs(r).max()) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)), default=1.0)
    return 1e-4 * max(1.0, scale)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.size:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(d)) if not np.isnan(d).all() else float("inf")


class _Tracer:
    """Forward hooks on every module: the stack of modules being run, and each one's
    outputs in the order they finish."""

    def __init__(self, root: nn.Module):
        self.stack: list[str] = []
        self.finished: list[tuple[str, list[torch.Tensor]]] = []
        self.calls: dict[str, int] = {}
        self.handles = []
        for name, mod in root.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(mod, args):
            self.stack.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1
        return hook

    def _post(self, name):
        def hook(mod, args, out):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            self.finished.append((name, [t.detach() for t in flat_tensors(out)]))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _run(module, example_inputs):
    args, kwargs = split_inputs(example_inputs)
    with eval_mode(module), torch.no_grad():
        return module(*args, **kwargs)


def _label(root: nn.Module, name: str) -> str:
    mod = root.get_submodule(name) if name else root
    return f"'{name or '<root>'}' ({type(mod).__name__})"


def _scope_values(proto):
    """module name -> values its exported nodes produce that are used outside them."""
    scopes = [module_scope(node) for node in proto.graph.node]
    consumers: dict[str, list[str | None]] = {}
    for node, s in zip(proto.graph.node, scopes):
        for i in node.input:
            consumers.setdefault(i, []).append(s)
    graph_outputs = {o.name for o in proto.graph.output}

    def inside(scope, mod):
        return scope is not None and (mod == "" or scope == mod or scope.startswith(mod + "."))

    def outputs_of(mod):
        out = []
        for node, s in zip(proto.graph.node, scopes):
            if not inside(s, mod):
                continue
            for o in node.output:
                users = consumers.get(o, [])
                if o in graph_outputs or any(not inside(u, mod) for u in users):
                    out.append(o)
        return out

    return outputs_of


def _entering_values(proto, mod: str) -> list[str]:
    """Values produced outside module ``mod``'s nodes that its nodes read (its inputs)."""
    inits = {t.name for t in proto.graph.initializer}
    produced_in = {}
    for node in proto.graph.node:
        for o in node.output:
            produced_in[o] = module_scope(node)
    graph_inputs = {i.name for i in proto.graph.input}
    out = []
    for node in proto.graph.node:
        s = module_scope(node)
        if s is None or not (mod == "" or s == mod or s.startswith(mod + ".")):
            continue
        for i in node.input:
            if not i or i in inits or i in out:
                continue
            p = produced_in.get(i)
            if i in graph_inputs or p is None or not (mod == "" or p == mod or p.startswith(mod + ".")):
                out.append(i)
    return out


def check_module(module: nn.Module, proto, example_inputs) -> dict:
    """The pruned module against the pruned ONNX model (see module doc)."""
    from surgery.verify import run

    feeds = onnx_feeds(proto, example_inputs)
    ref = run(proto, feeds)
    tracer = _Tracer(module)
    try:
        try:
            out = _run(module, example_inputs)
        except Exception as e:  # noqa: BLE001 - any failure names the module it happened in
            where = tracer.stack[-1] if tracer.stack else ""
            msg = str(e).strip().splitlines()
            keep = _entering_values(proto, where)
            hint = (f"; it likely hard-codes a channel count (view/reshape sizes, tensors built in forward); "
                    f"protect the channels it reads with keep={keep[:3]}" if keep else "")
            raise SurgeryError(
                f"the pruned module fails in module {_label(module, where)}: "
                f"{type(e).__name__}: {msg[0] if msg else ''}{hint}") from e
        finished = list(tracer.finished)
        calls = dict(tracer.calls)
    finally:
        tracer.close()
    got = [t.cpu().numpy() for t in flat_tensors(out)]
    if len(got) != len(ref):
        raise SurgeryError(f"the pruned module returns {len(got)} tensors, the ONNX model {len(ref)}")
    tol = _tolerance(ref)
    worst = max((_diff(r, g) for r, g in zip(ref, got)), default=0.0)
    if worst <= tol:
        return {"max_abs_diff": worst, "tolerance": tol}
    culprit = _localize(module, proto, feeds, finished, calls, tol)
    what = (f"output {i}: shape {list(g.shape)} vs ONNX {list(r.shape)}" if g.shape != r.shape else
            f"max abs diff {_diff(r, g):.3g}" for i, (r, g) in enumerate(zip(ref, got)) if _diff(r, g) > tol)
    first = next(what, "")
    raise SurgeryError(f"the pruned module's outputs differ from the pruned ONNX model's ({first}, tolerance {tol:.1e})"
                       + (f"; first module that differs: {culprit}" if culprit else
                          "; no module could be singled out (the difference arises in code between modules)"))


def _localize(module, proto, feeds, finished, calls, tol) -> str | None:
    """The first module (in the order they finish) whose output differs from the value
    its exported nodes produce in the pruned ONNX model."""
    import onnx

    from surgery.verify import run

    outputs_of = _scope_values(proto)
    vtypes = {vi.name: vi for vi in [*proto.graph.value_info, *proto.graph.output]}
    want: dict[str, list[str]] = {}
    for name, tensors in finished:
        if calls.get(name, 0) != 1 or not tensors or name == "":
            continue
        outs = [o for o in outputs_of(name) if o in vtypes]
        if outs:
            want[name] = outs
    extra = sorted({o for outs in want.values() for o in outs} - {o.name for o in proto.graph.output})
    if not want:
        return None
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for o in extra:
        p.graph.output.append(vtypes[o])
    names = [o.name for o in p.graph.output]
    try:
        values = dict(zip(names, run(p, feeds)))
    except SurgeryError:
        return None
    for name, tensors in finished:
        if name not in want:
            continue
        cands = [values[o] for o in want[name] if o in values]
        for k, t in enumerate(tensors):
            a = t.cpu().numpy()
            same = [c for c in cands if c.shape == a.shape]
            if same:
                best = min(_diff(c, a) for c in same)
                if best > tol:
                    return f"{_label(module, name)}: output {k} differs by {best:.3g}"
            elif len(cands) == 1 and len(tensors) == 1:
                return f"{_label(module, name)}: output shape {list(a.shape)} vs ONNX {list(cands[0].shape)}"
    return None
