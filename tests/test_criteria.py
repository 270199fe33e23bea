"""Criteria (passes/criteria.py, passes/criteria_extra.py): outcomes only.

- every criterion gives one finite score per unit, and the cut it drives is exact;
- data-aware criteria remove a dead (constant zero) channel first; obs removes a
  duplicated channel first; fpgm the unit at the geometric median; bn-scale the
  smallest |gamma|; lamp scores lie in (0, 1] with 1 for each group's largest unit;
- a data-aware criterion without calibration data is a clear error;
- plugins: ``@surgery.criterion`` and the ``surgery.criteria`` entry-point group.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import surgery
from surgery.errors import SurgeryError
from surgery.passes import criteria_core as criteria_mod  # where the registry lives
from surgery.passes.criteria import CriterionContext, get_criterion, needs_stats
from surgery.passes.stats import Calibration, collect

from corpus import build

REPO = Path(__file__).resolve().parents[1]
ALL = ["l1", "l2", "random", "bn-scale", "fpgm", "lamp", "activation", "wanda", "flap", "obs"]
DATA_AWARE = ["activation", "wanda", "flap", "obs", "obs-greedy"]
# every prunable group of these has a BatchNormalization
WITH_BN = {"resnet_tiny", "dynamic_batch-ir"}
MODELS = ["resnet_tiny", "dynamic_batch-ir", "gemm-ir", "matmul_nhwc-ir", "split-ir", "depth_to_space-ir",
          "squeeze_unsqueeze-ir", "densenet-legacy", "unet-legacy", "shufflenetv2-legacy", "gqa-ir", "swiglu-ir"]


def _source(name):
    if name == "resnet_tiny":
        return str(REPO / "models" / f"{name}.onnx")
    if name in ("gqa-ir", "swiglu-ir"):
        import corpus_transformers

        return corpus_transformers.build(name)
    return build(name)


def _calib(analysis, n=10, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for v in analysis.model.graph.inputs:
        shape = [d if isinstance(d, int) else 1 for d in v.shape]
        if not isinstance(v.shape[0], int):  # dynamic batch: samples along it
            shape[0] = n
        else:
            shape = [n, *shape[1:]]
        out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_criterion_scores_every_unit_and_the_cut_is_exact(name):
    analysis = surgery.analyze(_source(name))
    calib = _calib(analysis)
    stats = collect(analysis, Calibration(calib, analysis.model), gram=True)
    ctx = CriterionContext(rng=np.random.default_rng(0), stats=stats, analysis=analysis)
    groups = [g for g in analysis.groups if g.prunable]
    assert groups
    for crit in ALL:
        if crit == "bn-scale" and name not in WITH_BN:
            continue
        fn = get_criterion(crit)
        for g in groups:
            s = np.asarray(fn(g, ctx))
            assert s.shape == (len(g.atoms),), (crit, g.name)
            assert np.all(np.isfinite(s)), (crit, g.name)
        res = surgery.prune(_source(name), ratio=0.5, criterion=crit, calib=calib if crit in DATA_AWARE else None)
        v = res.report["verify"]
        assert v["exact"] is not False, (name, crit, v)
        assert v["exact"] is True or res.report["inexact_groups"], (name, crit, v)
        assert res.report["params_after"] < res.report["params_before"]


@pytest.mark.parametrize("crit", ["activation", "wanda", "flap", "obs", "obs-greedy"])
def test_global_ranking_with_data_aware_criteria_is_exact(crit):
    analysis = surgery.analyze(_source("resnet_tiny"))
    res = surgery.prune(_source("resnet_tiny"), ratio=0.4, criterion=crit, global_rank=True, calib=_calib(analysis))
    assert res.report["verify"]["exact"] is True and res.report["groups_pruned"] > 0


def _two_layer(w1, b1, w2, x_shape=("N", 3, 5, 5)):
    """x -> Conv(w1, b1) -> Relu -> Conv(w2) -> y, 1x1 convs."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in (("w1", w1), ("b1", b1), ("w2", w2))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w2.shape[0], 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("crit", ["activation", "wanda", "flap"])
