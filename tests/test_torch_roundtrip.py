"""PyTorch in and out: prune an nn.Module, get the same classes back, checked against ONNX."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from surgery import SurgeryError  # noqa: E402
from surgery.torch_api import load, prune_module, save  # noqa: E402
from surgery.backends.torch_module import apply_module_cuts, register_module_rule  # noqa: E402
from surgery.verify import run  # noqa: E402
from surgery.frontends.torch_export import NotRepresentable, TorchMap, export_module, onnx_feeds  # noqa: E402
from surgery.frontends.onnx_loader import META_FOLDED_FROM, load_onnx  # noqa: E402


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 4, 1), InvertedResidual(16, 24, 4, 2),
                                    InvertedResidual(24, 24, 4, 1))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.dense = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8))
        self.bn = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.dense(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 48)
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(48, 3)

    def forward(self, x):
        return self.fc3(self.drop(F.gelu(self.fc2(F.relu(self.fc1(x))))))


class AttnNet(nn.Module):
    """Tokens -> nn.MultiheadAttention -> MLP head (no residual around the attention)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Linear(32, 24)
        self.out = nn.Linear(24, 6)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h)  # need_weights=True: the decomposed path
        return self.out(F.relu(self.ff(a)))


class HardCoded(nn.Module):
    """A head that hard-codes its channel count: cannot follow a cut."""

    def forward(self, x):
        return x.mean((2, 3)).view(-1, 32)


class HardCodedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = HardCoded()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.conv2(F.relu(self.conv1(x))))))


class ConstantInForward(nn.Module):
    """Builds a 16-channel tensor in forward: a constant the module cannot re-slice."""

    def forward(self, x):
        return x * torch.tensor([1.0 + i / 16 for i in range(16)]).view(1, 16, 1, 1)


class HalfScaled(nn.Module):
    """Scales 'the first 8 channels': runs after a cut, silently on other channels."""

    def forward(self, x):
        return torch.cat([x[:, :8] * 2, x[:, 8:]], 1)


class MidNet(nn.Module):
    def __init__(self, mid):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = mid
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv2(self.mid(F.relu(self.conv1(x))))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def _build(cls, seed=0):
    torch.manual_seed(seed)
    return _randomize(cls(), seed + 1)


CASES = {
    "resnet": (ResNetTiny, (2, 3, 16, 16)),
    "mobilenet": (MobileNetTiny, (1, 3, 16, 16)),
    "densenet": (DenseNetTiny, (1, 3, 8, 8)),
    "mlp": (MLP, (4, 20)),
    "attention": (AttnNet, (2, 5, 12)),
}


@functools.lru_cache(maxsize=None)
def _pruned(name):
    cls, shape = CASES[name]
    module = _build(cls)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    before = copy.deepcopy(module.state_dict())
    res = prune_module(module, x, **_ratios(0.5))
    return module, x, res, before


def _ratios(r: float = 0.5) -> dict:
    """ratio=r for every kind of group surgery.prune knows (heads, head_dim, mlp, ...)."""
    import inspect

    from surgery import api

    params = inspect.signature(api.prune).parameters
    kinds = ("head_ratio", "mlp_ratio", "hidden_ratio", "head_dim_ratio")
    return {"ratio": r, **{k: r for k in kinds if k in params}}


def _outputs_close(a, b, tol=1e-4):
    scale = max(1.0, float(np.abs(b).max()))
    return float(np.abs(a - b).max()) <= tol * scale


# --------------------------------------------------------------------------- #
# round trip on each architecture
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_module_matches_pruned_onnx(name):
    module, x, res, before = _pruned(name)
    cls = CASES[name][0]
    assert res.report["groups_prunable"] > 0, res.report
    assert res.report["groups_pruned"] > 0
    assert res.report["verify"]["exact"] in (True, None)
    # same class, fewer parameters, the original untouched
    assert type(res.module) is cls and res.module is not module
    assert [type(m) for m in res.module.modules()] == [type(m) for m in module.modules()]
    n_before = sum(p.numel() for p in module.parameters())
    n_after = sum(p.numel() for p in res.module.parameters())
    assert n_after < n_before
    assert res.report["torch"]["params_after"] == n_after
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the pruned module reproduces the pruned ONNX model within 1e-4 (relative to scale)
    res.module.eval()
    with torch.no_grad():
        got = res.module(x).numpy()
    ref = run(res.onnx, onnx_feeds(res.onnx, x))[0]
    assert got.shape == ref.shape
    assert _outputs_close(got, ref)
    assert res.report["torch"]["max_abs_diff"] <= res.report["torch"]["tolerance"]
    # every weight the plan cut is a parameter or buffer of the module, by name
    assert not res.report["torch"]["unmapped_cuts"]
    names = set(module.state_dict())
    assert res.module_cuts and set(res.module_cuts) <= names
    assert set(res.plan.tensor_cuts()) <= names  # optimize=False keeps the module's names


