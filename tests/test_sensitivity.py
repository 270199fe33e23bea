"""`surgery sensitivity`: every prunable group pruned alone at a few ratios, and the
output error that costs against the dense model.

The error of one (group, ratio) is checked independently: the same cut made through
`surgery.prune(..., keep=<every other group>)`, both models run in onnxruntime.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import surgery
from surgery.cli import app
from surgery.sensitivity import sensitivity

REPO = Path(__file__).resolve().parents[1]
RESNET = REPO / "models" / "resnet_tiny.onnx"
RATIOS = (0.0, 0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def rows():
    return sensitivity(str(RESNET), RATIOS)


def _run(proto: onnx.ModelProto, feeds) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_one_row_per_prunable_group(rows):
    a = surgery.analyze(str(RESNET))
    prunable = [g for g in a.groups if g.prunable]
    assert [r["id"] for r in rows] == [g.id for g in prunable]
    assert [r["group"] for r in rows] == [g.name for g in prunable]
    for r, g in zip(rows, prunable):
        assert r["kind"] == g.kind and r["units"] == len(g.atoms)
        assert [x["ratio"] for x in r["results"]] == list(RATIOS)
        for x in r["results"]:
            assert x["units_removed"] == min(math.floor(x["ratio"] * r["units"] + 1e-9), r["units"] - 1)
        assert "random inputs" in r["inputs"]


def test_errors_zero_at_zero_nonnegative_and_growing(rows):
    for r in rows:
        res = r["results"]
        assert res[0]["max_abs_diff"] == 0 and res[0]["rel_l2"] == 0
        for x in res:
            assert x["max_abs_diff"] >= 0 and x["rel_l2"] >= 0 and math.isfinite(x["rel_l2"])
            assert (x["max_abs_diff"] == 0) == (x["rel_l2"] == 0)
        assert all(x["rel_l2"] > 0 for x in res[1:])  # any l2 cut of a real channel shows
    # generally increasing: the mean over groups at every step, and each group end to end
    means = [np.mean([r["results"][i]["rel_l2"] for r in rows]) for i in range(len(RATIOS))]
    assert all(b > a for a, b in zip(means, means[1:])), means
    growing = sum(r["results"][-1]["rel_l2"] >= r["results"][1]["rel_l2"] for r in rows)
    assert growing >= 0.8 * len(rows)


def test_error_matches_a_prune_of_that_group_alone(rows):
    from surgery.verify import random_feeds
    from surgery.frontends.onnx_loader import concrete_input_shapes

    row = max(rows, key=lambda r: r["results"][2]["rel_l2"])  # the most sensitive group, at 0.5
    others = [r["group"] for r in rows if r["id"] != row["id"]]
    res = surgery.prune(str(RESNET), ratio=0.5, keep=others, verify_result=False)
    assert [g.id for g in res.plan.groups] == [row["id"]]
    assert len(res.plan.groups[0].removed_units) == row["results"][2]["units_removed"]
    dense = onnx.load(str(RESNET))
    model = surgery.load(str(RESNET))
    feeds = random_feeds(model, concrete_input_shapes(model, None), 0)
    y, z = _run(dense, feeds)[0], _run(res.onnx, feeds)[0]
    assert float(np.abs(z - y).max()) == pytest.approx(row["results"][2]["max_abs_diff"], rel=1e-4, abs=1e-6)
    rel = float(np.linalg.norm((z - y).ravel()) / np.linalg.norm(y.ravel()))
    assert rel == pytest.approx(row["results"][2]["rel_l2"], rel=1e-4)


def test_inputs_not_modified_and_calibration_arrays():
    proto = onnx.load(str(RESNET))
    before = proto.SerializeToString()
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    rows = sensitivity(proto, (0.5,), calib={"input": x})
    assert proto.SerializeToString() == before
    assert "calibration" in rows[0]["inputs"]
    assert all(r["results"][0]["rel_l2"] > 0 for r in rows)
    with pytest.raises(surgery.SurgeryError, match="input 'input'"):
        sensitivity(proto, (0.5,), calib={"x": x})
    with pytest.raises(surgery.SurgeryError, match=r"\[0, 1\)"):
        sensitivity(proto, (1.0,))


def test_calibration_file(tmp_path):
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, input=x)
    rows = sensitivity(str(RESNET), (0.25,), calib=str(path))
    assert str(path) in rows[0]["inputs"]
    ref = sensitivity(str(RESNET), (0.25,), calib={"input": x})
    assert [r["results"] for r in rows] == [r["results"] for r in ref]


def _invoke(args):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_cli_prints_the_table(rows):
    r = _invoke(["sensitivity", str(RESNET), "--ratios", "0.25,0.5"])
    assert r.exit_code == 0, r.output
    assert "ratio 0.25" in r.output and "ratio 0.5" in r.output
    for row in rows:
        assert row["group"] in r.output
    assert "random inputs" in r.output
    r = _invoke(["sensitivity", str(RESNET), "--ratios", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [g["id"] for g in data["groups"]] == [row["id"] for row in rows]
    r = _invoke(["sensitivity", str(RESNET), "--ratios", "0.5,2"])
    assert r.exit_code == 2


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s.png"
    r = _invoke(["sensitivity", str(RESNET), "--ratios", "0.25,0.5", "--plot", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "s.png"
    r = _invoke(["sensitivity", str(RESNET), "--plot", str(out)])
    assert r.exit_code == 2
    assert "pip install surgery[plot]" in r.output
    assert not out.exists()
