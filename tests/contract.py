"""The command line's contract with an unattended caller, as a checker.

Every run of ``surgery`` ends one of two ways:

- exit 0 and an output that onnxruntime loads and runs (with ``--no-verify``: loads;
  when the input itself does not load in this onnxruntime, a plain "not validated"
  on stderr);
- exit 2, exactly one line on stderr, and no file left behind.

Either way no traceback is printed, the run finishes within its time and memory
budget, and every file that was in the input's folder before the run is
byte-identical after it. ``run_cli`` runs one case in a subprocess under a memory
cap and a timeout and returns the broken clauses (empty when the contract held).
Used by tests/test_hostile.py (one case per known finding) and tests/test_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

import surgery

_SITE = str(Path(surgery.__file__).resolve().parents[1])


@dataclasses.dataclass
class Outcome:
    code: int | None  # None: timed out
    stderr: str
    broken: list[str]  # the clauses the run broke

    @property
    def last_line(self) -> str:
        """The last stderr line that is not a box of rich's traceback (the exception)."""
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip() and ln.strip()[0] not in "│╭╰─"]
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        return f"exit {self.code}; broken: {self.broken}; stderr ends: {self.last_line[:400]!r}"


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> sha256 (or file type) of every entry under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            p = Path(root) / name
            if p.is_symlink() or not p.is_file():
                out[str(p)] = "dir" if p.is_dir() else "special"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _limits(mem_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    return apply


def env() -> dict:
    """The environment of a CLI subprocess: the package this process imported (the
    editable install, or an import tree on PYTHONPATH: the repo folder itself is not one,
    its subpackages live beside surgery/), wide plain output."""
    e = dict(os.environ)
    e.setdefault("PYTHONPATH", _SITE)
    e.update(COLUMNS="200", NO_COLOR="1")
    e.pop("FORCE_COLOR", None)
    return e


def run_cli(args: list[str], folder: Path, outputs: list[Path] = (), *, timeout: float = 120,
            mem_mb: int = 3072, watch: list[Path] = ()) -> Outcome:
    """Run ``surgery ARGS`` and check the contract; ``outputs`` are the files exit 0 must
    write (the first is the model), ``watch`` extra folders whose files must not change."""
    folders = [folder, *watch]
    before = {k: v for f in folders for k, v in snapshot(f).items()}
    try:
        p = subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True, text=True,
                           errors="replace", timeout=timeout, env=env(), preexec_fn=_limits(mem_mb),
                           stdin=subprocess.DEVNULL)
        code, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    after = {k: v for f in folders for k, v in snapshot(f).items()}
    broken = []
    if code is None:
        broken.append("hang")
    if "Traceback" in stderr:
        broken.append("traceback")
    if "MemoryError" in stderr:
        broken.append("memory")
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        broken.append(f"changed {changed}")
    new = sorted(set(after) - set(before))
    if code == 0:
        if "not validated" not in stderr:  # said plainly: ops this onnxruntime lacks
            broken += _check_outputs(outputs, new, run="--no-verify" not in args)
    elif code == 2:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if len(lines) != 1:
            broken.append(f"{len(lines)} stderr lines")
        if new:
            broken.append(f"left {new}")
    elif code is not None:
        broken.append(f"exit {code}")
    return Outcome(code, stderr, broken)


def _check_outputs(outputs, new, run: bool = True) -> list[str]:
    """The output exists and loads in onnxruntime; unless ``run`` is False (``--no-verify``
    promises a model that loads, not one that runs: the input may not run either), it runs."""
    if not outputs:
        return []
    model = Path(outputs[0])
    if str(model) not in new and not model.is_file():
        return [f"no output {model}"]
    try:
        run_model(model, run=run)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return [f"output does not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
    return []


_NP = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
       "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def run_model(path: Path, run: bool = True) -> list:
    """Load ``path`` in onnxruntime and run it on small random inputs (symbolic dims 1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if not run:
        return []
    rng = np.random.default_rng(0)
    feeds = {}
    for i in s.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dt = _NP.get(i.type, np.float32)
        feeds[i.name] = (rng.standard_normal(shape) if np.issubdtype(dt, np.floating)
                         else np.zeros(shape)).astype(dt)
    return s.run(None, feeds)
