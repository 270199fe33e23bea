"""Depth and scale: seconds and peak RSS of ``surgery prune`` against node count, on long chains.

    python bench/scale.py [--sizes 1000,10000,100000] [--kind conv|mlp] [--ratio 0.5]
                          [--no-verify] [--both] [--json PATH]

For every size it builds a chain of small blocks (``tests/deep_graphs.py``: Conv 1x1
8->8 + Relu, or MatMul + Add + Relu) with about that many nodes, writes it to a
temporary folder (both in a subprocess, so this process stays small: see
``build_chain``), and runs the real command line in a fresh subprocess:

    python -m surgery.cli prune chain.onnx --ratio 0.5 -o out.onnx -q --report r.json

The subprocess's wall time is measured around it, its CPU time and peak RSS come
from ``os.wait4`` (the kernel's per-child ``ru_maxrss``: one child's own high-water
mark, not the maximum over every child so far). A tiny chain run first gives the
fixed costs (interpreter, imports, onnxruntime's first session) that every run pays;
the ``net`` columns subtract them. On a shared machine wall seconds include time spent
waiting for a CPU; CPU seconds (user + system of the child) do not. Below the table: the growth exponent ``k`` of a
least-squares fit ``y ~ nodes^k`` over all sizes (1 = linear), for the whole command
and net of the fixed costs. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "tests"), str(_ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import deep_graphs  # noqa: E402
from common import finish, loglog_exponent, machine, verdict  # noqa: E402

STAGES = ("load", "analysis", "plan", "emit", "verify")
BASELINE_NODES = 20


def run_cli(model: Path, out: Path, report: Path, ratio: float, verify: bool) -> dict:
    """One ``surgery prune`` in a subprocess: wall and CPU seconds, peak RSS, exit code, report."""
    cmd = [sys.executable, "-m", "surgery.cli", "prune", str(model), "--ratio", str(ratio),
           "-o", str(out), "-q", "--report", str(report)]
    if not verify:
        cmd.append("--no-verify")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=model.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # os.wait4 reaps the child and returns its own rusage (RUSAGE_CHILDREN would be the
    # maximum over every child so far); two threads drain its pipes meanwhile
    chunks: dict[str, bytes] = {}
    drains = [threading.Thread(target=lambda n=n, p=p: chunks.__setitem__(n, p.read()))
              for n, p in (("out", proc.stdout), ("err", proc.stderr))]
    for t in drains:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    for t in drains:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = chunks.get("out", b""), chunks.get("err", b"")
    rep = json.loads(report.read_text()) if proc.returncode == 0 and report.is_file() else None
    return {
        "cmd": cmd, "exit": proc.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "report": rep, "stderr": stderr.decode(errors="replace")[-2000:], "stdout": stdout.decode(errors="replace")[-500:],
        "in_bytes": model.stat().st_size, "out_bytes": out.stat().st_size if out.is_file() else None,
    }


_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
import onnx, deep_graphs
m = deep_graphs.chain(int(sys.argv[2]), sys.argv[3])
onnx.save(m, sys.argv[4])
print(len(m.graph.node))
"""


