"""Command line: ``surgery prune | analyze | apply``.

Every user error is one line on stderr and exit status 2; no output file is left
behind on failure, and the input model is never written to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from surgery.console import clean as _clean, err, fail as _fail, parse_shapes as _shapes, run_app
from surgery.errors import SurgeryError
from surgery.outputs import Outputs, check_outputs, write_all

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Structural pruning for ONNX models: "
                  "remove whole channels, heads and units, and prove the cut exact.")
def _summary(console: Console, rep: dict, out: Path) -> None:
    t = Table(title=f"surgery: {out}", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("kept", justify="right")
    for key, label in (("params", "parameters"), ("flops", "FLOPs")):
        b, a = rep[f"{key}_before"], rep[f"{key}_after"]
        t.add_row(label, f"{b:,}", f"{a:,}", f"{a / b:.1%}" if b else "-")
    console.print(t)
    v = rep["verify"]
    console.print(f"groups: {rep['groups_pruned']} pruned of {rep['groups_prunable']} prunable ({rep['groups_total']} total)")
    if v["max_abs_diff"] is None:
        console.print(f"verify: [yellow]{v['why']}[/]", highlight=False)
    else:
        mark = {True: "[green]exact[/]", False: "[red]NOT exact[/]", None: "[yellow]not exact by construction[/]"}[v["exact"]]
        console.print(f"verify: {mark}, max |diff| {v['max_abs_diff']:.3g} ({v['why']})", highlight=False)
    if "compensation" in rep:  # calibration
        c = rep["compensation"]
        console.print(f"compensation ({c['mode']}): {len(c['applied'])} layers re-fitted, {len(c['skipped'])} skipped; "
                      f"max |output diff| vs the original on the calibration data {c['uncompensated_output_diff']:.3g} "
                      f"-> {rep['compensated_output_diff']:.3g}", highlight=False)
    tm = rep.get("timings", {})
    console.print("seconds: " + ", ".join(f"{k} {s:.2f}" for k, s in tm.items()) + f", total {rep['seconds']:.2f}")


def _finish(result, model: Path, outputs: Outputs, quiet: bool, verified: bool = True) -> None:
    """Refuse a cut that failed its check before anything is written, then write every output
    (unverified outputs are at least loaded in onnxruntime before they stay)."""
    from surgery.backends.onnx_writer import uses_external_data
    from surgery.verify import load_check

    if result.report["verify"]["exact"] is False:
        _fail(f"the cut is not mask-equivalent ({result.report['verify']['why']}); this is a bug, please report it", 1)
    ext = True if uses_external_data(model) else None
    write_all(outputs, lambda path: result.save(path, external_data=ext), result.report,
              result.plan.as_dict() if outputs.plan is not None else None,
              check=None if verified else load_check(str(model), result.report["verify"]))
    if not quiet:
        _summary(Console(), result.report, outputs.model)
    if not result.report["verify"].get("validated", True):
        err.print(f"warning: {_clean(result.report['verify']['why'])}", highlight=False, soft_wrap=True)


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Fraction of UNITS (channels, heads, MLP units) "
                                          "removed from every prunable group, in [0, 1); default 0.5 unless a "
                                          "--target-* is given. Not a fraction of parameters."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Instead of --ratio: fraction of "
                                                  "PARAMETERS kept, in (0, 1]; units go in the global ranking."),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="Instead of --ratio: fraction of FLOPs "
                                                 "kept, in (0, 1]; units go in the global ranking."),
    criterion: str = typer.Option("l2", "--criterion", "-c", help="Importance criterion: l1, l2, random, bn-scale, "
                                  "fpgm, lamp; with --calib: activation, wanda, flap, obs, obs-greedy; or a plugin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output model (default: MODEL.pruned.onnx)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the report as JSON."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Write the plan (what was removed) as JSON."),
    global_rank: bool = typer.Option(False, "--global", help="Rank the units of all groups of one kind together "
                                     "(channels, heads, MLP units; scores normalized per group): each kind loses its "
                                     "ratio in total; every group keeps at least one unit."),
    round_to: int = typer.Option(1, "--round-to", help="Keep each group's channel count a multiple of N."),
    head_ratio: Optional[float] = typer.Option(None, "--head-ratio", help="Fraction of attention heads removed "
                                               "(default: --ratio)."),
    mlp_ratio: Optional[float] = typer.Option(None, "--mlp-ratio", help="Fraction of MLP units removed (default: --ratio)."),
    hidden_ratio: Optional[float] = typer.Option(None, "--hidden-ratio", help="Fraction of the hidden size (residual "
                                                 "stream) removed; inexact under LayerNorm (default: --ratio)."),
    head_dim_ratio: float = typer.Option(0.0, "--head-dim-ratio", help="Fraction of channels removed inside every "
                                         "head (RoPE pairs stay together; default 0)."),
    gqa: str = typer.Option("kv", "--gqa", help="Grouped-query attention: 'kv' removes whole key/value heads with "
                            "their query heads; 'query' removes query heads evenly from every key/value group."),
    keep: List[str] = typer.Option([], "--keep", help="Protect a node, tensor or group by name (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random criterion and verification inputs."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:1x3x224x224 for verification inputs; "
                                          "symbolic dims default to 1."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip onnxruntime verification."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary (for CI)."),
    # -- calibration (passes/stats.py, passes/compensate.py) --
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: .npz with one array per graph "
                                         "input name, first axis = samples (needed by data-aware criteria and "
                                         "--compensate)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Use at most N calibration samples."),
    compensate: Optional[str] = typer.Option(None, "--compensate", help="After the verified cut, re-fit the layers "
                                             "reading removed channels: 'bias' (fold their mean into the bias) or "
                                             "'lstsq' (least-squares re-fit); only where it lowers the held-back "
                                             "error."),
    sequential: bool = typer.Option(False, "--sequential", help="Prune the groups one at a time in graph order, "
                                    "re-collecting each one's statistics from the already pruned earlier layers "
                                    "and fitting compensation back to the dense model's outputs; every step is "
                                    "verified. With --global, the dense model's global ranking sets each "
                                    "group's count."),
):
    """Prune MODEL and write a smaller dense model, verified against the original."""
    from surgery import api

    try:
        outputs = check_outputs(model, output, report, plan)
        with _status(quiet, "pruning"):
            result = api.prune(str(model), ratio=ratio, criterion=criterion, global_rank=global_rank,
                               round_to=round_to, keep=keep, seed=seed, input_shapes=_shapes(input_shape),
                               verify_result=not no_verify, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
                               hidden_ratio=hidden_ratio, head_dim_ratio=head_dim_ratio, gqa=gqa,
                               target_params=target_params, target_flops=target_flops,
                               calib=None if calib is None else str(calib), calib_samples=calib_samples,
                               compensate=compensate, sequential=sequential)
        _finish(result, model, outputs, quiet, verified=not no_verify)
    except SurgeryError as e:
        _fail(str(e))


@app.command()
def apply(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="A plan written by `surgery prune --plan`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output model (default: MODEL.pruned.onnx)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the report as JSON."),
    seed: int = typer.Option(0, "--seed"),
    input_shape: List[str] = typer.Option([], "--input-shape"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Replay a saved (possibly hand-edited) plan on MODEL."""
    from surgery import api

    try:
        outputs = check_outputs(model, output, report)
        with _status(quiet, "applying plan"):
            result = api.apply(str(model), str(plan_file), seed=seed, input_shapes=_shapes(input_shape))
        _finish(result, model, outputs, quiet)
    except SurgeryError as e:
        _fail(str(e))


