"""Compensation (`compensate="bias" | "lstsq"`, passes/compensate.py): outcomes only.

- the im2col features a Conv's compensation works on reproduce the Conv itself;
- `bias` restores the output exactly when the removed unit's input is constant
  (Conv, Gemm, MatMul, MatMul + Add consumers; a missing bias is created);
- `lstsq` lowers the consumer's reconstruction error on data it never saw;
- compensation is skipped, and reported, where it would raise the held-back error,
  for unsupported layers, and without held-back samples;
- `report["verify"]` still checks the uncompensated cut.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import surgery
from surgery.errors import SurgeryError
from surgery.passes import criteria_core as criteria_mod  # where the registry lives
from surgery.passes.compensate import _conv_geometry, conv_patches
from surgery.verify import run

import onnx_ir as ir


def _f32(a):
    return np.asarray(a, dtype=np.float32)


def _model(nodes, inits, x_shape, y_shape):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(_f32(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def pick(monkeypatch):
    """Register criterion 'pick' that removes the listed units of every group first."""
    monkeypatch.setattr(criteria_mod, "CRITERIA", dict(criteria_mod.CRITERIA))

    def use(*units):
        def score(group, ctx):
            s = np.arange(len(group.atoms), dtype=float) + 10.0
            s[list(units)] = np.arange(len(units))
            return s

        criteria_mod.CRITERIA["pick"] = score
        return "pick"

    return use


# --------------------------------------------------------------------------
# im2col
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
    dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[1, 1]),
])
def test_conv_features_reproduce_the_conv(attrs):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4, *attrs["kernel_shape"]))
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], {"w": W}, [2, 4, 9, 11], None)
    x = _f32(rng.standard_normal((2, 4, 9, 11)))
    (y,) = run(m, {"x": x})
    node = ir.from_proto(m).graph.node(0)
    geo = _conv_geometry(node, W.shape)
    F = np.concatenate(list(conv_patches(x.astype(np.float64), geo)))
    got = F @ W.reshape(5, -1).T  # rows: batch, then output positions
    want = y.transpose(0, 2, 3, 1).reshape(-1, 5)
    np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------
# bias: exact for a constant input
# --------------------------------------------------------------------------


def _constant_channel_model(consumer: str):
    """x -> producer (6 units; unit 2 is the constant 1.5 after Relu) -> Relu -> consumer -> y."""
    rng = np.random.default_rng(1)
    if consumer == "conv":
        w1 = rng.standard_normal((6, 3, 3, 3)) * 0.5
        w1[2] = 0.0
        b1 = rng.standard_normal(6) * 0.1
        b1[2] = 1.5
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[3, 3])]  # no bias, no padding
        inits = {"w1": w1, "b1": b1, "w2": rng.standard_normal((4, 6, 3, 3)) * 0.5}
        return _model(nodes, inits, ["N", 3, 8, 8], ["N", 4, 6, 6]), ["N", 3, 8, 8]
    w1 = rng.standard_normal((3, 6)) * 0.5
    w1[:, 2] = 0.0
    b1 = rng.standard_normal(6) * 0.1
    b1[2] = 1.5
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"])]
    inits = {"w1": w1, "b1": b1}
    if consumer == "gemm":
        nodes.append(helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, alpha=0.5))  # no C
        inits["w2"] = rng.standard_normal((4, 6))
    elif consumer == "matmul":
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"]))  # the graph output itself
        inits["w2"] = rng.standard_normal((6, 4))
    else:  # matmul followed by its own Add
        nodes += [helper.make_node("MatMul", ["r", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["y"])]
        inits.update(w2=rng.standard_normal((6, 4)), b2=rng.standard_normal(4))
    return _model(nodes, inits, ["N", 3], ["N", 4]), ["N", 3]


def _calib(shape, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": _f32(rng.standard_normal((n, *[d for d in shape[1:]]))) }


@pytest.mark.parametrize("consumer", ["conv", "gemm", "matmul", "matmul_add"])
def test_bias_restores_a_constant_channel_exactly(consumer, pick):
    model, shape = _constant_channel_model(consumer)
    calib = _calib(shape)
    res = surgery.prune(model, ratio=0.17, criterion=pick(2), calib=calib, compensate="bias")
    (g,) = res.plan.groups
    assert g.removed_units == [2]
    rep = res.report
    assert rep["verify"]["exact"] is True
    comp = rep["compensation"]
    assert [a["consumer"] for a in comp["applied"]] and not comp["skipped"]
    assert comp["applied"][0]["error_after"] < 1e-9 * max(1.0, comp["applied"][0]["error_before"])
    assert comp["uncompensated_output_diff"] > 0.1  # the cut alone moves the output ...
    assert rep["compensated_output_diff"] < 1e-5  # ... bias compensation puts it back exactly
    # the same holds on inputs the compensation never saw; names and shapes unchanged
    x = _calib(shape, n=7, seed=5)["x"]
    (want,) = run(model, {"x": x})
    (got,) = run(res.onnx, {"x": x})
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [o.name for o in res.onnx.graph.output] == ["y"]
    onnx.checker.check_model(res.onnx)
    if consumer == "matmul_add":  # folded into the existing Add, no new node
        assert [n.op_type for n in res.onnx.graph.node].count("Add") == 2


def test_verify_checks_the_uncompensated_cut(pick):
    model, shape = _constant_channel_model("conv")
    calib = _calib(shape)
    plain = surgery.prune(model, ratio=0.17, criterion=pick(2))
    comp = surgery.prune(model, ratio=0.17, criterion=pick(2), calib=calib, compensate="bias")
    x = _calib(shape, n=3, seed=9)["x"]
    (a,) = run(plain.onnx, {"x": x})
    (b,) = run(comp.onnx, {"x": x})
    assert np.abs(a - b).max() > 0.1  # compensation changed the model on purpose
    assert comp.report["verify"]["exact"] is True
    assert comp.report["verify"]["max_abs_diff"] == pytest.approx(plain.report["verify"]["max_abs_diff"], abs=1e-6)


# --------------------------------------------------------------------------
# lstsq: lower error on held-out data
# --------------------------------------------------------------------------


def _correlated_model():
    """x (8 features, correlated) -> Gemm (24) -> Relu -> Gemm (4) -> y."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, alpha=0.7, beta=2.0)]
    inits = {"w1": rng.standard_normal((24, 8)) * 0.5, "b1": rng.standard_normal(24) * 0.1,
             "w2": rng.standard_normal((4, 24)) * 0.5, "b2": rng.standard_normal(4) * 0.1}
    return _model(nodes, inits, ["N", 8], ["N", 4])


