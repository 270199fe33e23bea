"""Latency benchmark: does pruning 50% of attention heads and MLP units make transformers faster in onnxruntime?

    python bench/transformer_latency.py [--seq 128] [--batch 1] [--repeat 50] [--threads 2]
                                        [--warmup 5] [--attn {sdpa,eager}] [--only NAME] [--json PATH]

For a few realistic-shape transformers (MiniLM-like BERT encoder, GPT-2-small-like
decoder, Llama-like GQA decoder, ViT-small) built from Hugging Face ``transformers``
configs with seeded random weights (nothing is downloaded), wrapped so the graph has
one output (``last_hidden_state``) and exported with ``torch.onnx.export(...,
dynamo=True)`` (dynamic batch and sequence; ViT dynamic batch), it calls

    surgery.prune(proto, ratio=0.0, head_ratio=0.5, mlp_ratio=0.5, hidden_ratio=0.0)

and times the original and the pruned model with onnxruntime on CPU
(``ORT_ENABLE_ALL``, ``intra_op_num_threads=--threads``): median and p90 of
``--repeat`` runs after ``--warmup`` runs, the two models' runs interleaved in blocks
of 5 so that a busy spell of the machine slows both alike. The headline column is the measured
speedup divided by the FLOPs-promised speedup (FLOPs before / FLOPs after). FLOPs
are counted at the benchmark shape (``--batch`` x ``--seq``; ViT: 197 tokens), see
bench/README.md.
"""

from __future__ import annotations

from surgery.frontends.torch_export import quiet

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# ``python bench/transformer_latency.py`` puts bench/ first on sys.path; put the repo
# root first so ``import surgery`` is the regular package (see surgery_time.py).
# tests/ (last of the three) for ``corpus_transformers``: the models get the same
# random biases and norm gammas as the test corpus's, from the same function.
for _p in (str(_ROOT / "tests"), str(_ROOT / "bench"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import surgery  # noqa: E402
from common import finish, machine, verdict  # noqa: E402
from corpus_transformers import draw_biases_and_norms  # noqa: E402

PRUNE_KW = dict(ratio=0.0, head_ratio=0.5, mlp_ratio=0.5, hidden_ratio=0.0)
REFERENCE = (
    "Reference: the leading PyTorch pruning library's 50% CNN channel cuts reach 0.66-0.98 of the "
    "FLOPs-promised speedup in onnxruntime (speedup / (FLOPs before / FLOPs after))."
)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    name: str
    cls: str  # transformers model class
    cfg: str  # transformers config class
    config: dict
    kwargs: dict = field(default_factory=dict)
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    describe: str = ""
    image_size: int | None = None  # vision models: fixed image size (tokens = patches + 1)
    max_seq: int = 512


SPECS: list[Spec] = [
    Spec(
        "bert-minilm", "BertModel", "BertConfig",
        dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
             intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2),
        kwargs={"add_pooling_layer": False},
        describe="BERT encoder, E384 L6 H12 I1536 (MiniLM-L6-like)", max_seq=512,
    ),
    Spec(
        "gpt2-small6", "GPT2Model", "GPT2Config",
        dict(vocab_size=50257, n_embd=768, n_layer=6, n_head=12, n_positions=1024),
        describe="GPT-2 decoder, E768 L6 H12 I3072 (GPT-2 small width, half depth)", max_seq=1024,
    ),
    Spec(
        "llama-gqa", "LlamaModel", "LlamaConfig",
        dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1376, max_position_embeddings=2048),
        describe="Llama decoder, E512 L4 H8 KV4 I1376 SwiGLU RoPE RMSNorm", max_seq=2048,
    ),
    Spec(
        "vit-small", "ViTModel", "ViTConfig",
        dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
             image_size=224, patch_size=16, num_channels=3),
        kwargs={"add_pooling_layer": False}, inputs=("pixel_values",),
        describe="ViT-S/16 encoder at 224x224 (197 tokens), E384 L6 H6 I1536", image_size=224,
    ),
]


