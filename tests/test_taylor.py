"""Criterion "taylor" (PyTorch path only): |w * dL/dw| summed over every weight entry a
unit removes, gradients from calibration batches and a loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import surgery  # noqa: E402
from surgery import SurgeryError  # noqa: E402
from surgery.frontends.onnx_loader import META_FOLDED_FROM, load_onnx  # noqa: E402
from surgery.frontends.torch_export import TorchMap, export_module, onnx_feeds  # noqa: E402
from surgery.torch_api import _initializer_arrays, prune_module, taylor_importance  # noqa: E402
from surgery.verify import run  # noqa: E402

DEAD, MUTE = 3, 11  # hidden units: a dead ReLU, and one no output reads


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _net(dead=True):
    torch.manual_seed(0)
    m = Net()
    if dead:
        with torch.no_grad():
            m.fc1.bias[DEAD] = -100.0  # never active: no gradient reaches its weights; by far the largest L2 norm
            m.fc2.weight[:, MUTE] = 0.0  # nothing reads it: no gradient reaches fc1's row, |w*g| = 0 on fc2's column
    return m


def _x(seed=7, n=16):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _removed_units(res) -> list[int]:
    cuts = dict(res.module_cuts.get("fc1.weight", []))
    return sorted(cuts.get(0, np.zeros(0, np.int64)).tolist())


def _manual_taylor(m, batches, loss=None) -> np.ndarray:
    """Per hidden unit: sum over batches and over fc1's row, fc1's bias entry and fc2's column of |w * g|."""
    total = np.zeros(16)
    for x in batches:
        m.zero_grad()
        y = m(x)
        (loss(y, x) if loss else 0.5 * y.square().mean()).backward()
        a = lambda p: (p.detach() * p.grad).abs().double()  # noqa: E731
        total += (a(m.fc1.weight).sum(1) + a(m.fc1.bias) + a(m.fc2.weight).sum(0)).numpy()
    m.zero_grad(set_to_none=True)
    return total


def test_zero_gradient_units_go_first_and_l2_disagrees():
    m, x = _net(), _x()
    res = prune_module(m, x, criterion="taylor", ratio=2 / 16)
    assert _removed_units(res) == [DEAD, MUTE]
    # l2 keeps the dead unit: its bias makes it the largest
    l2 = prune_module(m, x, criterion="l2", ratio=2 / 16)
    assert DEAD not in _removed_units(l2)
    # the scores are the summed |w * dL/dw| per unit, exactly
    (name, scores), = [(k, v) for k, v in res.importance.items() if k.startswith("fc1.weight")]
    assert scores.shape == (16,)
    assert np.allclose(scores, _manual_taylor(_net(), [x]), rtol=1e-5, atol=1e-12)
    assert scores[DEAD] == 0 and scores[MUTE] == 0 and (np.delete(scores, [DEAD, MUTE]) > 0).all()
    norms = torch.cat([m.fc1.weight, m.fc1.bias[:, None], m.fc2.weight.T], 1).norm(dim=1).detach().numpy()
    assert np.argmax(norms) == DEAD and np.argsort(scores)[0] in (DEAD, MUTE)
    # the cut stays exact and the module matches the pruned ONNX model
    assert res.report["verify"]["exact"] is True
    assert res.report["torch"]["max_abs_diff"] <= res.report["torch"]["tolerance"]
    with torch.no_grad():
        got = res.module.eval()(x).numpy()
    assert np.allclose(got, run(res.onnx, onnx_feeds(res.onnx, x))[0], atol=1e-5)
    assert res.module.fc1.out_features == 14 and res.report["torch"]["taylor"]["batches"] == 1


