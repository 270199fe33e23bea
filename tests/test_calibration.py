"""Calibration data and the statistics gathered from it (passes/stats.py): outcomes only.

- the moments are those of the tensors the consumers read (checked against numpy);
- an .npz file, a dict and an iterable of feeds give the same statistics;
- batched statistics equal the statistics of one run over everything (1e-6);
- `calib_samples`, the held-back fifth, and a static batch size;
- bad calibration data is a one-line SurgeryError (exit status 2 from the CLI).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import surgery
from surgery.cli import app
from surgery.errors import SurgeryError
from surgery.passes.stats import HOLDOUT_EVERY, Calibration, collect

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESNET = str(REPO / "models" / "resnet_tiny.onnx")


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _stats(model, source, gram=True, **kw):
    analysis = surgery.analyze(model)
    cal = Calibration(source, analysis.model, **kw)
    return collect(analysis, cal, gram=gram), cal


def _close(a, b, tol, msg=""):
    """Equal to ``tol`` relative to the statistic's scale (onnxruntime's float32 kernels may
    round a batch of 3 and a batch of 20 differently in the last bit)."""
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0.0))), err_msg=msg)


def _assert_same(a, b, rtol=1e-6):
    assert set(a.parts) == set(b.parts) and a.parts
    for key in a.parts:
        for part in ("fit", "held", "all"):
            ma, mb = a.moments(*key, part=part), b.moments(*key, part=part)
            assert ma.n == mb.n, (key, part)
            for f in ("s1", "s2", "sa"):
                _close(getattr(ma, f), getattr(mb, f), rtol, f"{key} {part} {f}")
            assert (ma.gram is None) == (mb.gram is None)
            if ma.gram is not None:
                _close(ma.gram, mb.gram, rtol, f"{key} {part} gram")


def _relu_model(spatial=(3, 3)):
    """x -> Relu -> Conv(4 -> 5) -> Relu -> Conv(5 -> 2): the first consumer reads Relu(x)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "w1"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["h2"]), helper.make_node("Conv", ["h2", "w2"], ["y"], kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((2, 5, 1, 1)).astype(np.float32), "w2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, *spatial])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, *spatial])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_moments_are_those_of_the_consumer_inputs():
    x = _rand((12, 4, 3, 3))
    st, cal = _stats(_relu_model(), {"x": x})
    # the group is conv w1's 5 outputs; its consumer (conv w2) reads h2 = Relu(w1 * Relu(x))
    w1 = np.random.default_rng(0).standard_normal((5, 4, 1, 1)).astype(np.float32)
    h2 = np.maximum(np.einsum("oc,nchw->nohw", w1[:, :, 0, 0], np.maximum(x, 0)), 0).astype(np.float64)
    m = st.moments("h2", 1)
    X = h2.transpose(0, 2, 3, 1).reshape(-1, 5)
    assert m.n == X.shape[0] == 12 * 9
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.var, X.var(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.mean_abs, np.abs(X).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.gram, X.T @ X, rtol=1e-5, atol=1e-6)
    held = st.moments("h2", 1, part="held")
    np.testing.assert_allclose(held.s1, X.reshape(12, 9, 5)[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY].sum((0, 1)), rtol=1e-5)
    assert cal.summary() == {"samples": 12, "held_back": 2, "dropped": 0, "runs": 2}


@pytest.mark.parametrize("model", ["resnet", "static"])
def test_npz_dict_and_iterable_give_the_same_statistics(tmp_path, model):
    if model == "resnet":
        src, x = RESNET, {"input": _rand((11, 3, 32, 32))}
    else:  # static batch 1: one sample per run
        from corpus import build

        src, x = build("gemm-ir"), {"input": _rand((7, 3, 16, 16))}
    path = tmp_path / "calib.npz"
    np.savez(path, **x)
    name = next(iter(x))
    a, _ = _stats(src, str(path))
    b, _ = _stats(src, x)
    c, _ = _stats(src, [{name: x[name][i : i + 1]} for i in range(len(x[name]))])
    d, _ = _stats(src, ({name: x[name][i : i + 1]} for i in range(len(x[name]))))  # one-shot generator
    e, _ = _stats(src, {name: x[name][:, None]})  # whole feeds, one per sample
    for other in (b, c, d, e):
        _assert_same(a, other)


def test_batched_statistics_equal_one_run():
    x = {"input": _rand((20, 3, 32, 32))}
    one, c1 = _stats(RESNET, x, batch=100)
    many, c2 = _stats(RESNET, x, batch=3)
    assert c1.n_runs == 2 and c2.n_runs > 6  # fit and held-back parts never share a run
    _assert_same(one, many, rtol=1e-6)


def test_samples_of_different_shapes_are_batched_by_shape():
    """Variable-size samples (text of different lengths; here images of different sizes)
    run without padding: each run holds samples of one shape, so the statistics are
    exactly those of every sample's own positions."""
    sizes = [3, 5, 3, 4, 5, 3, 3, 4, 5, 3, 4, 3]
    feeds = [{"x": _rand((1, 4, s, s), seed=i)} for i, s in enumerate(sizes)]
    st, cal = _stats(_relu_model(("H", "W")), feeds, batch=16)
    assert cal.summary()["samples"] == len(sizes)
    assert cal.n_runs == 5  # fit: sizes 3, 4, 5; held back (#5, #10): 5, 3. Equal shapes share a run
    w1 = np.random.default_rng(0).standard_normal((5, 4, 1, 1)).astype(np.float32)
    rows = [np.maximum(np.einsum("oc,nchw->nhwo", w1[:, :, 0, 0], np.maximum(f["x"], 0)), 0).reshape(-1, 5)
            for f in feeds]
    X = np.concatenate(rows).astype(np.float64)
    m = st.moments("h2", 1)
    assert m.n == X.shape[0] == sum(s * s for s in sizes)
    np.testing.assert_allclose(m.mean, X.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.gram, X.T @ X, rtol=1e-5, atol=1e-6)
    held = np.concatenate([r for i, r in enumerate(rows) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1])
    np.testing.assert_allclose(st.moments("h2", 1, part="held").s1, held.sum(0), rtol=1e-5)


def test_gram_budget_splits_the_passes_not_the_statistics(monkeypatch):
    """Gram matrices past MAX_GRAM_BYTES are gathered in more passes over the data, so
    memory stays bounded whatever the number of layers; the statistics are the same."""
    import surgery.passes.stats as S

    x = {"input": _rand((10, 3, 32, 32))}
    one, c1 = _stats(RESNET, x)
    runs_one = c1.n_runs
    calls = []
    real = S.run_calibration
    monkeypatch.setattr(S, "run_calibration", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(S, "MAX_GRAM_BYTES", 8 * 64 * 64)  # one 64-channel Gram at a time
    many, _ = _stats(RESNET, x)
    assert len(calls) > 3 and runs_one == 2
    _assert_same(one, many, rtol=1e-9)


def test_calib_samples_caps_the_data():
    x = {"input": _rand((30, 3, 32, 32))}
    full, _ = _stats(RESNET, {"input": x["input"][:10]}, gram=False)
    capped, cal = _stats(RESNET, x, gram=False, samples=10)
    _assert_same(full, capped)
    assert cal.summary()["samples"] == 10 and cal.summary()["held_back"] == 2


def test_static_batch_leftovers_are_reported():
    g = _relu_model()
    for v in (g.graph.input[0], g.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = 4  # static batch of 4
    res = surgery.prune(g, ratio=0.4, criterion="wanda", calib={"x": _rand((14, 4, 3, 3))})
    cal = res.report["calibration"]
    assert cal["samples"] == 14 and cal["runs"] >= 1
    assert cal["dropped"] == 14 - 4 * cal["runs"]
    assert res.report["verify"]["exact"] is True


@pytest.mark.parametrize("bad,match", [
    ({"inputs": np.zeros((4, 3, 32, 32), np.float32)}, "no array for input 'input'"),
    ({"input": np.zeros((4, 3, 32, 32), np.float32), "extra": np.zeros((4, 1))}, "not an input of the model"),
    ({"input": np.zeros((3, 32, 32), np.float32)}, "rank"),
    ({"input": np.zeros((0, 3, 32, 32), np.float32)}, "no calibration samples"),
    ([{"input": np.zeros((1, 3, 32, 32), np.float32)}, [1, 2]], "not a dict"),
    (42, "calibration data must be"),
    ("/nonexistent/calib.npz", "not found"),
])
def test_bad_calibration_data_is_a_clear_error(bad, match):
    with pytest.raises(SurgeryError, match=match):
        surgery.prune(RESNET, ratio=0.5, criterion="activation", calib=bad)


def test_not_an_npz_file(tmp_path):
    p = tmp_path / "calib.npz"
    p.write_text("hello")
    with pytest.raises(SurgeryError, match="not an .npz"):
        surgery.prune(RESNET, criterion="wanda", calib=str(p))


def test_cli_calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, input=_rand((10, 3, 32, 32)))
    out = tmp_path / "out.onnx"
    rep = tmp_path / "report.json"
    r = CliRunner().invoke(app, ["prune", RESNET, "-o", str(out), "--criterion", "wanda", "--calib", str(path),
                                 "--calib-samples", "6", "--compensate", "bias", "--report", str(rep), "-q"])
    assert r.exit_code == 0, r.output
    import json

    report = json.loads(rep.read_text())
    assert report["calibration"]["samples"] == 6 and report["verify"]["exact"] is True
    assert "compensated_output_diff" in report and "applied" in report["compensation"]
    # a data-aware criterion without --calib: exit 2, one line, no output
    out2 = tmp_path / "out2.onnx"
    r = CliRunner().invoke(app, ["prune", RESNET, "-o", str(out2), "--criterion", "obs", "-q"])
    assert r.exit_code == 2 and "calibration data" in r.output and not out2.exists()
    r = CliRunner().invoke(app, ["prune", RESNET, "-o", str(out2), "--calib", str(tmp_path / "missing.npz"),
                                 "--criterion", "flap", "-q"])
    assert r.exit_code == 2 and "not found" in r.output and not out2.exists()
