"""The coupling engine, rule by rule: which groups exist, their unit sizes, what blocks them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import surgery
from graphs import conv, i64, model, w


def groups(m):
    a = surgery.analyze(m)
    return a, {g.name: g for g in a.groups}


def prunable(a):
    return sorted((g.name, len(g.atoms), g.unit) for g in a.groups if g.prunable)


def test_grouped_conv_factors_into_groups_and_per_group_channels():
    # x(3) -> c1(8) -> grouped conv g=4 (2 in/group, 3 out/group) -> c3 1x1 -> y
    m = model(
        [conv("x", "w1", "a"), conv("a", "w2", "b", group=4), conv("b", "w3", "y")],
        [w("w1", 8, 3, 1, 1), w("w2", 12, 2, 1, 1), w("w3", 5, 12, 1, 1)],
        [1, 3, 4, 4], [1, 5, 4, 4],
    )
    a, _ = groups(m)
    got = prunable(a)
    # whole groups (2 channels of w1, 3 of w2 each), channel j of every group (4 channels of w1),
    # output k of every group (4 channels of w2)
    assert ("w1@0 (groups of Conv_1)", 4, 2) in got
    assert ("w1@0 (in_per_group of Conv_1)", 2, 4) in got
    assert ("w2@0", 3, 4) in got
    res = surgery.prune(m, ratio=0.5)
    assert res.report["verify"]["exact"] is True
    # the conv's group attribute follows the kept groups
    node = [n for n in res.model.graph if n.op_type == "Conv" and n.inputs[1].name == "w2"][0]
    assert node.attributes["group"].value == 2


def test_depthwise_conv_channels_are_one_unit_each():
    m = model(
        [conv("x", "w1", "a"), conv("a", "dw", "b", group=6), conv("b", "w3", "y")],
        [w("w1", 6, 3, 1, 1), w("dw", 6, 1, 3, 3), w("w3", 4, 6, 1, 1)],
        [1, 3, 5, 5], [1, 4, 3, 3],
    )
    a, g = groups(m)
    assert prunable(a) == [("w1@0", 6, 1)]
    assert {s.tensor for s in g["w1@0"].slices} == {"w1", "dw", "w3"}
    res = surgery.prune(m, ratio=0.5)
    assert res.model.graph.initializers["dw"].const_value.shape[0] == 3
    assert [n for n in res.model.graph if n.inputs[1].name == "dw"][0].attributes["group"].value == 3


def test_flatten_into_gemm_couples_channel_with_its_spatial_block():
    m = model(
        [conv("x", "w1", "a"), helper.make_node("Flatten", ["a"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)],
        [w("w1", 4, 3, 1, 1), w("fw", 7, 4 * 3 * 3)],
        [1, 3, 3, 3], [1, 7],
    )
    a, g = groups(m)
    assert prunable(a) == [("w1@0", 4, 1)]
    fw = [s for s in g["w1@0"].slices if s.tensor == "fw"][0]
    assert fw.axis == 1
    assert np.asarray(fw.units.sum(axis=1)).ravel().tolist() == [9, 9, 9, 9]
    res = surgery.prune(m, ratio=0.5)
    assert res.model.graph.initializers["fw"].const_value.shape == (7, 18)
    assert res.report["verify"]["exact"] is True


def test_channel_shuffle_unit_is_one_channel_per_group():
    # a(8) -> reshape (1,2,4,H,W) -> transpose -> reshape (1,8,H,W) -> conv
    m = model(
        [conv("x", "w1", "a"),
         helper.make_node("Reshape", ["a", "s1"], ["r1"]),
         helper.make_node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
         helper.make_node("Reshape", ["t", "s2"], ["r2"]),
         conv("r2", "w2", "y")],
        [w("w1", 8, 3, 1, 1), w("w2", 5, 8, 1, 1), i64("s1", [1, 2, 4, 3, 3]), i64("s2", [1, 8, 3, 3])],
        [1, 3, 3, 3], [1, 5, 3, 3],
    )
    a, g = groups(m)
    got = [(k, u) for n, k, u in prunable(a) if n.startswith("w1@0")]
    assert (4, 2) in got  # channel k of both shuffle groups: 4 units of 2 channels
    res = surgery.prune(m, ratio=0.5)
    assert res.report["verify"]["exact"] is True
    assert res.model.graph.initializers["w1"].const_value.shape[0] < 8


def test_concat_offsets_couple_each_branch_with_its_slice_of_the_consumer():
    m = model(
        [conv("x", "wa", "a"), conv("x", "wb", "b"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
         conv("c", "wc", "y")],
        [w("wa", 4, 3, 1, 1), w("wb", 6, 3, 1, 1), w("wc", 5, 10, 1, 1)],
        [1, 3, 2, 2], [1, 5, 2, 2],
    )
    a, g = groups(m)
    assert prunable(a) == [("wa@0", 4, 1), ("wb@0", 6, 1)]
    units_b = g["wb@0"].slices
    wc = [s for s in units_b if s.tensor == "wc"][0]
    assert sorted(wc.units.indices.tolist()) == list(range(4, 10))


def test_unknown_op_blocks_what_it_touches_and_analyze_names_it():
    m = model(
        [conv("x", "w1", "a"), helper.make_node("Mystery", ["a"], ["b"], domain="custom.ops"), conv("b", "w2", "y")],
        [w("w1", 4, 3, 1, 1), w("w2", 5, 4, 1, 1)],
        [1, 3, 2, 2], [1, 5, 2, 2], extra_opsets=[("custom.ops", 1)],
    )
    m.graph.value_info.append(helper.make_tensor_value_info("b", 1, [1, 4, 2, 2]))
    a, g = groups(m)
    assert not g["w1@0"].prunable
    assert "Mystery" in g["w1@0"].blocked_reason and "no channel rule" in g["w1@0"].blocked_reason


def test_softmax_over_channels_blocks_and_layernorm_is_inexact():
    sm = model(
        [conv("x", "w1", "a"), helper.make_node("Softmax", ["a"], ["b"], axis=1), conv("b", "w2", "y")],
        [w("w1", 4, 3, 1, 1), w("w2", 5, 4, 1, 1)], [1, 3, 2, 2], [1, 5, 2, 2],
    )
    _, g = groups(sm)
    assert not g["w1@0"].prunable and "normalized over this axis" in g["w1@0"].blocked_reason
    ln = model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["n"], axis=-1),
         helper.make_node("MatMul", ["n", "w2"], ["y"])],
        [w("w1", 6, 8), w("g", 8), w("b", 8), w("w2", 8, 3)], [2, 6], [2, 3],
    )
    res = surgery.prune(ln, ratio=0.5)
    assert res.report["verify"]["exact"] is None
    assert "LayerNormalization" in res.report["verify"]["why"]


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21, onnx.defs.onnx_opset_version()])
def test_slice_split_and_reduce_across_opsets(opset):
    if opset >= 13:
        split = helper.make_node("Split", ["a", "sp"], ["p", "q"], axis=1)
        inits = [i64("sp", [3, 5])]
    else:
        split = helper.make_node("Split", ["a"], ["p", "q"], axis=1, split=[3, 5])
        inits = []
    m = model(
        [conv("x", "w1", "a"), split, conv("p", "wp", "pp"), conv("q", "wq", "qq"),
         helper.make_node("Concat", ["pp", "qq"], ["y"], axis=1)],
        [w("w1", 8, 3, 1, 1), w("wp", 2, 3, 1, 1), w("wq", 2, 5, 1, 1), *inits],
        [1, 3, 2, 2], [1, 4, 2, 2], opset=opset,
    )
    res = surgery.prune(m, ratio=0.5)
    assert res.report["verify"]["exact"] is True
    assert res.model.graph.initializers["w1"].const_value.shape[0] == 8 - 1 - 2  # floor(.5*3) + floor(.5*5)