def _correlated_inputs(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    mix = np.random.default_rng(7).standard_normal((3, 8))
    return _f32(z @ mix + 0.05 * rng.standard_normal((n, 8)))


@pytest.mark.parametrize("mode", ["bias", "lstsq"])
def test_compensation_lowers_the_error_on_unseen_data(mode):
    model = _correlated_model()
    calib = {"x": _correlated_inputs(400, 0)}
    plain = surgery.prune(model, ratio=0.5, criterion="l2")
    comp = surgery.prune(model, ratio=0.5, criterion="l2", calib=calib, compensate=mode, calib_batch=64)
    (applied,) = comp.report["compensation"]["applied"]
    assert applied["consumer"] and applied["error_after"] < applied["error_before"]
    x = _correlated_inputs(300, 1)  # never seen
    (want,) = run(model, {"x": x})
    (a,) = run(plain.onnx, {"x": x})
    (b,) = run(comp.onnx, {"x": x})
    err_plain = float(np.mean((a - want) ** 2))
    err_comp = float(np.mean((b - want) ** 2))
    assert err_comp < err_plain * (0.5 if mode == "lstsq" else 1.0)


def test_lstsq_conv_lowers_the_consumer_error_on_unseen_data():
    """A 3x3 Conv consumer: the re-fit uses whole im2col patches."""
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((12, 2, 1, 1))  # 12 channels from 2: strongly correlated
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = _model(nodes, {"w1": w1, "w2": rng.standard_normal((3, 12, 3, 3)) * 0.3, "b2": np.zeros(3)},
                   ["N", 2, 6, 6], ["N", 3, 6, 6])
    calib = {"x": _f32(rng.standard_normal((60, 2, 6, 6)))}
    plain = surgery.prune(model, ratio=0.5, criterion="l2")
    comp = surgery.prune(model, ratio=0.5, criterion="l2", calib=calib, compensate="lstsq")
    assert comp.report["compensation"]["applied"]
    x = _f32(np.random.default_rng(8).standard_normal((20, 2, 6, 6)))
    (want,) = run(model, {"x": x})
    (a,) = run(plain.onnx, {"x": x})
    (b,) = run(comp.onnx, {"x": x})
    assert np.mean((b - want) ** 2) < 0.5 * np.mean((a - want) ** 2)


# --------------------------------------------------------------------------
# never worse: skipped and reported
# --------------------------------------------------------------------------


def _shift_model():
    """Unit 2 of the hidden layer copies input feature 0 (Relu of it)."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((4, 6)) * 0.5
    w1[:, 2] = [1.0, 0, 0, 0]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    return _model(nodes, {"w1": w1, "w2": rng.standard_normal((3, 6)), "b2": np.zeros(3)}, ["N", 4], ["N", 3])


def test_compensation_that_would_hurt_is_skipped_and_reported(pick):
    x = _f32(np.random.default_rng(0).standard_normal((25, 4)) * 0.1)
    x[:, 0] = 3.0
    x[4::5, 0] = -3.0  # every 5th sample is held back: there unit 2 is 0, not 3
    res = surgery.prune(_shift_model(), ratio=0.17, criterion=pick(2), calib={"x": x}, compensate="bias")
    comp = res.report["compensation"]
    assert not comp["applied"]
    (skip,) = comp["skipped"]
    assert skip["consumer"] == [n.name for n in res.model.graph if n.op_type == "Gemm"][0]
    assert "raise the held-back reconstruction error" in skip["why"]
    assert res.report["compensated_output_diff"] == pytest.approx(comp["uncompensated_output_diff"])
    # the same data without the shift: applied
    x[4::5, 0] = 3.0
    res = surgery.prune(_shift_model(), ratio=0.17, criterion=pick(2), calib={"x": x}, compensate="bias")
    assert res.report["compensation"]["applied"] and res.report["compensated_output_diff"] < 1e-4


def test_without_held_back_samples_nothing_is_compensated(pick):
    x = _f32(np.random.default_rng(0).standard_normal((4, 4)))
    res = surgery.prune(_shift_model(), ratio=0.17, criterion=pick(2), calib={"x": x}, compensate="lstsq")
    comp = res.report["compensation"]
    assert not comp["applied"] and "held-back" in comp["skipped"][0]["why"]
    assert res.report["calibration"]["held_back"] == 0


def test_unsupported_consumers_are_reported():
    """MobileNet: depthwise (grouped) convolutions read removed channels."""
    rng = np.random.default_rng(0)
    calib = {"input": _f32(rng.standard_normal((10, 3, 32, 32)))}
    res = surgery.prune(str(_repo() / "models" / "mobilenet_tiny.onnx"), ratio=0.5, calib=calib, compensate="bias")
    comp = res.report["compensation"]
    assert res.report["verify"]["exact"] is True
    assert any("grouped convolution" in s["why"] for s in comp["skipped"])
    assert comp["applied"]
    assert np.isfinite(res.report["compensated_output_diff"])


def test_compensation_needs_calibration_data():
    with pytest.raises(SurgeryError, match="calibration data"):
        surgery.prune(_shift_model(), ratio=0.5, compensate="bias")
    with pytest.raises(SurgeryError, match="--compensate"):
        surgery.prune(_shift_model(), ratio=0.5, compensate="ridge", calib={"x": np.zeros((5, 4), np.float32)})


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_gram_budget_gives_the_same_fits(monkeypatch):
    """With a Gram budget of one consumer at a time, compensation takes a pass per consumer
    and gives the same weights."""
    import surgery.passes.stats as S

    path = str(_repo() / "models" / "resnet_tiny.onnx")
    x = {"input": np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)}
    kw = dict(ratio=0.5, criterion="l2", compensate="lstsq", calib=x)
    a = surgery.prune(path, **kw)
    monkeypatch.setattr(S, "MAX_GRAM_BYTES", 1)
    b = surgery.prune(path, **kw)
    assert a.report["compensation"]["applied"] and \
        [c["consumer"] for c in a.report["compensation"]["applied"]] == \
        [c["consumer"] for c in b.report["compensation"]["applied"]]
    ia, ib = a.model.graph.initializers, b.model.graph.initializers
    assert set(ia) == set(ib)
    for n in ia:
        np.testing.assert_allclose(ia[n].const_value.numpy(), ib[n].const_value.numpy(), rtol=1e-9, atol=1e-9)