def _seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def torch_module(spec: Spec, attn: str):
    """The wrapped (one output: last_hidden_state), seeded, eval-mode torch model."""
    import torch
    import transformers

    cfg = getattr(transformers, spec.cfg)(**spec.config)
    cfg._attn_implementation = attn
    seed = _seed(spec.name)
    torch.manual_seed(seed)
    hf = getattr(transformers, spec.cls)(cfg, **spec.kwargs)
    # HF init leaves biases at 0 and norm gammas at 1; the dynamo exporter's optimizer
    # deduplicates equal initializers, so every layer would share one bias tensor. Draw
    # them at random (as the test corpus does) so each layer has its own.
    draw_biases_and_norms(hf, seed)
    hf.eval()

    class TextWithMask(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Vision(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).last_hidden_state

    w = (Vision if spec.inputs == ("pixel_values",) else TextWithMask)(hf)
    w.eval()
    return w


def export(spec: Spec, attn: str) -> onnx.ModelProto:
    import torch

    module = torch_module(spec, attn)
    gen = torch.Generator().manual_seed(_seed(spec.name) + 2)
    batch, seq = 2, 8  # example shapes for tracing; the exported axes are dynamic
    vision = spec.inputs == ("pixel_values",)
    if vision:
        args = (torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen),)
    else:
        args = (torch.randint(0, spec.config["vocab_size"], (batch, seq), generator=gen),
                torch.ones(batch, seq, dtype=torch.int64))
    B = torch.export.Dim("batch", min=1, max=64)
    S = torch.export.Dim("seq", min=1, max=spec.max_seq)
    dyn = {n: ({0: B} if vision else {0: B, 1: S}) for n in spec.inputs}
    with tempfile.TemporaryDirectory() as tmp, quiet(), torch.no_grad():
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module, args, path, dynamo=True, verbose=False, input_names=list(spec.inputs),
                          output_names=["last_hidden_state"], dynamic_shapes=dyn)
        proto = onnx.load(path, load_external_data=True)
    proto.graph.name = spec.name
    return proto


# --------------------------------------------------------------------------- measuring


