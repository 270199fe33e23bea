"""The README's plugin example runs as printed and its first command works."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_criterion_example_runs_and_cuts_exactly(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "@surgery.criterion" in b)
    block = block.replace('"model.onnx"', repr(str(ROOT / "models" / "resnet_tiny.onnx")))
    ns: dict = {}
    exec(compile(block.replace("surgery.prune(", "RESULT = surgery.prune("), "README", "exec"), ns)
    rep = ns["RESULT"].report
    assert rep["verify"]["exact"] is True and rep["params_after"] < rep["params_before"]


def test_readme_first_command_prunes_a_shipped_model(tmp_path):
    out = tmp_path / "r.onnx"
    cmd = [sys.executable, "-m", "surgery.cli", "prune", str(ROOT / "models" / "resnet_tiny.onnx"), "-o", str(out), "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert out.exists() and out.stat().st_size < (ROOT / "models" / "resnet_tiny.onnx").stat().st_size