def test_calibration_batches_and_a_user_loss():
    """A loss on output 0 only: the unit output 0 does not read has no gradient and goes first."""
    m = _net(dead=False)
    with torch.no_grad():
        m.fc2.weight[0, 5] = 0.0
    batches = [_x(s) for s in (1, 2, 3)]

    def first_output(out, batch):
        return out[:, 0].sum()

    res = prune_module(m, batches[0], criterion="taylor", calib=batches, loss=first_output, ratio=1 / 16)
    assert _removed_units(res) == [5]
    assert res.report["torch"]["taylor"] == {
        "batches": 3, "loss": "first_output",
        "score": "sum over the batches and over every weight entry a unit removes of |w * dL/dw|"}
    (scores,) = [v for k, v in res.importance.items() if k.startswith("fc1.weight")]
    assert np.allclose(scores, _manual_taylor(m, batches, first_output), rtol=1e-5)
    default = prune_module(m, batches[0], criterion="taylor", calib=batches, ratio=1 / 16)
    assert _removed_units(default) != [5]  # the default loss reads every output
    # per-batch accumulation: sum over batches of |w * g_b| (no cancellation between batches)
    both = taylor_importance(m, batches[:2])
    one, two = taylor_importance(m, batches[:1]), taylor_importance(m, batches[1:2])
    assert np.allclose(both["fc2.weight"], one["fc2.weight"] + two["fc2.weight"])


def test_gradients_leave_the_module_as_it_was():
    m = _net()
    m.fc1.requires_grad_(False)  # frozen layers are scored too
    m.train()
    res = prune_module(m, _x(), criterion="taylor", ratio=2 / 16)
    assert _removed_units(res) == [DEAD, MUTE]
    assert not m.fc1.weight.requires_grad and m.fc2.weight.requires_grad and m.training
    assert all(p.grad is None for p in m.parameters())


def test_through_surgery_prune_and_bad_losses():
    m, x = _net(), _x()
    res = surgery.prune(m, x, criterion="taylor", ratio=2 / 16)  # dispatches to prune_module
    assert _removed_units(res) == [DEAD, MUTE]
    with pytest.raises(SurgeryError, match="scalar"):
        prune_module(m, x, criterion="taylor", loss=lambda out, b: out, ratio=0.25)
    with pytest.raises(SurgeryError, match="loss= is for criterion='taylor'"):
        prune_module(m, x, criterion="l2", loss=lambda out, b: out.sum(), ratio=0.25)
    with pytest.raises(SurgeryError, match="iterable of batches"):
        prune_module(m, x, criterion="taylor", calib=x, ratio=0.25)


def test_onnx_model_gets_a_clear_error(tmp_path):
    import onnx

    path = tmp_path / "net.onnx"
    onnx.save(export_module(_net(), _x()), path)
    with pytest.raises(SurgeryError, match="taylor needs a PyTorch module and a loss"):
        surgery.prune(str(path), criterion="taylor", ratio=0.25)


def test_folded_weights_take_their_parameter_entries():
    """A weight the loader folds into a new initializer (Einsum 'ij->ji', a transpose)
    gets its scores from the parameter entries the probing maps it to."""
    import onnx

    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    proto = export_module(m, torch.randn(2, 3, 6))
    for n in proto.graph.node:
        if n.op_type == "Transpose" and n.input[0] == "0.weight":
            n.op_type = "Einsum"
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("equation", "ij->ji"))
    model = load_onnx(proto)
    (folded,) = [k for k, v in model.graph.initializers.items() if tuple(v.meta.get(META_FOLDED_FROM) or ()) == ("0.weight",)]
    rng = np.random.default_rng(0)
    per_param = {n: rng.random(tuple(p.shape)).astype(np.float32) for n, p in m.named_parameters()}
    arrays = _initializer_arrays(TorchMap(proto, m), model, per_param)
    assert np.array_equal(arrays[folded], per_param["0.weight"].T)
    assert np.array_equal(arrays["0.bias"], per_param["0.bias"])


def test_calib_batches_feed_the_data_aware_onnx_criteria():
    """For the ONNX data-aware criteria, calib= batches become the exported model's feeds."""
    res = prune_module(_net(), _x(), criterion="activation", calib=[_x(1), _x(2)], ratio=1 / 16)
    assert _removed_units(res) == [DEAD]  # never active
    assert res.report["calibration"]["runs"] == 2