@pytest.mark.parametrize("name", list(CASES))
def test_backward_and_optimizer_step(name):
    _, x, res, _ = _pruned(name)
    m = copy.deepcopy(res.module).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    loss = m(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters() if p.requires_grad)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_reproduces(name, tmp_path):
    module, x, res, _ = _pruned(name)
    path = tmp_path / "pruned.pt"
    save(res, path)
    cls = CASES[name][0]
    rebuilt = load(path, build=lambda: cls())  # fresh, differently initialized weights
    assert type(rebuilt) is cls
    rebuilt.eval()
    res.module.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), res.module(x), atol=0, rtol=0)
    for (n1, a), (n2, b) in zip(rebuilt.named_modules(), res.module.named_modules()):
        assert n1 == n2 and repr(a) == repr(b)


def test_attributes_follow_the_weights():
    _, _, res, _ = _pruned("resnet")
    for m in res.module.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.shape[0] == m.running_mean.shape[0]
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
    _, _, mres, _ = _pruned("mobilenet")
    dw = [m for m in mres.module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
    assert any(m.groups < 64 for m in dw)  # depthwise convs shrank with their channels


def test_attention_heads_blocked_and_why():
    """nn.MultiheadAttention: ONNX can remove heads here, the module cannot express it
    (num_heads x head_dim is tied to the query's embed_dim); those groups are protected,
    the rest (out_proj rows, the MLP) is pruned."""
    _, x, res, _ = _pruned("attention")
    prot = res.report["torch"]["protected_groups"]
    assert prot and all("MultiheadAttention" in p["why"] for p in prot)
    attn = res.module.attn
    assert attn.embed_dim == 32 and attn.num_heads == 4
    assert attn.out_proj.out_features < 32 and res.module.ff.in_features == attn.out_proj.out_features


def test_inplace_and_dict_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 32)
            self.b = nn.Linear(32, 4)

        def forward(self, x, scale=None):
            return self.b(F.relu(self.a(x))) * scale

    torch.manual_seed(0)
    m = KW()
    x, s = torch.randn(3, 8), torch.rand(3, 4)
    res = prune_module(m, {"x": x, "scale": s}, inplace=True, **_ratios(0.25))
    assert res.module is m and m.a.out_features == 24 and m.b.in_features == 24
    ref = run(res.onnx, onnx_feeds(res.onnx, {"x": x, "scale": s}))[0]
    with torch.no_grad():
        assert _outputs_close(m(x, scale=s).numpy(), ref)


def test_hard_coded_channel_count_names_the_module():
    m = _build(HardCodedNet)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(SurgeryError, match=r"fails in module 'pool' \(HardCoded\).*keep="):
        prune_module(m, x, **_ratios(0.5))
    torch.manual_seed(0)
    with pytest.raises(SurgeryError, match=r"fails in module 'mid' \(ConstantInForward\)"):
        prune_module(MidNet(ConstantInForward()), x, **_ratios(0.5))
    # no exception, wrong channels: found by comparing module outputs with the ONNX values
    torch.manual_seed(0)
    with pytest.raises(SurgeryError, match=r"first module that differs: 'mid' \(HalfScaled\)"):
        prune_module(MidNet(HalfScaled()), x, **_ratios(0.5))


def test_failed_inplace_prune_leaves_the_module_alone():
    m = _build(HardCodedNet)
    x = torch.randn(1, 3, 8, 8)
    ref = copy.deepcopy(m.state_dict())
    with pytest.raises(SurgeryError):
        prune_module(m, x, inplace=True, **_ratios(0.5))
    assert m.conv2.out_channels == 32
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- #
# the backend alone: rules for layers the dynamo export never lets ONNX cut
# --------------------------------------------------------------------------- #


def test_backend_grouped_conv_groupnorm_convtranspose():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.GroupNorm(4, 8), nn.ConvTranspose2d(8, 6, 2, 2, groups=2),
                        nn.Conv2d(6, 6, 1))
    net.eval()
    x = torch.randn(1, 4, 5, 5)
    # drop conv group 1 whole (out channels 4..7), its GroupNorm groups (2, 3), the
    # transposed conv's input group 1 (inputs 4..7) with its outputs 3..5
    cuts = {"0.weight": [(0, np.arange(4, 8))], "0.bias": [(0, np.arange(4, 8))],
            "1.weight": [(0, np.arange(4, 8))], "1.bias": [(0, np.arange(4, 8))],
            "2.weight": [(0, np.arange(4, 8))], "2.bias": [(0, np.arange(3, 6))],
            "3.weight": [(1, np.arange(3, 6))]}
    pruned = copy.deepcopy(net)
    apply_module_cuts(pruned, cuts)
    assert (pruned[0].groups, pruned[0].in_channels, pruned[0].out_channels) == (1, 2, 4)
    assert (pruned[1].num_groups, pruned[1].num_channels) == (2, 4)
    assert (pruned[2].groups, pruned[2].in_channels, pruned[2].out_channels) == (1, 4, 3)
    assert pruned[3].in_channels == 3
    # conv group 1 read inputs 2..3, which go with it; the kept groups compute what they did
    with torch.no_grad():
        assert torch.allclose(pruned[:3](x[:, :2]), net[:3](x)[:, :3], atol=1e-5)
        assert pruned(x[:, :2]).shape == (1, 6, 10, 10)


