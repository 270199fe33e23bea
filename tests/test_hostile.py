"""Hostile input through the command line: every case ends in a checked model or a
one-line refusal (exit 2), never a traceback, a hang, a file left behind or a byte of
the user's files changed (tests/contract.py checks all of it).

One case per finding of the robustness issue; all cases run at once (two at a time)
in a module fixture, each test then inspects its own finished run.
"""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from contract import run_cli
from graphs import conv, i64, model, w

CASES = {}
EXPECT = {}  # case -> (exit code, text the stderr line must hold)


def case(code: int, needle: str = ""):
    def deco(fn):
        CASES[fn.__name__] = fn
        EXPECT[fn.__name__] = (code, needle)
        return fn
    return deco


def cnn(**kw) -> onnx.ModelProto:
    nodes = [conv("x", "w1", "a", pads=[1, 1, 1, 1], **kw), helper.make_node("Relu", ["a"], ["b"]), conv("b", "w2", "y")]
    return model(nodes, [w("w1", 8, 3, 3, 3), w("w2", 4, 8, 1, 1)], [1, 3, 8, 8], [1, 4, 8, 8])


def _prune(d: Path, *extra: str) -> list[str]:
    return ["prune", str(d / "m.onnx"), "-o", str(d / "o.onnx"), *extra]


def _with_big_constant(m: onnx.ModelProto) -> onnx.ModelProto:
    """Insert ``a + Constant[1,8,8,8]`` after the first conv: the only tensor over 1 KB."""
    big = numpy_helper.from_array(np.full((1, 8, 8, 8), 0.5, np.float32), "big")
    m.graph.node.insert(1, helper.make_node("Constant", [], ["c"], value=big))
    m.graph.node.insert(2, helper.make_node("Add", ["a", "c"], ["a2"]))
    m.graph.node[3].input[0] = "a2"
    return m


# -- 1. data loss -------------------------------------------------------------

@case(2, "would overwrite the input")
def constant_in_data_file(d):
    """The input keeps only a Constant node's tensor in ``o.onnx.data``; ``-o o.onnx``
    would write its own data file under that name."""
    onnx.save(_with_big_constant(cnn()), d / "m.onnx", save_as_external_data=True, location="o.onnx.data",
              size_threshold=1024, convert_attribute=True)
    assert all(not t.external_data for t in onnx.load(d / "m.onnx", load_external_data=False).graph.initializer)
    return _prune(d)


@case(2, "would overwrite the input")
def subgraph_tensor_in_data_file(d):
    """The external tensor sits in an If branch."""
    big = numpy_helper.from_array(np.full((1, 8, 8, 8), 0.5, np.float32), "big")
    branch = helper.make_graph([helper.make_node("Constant", [], ["t"], value=big)], "then", [],
                               [helper.make_tensor_value_info("t", T.FLOAT, [1, 8, 8, 8])])
    m = cnn()
    m.graph.node.insert(1, helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch))
    m.graph.node.insert(2, helper.make_node("Add", ["a", "c"], ["a2"]))
    m.graph.node[3].input[0] = "a2"
    m.graph.input.append(helper.make_tensor_value_info("cond", T.BOOL, []))
    onnx.save(m, d / "m.onnx", save_as_external_data=True, location="o.onnx.data", size_threshold=1024,
              convert_attribute=True)
    return _prune(d)


@case(2, "not a regular file")
def output_is_a_device(d):
    onnx.save(cnn(), d / "m.onnx")
    try:  # a device node of our own (as root); else a link to /dev/null, which os.stat follows
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.symlink("/dev/null", d / "null")
    return ["prune", str(d / "m.onnx"), "-o", str(d / "null")]


@case(2, "not a regular file")
def output_is_a_fifo(d):
    onnx.save(cnn(), d / "m.onnx")
    os.mkfifo(d / "o.onnx")
    return _prune(d)


@case(2, "not a regular file")
def report_is_a_fifo(d):
    onnx.save(cnn(), d / "m.onnx")
    os.mkfifo(d / "r.json")
    return _prune(d, "--report", str(d / "r.json"))


