"""Memory does not depend on declared sizes (surgery/dims.py, "Memory" in docs/design-notes.md).

A file can declare any size: a [1, 3, 2**20, 2**20] image, a 2**40-wide activation, an
int64-max dim. The analysis lays out elements only where a group can come from and only
for classes of at most MAX_DIM indices; everything else is a block with a reason, never
a MemoryError or an OverflowError, and the channels next to it are still analyzed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import surgery
from graphs import conv, i64, model, w
from surgery.dims import MAX_DIM, MAX_FREE_DIM, DimGraph

HUGE = [2**20, 2**40, 2**62, 2**63 - 1]  # 2**20: past MAX_FREE_DIM, under MAX_DIM


def big_conv(h: int) -> onnx.ModelProto:
    """x [1, 3, h, h] -> Conv(8) -> Relu -> Conv(4): small channels, huge spatial axes."""
    return model(
        [conv("x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
         conv("r", "w2", "y", pads=[1, 1, 1, 1])],
        [w("w1", 8, 3, 3, 3), w("w2", 4, 8, 3, 3)], [1, 3, h, h], [1, 4, h, h],
    )


def sliced_mlp(n: int) -> onnx.ModelProto:
    """x declares n features; a Slice keeps 16 of them for a 16 -> 8 -> 4 MLP."""
    nodes = [helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["xs"]),
             helper.make_node("MatMul", ["xs", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return model(nodes, [i64("s0", [0]), i64("s1", [16]), i64("ax", [1]), w("w1", 16, 8), w("w2", 8, 4)],
                 [1, n], [1, 4])


def reshaped_mlp(n: int) -> onnx.ModelProto:
    """A Reshape target claims n elements (the data has 16); a Slice goes back to 16."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]),
             helper.make_node("Reshape", ["h0", "shp"], ["big"]),
             helper.make_node("Slice", ["big", "s0", "s1", "ax"], ["xs"]),
             helper.make_node("MatMul", ["xs", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return model(nodes, [w("w0", 16, 16), i64("shp", [1, n]), i64("s0", [0]), i64("s1", [16]), i64("ax", [1]),
                         w("w1", 16, 8), w("w2", 8, 4)], [1, 16], [1, 4])


def _groups(a):
    return {g.name: g for g in a.groups}


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(surgery.__file__).resolve().parents[1]))
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    return subprocess.run([sys.executable, "-m", "surgery.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_huge_spatial_input_analyzes_in_small_memory():
    surgery.analyze(big_conv(8))  # imports and caches outside the measurement
    m = big_conv(2**20)
    tracemalloc.start()
    try:
        a = surgery.analyze(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"analysis peaked at {peak / 2**20:.1f} MiB"
    # the spatial axes got no elements: only the channel axes did
    assert a.dims.n_elements < 1000
    g = _groups(a)
    assert g["w1@0"].prunable and len(g["w1@0"].atoms) == 8 and g["w1@0"].unit == 1
    assert {s.tensor for s in g["w1@0"].slices} == {"w1", "w2"}
    assert not g["w1@1"].prunable and "graph input" in g["w1@1"].blocked_reason
    res = surgery.prune(m, ratio=0.5, verify_result=False)
    assert res.model.graph.initializers["w1"].const_value.shape[0] == 4
    assert res.model.graph.initializers["w2"].const_value.shape[1] == 4


def test_huge_spatial_input_same_groups_as_a_small_one():
    small, huge = surgery.analyze(big_conv(6)), surgery.analyze(big_conv(2**20))
    key = lambda a: sorted((g.name, len(g.atoms), len(g.blocked_atoms), g.unit, g.blocked_reason)  # noqa: E731
                           for g in a.groups)
    assert key(small) == key(huge)


def test_huge_spatial_input_cli(tmp_path):
    src = tmp_path / "big.onnx"
    onnx.save(big_conv(2**20), src)
    r = _cli("prune", src, "-r", "0.5", "--no-verify", "-q", "-o", tmp_path / "out.onnx")
    assert r.returncode == 0, r.stderr
    out = onnx.load(tmp_path / "out.onnx")
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 2**20, 2**20]
    # verification cannot make up such an input: one line, exit 2, no MemoryError
    r = _cli("prune", src, "-r", "0.5", "-q", "-o", tmp_path / "out2.onnx")
    assert r.returncode == 2
    assert "too large" in _one_line(r.stderr)
    # a FLOP target over int64's range cannot be searched in int64: said so
    onnx.save(big_conv(2**62), src)
    r = _cli("prune", src, "--target-flops", "0.5", "--no-verify", "-q", "-o", tmp_path / "out3.onnx")
    assert r.returncode == 2
    assert "--ratio" in _one_line(r.stderr)


@pytest.mark.parametrize("n", HUGE)
def test_huge_declared_features_block_what_they_touch(n):
    a = surgery.analyze(sliced_mlp(n))
    g = _groups(a)
    # the 16 sliced features are tied into the huge axis: blocked, with the reason
    assert not g["w1@0"].prunable
    assert f"size {n} is too large" in g["w1@0"].blocked_reason
    # the rest is analyzed as usual
    assert g["w1@1"].prunable and len(g["w1@1"].atoms) == 8
    assert a.dims.n_elements < 1000
    res = surgery.prune(sliced_mlp(n), ratio=0.5, verify_result=False)
    assert res.model.graph.initializers["w1"].const_value.shape == (16, 4)


@pytest.mark.parametrize("n", HUGE)
def test_huge_reshape_target(n):
    g = _groups(surgery.analyze(reshaped_mlp(n)))
    assert "inconsistent sizes" in g["w0@1"].blocked_reason
    assert g["w1@1"].prunable and len(g["w1@1"].atoms) == 8


def test_huge_sizes_cli(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(sliced_mlp(2**63 - 1), src)
    r = _cli("analyze", src)
    assert r.returncode == 0, r.stderr
    assert "too large to analyze per channel" in r.stdout
    r = _cli("prune", src, "-r", "0.5", "--no-verify", "-q", "-o", tmp_path / "out.onnx")
    assert r.returncode == 0, r.stderr


# -- the dim graph itself ------------------------------------------------------


def test_whole_axis_ties_and_ranges_allocate_nothing_per_index():
    g = DimGraph()
    a = g.axis(("value", "a", 0), 2**62)
    b = g.axis(("value", "b", 0), 2**62)
    c = g.axis(("value", "c", 0), 2**61)
    g.tie(a, b)
    g.tie(a, c, range(0, 2**61), None)
    g.block(b, "somewhere", range(5, 2**60))
    w_ = g.axis(("value", "w", 0), 4)
    g.tie(c, w_, range(2**60, 2**60 + 4), None)
    cp = g.solve([w_])
    assert g.n_elements == 4 and g.axes[a].offset < 0
    assert all("too large" in cp.atom_block.get(int(x), "") for x in cp.comp)


def test_classes_up_to_max_dim_are_laid_out_beyond_it_blocked():
    g = DimGraph()
    small = g.axis(("value", "s", 0), 6)
    ok = g.axis(("value", "ok", 0), 12)
    big = g.axis(("value", "big", 0), MAX_DIM + 1)
    g.tie(small, ok, None, range(0, 6))
    g.tie(ok, big, None, range(0, 12))
    cp = g.solve()
    assert g.axes[big].offset < 0 and g.axes[ok].offset >= 0
    assert g.n_elements == 18
    assert len(cp.atom_block) == cp.n_comp  # everything tied into the big class is blocked


def test_classes_without_weights_are_bounded_by_the_weights_of_their_cluster():
    g = DimGraph()
    n = MAX_FREE_DIM + 1000
    wt = g.axis(("value", "w", 0), n)  # a weight axis: real data
    a = g.axis(("value", "a", 0), n)
    near = g.axis(("value", "near", 0), n - 10)  # no weight, but no larger than the weights
    far = g.axis(("value", "far", 0), 2 * n + 1)  # no weight, larger than all of them
    g.tie(wt, a)
    g.tie(a, near, range(0, n - 10), None)
    g.tie(a, far, None, range(0, n))
    cp = g.solve([wt])
    assert g.axes[near].offset >= 0 and g.axes[far].offset < 0
    assert g.n_elements == 3 * n - 10
    reasons = {cp.atom_block.get(int(cp.comp[g.axes[wt].offset + i])) for i in (0, n - 5)}
    assert len(reasons) == 1 and f"size {2 * n + 1} is too large" in reasons.pop()


def test_out_of_range_index_maps_block_instead_of_touching_other_axes():
    g = DimGraph()
    a = g.axis(("value", "a", 0), 4)
    b = g.axis(("value", "b", 0), 4)
    c = g.axis(("value", "c", 0), 4)
    g.tie(a, b, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    cp = g.solve()
    assert all("out of range" in cp.atom_block[int(x)] for x in cp.comp[:8])
    assert not any(int(x) in cp.atom_block for x in cp.comp[g.axes[c].offset:])


def test_deep_reshape_chains_do_not_recurse():
    g = DimGraph()
    depth = 3 * sys.getrecursionlimit()
    ids = [g.axis(("virtual", "n", k), 2) for k in range(depth)]
    for k in range(depth - 1):
        g.product(ids[k], [ids[k + 1]])
    cp = g.solve()
    last = cp.comp[g.axes[ids[-1]].offset]
    first = cp.comp[g.axes[ids[0]].offset]
    assert cp.leaves(int(first)) == (int(last),)
    assert len(cp.atoms) == 2


def test_too_many_elements_in_all_is_a_clean_error(monkeypatch):
    import surgery.dims
    from surgery.errors import SurgeryError

    monkeypatch.setattr(surgery.dims, "MAX_ELEMENTS", 20)
    with pytest.raises(SurgeryError, match="too many to analyze"):
        surgery.analyze(big_conv(4))


def test_negative_declared_sizes():
    from surgery.errors import SurgeryError

    # onnx's shape inference aborts the process on a Slice over a size of -5: the loader refuses it
    with pytest.raises(SurgeryError, match="declares size -5 on axis 1"):
        surgery.analyze(sliced_mlp(-5))
    # -1 is how some exporters write "unknown"
    g = _groups(surgery.analyze(sliced_mlp(-1)))
    assert g["w1@1"].prunable and len(g["w1@1"].atoms) == 8
