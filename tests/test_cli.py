"""The command line: `surgery prune | apply | analyze`, judged by its outcomes.

Every exit-code test runs the CLI in a subprocess (`python -m surgery.cli`). To keep
the file fast, all those subprocesses are started at once by one module fixture
(`cli`) and each test then inspects its own finished run. Outcome checks that do
not need a process boundary use typer's CliRunner in-process.

Independent checks (plan masking, reference outputs) use numpy/onnx/onnxruntime
only, never surgery's own code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from contract import env
from corpus import build

REPO = Path(__file__).resolve().parents[1]
RESNET = REPO / "models" / "resnet_tiny.onnx"
MOBILENET = REPO / "models" / "mobilenet_tiny.onnx"

REPORT_KEYS = {
    "params_before", "params_after", "flops_before", "flops_after",
    "groups_total", "groups_prunable", "groups_pruned", "seconds", "verify",
}
VERIFY_KEYS = {"max_abs_diff", "exact", "why", "validated"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --------------------------------------------------------------------------
# helpers (numpy / onnx / onnxruntime only)
# --------------------------------------------------------------------------


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    s = _session(model)
    return s.run(None, {s.get_inputs()[0].name: x})


def _image(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def _io(model: onnx.ModelProto) -> tuple:
    sig = lambda vis: [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in vis]  # noqa: E731
    return sig(model.graph.input), sig(model.graph.output)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` (hidden ones too): content hash and mtime."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = ("dir",)
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(Path(p).read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in ANSI.sub("", stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def _mask(model: onnx.ModelProto, plan: dict) -> onnx.ModelProto:
    """The model with every plan slice set to zero (initializers and Constant nodes)."""
    out = copy.deepcopy(model)
    cuts: dict[str, list] = {}
    for g in plan["groups"]:
        for t in g["tensors"]:
            cuts.setdefault(t["tensor"], []).append((int(t["axis"]), list(t["removed"])))

    def zeroed(tp: onnx.TensorProto, name: str) -> onnx.TensorProto:
        arr = numpy_helper.to_array(tp).copy()
        for axis, idx in cuts.pop(name):
            sl = [slice(None)] * arr.ndim
            sl[axis] = np.asarray(idx, dtype=np.int64)
            arr[tuple(sl)] = 0
        return numpy_helper.from_array(arr, tp.name)

    for init in out.graph.initializer:
        if init.name in cuts:
            init.CopyFrom(zeroed(init, init.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in cuts:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(zeroed(a.t, node.output[0]))
    assert not cuts, f"plan names tensors that hold no data in the input model: {sorted(cuts)}"
    return out


def _ext_model(folder: Path, name: str = "m.onnx", location: str = "m.onnx.data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(onnx.load(str(RESNET)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def _opset8_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])],
        "opset8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [w1, w2],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    onnx.save(m, str(path))


# --------------------------------------------------------------------------
# all subprocess runs, started together
# --------------------------------------------------------------------------


class Run:
    def __init__(self, name: str, folder: Path, args: list, expect: str = ""):
        self.name, self.folder, self.args, self.expect = name, folder, [str(a) for a in args], expect
        self.before = _snapshot(folder)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "surgery.cli", *self.args], cwd=folder, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.rc = self.stdout = self.stderr = None

    def wait(self) -> "Run":
        if self.rc is None:
            self.stdout, self.stderr = self.proc.communicate(timeout=300)
            self.rc = self.proc.returncode
        return self


def _bad_cases(root: Path) -> dict[str, tuple[Path, list, str]]:
    """name -> (folder, CLI args, a word the one-line error must contain)."""
    cases = {}

    def folder(name: str, model: Path | None = RESNET) -> Path:
        d = root / name
        d.mkdir()
        if model is not None:
            shutil.copy(model, d / "model.onnx")
        return d

    d = folder("missing_path", None)
    cases["missing_path"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "does not exist")
    d = folder("directory", None)
    (d / "model.onnx").mkdir()
    cases["directory"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "directory")
    d = folder("text_file", None)
    (d / "model.onnx").write_text("this is not a model\n")
    cases["text_file"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "not an ONNX")
    d = folder("truncated", None)
    data = RESNET.read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "truncated")
    d = folder("ratio_one")
    cases["ratio_one"] = (d, ["prune", "model.onnx", "--ratio", "1.0", "-o", "out.onnx"], "--ratio")
    d = folder("ratio_negative")
    cases["ratio_negative"] = (d, ["prune", "model.onnx", "--ratio", "-0.1", "-o", "out.onnx"], "--ratio")
    d = folder("unknown_criterion")
    cases["unknown_criterion"] = (d, ["prune", "model.onnx", "-c", "no_such_crit", "-o", "out.onnx"], "no_such_crit")
    d = folder("keep_unknown")
    cases["keep_unknown"] = (d, ["prune", "model.onnx", "--keep", "no_such_node", "-o", "out.onnx"], "no_such_node")
    d = folder("input_shape_malformed")
    cases["input_shape_malformed"] = (
        d, ["prune", "model.onnx", "--input-shape", "input1x3x32x32", "-o", "out.onnx"], "--input-shape")
    d = folder("output_is_input")
    cases["output_is_input"] = (d, ["prune", "model.onnx", "-o", "model.onnx"], "input model")
    d = folder("opset8", None)
    _opset8_model(d / "model.onnx")
    cases["opset8"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "opset 8")
    d = folder("external_data_missing", None)
    _ext_model(d, "model.onnx", "model.onnx.data")
    (d / "model.onnx.data").unlink()
    cases["external_data_missing"] = (d, ["prune", "model.onnx", "-o", "out.onnx"], "model.onnx.data")
    return cases


class Runs(dict):
    """name -> Run; reading one waits for that process only."""

    def __getitem__(self, name: str) -> Run:
        return super().__getitem__(name).wait()


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """Starts every subprocess of this file at once, when the module's first test runs.

    The in-process tests come first in this file and run while the processes work;
    the tests that read a run wait for it."""
    root = tmp_path_factory.mktemp("cli")
    runs = Runs()

    d = root / "prune_resnet"
    d.mkdir()
    shutil.copy(RESNET, d / "model.onnx")
    os.utime(d / "model.onnx", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    runs["prune"] = Run("prune", d, ["prune", "model.onnx", "--ratio", "0.5", "-o", "out.onnx",
                                     "--report", "report.json", "--plan", "plan.json"])
    for name, (folder, args, expect) in _bad_cases(root).items():
        runs[name] = Run(name, folder, args, expect)

    # a hand-edited plan that removes part of a coupled unit (made while the others run)
    import surgery

    plan = surgery.prune(str(RESNET), ratio=0.5, verify_result=False).plan.as_dict()
    entry = plan["groups"][0]["tensors"][0]
    entry["removed"] = entry["removed"][1:]  # one index of one tensor entry no longer listed
    d = root / "apply_partial_unit"
    d.mkdir()
    shutil.copy(RESNET, d / "model.onnx")
    (d / "plan.json").write_text(json.dumps(plan))
    runs["apply_partial_unit"] = Run("apply_partial_unit", d, ["apply", "model.onnx", "plan.json", "-o", "out.onnx"],
                                     "whole units")
    yield runs
    for r in dict.values(runs):
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


runner = CliRunner()


def _app():
    from surgery.cli import app

    return app


def _invoke_in(folder: Path, args: list):
    """CliRunner, with the current directory set to ``folder``."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return runner.invoke(_app(), [str(a) for a in args])
    finally:
        os.chdir(cwd)