@case(2, "does not exist")
def report_folder_missing(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--report", str(d / "nowhere" / "r.json"))


# -- 2. shapes nobody inferred --------------------------------------------------

@case(0)
def custom_op_before_reshape(d):
    nodes = [conv("x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["a1"]),
             conv("a1", "w2", "a2", pads=[1, 1, 1, 1]), helper.make_node("Foo", ["a2"], ["b"], domain="my.dom"),
             helper.make_node("Reshape", ["b", "sh"], ["y"])]
    m = model(nodes, [w("w1", 8, 3, 3, 3), w("w2", 4, 8, 3, 3), i64("sh", [1, -1])], [1, 3, 8, 8], [1, 256],
              extra_opsets=[("my.dom", 1)])
    onnx.save(m, d / "m.onnx")
    return _prune(d, "--no-verify", "--report", str(d / "r.json"))


# -- 5. other tracebacks ------------------------------------------------------

@case(2, "group")
def conv_group_zero(d):
    onnx.save(cnn(group=0), d / "m.onnx")
    return _prune(d)


@case(2, "NaN or infinite")
def nan_weight(d):
    m = cnn()
    a = numpy_helper.to_array(m.graph.initializer[0]).copy()
    a[0, 0, 0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(a, "w1"))
    onnx.save(m, d / "m.onnx")
    return _prune(d)


@case(2, "NaN or infinite")
def inf_weight(d):
    m = cnn()
    a = numpy_helper.to_array(m.graph.initializer[1]).copy()
    a[1, 2, 0, 0] = -np.inf
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(a, "w2"))
    onnx.save(m, d / "m.onnx")
    return _prune(d)


@case(2, "is too small for the declared shape")
def constant_dims_disagree(d):
    m = _with_big_constant(cnn())
    m.graph.node[1].attribute[0].t.dims[0] = 2
    onnx.save(m, d / "m.onnx")
    return _prune(d)


@case(0)
def string_weight(d):
    m = cnn()
    m.graph.initializer.append(helper.make_tensor("sw", T.STRING, [2], [b"a", b"b"]))
    m.graph.node.append(helper.make_node("Identity", ["sw"], ["z"]))
    m.graph.output.append(helper.make_tensor_value_info("z", T.STRING, [2]))
    onnx.save(m, d / "m.onnx")
    return _prune(d)


@case(2, "tensor(string)")
def string_conv_weight(d):
    """A weight the cut slices holds strings: sliced as strings, then onnxruntime refuses the model."""
    m = cnn()
    m.graph.initializer[1].CopyFrom(helper.make_tensor("w2", T.STRING, [4, 8, 1, 1], [b"s"] * 32))
    onnx.save(m, d / "m.onnx")
    return _prune(d)


@case(2, "not valid UTF-8")
def non_utf8_data_location(d):
    onnx.save(cnn(), d / "m.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    (d / "m.onnx").write_bytes((d / "m.onnx").read_bytes().replace(b"w.data", b"w\xff.dat"))
    return _prune(d)


@case(2, "--seed")
def negative_seed(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--seed", "-1")


@case(2, "input_shapes")
def forty_digit_input_shape(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--input-shape", "x:1x3x" + "9" * 40 + "x8")


@case(2, "without pickle")
def calib_object_array(d):
    onnx.save(cnn(), d / "m.onnx")
    np.savez(d / "c.npz", x=np.array([{"a": 1}] * 4, dtype=object))
    return _prune(d, "--calib", str(d / "c.npz"), "-c", "activation")


@case(2, "dtype <U")
def calib_string_array(d):
    onnx.save(cnn(), d / "m.onnx")
    np.savez(d / "c.npz", x=np.array(["a"] * 4))
    return _prune(d, "--calib", str(d / "c.npz"), "-c", "activation")


# -- 6. inputs that are not regular files -------------------------------------

@case(2, "not a regular file")
def model_is_a_fifo(d):
    os.mkfifo(d / "m.onnx")
    return _prune(d)


@case(2, "not a regular file")
def model_is_dev_zero(d):
    os.symlink("/dev/zero", d / "m.onnx")
    return _prune(d)


# -- 7. messages ----------------------------------------------------------------

@case(2, "Missing argument")
def usage_missing_model(d):
    return ["prune"]


@case(2, "Invalid value for '--ratio'")
def usage_bad_float(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--ratio", "abc")


@case(2, "No such option")
def usage_unknown_option(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--bogus")


@case(2, "\\x1b[31m")
def escape_sequence_in_a_name(d):
    m = cnn()
    evil = "x\n\x1b[31m[bold]evil[/]"
    m.graph.input[0].name = evil
    m.graph.node[0].input[0] = evil
    onnx.save(m, d / "m.onnx")
    return _prune(d, "--input-shape", "nope:1x3x8x8")


# -- 8. --no-verify -----------------------------------------------------------------

@case(0)
def no_verify_still_loads(d):
    onnx.save(cnn(), d / "m.onnx")
    return _prune(d, "--no-verify", "--report", str(d / "r.json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def one(name):
        d = tmp_path_factory.mktemp(name)
        args = CASES[name](d)
        return name, d, run_cli(args, d, [d / "o.onnx"] if "-o" in args else [], timeout=120)
    with ThreadPoolExecutor(2) as pool:
        return {name: (d, out) for name, d, out in pool.map(one, CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_contract(runs, name):
    d, out = runs[name]
    code, needle = EXPECT[name]
    assert not out.broken, out
    assert out.code == code, out
    assert needle in out.stderr, out


def test_unknown_shape_blocks_only_its_dims(runs):
    """The custom op's output has no shape: its dims are blocked, the conv before it still prunes."""
    d, _ = runs["custom_op_before_reshape"]
    rep = json.loads((d / "r.json").read_text())
    assert rep["groups_pruned"] == 1 and rep["params_after"] < rep["params_before"]


def test_no_verify_report_says_loaded(runs):
    d, _ = runs["no_verify_still_loads"]
    v = json.loads((d / "r.json").read_text())["verify"]
    assert v["validated"] is True and "loads in onnxruntime" in v["why"] and v["exact"] is None


def test_escaped_message_is_one_line_without_escape_codes(runs):
    _, out = runs["escape_sequence_in_a_name"]
    assert "\x1b" not in out.stderr and out.stderr.count("\n") == 1


def test_read_only_report_folder_refused_before_any_work(tmp_path, monkeypatch):
    """As root every folder is writable, so the check is seen through os.access."""
    from typer.testing import CliRunner

    from surgery import cli

    onnx.save(cnn(), tmp_path / "m.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    r = CliRunner().invoke(cli.app, _prune(tmp_path, "--report", str(ro / "r.json")))
    assert r.exit_code == 2 and "not writable" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "ro"]