@app.command()
def analyze(
    model: Path = typer.Argument(..., help="Input ONNX model."),
    as_json: bool = typer.Option(False, "--json", help="Print the groups as JSON."),
):
    """List the coupled channel groups: prunable or blocked, and why."""
    from surgery import api

    try:
        analysis = api.analyze(str(model))
    except SurgeryError as e:
        _fail(str(e))
    rows = [
        {
            "id": g.id, "name": g.name, "units": int(len(g.atoms) + len(g.blocked_atoms)), "prunable_units": int(len(g.atoms)),
            "unit": g.unit, "kind": g.kind, "status": "prunable" if g.prunable else "blocked",
            "why": g.blocked_reason if not g.prunable else (f"{len(g.blocked_atoms)} units blocked: {g.blocked_reason}" if len(g.blocked_atoms) else ""),
            "exact": g.exact, "inexact_why": g.inexact_reason,
            "tensors": [f"{s.tensor}@{s.axis}" for s in g.weight_slices_names()],
        }
        for g in analysis.groups
    ]
    if as_json:
        print(json.dumps({"groups": rows}, indent=1))
        return
    t = Table(title=f"{model}: {sum(r['status'] == 'prunable' for r in rows)} of {len(rows)} groups prunable",
              header_style="bold")
    for col in ("id", "group", "kind", "units", "unit", "status", "why / exactness"):
        t.add_column(col, overflow="fold")
    for r in rows:
        why = r["why"] or ("" if r["exact"] else f"inexact: {r['inexact_why']}")
        style = "green" if r["status"] == "prunable" else "dim"
        t.add_row(str(r["id"]), r["name"], r["kind"], f"{r['prunable_units']}/{r['units']}", str(r["unit"]),
                  f"[{style}]{r['status']}[/]", why)
    Console().print(t)


from surgery.sensitivity import sensitivity_command  # noqa: E402  (surgery sensitivity: surgery/sensitivity.py)
app.command("sensitivity")(sensitivity_command)


class _status:
    def __init__(self, quiet: bool, what: str):
        self.cm = None if quiet else err.status(what + "...")

    def __enter__(self):
        if self.cm:
            self.cm.__enter__()

    def __exit__(self, *exc):
        if self.cm:
            self.cm.__exit__(*exc)
        return False


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
