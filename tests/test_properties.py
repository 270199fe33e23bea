"""The central property, over the whole corpus: every cut is exact.

- ratio 0 leaves the model's outputs bitwise identical;
- random ratios and seeds give a mask-equivalent model wherever `exact` is not null
  (the pruned model equals the original with the plan's weight slices zeroed);
- parameters strictly drop when any group is prunable; output shapes never change;
- a saved plan replays to the same model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import surgery
from surgery.frontends.onnx_loader import concrete_input_shapes as concrete_shapes
from surgery.verify import random_feeds, run

from corpus import CASES, build

NAMES = [c.name for c in CASES]


def _outputs(proto: onnx.ModelProto, seed: int = 0):
    model = ir.from_proto(proto)
    feeds = random_feeds(model, concrete_shapes(model), seed)
    return run(proto, feeds), feeds


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_is_identity(name):
    proto = build(name)
    res = surgery.prune(proto, ratio=0.0)
    assert res.report["groups_pruned"] == 0
    assert res.report["params_after"] == res.report["params_before"]
    ref, feeds = _outputs(proto)
    got = run(res.onnx, feeds)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_random_cuts_are_exact(name):
    proto = build(name)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for seed, ratio in ((1, 0.5), (2, float(rng.uniform(0.1, 0.9)))):
        res = surgery.prune(proto, ratio=ratio, criterion="random", seed=seed)
        rep = res.report
        v = rep["verify"]
        assert v["exact"] is not False, f"{name} ratio {ratio}: {v}"
        if v["exact"] is None:
            assert rep["inexact_groups"], "null exactness must name its groups"
        if rep["groups_prunable"] and rep["groups_pruned"]:
            assert rep["params_after"] < rep["params_before"]
        # output names, dtypes and shapes unchanged
        orig = ir.from_proto(proto)
        assert [o.name for o in res.model.graph.outputs] == [o.name for o in orig.graph.outputs]
        assert [str(o.shape) for o in res.model.graph.outputs] == [str(o.shape) for o in orig.graph.outputs]
        assert [o.dtype for o in res.model.graph.outputs] == [o.dtype for o in orig.graph.outputs]


@pytest.mark.parametrize("name", NAMES)
def test_plan_replays_to_the_same_model(name):
    proto = build(name)
    res = surgery.prune(proto, ratio=0.4, criterion="l2", verify_result=False)
    again = surgery.apply(proto, res.plan.as_dict(), verify_result=False)
    a = {k: v.const_value.numpy() for k, v in res.model.graph.initializers.items()}
    b = {k: v.const_value.numpy() for k, v in again.model.graph.initializers.items()}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
