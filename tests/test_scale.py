"""Depth and scale: nothing on the load -> analyze -> plan -> cut -> verify -> save path,
nor plan loading, may recurse per node; long chains prune like short ones.

The helpers that used to recurse over producers (``RuleContext.from_weights``,
``shape_sources``) are checked on chains far deeper than Python's recursion limit;
a 2,000-node chain goes through the real command line; the 100,000-node one is
marked slow (kept out of the default run; ``pytest -m slow`` runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import surgery
from deep_graphs import chain
from surgery.errors import SurgeryError

DEEP = 5 * sys.getrecursionlimit()  # far past what any per-node recursion survives


def _env() -> dict:
    env = dict(os.environ)
    # the package this test process imported (an editable install, or an import tree on PYTHONPATH)
    env.setdefault("PYTHONPATH", str(Path(surgery.__file__).resolve().parents[1]))
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    return env


def _cli(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


# ----------------------------------------------------------------------------- the rule helpers


def _relu_chain_ir(n: int) -> ir.Model:
    """x[1,2,8] -> Relu x n -> MatMul(w) -> Relu -> MatMul(w2) -> y: the MatMul rule asks
    whether its input is computed from weights, which walks the whole chain of producers."""
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"]) for i in range(n)]
    nodes += [helper.make_node("MatMul", [f"r{n - 1}", "w"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("MatMul", ["hr", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8])],
                          [numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
                           numpy_helper.from_array(np.eye(8, dtype=np.float32), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return surgery.load(m)


def test_from_weights_is_iterative_on_a_deep_chain():
    from surgery.dims import DimGraph
    from surgery.passes.rules import RuleContext

    model = _relu_chain_ir(DEEP)
    nodes = list(model.graph)
    ctx = RuleContext(DimGraph(), 17)
    y_in = nodes[-3].inputs  # the first MatMul's
    assert ctx.from_weights(y_in[0]) is False  # activations all the way up to the graph input
    assert ctx.from_weights(y_in[1]) is True  # the weight
    assert ctx.from_weights(None) is True
    # memoized per value, as a plain attribute
    assert ctx._from_weights[y_in[0]] is False and ctx._from_weights[nodes[0].inputs[0]] is False


def test_from_weights_through_a_deep_chain_of_weight_casts():
    """W -> Cast x DEEP -> MatMul: computed from the initializer alone."""
    from surgery.dims import DimGraph
    from surgery.passes.rules import RuleContext

    w = ir.Value(name="w", shape=ir.Shape([8, 8]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.eye(8, dtype=np.float32), name="w"))
    v = w
    for _ in range(DEEP):
        v = ir.node("Cast", [v], attributes={"to": 1}).outputs[0]
    ctx = RuleContext(DimGraph(), 17)
    assert ctx.from_weights(v) is True
    x = ir.Value(name="x", shape=ir.Shape([8]), type=ir.TensorType(ir.DataType.FLOAT))
    mixed = ir.node("Add", [v, x]).outputs[0]
    assert ctx.from_weights(mixed) is False


def test_shape_sources_is_iterative_on_a_deep_chain():
    from surgery.passes.rules.base import shape_literals, shape_sources

    x = ir.Value(name="x", shape=ir.Shape([ir.SymbolicDim("N"), 8]), type=ir.TensorType(ir.DataType.FLOAT))
    s = ir.node("Shape", [x]).outputs[0]
    v = s
    for _ in range(DEEP):
        v = ir.node("Identity", [v]).outputs[0]
    lit = ir.Value(name="c", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                   const_value=ir.tensor(np.array([-1], dtype=np.int64), name="c"))
    cat = ir.node("Concat", [v, lit], attributes={"axis": 0}).outputs[0]
    src = shape_sources(cat)
    assert src == [("dim", x, 0), ("dim", x, 1), -1]
    assert shape_literals(cat) == [None, None, -1]
    idx = ir.Value(name="i", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                   const_value=ir.tensor(np.array([1], dtype=np.int64), name="i"))
    assert shape_sources(ir.node("Gather", [cat, idx]).outputs[0]) == [("dim", x, 1)]
    assert shape_sources(None) is None


def test_deep_chain_before_a_matmul_analyzes():
    """The MatMul's rule calls from_weights on an input DEEP producers down: it must map
    the node (not give up on it), so the hidden units between the two MatMuls stay prunable."""
    a = surgery.analyze(_relu_chain_ir(DEEP))
    reasons = a.dims.block_reasons()
    assert not any("Recursion" in why or "cannot be analyzed" in why for why in reasons), reasons[:3]
    hidden = [g for g in a.groups if g.name == "w@1"]
    assert len(hidden) == 1 and hidden[0].prunable and len(hidden[0].atoms) == 8


# ----------------------------------------------------------------------------- plan files


def test_deeply_nested_plan_file_is_one_line_error(tmp_path):
    from surgery.plan import read_plan

    p = tmp_path / "deep.json"
    p.write_text('{"groups": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SurgeryError) as e:
        read_plan(p)
    msg = str(e.value)
    assert "nested too deeply" in msg and str(p) in msg and "\n" not in msg


def test_deeply_nested_tensor_entry_is_one_line_error(tmp_path):
    """Nesting json can parse but not print back (the error message shows the entry)."""
    from surgery.plan import _validate

    t: list = []
    for _ in range(DEEP):
        t = [t]
    with pytest.raises(SurgeryError) as e:
        _validate({"groups": [{"name": "w@0", "tensors": [t]}]})
    assert "\n" not in str(e.value) and "each tensor entry needs" in str(e.value)


def test_cli_apply_deep_plan_exit_2(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(chain(20), str(model))
    plan = tmp_path / "plan.json"
    plan.write_text("[" * 200_000 + "]" * 200_000)
    r = _cli("apply", str(model), str(plan), "-o", str(tmp_path / "o.onnx"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "nested too deeply" in err[0], r.stderr
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------------------- long chains, end to end


def _prune_chain(tmp_path: Path, n_nodes: int, kind: str, timeout: float, *extra: str) -> dict:
    src = tmp_path / f"chain{n_nodes}.onnx"
    out = tmp_path / f"chain{n_nodes}.pruned.onnx"
    rep = tmp_path / f"report{n_nodes}.json"
    plan = tmp_path / f"plan{n_nodes}.json"
    proto = chain(n_nodes, kind)
    assert abs(len(proto.graph.node) - n_nodes) <= 2
    onnx.save(proto, str(src))
    r = _cli("prune", str(src), "--ratio", "0.5", "-o", str(out), "-q", "--report", str(rep),
             "--plan", str(plan), *extra, cwd=tmp_path, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(rep.read_text())
    assert out.stat().st_size < src.stat().st_size
    assert report["params_after"] < report["params_before"]
    n_blocks = len(proto.graph.node) // (2 if kind == "conv" else 3)
    # every block's channels but the last (they reach the graph output) lose half
    assert report["groups_pruned"] == n_blocks - 1
    return {"src": src, "out": out, "report": report, "plan": json.loads(plan.read_text())}


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_cli_prunes_a_2000_node_chain(tmp_path, kind):
    got = _prune_chain(tmp_path, 2000, kind, timeout=300)
    v = got["report"]["verify"]
    assert v["exact"] is True, v
    # independently of surgery: the pruned model runs, with the input's shapes, and its
    # output is that of the original with the planned slices zeroed
    shape = [1, 8, 2, 2] if kind == "conv" else [1, 2, 8]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    masked = onnx.load(str(got["src"]))
    cuts = {}
    for g in got["plan"]["groups"]:
        for t in g["tensors"]:
            cuts.setdefault(t["tensor"], []).append((t["axis"], t["removed"]))
    for init in masked.graph.initializer:
        if init.name in cuts:
            arr = numpy_helper.to_array(init).copy()
            for axis, idx in cuts[init.name]:
                sl = [slice(None)] * arr.ndim
                sl[axis] = idx
                arr[tuple(sl)] = 0
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    mpath = got["src"].with_name("masked.onnx")
    onnx.save(masked, str(mpath))
    ref, y = _run(mpath, x), _run(got["out"], x)
    assert y.shape == ref.shape == tuple(shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref).max() > 0  # the chain neither vanished nor blew up


@pytest.mark.slow
def test_cli_prunes_a_100000_node_chain(tmp_path):
    """100k nodes through the command line, verified in onnxruntime (several minutes on
    2 CPUs: onnxruntime's session creation grows faster than linearly in the number of
    initializers; see bench/scale.py)."""
    got = _prune_chain(tmp_path, 100_000, "conv", timeout=3600)
    assert got["report"]["verify"]["exact"] is True, got["report"]["verify"]


def test_iter_tensor_protos_walks_deeply_nested_subgraphs_in_order():
    """Subgraphs inside subgraphs (If in If in ...): every tensor, in the order of a
    depth-first walk, from a stack of iterators. (protobuf refuses messages nested more
    than 100 deep, so a model cannot nest deeper than that.)"""
    from surgery.frontends.onnx_loader import iter_tensor_protos

    depth = 20  # each level nests graph -> node -> attribute: 60 message levels

    empty = helper.make_graph([], "empty", [], [])
    inner = helper.make_graph([], "g_last", [], [], [numpy_helper.from_array(np.zeros(1, np.float32), "t_last")])
    for i in reversed(range(depth)):
        node = helper.make_node("If", ["c"], [f"o{i}"], then_branch=inner, else_branch=empty,
                                value=numpy_helper.from_array(np.zeros(1, np.float32), f"attr{i}"))
        inner = helper.make_graph([node], f"g{i}", [], [], [numpy_helper.from_array(np.zeros(1, np.float32), f"t{i}")])
    names = [t.name for t in iter_tensor_protos(helper.make_model(inner))]
    # attributes in name order (else_branch, then_branch, value): each graph's initializer,
    # then everything nested in its node's then-branch, then that node's own attribute tensor
    want = [f"t{i}" for i in range(depth)] + ["t_last"] + [f"attr{i}" for i in reversed(range(depth))]
    assert names == want