def build_chain(n: int, kind: str, path: Path) -> int:
    """Build and save the chain in a subprocess of its own; return its node count.

    The parent must stay small: a child's ``ru_maxrss`` starts from the RSS of the
    process it was forked from (Linux keeps the high-water mark across exec), so a
    parent that had held a 100k-node model would inflate every later measurement."""
    r = subprocess.run([sys.executable, "-c", _BUILD, str(_ROOT / "tests"), str(n), kind, str(path)],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def bench(sizes: list[int], kind: str, ratio: float, verify: bool, console: Console, tmp: Path) -> tuple[dict, list]:
    rows: dict = {}
    failures: list = []
    for n in [BASELINE_NODES, *sizes]:
        t0 = time.perf_counter()
        path = tmp / f"chain_{kind}_{n}.onnx"
        nodes = build_chain(n, kind, path)
        build = time.perf_counter() - t0
        console.print(f"  {nodes:,} nodes: built in {build:.1f} s, pruning (verify {'on' if verify else 'off'}) ...")
        r = run_cli(path, tmp / f"out_{kind}_{n}.onnx", tmp / f"report_{kind}_{n}.json", ratio, verify)
        if n == BASELINE_NODES:  # the fixed costs: the better of two runs (the first one warms the file caches)
            again = run_cli(path, tmp / f"out_{kind}_{n}.onnx", tmp / f"report_{kind}_{n}.json", ratio, verify)
            r = min(r, again, key=lambda x: x["cpu"])
        r["nodes"] = nodes
        r["build"] = build
        if r["exit"] != 0:
            failures.append((f"{nodes} nodes", f"exit {r['exit']}\n{r['stderr']}"))
        rows[n] = r
        for p in (path, tmp / f"out_{kind}_{n}.onnx"):
            p.unlink(missing_ok=True)
    return rows, failures


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def table_for(rows: dict, sizes: list[int], verify: bool, console: Console) -> dict:
    base = rows[BASELINE_NODES]
    t = Table(title=f"surgery prune on a chain, one subprocess per size (verify {'on' if verify else 'off'})")
    for col in ("nodes", "seconds", "net s", "cpu s", "net cpu s", "peak RSS MB", "net MB", "load", "analysis", "plan", "emit",
                "verify", "out/in bytes", "verified"):
        t.add_column(col, justify="left" if col == "verified" else "right")
    for n in [BASELINE_NODES, *sizes]:
        r = rows[n]
        rep = r["report"] or {}
        tm = rep.get("timings", {})
        net_s = r["wall"] - base["wall"] if n != BASELINE_NODES else None
        net_cpu = r["cpu"] - base["cpu"] if n != BASELINE_NODES else None
        net_mb = r["peak_mb"] - base["peak_mb"] if n != BASELINE_NODES else None
        r["net_s"], r["net_cpu"], r["net_mb"] = net_s, net_cpu, net_mb
        ratio = f"{r['out_bytes'] / r['in_bytes']:.2f}" if r["out_bytes"] else "-"
        ver = verdict(rep.get("verify")) if verify else "off"
        if r["exit"] != 0:
            ver = f"[red]exit {r['exit']}[/red]"
        t.add_row(f"{r['nodes']:,}" + (" (fixed)" if n == BASELINE_NODES else ""), _s(r["wall"]), _s(net_s),
                  _s(r["cpu"]), _s(net_cpu), f"{r['peak_mb']:.0f}", "-" if net_mb is None else f"{net_mb:.0f}",
                  *[_s(tm.get(s)) for s in STAGES], ratio, ver)
    console.print(t)
    ok = [rows[n] for n in sizes if rows[n]["exit"] == 0]
    xs = [r["nodes"] for r in ok]
    fits = {
        "seconds": loglog_exponent(xs, [r["wall"] for r in ok]),
        "net seconds": loglog_exponent(xs, [r["net_s"] for r in ok]),
        "cpu seconds": loglog_exponent(xs, [r["cpu"] for r in ok]),
        "net cpu seconds": loglog_exponent(xs, [r["net_cpu"] for r in ok]),
        "peak RSS": loglog_exponent(xs, [r["peak_mb"] for r in ok]),
        "net RSS": loglog_exponent(xs, [r["net_mb"] for r in ok]),
    }
    for s in STAGES:
        fits[f"stage {s}"] = loglog_exponent(xs, [(r["report"] or {}).get("timings", {}).get(s, 0) for r in ok])
    shown = ", ".join(f"{k} {v:.2f}" for k, v in fits.items() if v is not None and not k.startswith("stage"))
    console.print(f"growth exponent k (y ~ nodes^k, least squares over {len(ok)} sizes): {shown}", soft_wrap=True)
    stages = ", ".join(f"{k[6:]} {v:.2f}" for k, v in fits.items() if v is not None and k.startswith("stage"))
    console.print(f"  per stage (report timings): {stages}", soft_wrap=True)
    return fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="node counts, comma-separated")
    parser.add_argument("--kind", choices=sorted(deep_graphs.NODES_PER_BLOCK), default="conv",
                        help="block of the chain: conv (Conv+Relu) or mlp (MatMul+Add+Relu)")
    parser.add_argument("--ratio", type=float, default=0.5, help="passed to --ratio (default 0.5)")
    parser.add_argument("--no-verify", action="store_true", help="pass --no-verify (no onnxruntime check)")
    parser.add_argument("--both", action="store_true", help="run every size with verification on, then off")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes must be comma-separated integers")

    console = Console(width=max(Console().width, 150))
    m = machine()
    import surgery

    console.print(f"[bold]Machine[/bold]: {m['nproc']} CPUs (nproc), {m['cpu']}; "
                  f"load average {m['loadavg'][0]:.2f} {m['loadavg'][1]:.2f} {m['loadavg'][2]:.2f} at start")
    console.print(f"Python {m['python']}, numpy {m['numpy']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, "
                  f"surgery {m['surgery']} from {Path(surgery.__file__).parent}")
    console.print(f"chain of '{args.kind}' blocks ({deep_graphs.NODES_PER_BLOCK[args.kind]} nodes each), "
                  f"--ratio {args.ratio}")
    modes = [True, False] if args.both else [not args.no_verify]
    payload: dict = {"machine": m, "args": vars(args), "runs": {}}
    failures: list = []
    with tempfile.TemporaryDirectory(prefix="surgery-scale-") as d:
        for verify in modes:
            rows, fails = bench(sizes, args.kind, args.ratio, verify, console, Path(d))
            failures += fails
            fits = table_for(rows, sizes, verify, console)
            payload["runs"]["verify" if verify else "no-verify"] = {"rows": rows, "fits": fits}
    try:
        load = os.getloadavg()
        console.print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    return finish(console, args.json, payload, failures)


if __name__ == "__main__":
    raise SystemExit(main())