# ==========================================================================
# in-process tests (run while the subprocesses work)
# ==========================================================================

# -- analyze ----------------------------------------------------------------


def test_analyze_lists_groups_and_block_reasons():
    res = runner.invoke(_app(), ["analyze", str(RESNET)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = ANSI.sub("", res.stdout)
    rows = {ln.split("│")[2].strip(): ln for ln in out.splitlines() if ln.count("│") >= 6}
    assert {"conv1.weight@1", "conv1.weight@0", "layer3.1.conv1.weight@0", "fc.weight@0"} <= set(rows)
    assert len(rows) == 11
    assert "blocked" in rows["conv1.weight@1"] and "graph input 'input'" in rows["conv1.weight@1"]
    assert "blocked" in rows["fc.weight@0"] and "graph output 'logits'" in rows["fc.weight@0"]
    assert "prunable" in rows["conv1.weight@0"] and "16/16" in rows["conv1.weight@0"]
    assert "9 of 11 groups prunable" in out


def test_analyze_json():
    res = runner.invoke(_app(), ["analyze", str(RESNET), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    groups = {g["name"]: g for g in data["groups"]}
    assert len(groups) == len(data["groups"]) == 11
    first_in = groups["conv1.weight@1"]
    assert first_in["status"] == "blocked" and "graph input 'input'" in first_in["why"]
    assert first_in["prunable_units"] == 0 and first_in["units"] == 3
    stem = groups["conv1.weight@0"]
    assert stem["status"] == "prunable" and stem["units"] == stem["prunable_units"] == 16
    assert "conv1.weight@0" in stem["tensors"] and "layer1.0.conv1.weight@1" in stem["tensors"]
    assert sum(g["status"] == "prunable" for g in groups.values()) == 9


# -- more bad input (in-process: variants and known bugs) ----------------------


def test_output_is_input_spelled_differently(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    before = _snapshot(tmp_path)
    res = _invoke_in(tmp_path, ["prune", tmp_path / "model.onnx", "-o", "./sub/../model.onnx"])
    assert res.exit_code == 2
    assert "input" in _one_error_line(res.stderr)
    assert _snapshot(tmp_path) == before


def test_input_shape_valid_override_is_used(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    res = _invoke_in(tmp_path, ["prune", "model.onnx", "--input-shape", "input:2x3x32x32", "-o", "out.onnx",
                                "--report", "r.json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["verify"]["exact"] is True


def test_input_shape_negative_dim_is_a_user_error(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    res = _invoke_in(tmp_path, ["prune", "model.onnx", "--input-shape", "input:-1x3x32x32", "-o", "out.onnx", "-q"])
    assert res.exit_code == 2, repr(res.exception)
    _one_error_line(res.stderr)
    assert not (tmp_path / "out.onnx").exists()


def test_input_shape_contradicting_static_dim_is_a_user_error(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    res = _invoke_in(tmp_path, ["prune", "model.onnx", "--input-shape", "input:1x4x32x32", "-o", "out.onnx", "-q"])
    assert res.exit_code == 2, repr(res.exception)
    _one_error_line(res.stderr)
    assert not (tmp_path / "out.onnx").exists()


def test_report_in_missing_folder_fails_cleanly(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    res = _invoke_in(tmp_path, ["prune", "model.onnx", "-o", "out.onnx", "--report", "nodir/r.json", "-q"])
    assert res.exit_code == 2, repr(res.exception)
    _one_error_line(res.stderr)
    assert not (tmp_path / "out.onnx").exists()


def test_report_path_equal_to_input_is_refused(tmp_path):
    shutil.copy(RESNET, tmp_path / "model.onnx")
    res = _invoke_in(tmp_path, ["prune", "model.onnx", "-o", "out.onnx", "--report", "model.onnx", "-q"])
    assert (tmp_path / "model.onnx").read_bytes() == RESNET.read_bytes(), "the input model was overwritten"
    assert res.exit_code == 2


# -- external data ----------------------------------------------------------


def _check_external_output(out: Path, x: np.ndarray) -> np.ndarray:
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".data"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {out.name + ".data"}
    onnx.checker.check_model(str(out))
    (y,) = _run(out, x)
    assert y.shape == (x.shape[0], 10)
    return y


def test_external_data_prune_from_model_folder(tmp_path):
    src = _ext_model(tmp_path / "in", "m.onnx", "m.onnx.data")
    before = _snapshot(tmp_path / "in")
    (tmp_path / "out").mkdir()
    res = _invoke_in(tmp_path / "in", ["prune", "m.onnx", "-o", tmp_path / "out" / "p.onnx", "-q",
                                       "--report", tmp_path / "r.json"])
    assert res.exit_code == 0, res.output
    assert _snapshot(tmp_path / "in") == before
    assert json.loads((tmp_path / "r.json").read_text())["verify"]["exact"] is True
    x = _image(3)
    got = _check_external_output(tmp_path / "out" / "p.onnx", x)
    # the same cut as pruning the embedded-weights model
    ref = tmp_path / "ref.onnx"
    assert runner.invoke(_app(), ["prune", str(RESNET), "-o", str(ref), "-q"]).exit_code == 0
    (want,) = _run(ref, x)
    assert np.abs(want - got).max() <= 1e-5
    assert src.exists()


def test_external_data_prune_from_another_folder(tmp_path):
    src = _ext_model(tmp_path / "in", "m.onnx", "m.onnx.data")
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    res = runner.invoke(_app(), ["prune", str(src), "-o", str(out), "-q"])  # cwd is not the model's folder
    assert _snapshot(tmp_path / "in") == before
    assert res.exit_code == 0, res.output
    _check_external_output(out, _image(3))


def test_output_data_file_never_clobbers_input_data(tmp_path):
    src = _ext_model(tmp_path, "model.onnx", "m.onnx.data")
    data = (tmp_path / "m.onnx.data").read_bytes()
    _invoke_in(tmp_path, ["prune", "model.onnx", "-o", "m.onnx", "-q"])
    assert (tmp_path / "m.onnx.data").read_bytes() == data, "the input model's external data was overwritten"
    _run(src, _image(1))


# -- quiet, ratio 0, no-verify -------------------------------------------------


def test_quiet_prints_nothing(tmp_path):
    res = runner.invoke(_app(), ["prune", str(MOBILENET), "--quiet", "-o", str(tmp_path / "out.onnx")])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    assert res.stderr == ""
    assert (tmp_path / "out.onnx").exists()
    loud = runner.invoke(_app(), ["prune", str(MOBILENET), "-o", str(tmp_path / "out2.onnx")])
    assert loud.exit_code == 0 and "parameters" in loud.stdout  # the contrast: a summary without --quiet


def test_ratio_zero_is_bitwise_identical(tmp_path):
    out = tmp_path / "out.onnx"
    res = runner.invoke(_app(), ["prune", str(MOBILENET), "--ratio", "0", "-o", str(out), "-q",
                                 "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["groups_pruned"] == 0 and rep["params_after"] == rep["params_before"]
    x = _image(3, seed=3)
    (want,), (got,) = _run(MOBILENET, x), _run(out, x)
    assert want.dtype == got.dtype and want.shape == got.shape
    assert np.array_equal(want, got)
    assert _io(onnx.load(str(out))) == _io(onnx.load(str(MOBILENET)))


def test_no_verify_report_is_strict_json(tmp_path):
    res = runner.invoke(_app(), ["prune", str(RESNET), "-o", str(tmp_path / "o.onnx"), "--no-verify", "-q",
                                 "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output

    def reject(token):
        raise ValueError(f"not JSON: {token}")

    json.loads((tmp_path / "r.json").read_text(), parse_constant=reject)


# -- the plan can be checked without this code ----------------------------------


def test_plan_names_stored_tensors_of_input_model(tmp_path):
    import surgery

    proto = build("constant_subgraph-ir")
    src = tmp_path / "model.onnx"
    onnx.save(proto, str(src))
    res = surgery.prune(str(src), ratio=0.5)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    masked = _mask(proto, res.plan.as_dict())  # fails: 'transpose_9', 'mul_14' are not stored tensors
    (want,), (got,) = _run(masked, x), _run(res.onnx, x)
    assert np.abs(want - got).max() <= 1e-4


# ==========================================================================
# subprocess tests (read the runs started by the `cli` fixture)
# ==========================================================================

# -- prune: outputs -----------------------------------------------------------


def test_prune_writes_model_report_and_plan(cli):
    r = cli["prune"]
    assert r.rc == 0, r.stderr
    names = {p.name for p in r.folder.iterdir()}
    assert names == {"model.onnx", "out.onnx", "report.json", "plan.json"}, names  # no stray temporaries


def test_prune_report_keys_and_values(cli):
    r = cli["prune"]
    rep = json.loads((r.folder / "report.json").read_text())
    assert REPORT_KEYS <= set(rep), REPORT_KEYS - set(rep)
    assert set(rep["verify"]) == VERIFY_KEYS
    for k in ("params_before", "params_after", "flops_before", "flops_after",
              "groups_total", "groups_prunable", "groups_pruned"):
        assert isinstance(rep[k], int) and rep[k] >= 0, k
    assert rep["params_after"] < rep["params_before"]
    assert rep["flops_after"] < rep["flops_before"]
    assert (rep["groups_total"], rep["groups_prunable"], rep["groups_pruned"]) == (11, 9, 9)
    assert isinstance(rep["seconds"], float) and rep["seconds"] > 0
    assert rep["verify"]["exact"] is True
    assert 0 <= rep["verify"]["max_abs_diff"] <= 1e-4
    assert isinstance(rep["verify"]["why"], str) and rep["verify"]["why"]
    # the report's parameter counts are the files' own
    count = lambda m: sum(math.prod(t.dims) for t in m.graph.initializer)  # noqa: E731
    assert rep["params_before"] == count(onnx.load(str(RESNET)))
    assert rep["params_after"] == count(onnx.load(str(r.folder / "out.onnx")))


def test_prune_leaves_input_bytes_and_mtime(cli):
    src = cli["prune"].folder / "model.onnx"
    assert src.read_bytes() == RESNET.read_bytes()
    assert src.stat().st_mtime_ns == 1_000_000_000_000_000_000


def test_pruned_model_same_interface_and_runs(cli):
    out = cli["prune"].folder / "out.onnx"
    pruned, original = onnx.load(str(out)), onnx.load(str(RESNET))
    onnx.checker.check_model(pruned, full_check=True)
    assert _io(pruned) == _io(original)
    assert _dims(pruned.graph.input[0])[0] == "batch"  # symbolic batch stays symbolic
    assert _dims(pruned.graph.output[0])[0] == "batch"
    sess = _session(out)
    for batch in (1, 3):
        (y,) = sess.run(None, {"input": _image(batch)})
        assert y.shape == (batch, 10)
        assert np.isfinite(y).all()
    assert sum(w.size for w in _weights(pruned).values()) < sum(w.size for w in _weights(original).values())


def test_plan_json_structure(cli):
    plan = json.loads((cli["prune"].folder / "plan.json").read_text())
    weights = _weights(onnx.load(str(RESNET)))
    assert plan["groups"], "ratio 0.5 pruned nothing"
    ids = [g["id"] for g in plan["groups"]]
    assert len(set(ids)) == len(ids)
    for g in plan["groups"]:
        assert {"id", "name", "unit", "units", "units_removed", "removed_units", "tensors"} <= set(g)
        assert isinstance(g["id"], int) and isinstance(g["unit"], int) and g["unit"] >= 1
        assert g["units_removed"] == len(g["removed_units"]) == math.floor(0.5 * g["units"])
        assert 0 < g["units_removed"] < g["units"]
        assert len(set(g["removed_units"])) == len(g["removed_units"])
        assert all(0 <= u < g["units"] for u in g["removed_units"])
        assert g["tensors"]
        for t in g["tensors"]:
            assert set(t) == {"tensor", "axis", "removed"}
            assert t["tensor"] in weights, f"{t['tensor']} is not a tensor of the input model"
            shape = weights[t["tensor"]].shape
            assert 0 <= t["axis"] < len(shape)
            assert t["removed"] == sorted(set(t["removed"]))
            assert all(0 <= i < shape[t["axis"]] for i in t["removed"])
            # resnet_tiny: one unit is one channel in every tensor it touches
            assert len(t["removed"]) == g["units_removed"] * g["unit"]


def test_plan_zeroing_matches_pruned_outputs(cli):
    """Anyone can check the cut: zero the plan's slices in the input model, compare."""
    folder = cli["prune"].folder
    plan = json.loads((folder / "plan.json").read_text())
    original = onnx.load(str(RESNET))
    masked = _mask(original, plan)
    x = _image(2, seed=7)
    (want,), (got,) = _run(masked, x), _run(folder / "out.onnx", x)
    assert np.abs(want - got).max() <= 1e-4
    (orig,) = _run(original, x)
    assert np.abs(orig - got).max() > 1e-3  # the cut did change the function


# -- apply ----------------------------------------------------------------------


def test_apply_saved_plan_reproduces_prune(cli, tmp_path):
    folder = cli["prune"].folder
    res = runner.invoke(_app(), ["apply", str(folder / "model.onnx"), str(folder / "plan.json"),
                                 "-o", str(tmp_path / "applied.onnx"), "--quiet"])
    assert res.exit_code == 0, res.output
    a, b = _weights(onnx.load(str(tmp_path / "applied.onnx"))), _weights(onnx.load(str(folder / "out.onnx")))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def test_apply_partial_unit_plan_fails(cli):
    r = cli["apply_partial_unit"]
    assert r.rc == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "whole units" in line
    assert r.stdout.strip() == ""
    assert not (r.folder / "out.onnx").exists()
    assert _snapshot(r.folder) == r.before


def _edited_plan(cli, tmp_path: Path, edit) -> Path:
    plan = json.loads((cli["prune"].folder / "plan.json").read_text())
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    shutil.copy(RESNET, tmp_path / "model.onnx")
    return tmp_path / "plan.json"


def test_apply_plan_missing_a_coupled_tensor_fails(cli, tmp_path):
    _edited_plan(cli, tmp_path, lambda p: p["groups"][0]["tensors"].pop(1))  # drop one coupled tensor entry
    before = _snapshot(tmp_path)
    res = _invoke_in(tmp_path, ["apply", "model.onnx", "plan.json", "-o", "out.onnx"])
    assert res.exit_code == 2
    assert "not listed" in _one_error_line(res.stderr)
    assert _snapshot(tmp_path) == before


def test_apply_malformed_plan_is_a_user_error(cli, tmp_path):
    _edited_plan(cli, tmp_path, lambda p: p["groups"][0]["tensors"][0].pop("tensor"))
    res = _invoke_in(tmp_path, ["apply", "model.onnx", "plan.json", "-o", "out.onnx"])
    assert res.exit_code == 2, repr(res.exception)
    _one_error_line(res.stderr)
    assert not (tmp_path / "out.onnx").exists()


def test_apply_rejects_plan_that_empties_a_group(cli, tmp_path):
    def empty_first_group(plan):
        g = plan["groups"][0]
        for t in g["tensors"]:
            t["removed"] = list(range(g["units"] * g["unit"]))

    _edited_plan(cli, tmp_path, empty_first_group)
    res = _invoke_in(tmp_path, ["apply", "model.onnx", "plan.json", "-o", "out.onnx", "-q"])
    assert res.exit_code == 2
    assert not (tmp_path / "out.onnx").exists()


# -- bad input: exit 2, one line on stderr, nothing written, input untouched ------

BAD = ["missing_path", "directory", "text_file", "truncated", "ratio_one", "ratio_negative", "unknown_criterion",
       "keep_unknown", "input_shape_malformed", "output_is_input", "opset8", "external_data_missing"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input(cli, case):
    r = cli[case]
    assert r.rc == 2, f"rc={r.rc}\n{r.stderr}"
    line = _one_error_line(r.stderr)
    assert line.startswith("error:"), line
    assert r.expect in line, line
    assert r.stdout.strip() == ""
    assert not (r.folder / "out.onnx").exists()
    assert _snapshot(r.folder) == r.before  # no output, no temporaries, input bytes and mtime as they were