def test_data_aware_criteria_remove_a_dead_channel_first(crit):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 1, 1))
    b1 = np.abs(rng.standard_normal(8))
    w1[5], b1[5] = 1e-3, -100.0  # channel 5 is Relu(negative) = 0 on every input; its weights are not small
    w2 = rng.standard_normal((4, 8, 1, 1)) * 0.1
    w2[:, 5] = 5.0  # the largest consumer column: magnitude alone would keep it
    model = _two_layer(w1, b1, w2)
    calib = {"x": rng.standard_normal((10, 3, 5, 5)).astype(np.float32)}
    res = surgery.prune(model, ratio=0.125, criterion=crit, calib=calib)
    (g,) = res.plan.groups
    assert g.removed_units == [5]
    assert surgery.prune(model, ratio=0.125, criterion="l2").plan.groups[0].removed_units != [5]


def test_obs_removes_a_duplicated_channel_first():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 8, 1, 1))
    w1[4] = w1[1]  # channel 4 duplicates channel 1: the consumer can re-route it through the other
    w2 = rng.standard_normal((4, 6, 1, 1))
    w2[:, 1] *= 2.0
    w2[:, 4] *= 2.0  # and both weigh a lot
    model = _two_layer(w1, np.zeros(6), w2, x_shape=("N", 8, 5, 5))
    calib = {"x": rng.standard_normal((20, 8, 5, 5)).astype(np.float32)}
    (g,) = surgery.prune(model, ratio=0.17, criterion="obs", calib=calib).plan.groups
    assert g.removed_units in ([1], [4])
    (g,) = surgery.prune(model, ratio=0.17, criterion="wanda", calib=calib).plan.groups
    assert g.removed_units not in ([1], [4])


def test_fpgm_removes_the_unit_at_the_geometric_median():
    c = np.array([0.5, -0.2, 0.3])
    rows = [c + d for d in ([1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1])] + [c]
    w1 = np.array(rows)[:, :, None, None] * 3.0  # unit 5 sits at the centre, with the largest-but-one norm
    w2 = np.ones((2, 6, 1, 1))  # identical consumer columns: no information there
    (g,) = surgery.prune(_two_layer(w1, np.zeros(6), w2), ratio=0.17, criterion="fpgm").plan.groups
    assert g.removed_units == [5]


def test_bn_scale_follows_gamma_and_needs_a_norm():
    res = surgery.prune(build("dynamic_batch-ir"), ratio=0.25, criterion="bn-scale")
    a = surgery.analyze(build("dynamic_batch-ir"))  # res.analysis holds the cut weights
    for pg in res.plan.groups:
        g = next(x for x in a.groups if x.name == pg.name)
        (gamma,) = [s for s in g.slices if any(u.node.op_type == "BatchNormalization" and u.idx == 1
                                               for u in s.value.uses())]
        per_unit = gamma.units @ np.abs(gamma.array)
        assert sorted(pg.removed_units) == sorted(np.argsort(per_unit, kind="stable")[: len(pg.removed_units)].tolist())
    with pytest.raises(SurgeryError, match="bn-scale.*no BatchNormalization"):
        surgery.prune(build("gemm-ir"), criterion="bn-scale")


def test_lamp_scores_compare_across_groups():
    analysis = surgery.analyze(_source("resnet_tiny"))
    ctx = CriterionContext(rng=np.random.default_rng(0), analysis=analysis)
    lamp, l2 = get_criterion("lamp"), get_criterion("l2")
    for g in (g for g in analysis.groups if g.prunable):
        s, n = lamp(g, ctx), l2(g, ctx)
        assert np.all((s > 0) & (s <= 1)) and s.max() == pytest.approx(1.0)
        assert np.array_equal(np.argsort(s, kind="stable"), np.argsort(n, kind="stable"))  # same order as magnitude
        # smallest unit: its share of everything
        assert s.min() == pytest.approx(n.min() ** 2 / np.sum(n**2))