def run_shapes(spec: Spec, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    if spec.image_size:
        return {"pixel_values": (batch, 3, spec.image_size, spec.image_size)}
    return {n: (batch, seq) for n in spec.inputs}


def feeds_for(spec: Spec, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n, s in shapes.items():
        if n == "input_ids":
            out[n] = rng.integers(0, spec.config["vocab_size"], size=s, dtype=np.int64)
        elif n == "attention_mask":
            out[n] = np.ones(s, dtype=np.int64)
        else:
            out[n] = rng.standard_normal(s).astype(np.float32)
    return out


def flops_at(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """``surgery``'s FLOPs count (2 x MACs of MatMul/Gemm/Conv) at concrete input shapes.

    The report's ``flops_before/after`` count every symbolic dim as 1 (batch 1, seq 1
    for the text models: the S x S attention matmuls vanish); here the graph inputs are
    pinned to ``shapes`` on a copy and shapes re-inferred before counting."""
    from surgery.metrics import count_flops

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for inp in p.graph.input:
        if inp.name in shapes:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for v in shapes[inp.name]:
                shape.dim.add().dim_value = v
    del p.graph.value_info[:]
    return count_flops(surgery.load(p))


def session(proto: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _stats(times: list[float]) -> dict:
    """median / p90 / min in ms; ``runs_ms`` in the order they were measured."""
    srt = sorted(times)
    p90 = srt[min(len(srt) - 1, int(round(0.9 * (len(srt) - 1))))]
    return {"median_ms": statistics.median(srt) * 1e3, "p90_ms": p90 * 1e3, "min_ms": srt[0] * 1e3,
            "runs_ms": [t * 1e3 for t in times]}


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (all processes, from /proc/stat)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    guest = sum(f[8:10]) if len(f) > 9 else 0  # already counted in user/nice
    return (sum(f) - idle - guest) / os.sysconf("SC_CLK_TCK")


def latency_pair(protos: tuple[onnx.ModelProto, onnx.ModelProto], feeds: dict, threads: int, warmup: int,
                 repeat: int, block: int = 5) -> tuple[dict, dict]:
    """Time the original and the pruned model, interleaved in blocks of ``block`` runs
    (order A B, B A, A B, ...), so that a slow spell of a shared machine hits both
    about equally instead of whichever happened to run during it."""
    sessions = [session(p, threads) for p in protos]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times: list[list[float]] = [[], []]
    busy0, own0, wall0 = _cpu_busy_s(), time.process_time(), time.perf_counter()
    rnd = 0
    while min(len(t) for t in times) < repeat:
        for i in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            s = sessions[i]
            for _ in range(min(block, repeat - len(times[i]))):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[i].append(time.perf_counter() - t0)
        rnd += 1
    busy1, own1, wall1 = _cpu_busy_s(), time.process_time(), time.perf_counter()
    # CPUs kept busy by other processes while timing (machine busy time minus ours)
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    del sessions
    gc.collect()
    return _stats(times[0]), _stats(times[1]), others


def bench_model(spec: Spec, args, console: Console) -> dict:
    t0 = time.perf_counter()
    proto = export(spec, args.attn)
    t_export = time.perf_counter() - t0
    shapes = run_shapes(spec, args.batch, args.seq)
    console.print(f"  {spec.name}: exported in {t_export:.1f} s ({len(proto.graph.node)} nodes); pruning ...")

    t0 = time.perf_counter()
    # verification runs at the benchmark shape too (symbolic dims would otherwise default to 1)
    res = surgery.prune(proto, **PRUNE_KW, input_shapes=shapes, verify_result=True)
    t_prune = time.perf_counter() - t0
    pruned = res.onnx
    rep = res.report

    fb, fa = flops_at(proto, shapes), flops_at(pruned, shapes)
    feeds = feeds_for(spec, shapes)
    console.print(f"  {spec.name}: pruned in {t_prune:.1f} s; timing onnxruntime ...")
    before, after, others = latency_pair((proto, pruned), feeds, args.threads, args.warmup, args.repeat)
    promised = fb / fa if fa else float("nan")
    speedup = before["median_ms"] / after["median_ms"]
    return {
        "describe": spec.describe,
        "shapes": shapes,
        "nodes": len(proto.graph.node),
        "nodes_after": len(pruned.graph.node),
        "export_s": t_export,
        "prune_s": t_prune,
        "params_before": rep["params_before"],
        "params_after": rep["params_after"],
        "flops_before": fb,
        "flops_after": fa,
        "report_flops_before": rep["flops_before"],
        "report_flops_after": rep["flops_after"],
        "promised": promised,
        "before": before,
        "after": after,
        "speedup": speedup,
        "efficiency": speedup / promised,
        "other_cpus": others,
        "verify": rep["verify"],
        "pruned_by_kind": {k: v for k, v in rep["pruned_by_kind"].items() if v},
        "groups_pruned": rep["groups_pruned"],
        "timings": rep["timings"],
        "inexact_groups": rep.get("inexact_groups", []),
    }


# --------------------------------------------------------------------------- output


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _g(n: int) -> str:
    return f"{n / 1e9:.2f}G"


def _eff(e: float) -> str:
    color = "green" if e >= 0.66 else "yellow" if e >= 0.5 else "red"
    return f"[{color}]{e:.2f}[/]"


def _others(v: float | None) -> str:
    if v is None:
        return "-"
    return f"[yellow]{v:.2f}[/yellow]" if v >= 0.2 else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the text models (default 128)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per model and variant (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra_op_num_threads (default 2)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                        help="HF attention implementation exported (default sdpa, the HF default)")
    parser.add_argument("--only", default="", help="only models whose name contains this substring")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batch < 1 or args.seq < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeat, --batch, --seq, --threads must be >= 1 and --warmup >= 0")

    console = Console(width=max(Console().width, 160))
    selected = [s for s in SPECS if args.only in s.name]
    if not selected:
        console.print(f"no model name contains {args.only!r}; known: {', '.join(s.name for s in SPECS)}")
        return 2
    for s in selected:
        if not s.image_size and args.seq > s.max_seq:
            parser.error(f"--seq {args.seq} exceeds {s.name}'s exported maximum {s.max_seq}")

    m = machine("torch", "transformers")
    console.print(f"[bold]Machine[/bold]: {m['nproc']} CPUs (nproc), {m['cpu']}; "
                  f"load average {m['loadavg'][0]:.2f} {m['loadavg'][1]:.2f} {m['loadavg'][2]:.2f} at start")
    console.print(f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, onnx {m['onnx']}, "
                  f"onnxruntime {m['onnxruntime']}, surgery {m['surgery']}")
    if m["loadavg"][0] > 0.5 * m["nproc"]:
        console.print(f"[yellow]load average {m['loadavg'][0]:.2f} on {m['nproc']} CPUs: something else is "
                      "running; latencies will be inflated and noisy (the before/after runs are interleaved, "
                      "so their ratio suffers less)[/yellow]")
    console.print(REFERENCE)
    console.print(f"prune: {', '.join(f'{k}={v}' for k, v in PRUNE_KW.items())}, criterion=l2; "
                  f"attention={args.attn}; batch={args.batch}, seq={args.seq} (ViT: 197 tokens); "
                  f"ORT CPU, ORT_ENABLE_ALL, intra_op threads={args.threads}; "
                  f"{args.warmup} warm-up + {args.repeat} timed runs", soft_wrap=True)

    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    failures: list[tuple[str, str]] = []
    for spec in selected:
        try:
            results[spec.name] = bench_model(spec, args, console)
        except Exception:  # noqa: BLE001 - report and go on with the next model
            tb = traceback.format_exc()
            failures.append((spec.name, tb))
            console.print(f"  {spec.name}: [red]FAILED[/red] ({tb.strip().splitlines()[-1]})", markup=True)
        gc.collect()

    size = Table(title="surgery.prune(head_ratio=0.5, mlp_ratio=0.5): size and exactness", show_lines=False)
    for col, just in [("model", "left"), ("params\nbefore", "right"), ("params\nafter", "right"),
                      ("FLOPs\nbefore", "right"), ("FLOPs\nafter", "right"), ("FLOPs\nafter/before", "right"),
                      ("verify", "left"), ("pruned_by_kind", "left"), ("nodes\nbefore/after", "right"),
                      ("prune s", "right")]:
        size.add_column(col, justify=just)
    lat = Table(title=f"onnxruntime CPU latency, ms (batch {args.batch}, seq {args.seq}; "
                      f"{args.threads} threads; {args.repeat} runs)", show_lines=False)
    for col, just in [("model", "left"), ("before\nmedian", "right"), ("before\np90", "right"),
                      ("after\nmedian", "right"), ("after\np90", "right"), ("speedup\n(median)", "right"),
                      ("FLOPs-promised\nspeedup", "right"), ("speedup /\npromised", "right"),
                      ("other\nprocs' CPUs", "right")]:
        lat.add_column(col, justify=just)
    for spec in selected:
        r = results.get(spec.name)
        if r is None:
            size.add_row(spec.name, *["-"] * 5, "[red]FAILED[/red]", "-", "-", "-")
            lat.add_row(spec.name, *["-"] * 6, "[red]FAILED[/red]", "-")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in r["pruned_by_kind"].items()) or "-"
        size.add_row(spec.name, _m(r["params_before"]), _m(r["params_after"]), _g(r["flops_before"]),
                     _g(r["flops_after"]), f"{r['flops_after'] / r['flops_before']:.3f}", verdict(r["verify"]),
                     kinds, f"{r['nodes']}/{r['nodes_after']}", f"{r['prune_s']:.1f}")
        b, a = r["before"], r["after"]
        lat.add_row(spec.name, f"{b['median_ms']:.2f}", f"{b['p90_ms']:.2f}", f"{a['median_ms']:.2f}",
                    f"{a['p90_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['promised']:.2f}x",
                    _eff(r["efficiency"]), _others(r["other_cpus"]))
    console.print(size)
    console.print(lat)
    for spec in selected:
        r = results.get(spec.name)
        if r is not None:
            console.print(f"{spec.name}: {r['describe']}; report FLOPs (symbolic dims = 1) "
                          f"{_g(r['report_flops_before'])} -> {_g(r['report_flops_after'])}", soft_wrap=True)
    console.print("FLOPs: 2 x MACs of MatMul/Gemm/Conv at the benchmark shape (the attention-score "
                  "matmuls Q.K^T and P.V count, and shrink with the heads); params include embeddings, "
                  "which hidden_ratio=0 leaves whole.", soft_wrap=True)
    console.print("other procs' CPUs: average number of CPUs that other processes kept busy while the "
                  "model was timed (/proc/stat busy time minus this process's CPU time); yellow from 0.2: "
                  "the latencies are inflated by contention.", soft_wrap=True)
    console.print(f"total {time.perf_counter() - t_all:.0f} s", end="")
    try:
        load = os.getloadavg()
        console.print(f"; load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        console.print()

    return finish(console, args.json, {"machine": m, "args": vars(args), "results": results}, failures)


if __name__ == "__main__":
    raise SystemExit(main())
