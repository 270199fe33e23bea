"""LRN, the worked example of a one-file op family (passes/rules/lrn.py): channel rule
(tied through, channel axis inexact unless the window is one channel), FLOP formula."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import surgery
from graphs import conv, model, w
from surgery.analysis import Analysis
from surgery.api import load
from surgery.metrics import count_flops
from surgery.passes import targets
from surgery.passes.rules import flop_terms


def _conv_lrn_conv(size: int):
    # x(3) -> Conv(8) -> LRN -> Conv(5) -> y
    return model(
        [conv("x", "w1", "a"), helper.make_node("LRN", ["a"], ["n"], size=size, alpha=1e-2, beta=0.75, bias=1.0),
         conv("n", "w2", "y")],
        [w("w1", 8, 3, 1, 1), w("w2", 5, 8, 1, 1)], [2, 3, 4, 4], [2, 5, 4, 4],
    )


def _run(m, x):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_lrn_channels_form_one_inexact_channel_group():
    a = Analysis(load(_conv_lrn_conv(3)))
    (g,) = [g for g in a.groups if g.prunable]
    assert g.name == "w1@0" and len(g.atoms) == 8
    assert g.kind == "channel"  # the producer's kind: LRN adds no role
    assert not g.exact and "LRN" in g.inexact_reason and "neighbouring channels" in g.inexact_reason


def test_prune_through_lrn_runs_and_reports_inexact():
    m = _conv_lrn_conv(3)
    res = surgery.prune(m, ratio=0.5)
    inits = res.model.graph.initializers
    assert inits["w1"].const_value.shape[0] == 4 and inits["w2"].const_value.shape[1] == 4
    assert res.report["verify"]["exact"] is None and "LRN" in res.report["verify"]["why"]
    assert res.report["inexact_groups"] == ["w1@0"]
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    y = _run(res.onnx, x)
    assert y.shape == (2, 5, 4, 4) and np.isfinite(y).all()


def test_lrn_of_one_channel_window_is_pointwise_and_exact():
    res = surgery.prune(_conv_lrn_conv(1), ratio=0.5)
    assert res.report["verify"]["exact"] is True


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn_flop_formula(size):
    ir_model = load(_conv_lrn_conv(size))
    (node,) = [n for n in ir_model.graph if n.op_type == "LRN"]
    ((coef, parts),) = flop_terms(node)
    assert coef == size + 4 and [(v.name, axes) for v, axes in parts] == [("n", [0, 1, 2, 3])]
    convs = 2 * (2 * 8 * 4 * 4 * 3) + 2 * (2 * 5 * 4 * 4 * 8)
    assert count_flops(ir_model) == convs + (size + 4) * 2 * 8 * 4 * 4
    # the --target-flops search counts the same formula, as a function of the kept channels
    assert targets.terms(Analysis(ir_model), "flops").total == count_flops(ir_model)