@pytest.mark.parametrize("crit", DATA_AWARE)
def test_data_aware_criterion_without_calibration_is_an_error(crit):
    assert needs_stats(get_criterion(crit)) in ("moments", "gram")
    with pytest.raises(SurgeryError, match=f"criterion '{crit}' is data-aware.*calibration data"):
        surgery.prune(_source("resnet_tiny"), criterion=crit)
    for crit in ("l1", "l2", "random", "fpgm", "lamp", "bn-scale"):
        assert needs_stats(get_criterion(crit)) is None


# --------------------------------------------------------------------------
# plugins
# --------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(criteria_mod, "CRITERIA", dict(criteria_mod.CRITERIA))


def _last_first(group, ctx):
    return -np.arange(len(group.atoms), dtype=float)  # the last unit scores lowest


def test_decorator_plugin(registry):
    surgery.criterion("last-first")(_last_first)
    res = surgery.prune(build("gemm-ir"), ratio=0.1, criterion="last-first")
    for g in res.plan.groups:
        assert g.removed_units == list(range(g.units - len(g.removed_units), g.units))


def test_entry_point_plugin(registry, monkeypatch):
    mod = types.ModuleType("surgery_fake_plugin")
    mod.last_first = _last_first

    def dead(group, ctx):
        return ctx.stats.moments  # never reached without data

    dead.needs_stats = "moments"
    mod.dead = dead
    monkeypatch.setitem(sys.modules, "surgery_fake_plugin", mod)
    eps = [importlib.metadata.EntryPoint("ep-last-first", "surgery_fake_plugin:last_first", "surgery.criteria"),
           importlib.metadata.EntryPoint("ep-data", "surgery_fake_plugin:dead", "surgery.criteria"),
           importlib.metadata.EntryPoint("ep-broken", "surgery_fake_plugin:missing", "surgery.criteria")]
    real = importlib.metadata.entry_points

    def fake(**kw):
        if kw.get("group") == "surgery.criteria":
            return [e for e in eps if e.name != "ep-broken" or kw.get("_broken")]
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    assert "ep-last-first" not in criteria_mod.CRITERIA
    res = surgery.prune(build("gemm-ir"), ratio=0.1, criterion="ep-last-first")
    assert res.plan.groups
    for g in res.plan.groups:
        assert g.removed_units == list(range(g.units - len(g.removed_units), g.units))
    # an entry point's needs_stats is honoured: no data, no silent random inputs
    with pytest.raises(SurgeryError, match="'ep-data' is data-aware"):
        surgery.prune(build("gemm-ir"), criterion="ep-data")
    # a plugin that fails to load is a one-line error naming it
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: fake(_broken=True, **kw))
    with pytest.raises(SurgeryError, match="plugin 'ep-broken'"):
        surgery.prune(build("gemm-ir"), criterion="ep-broken")
    with pytest.raises(SurgeryError, match="unknown criterion 'nope'"):
        surgery.prune(build("gemm-ir"), criterion="nope")


def test_obs_greedy_keeps_one_of_two_duplicate_channels():
    """Two channels that always carry the same value: each alone can be removed at no cost
    (the other takes its weight), so one-shot obs scores both lowest and removes both;
    obs-greedy removes one, updates the other's weight and Hessian, and then keeps it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((6, 8)).astype(np.float32)  # wider input: no other channel is redundant
    W1[1] = W1[0]  # hidden channels 0 and 1 are identical
    W2 = rng.standard_normal((3, 6)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
             helper.make_node("Gemm", ["h", "W2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    calib = {"x": rng.standard_normal((100, 8)).astype(np.float32)}
    gone = {}
    for crit in ("obs", "obs-greedy"):
        res = surgery.prune(m, ratio=0.5, criterion=crit, calib=calib)
        (pg,) = res.plan.groups
        gone[crit] = set(pg.removed_units)
    assert {0, 1} <= gone["obs"]
    assert len({0, 1} & gone["obs-greedy"]) == 1, gone
