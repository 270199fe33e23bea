"""Helpers shared by the benchmark scripts in bench/ (imported as ``common``: each
script puts bench/ and the repo root on sys.path before importing it)."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
from pathlib import Path

#: the libraries every benchmark reports, after any extra ones a caller asks for
COMMON_MODULES = ("numpy", "onnx", "onnxruntime")


def _module_version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return "not installed"


def machine(*extra_modules: str) -> dict:
    """The machine and library versions a benchmark prints in its header and writes to JSON.

    Keys, in order: ``nproc`` (the CPUs this process may use), ``cpu`` (the model name
    from /proc/cpuinfo), ``loadavg`` (1, 5, 15 minutes), ``python``, the ``__version__``
    of each of ``extra_modules`` (e.g. ``"torch"``, ``"transformers"``) and of
    numpy, onnx, onnxruntime (``"not installed"`` for a module that does not import),
    and ``surgery``.
    """
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import surgery

    info = {"nproc": usable, "cpu": cpu, "loadavg": load, "python": platform.python_version()}
    for name in dict.fromkeys(extra_modules + COMMON_MODULES):
        info[name] = _module_version(name)
    info["surgery"] = getattr(surgery, "__version__", "?")
    return info


def finish(console, json_path, payload: dict, failures: list) -> int:
    """Write ``payload`` (plus the failures) as JSON when asked, print each failure's
    traceback, and give the exit status: 1 if anything failed."""
    if json_path:
        Path(json_path).write_text(json.dumps({**payload, "failures": failures}, indent=1, default=str))
    for name, tb in failures:
        console.print(f"[red]{name} failed:[/red]")
        console.print(tb, markup=False, highlight=False)
    return 1 if failures else 0


def verdict(v: dict | None) -> str:
    """A verification result (``report["verify"]``) as a table cell (rich markup)."""
    if not v:
        return "-"
    if v.get("exact") is True:
        return f"exact ({v['max_abs_diff']:.0e})"
    if v.get("exact") is False:
        d = v.get("max_abs_diff")
        return f"[red]NOT exact ({d:.1e})[/red]" if d == d else "[red]NOT exact[/red]"
    return v.get("why") or "-"


def loglog_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares k in y ~ c * x**k (1 = linear); None with fewer than two positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    if den == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den