def test_backend_registry_is_open():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n
            self.s = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.s.view(1, self.n)

    @register_module_rule(Scale)
    def _scale_rule(m, cut):
        cut.set("n", int(m.s.shape[0]))

    m = nn.Sequential(nn.Linear(3, 6), Scale(6))
    apply_module_cuts(m, {"0.weight": [(0, np.array([1, 4]))], "0.bias": [(0, np.array([1, 4]))],
                          "1.s": [(0, np.array([1, 4]))]})
    assert m[1].n == 4 and m(torch.randn(2, 3)).shape == (2, 4)
    assert isinstance(m[1].s, nn.Parameter) and m[1].s.requires_grad


def test_export_is_deterministic_and_names_parameters():
    m = _build(ResNetTiny)
    x = torch.randn(1, 3, 16, 16)
    p1 = export_module(m, x)
    p2 = export_module(m, x)
    assert p1.SerializeToString() == p2.SerializeToString()
    names = {t.name for t in p1.graph.initializer}
    assert {n for n, _ in m.named_parameters()} <= names
    assert "layer1.0.bn1.running_mean" in names
    assert any(n.op_type == "BatchNormalization" for n in p1.graph.node)
    assert m.training  # export ran in eval mode and restored the flag


def test_weights_the_loader_folds_map_back_by_probing():
    """A weight op without a channel rule is folded by the loader into a new initializer;
    probing finds which parameter entries it holds (Einsum 'ij->ji' is a transpose), and
    refuses arithmetic (Einsum 'ij,ij->ji' squares)."""
    import onnx

    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    proto = export_module(m, torch.randn(2, 3, 6))  # 3-D input: MatMul(x, Transpose(W))
    transposes = [n for n in proto.graph.node if n.op_type == "Transpose"]
    assert [n.input[0] for n in transposes] == ["0.weight", "2.weight"]
    for n, eq in zip(transposes, ["ij->ji", "ij,ij->ji"]):
        n.op_type = "Einsum"
        del n.attribute[:]
        n.attribute.append(onnx.helper.make_attribute("equation", eq))
        if "," in eq:
            n.input.append(n.input[0])
    model = load_onnx(proto)
    folded = {tuple(v.meta.get(META_FOLDED_FROM) or ()): k for k, v in model.graph.initializers.items()}
    first, second = folded[("0.weight",)], folded[("2.weight",)]
    tmap = TorchMap(proto, m)
    cuts, unmapped = tmap.to_module_cuts({first: [(1, np.array([1, 3]))], "0.bias": [(0, np.array([1, 3]))]}, model)
    assert {k: [(a, i.tolist()) for a, i in v] for k, v in cuts.items()} == {
        "0.weight": [(0, [1, 3])], "0.bias": [(0, [1, 3])]} and not unmapped
    with pytest.raises(NotRepresentable, match="computed from 2.weight"):
        tmap.to_module_cuts({second: [(0, np.array([1]))]}, model)


def test_transformers_llama_attention_and_mlp():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    res = prune_module(lm, {"input_ids": ids, "use_cache": False}, **_ratios(0.5))
    t = res.report["torch"]
    # RoPE frequency pairs and value head_dim: ONNX can cut them, LlamaAttention cannot
    assert any("head_dim" in p["why"] and "LlamaAttention" in p["why"] for p in t["protected_groups"])
    mlp, attn = res.module.model.layers[0].mlp, res.module.model.layers[0].self_attn
    assert mlp.intermediate_size == mlp.up_proj.out_features == res.module.config.intermediate_size == 32
    assert lm.config.intermediate_size == 64  # the original keeps its own config
    assert attn.q_proj.out_features // attn.head_dim == res.module.config.num_attention_heads
    assert attn.k_proj.out_features // attn.head_dim == res.module.config.num_key_value_heads
    with torch.no_grad():
        got = res.module(input_ids=ids, use_cache=False).logits.numpy()
    ref = run(res.onnx, onnx_feeds(res.onnx, {"input_ids": ids, "use_cache": False}))[0]
    assert _outputs_close(got, ref)


def test_dynamic_batch():
    m = _build(MLP)
    x = torch.randn(4, 20)
    res = prune_module(m, x, dynamic_shapes=({0: torch.export.Dim("batch")},), **_ratios(0.5))
    dim0 = res.onnx.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    x7 = torch.randn(7, 20)
    with torch.no_grad():
        got = res.module.eval()(x7).numpy()
    assert _outputs_close(got, run(res.onnx, onnx_feeds(res.onnx, x7))[0])
