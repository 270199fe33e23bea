"""Speed benchmark: per-stage seconds of ``surgery.prune`` on synthetic graphs of growing depth.

    python bench/surgery_time.py [--only SUBSTR] [--ratio 0.5] [--repeat 3] [--no-verify]
                                 [--mem {rss,tracemalloc,none}] [--json PATH]

For every graph of :func:`synthetic.graphs` (tiny ones, MobileNet-v2, ResNet-18..152,
DenseNet-121..201) it builds the ONNX model, runs the public API
``surgery.prune(proto, ratio=..., verify_result=...)`` and reads the per-stage
seconds from ``res.report["timings"]`` (load / analysis / plan / emit / verify).
Each stage shows the best (minimum) of ``--repeat`` runs; the model is rebuilt for
every run because ``prune`` mutates the model it loads. See bench/README.md for
what each column means.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import resource
import sys
import time
import tracemalloc
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# Running ``python bench/surgery_time.py`` puts bench/ (not the repo root) first on
# sys.path; put the repo root first so ``import surgery`` is the regular package
# (an editable install that maps ``surgery`` as a namespace package would otherwise
# shadow ``surgery/__init__.py`` and its lazy ``prune``/``load`` attributes).
for _p in (str(_ROOT / "bench"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import onnx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import surgery  # noqa: E402
import synthetic  # noqa: E402
from common import finish, loglog_exponent, machine, verdict  # noqa: E402

STAGES = ("load", "analysis", "plan", "emit", "verify")
#: the speed target: analysis+plan+emit under this many seconds for these graphs
TARGET_S = 1.0
TARGET_GRAPHS = ("resnet-50", "densenet-201")
REFERENCE = (
    "Reference (leading PyTorch pruning library, build+prune, this machine): "
    "ResNet-50 ~0.2-0.45 s; DenseNet-201 18 s (idle) to 42 s (busy)."
)


# --------------------------------------------------------------------------- memory


def _statm_rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: ``echo 5 > clear_refs``),
    so that ``getrusage().ru_maxrss`` afterwards is the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so the baseline RSS is not inflated by
    the previous run's freed-but-kept arenas (which the next run would reuse unseen)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_supported() -> bool:
    return sys.platform.startswith("linux") and _reset_peak_rss()


# --------------------------------------------------------------------------- runs


def param_count(proto: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in proto.graph.initializer)


def one_run(build, ratio: float, verify: bool, mem: str) -> dict:
    """Build the graph, prune it once; return timings (+ peak memory when ``mem``)."""
    t0 = time.perf_counter()
    proto = build()
    t_build = time.perf_counter() - t0
    nodes, params = len(proto.graph.node), param_count(proto)
    gc.collect()
    peak_mb = None
    if mem == "rss":
        _malloc_trim()
        _reset_peak_rss()
        base = _statm_rss_bytes()
    elif mem == "tracemalloc":
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    res = surgery.prune(proto, ratio=ratio, verify_result=verify)
    if mem == "rss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        peak_mb = max(0, peak - base) / 2**20
    elif mem == "tracemalloc":
        peak_mb = max(0, tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()
    rep = res.report
    out = {
        "build": t_build,
        **{s: rep["timings"].get(s) for s in STAGES},
        "nodes": nodes,
        "params": params,
        "params_after": rep.get("params_after"),
        "groups_pruned": rep.get("groups_pruned"),
        "verify_result": rep.get("verify"),
        "peak_mb": peak_mb,
    }
    del res, proto
    gc.collect()
    return out


def bench_graph(build, args, mem: str) -> dict:
    runs = []
    # rss is read for free in the timed runs; tracemalloc slows the pipeline
    # severalfold, so it gets one extra untimed run of its own.
    for _ in range(args.repeat):
        runs.append(one_run(build, args.ratio, not args.no_verify, mem if mem == "rss" else "none"))
    row = {k: runs[0][k] for k in ("nodes", "params", "params_after", "groups_pruned", "verify_result")}
    for s in ("build", *STAGES):
        vals = [r[s] for r in runs if r[s] is not None]
        row[s] = min(vals) if vals else None
    # sums are the best run's sum (a time one run achieved), not the sum of per-stage minima
    row["ape"] = min(r["analysis"] + r["plan"] + r["emit"] for r in runs)
    row["total"] = min(sum(r[s] or 0.0 for s in STAGES) for r in runs)
    if mem == "rss":
        row["peak_mb"] = max(r["peak_mb"] for r in runs)
    elif mem == "tracemalloc":
        row["peak_mb"] = one_run(build, args.ratio, not args.no_verify, "tracemalloc")["peak_mb"]
    else:
        row["peak_mb"] = None
    row["runs"] = runs
    return row


def family(name: str) -> str | None:
    """Growth family of a graph; tiny graphs (dominated by fixed costs) have none."""
    if "tiny" in name or name == "grouped-cnn":
        return None
    return name.split("-", 1)[0]


# --------------------------------------------------------------------------- output


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only graphs whose name contains this substring")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of units removed per group (default 0.5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per graph; each stage shows the best (default 3)")
    parser.add_argument("--no-verify", action="store_true", help="skip onnxruntime + mask-equivalence verification")
    parser.add_argument("--mem", choices=("rss", "tracemalloc", "none"), default="rss",
                        help="peak memory: RSS high-water delta of the prune() call (default; Linux), "
                             "tracemalloc peak (one extra untimed run), or none")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    console = Console(width=max(Console().width, 150))
    mem = args.mem
    if mem == "rss" and not rss_supported():
        console.print("[yellow]RSS high-water reset unavailable here; falling back to --mem tracemalloc[/yellow]")
        mem = "tracemalloc"

    m = machine()
    console.print(f"[bold]Machine[/bold]: {m['nproc']} CPUs (nproc), {m['cpu']}; "
                  f"load average {m['loadavg'][0]:.2f} {m['loadavg'][1]:.2f} {m['loadavg'][2]:.2f} at start")
    console.print(f"Python {m['python']}, numpy {m['numpy']}, onnx {m['onnx']}, "
                  f"onnxruntime {m['onnxruntime']}, surgery {m['surgery']}")
    console.print(REFERENCE)
    console.print(f"ratio={args.ratio}, best of {args.repeat} run(s) per stage, "
                  f"verify={'off' if args.no_verify else 'on'}, memory={mem}; "
                  f"target: analysis+plan+emit < {TARGET_S:g} s for {' and '.join(TARGET_GRAPHS)}")

    selected = [(n, b) for n, b in synthetic.graphs() if args.only in n]
    if not selected:
        console.print(f"no graph name contains {args.only!r}")
        return 2

    # Warm-up (not reported): imports, onnxruntime's first session, numpy/scipy paths.
    warm = dict(synthetic.graphs())["resnet-tiny"]
    surgery.prune(warm(), ratio=args.ratio, verify_result=not args.no_verify)

    mem_head = {"rss": "peak MB\n(RSS Δ)", "tracemalloc": "peak MB\n(tracemalloc)", "none": "peak MB"}[mem]
    table = Table(title="surgery.prune: seconds per stage (best of runs)", show_lines=False)
    for col, just in [("graph", "left"), ("nodes", "right"), ("params", "right"), ("build", "right"),
                      ("load", "right"), ("analysis", "right"), ("plan", "right"), ("emit", "right"),
                      ("verify", "right"), ("analysis+\nplan+emit", "right"), ("total", "right"),
                      (mem_head, "right"), ("verified", "left")]:
        table.add_column(col, justify=just)

    results: dict[str, dict] = {}
    failures: list[tuple[str, str]] = []
    with console.status("") as status:
        for name, build in selected:
            status.update(f"{name} ...")
            try:
                row = bench_graph(build, args, mem)
            except Exception:  # noqa: BLE001 - report and go on with the next graph
                tb = traceback.format_exc()
                failures.append((name, tb))
                table.add_row(name, *["-"] * 11, "[red]FAILED[/red]")
                console.print(f"  {name}: FAILED ({tb.strip().splitlines()[-1]})")
                continue
            results[name] = row
            ape = _s(row["ape"])
            if name in TARGET_GRAPHS:
                ok = row["ape"] < TARGET_S
                ape = f"[{'green' if ok else 'red'}]{ape} {'<' if ok else '>='} {TARGET_S:g}[/]"
            table.add_row(
                name, f"{row['nodes']:,}", f"{row['params']:,}", _s(row["build"]),
                *[_s(row[s]) for s in STAGES], ape, _s(row["total"]),
                "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}",
                verdict(row["verify_result"]) if not args.no_verify else "off",
            )
            console.print(f"  {name}: analysis+plan+emit {row['ape']:.3f} s, total {row['total']:.3f} s")

    console.print(table)

    # Growth: analysis+plan+emit seconds per 1000 nodes, per family, by size.
    fams: dict[str, list[tuple[str, dict]]] = {}
    for name, row in results.items():
        f = family(name)
        if f:
            fams.setdefault(f, []).append((name, row))
    for f, rows in fams.items():
        rows.sort(key=lambda r: r[1]["nodes"])
        parts = [f"{n.split('-', 1)[1]} ({r['nodes']} nodes) {r['ape'] / r['nodes'] * 1000:.2f}" for n, r in rows]
        k = loglog_exponent([r["nodes"] for _, r in rows], [r["ape"] for _, r in rows])
        kp = loglog_exponent([r["params"] for _, r in rows], [r["ape"] for _, r in rows])
        tail = f"; fit: time ~ nodes^{k:.2f}, ~ params^{kp:.2f}" if k is not None else ""
        console.print(f"growth {f}: s per 1000 nodes of analysis+plan+emit: {', '.join(parts)}{tail}",
                      soft_wrap=True)

    if not args.no_verify:
        console.print("note: with verify on, 'emit' includes serializing the original model for the "
                      "mask-equivalence check (ir.to_proto); --no-verify times the bare cut.")
    if mem == "rss":
        console.print("peak MB (RSS Δ): getrusage max RSS during the prune() call (load..verify) minus the RSS "
                      "just before it, high-water mark reset per run; max over runs.")
    elif mem == "tracemalloc":
        console.print("peak MB (tracemalloc): Python/numpy allocations during prune() (load..verify), one extra "
                      "untimed run; protobuf (C++) and onnxruntime native memory are not seen.")
    try:
        load = os.getloadavg()
        console.print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass

    return finish(console, args.json, {"machine": m, "args": vars(args), "memory": mem, "results": results}, failures)


if __name__ == "__main__":
    raise SystemExit(main())
