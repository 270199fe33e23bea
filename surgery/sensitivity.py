"""Sensitivity: prune every prunable group alone at a few ratios and measure what it costs.

For each group and each ratio, the units the criterion scores lowest are cut from that
group only (``select`` on one group: ``floor(ratio x units)``, never all), the pruned
copy runs in onnxruntime on the same inputs as the dense model, and the difference of
the outputs is measured: the largest absolute difference and the relative L2 error
``||y - y_dense|| / ||y_dense||`` over every floating-point output. The model is loaded
and analyzed once; every cut is made on a fresh copy of it.

Inputs are the calibration data (``calib``, read by surgery.passes.stats as
``surgery.prune`` reads it; a data-aware criterion scores with its statistics) when
given, else random inputs of the declared shapes (symbolic dims 1, integer inputs 0:
the ones verification uses), which every row notes in ``"inputs"``.

``surgery sensitivity MODEL [--ratios 0.25,0.5,0.75] [--plot out.png]`` prints a table;
``--plot`` needs matplotlib (``pip install surgery[plot]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from surgery.errors import SurgeryError

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
METRICS = ("rel_l2", "max_abs_diff")


def sensitivity(
    model,
    ratios=DEFAULT_RATIOS,
    criterion: str = "l2",
    calib=None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per prunable group: ``{"id", "group", "kind", "units", "unit", "exact",
    "inputs", "results": [{"ratio", "units_removed", "max_abs_diff", "rel_l2"}, ...]}``.

    ``model``: a path, a ModelProto or an ``onnx_ir`` Model (never modified). ``calib``:
    calibration data as ``surgery.prune`` takes it (an ``.npz`` path or a dict of arrays of
    input name -> samples along the batch axis, or a list of feed dicts; read by
    surgery.passes.stats): the inputs measured on and, for a data-aware criterion, the
    statistics it scores with."""
    import numpy as np
    import onnx_ir as ir

    from surgery import api
    from surgery.analysis import Analysis, refuse_nonfinite
    from surgery.passes.criteria import CriterionContext, get_criterion
    from surgery.passes.policy import select
    from surgery.passes.targets import clone, cut_copy
    from surgery.verify import run

    ratios = _check_ratios(ratios)
    crit = get_criterion(criterion)
    if isinstance(model, ir.Model):
        model = clone(model)  # analysis names nodes: leave the caller's alone
    else:
        model = api.load(model, input_shapes=input_shapes)
    ir.external_data.load_to_model(model)
    analysis = Analysis(model)  # names every node: copies made after this share the names
    refuse_nonfinite(analysis)
    dense_proto = ir.to_proto(model)
    feeds, note, cal = _inputs(model, calib, input_shapes, seed)
    dense = [run(dense_proto, f) for f in feeds]
    ctx = CriterionContext(rng=np.random.default_rng(seed))
    if hasattr(ctx, "analysis"):
        ctx.analysis = analysis
    stats = _criterion_stats(analysis, crit, criterion, cal)
    if stats is not None:
        ctx.stats = stats
    rows = []
    for g in analysis.groups:
        if not g.prunable:
            continue
        scores = {g.id: np.asarray(crit(g, ctx), dtype=np.float64)}
        results = []
        for r in ratios:
            removed = select([g], scores, r)
            k = int(len(removed.get(g.id, ())))
            if k == 0:  # nothing cut: the model is the dense one
                results.append({"ratio": r, "units_removed": 0, "max_abs_diff": 0.0, "rel_l2": 0.0})
                continue
            pruned = ir.to_proto(cut_copy(analysis, removed))
            outs = [run(pruned, f) for f in feeds]
            results.append({"ratio": r, "units_removed": k, **_errors(dense, outs)})
        rows.append({
            "id": g.id, "group": g.name, "kind": g.kind, "units": int(len(g.atoms)), "unit": int(g.unit),
            "exact": g.exact, "inputs": note, "results": results,
        })
    return rows


def _check_ratios(ratios) -> list[float]:
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise SurgeryError(f"sensitivity ratios must be in [0, 1), got {r}")
        out.append(float(r))
    if not out:
        raise SurgeryError("sensitivity needs at least one ratio")
    return sorted(set(out))


def _errors(dense, pruned) -> dict:
    """Largest |diff| and relative L2 over every floating-point output of every batch."""
    import numpy as np

    worst, num, den = 0.0, 0.0, 0.0
    for ys, zs in zip(dense, pruned):
        for y, z in zip(ys, zs):
            if not np.issubdtype(y.dtype, np.floating) or not y.size:
                continue
            if y.shape != z.shape:
                raise SurgeryError(f"pruned model output shape {z.shape} differs from the dense {y.shape}")
            d = z.astype(np.float64) - y.astype(np.float64)
            worst = max(worst, float(np.abs(d).max()))
            num += float(np.square(d).sum())
            den += float(np.square(y.astype(np.float64)).sum())
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return {"max_abs_diff": worst, "rel_l2": rel}


def _inputs(model, calib, input_shapes, seed) -> tuple[list[dict], str, object]:
    """Batches of feeds, a note saying where they came from, and the calibration object
    (None without one, or without the calibration helper)."""
    from surgery.frontends.onnx_loader import concrete_input_shapes
    from surgery.verify import random_feeds

    if calib is None:
        shapes = concrete_input_shapes(model, input_shapes)
        note = f"random inputs (seed {seed}) of the declared shapes; --calib for real data"
        return [random_feeds(model, shapes, seed)], note, None
    try:  # the calibration helper: .npz / dict / iterable of feeds, read in runs
        from surgery.passes.stats import as_calibration
    except ImportError:
        as_calibration = None
    if as_calibration is not None:
        cal = as_calibration(calib, model)
        batches = [feeds for feeds, _ in cal.runs()]
        n = getattr(cal, "n_samples", 0) or len(batches)
        return batches, f"{getattr(cal, 'label', 'calibration data')}: {n} samples in {len(batches)} runs", cal
    batches, where = _load_calib(calib)
    names = [v.name for v in model.graph.inputs]
    for b in batches:
        missing = [k for k in names if k not in b]
        if missing:
            raise SurgeryError(f"calibration data {where} has no array for input "
                               f"{', '.join(repr(m) for m in missing)} (model inputs: {', '.join(names)})")
    n = len(batches)
    note = f"calibration data {where}, {n} batch{'es' if n > 1 else ''}"
    return [{k: b[k] for k in names} for b in batches], note, None


def _load_calib(calib) -> tuple[list[dict], str]:
    """Without the calibration helper: an ``.npz`` (or dict) of input name -> array, one batch."""

    if isinstance(calib, dict):
        return [dict(calib)], "(given arrays)"
    if isinstance(calib, (list, tuple)) and all(isinstance(b, dict) for b in calib):
        return [dict(b) for b in calib], "(given batches)"
    from surgery.passes.stats import read_npz

    return [read_npz(calib)], str(calib)


def _criterion_stats(analysis, crit, name: str, cal):
    """Calibration statistics for a data-aware criterion (None for a data-free one)."""
    from surgery.passes import criteria

    need = getattr(criteria, "needs_stats", lambda fn: None)(crit)
    if not need:
        return None
    if cal is None:
        raise SurgeryError(f"criterion '{name}' needs calibration data: give --calib data.npz")
    from surgery.passes.stats import collect

    return collect(analysis, cal, [g for g in analysis.groups if g.prunable], gram=need == "gram")


# --------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------


def table(rows: list[dict], title: str = "sensitivity", metric: str = "rel_l2"):
    """A rich table: group, kind, units, the error at each ratio (units removed)."""
    from rich.table import Table

    ratios = [r["ratio"] for r in rows[0]["results"]] if rows else []
    label = {"rel_l2": "relative L2 error", "max_abs_diff": "max |diff|"}[metric]
    t = Table(title=f"{title}: {label} of the outputs, each group pruned alone", header_style="bold")
    for col in ("id", "group", "kind", "units"):
        t.add_column(col, overflow="fold", justify="right" if col in ("id", "units") else "left")
    for r in ratios:
        t.add_column(f"ratio {r:g}", justify="right")
    for row in rows:
        cells = []
        for res in row["results"]:
            v = res[metric]
            cells.append(f"{v:.3g} [dim](-{res['units_removed']})[/]" if res["units_removed"] else "[dim]0 (-0)[/]")
        name = row["group"] + ("" if row["exact"] else " [yellow](inexact)[/]")
        t.add_row(str(row["id"]), name, row["kind"], str(row["units"]), *cells)
    return t


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install surgery[plot]") from None
    return plt


def plot(rows: list[dict], path, metric: str = "rel_l2", title: str = "sensitivity") -> None:
    """One line per group: error vs ratio (ratio 0 is the dense model: no error)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        xs = [0.0] + [r["ratio"] for r in row["results"] if r["ratio"] > 0]
        ys = [0.0] + [r[metric] for r in row["results"] if r["ratio"] > 0]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{row['id']}: {row['group']} ({row['kind']})")
    ax.set_xlabel("fraction of the group's units removed")
    ax.set_ylabel({"rel_l2": "relative L2 error of the outputs", "max_abs_diff": "max |diff| of the outputs"}[metric])
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=6 if len(rows) > 12 else 8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  ncol=1 + len(rows) // 30)
    fig.savefig(str(path), dpi=120, bbox_inches="tight")
    plt.close(fig)


def sensitivity_command(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    ratios: str = typer.Option("0.25,0.5,0.75", "--ratios", help="Comma-separated fractions of a group's units "
                               "removed, each in [0, 1)."),
    criterion: str = typer.Option("l2", "--criterion", "-c", help="Importance criterion: which units go first."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data (.npz: input name -> samples along "
                                         "the batch axis) to measure on, and for data-aware criteria; default: "
                                         "random inputs of the declared shapes."),
    metric: str = typer.Option("rel_l2", "--metric", help="Shown in the table and plot: rel_l2 or max_abs_diff."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Also draw error vs ratio, one line per group, "
                                             "to this PNG (needs matplotlib: pip install surgery\\[plot])."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random criterion and the random inputs."),
    input_shape: List[str] = typer.Option([], "--input-shape", help="NAME:1x3x224x224 for the inputs; symbolic "
                                          "dims default to 1."),
):
    """Prune each prunable group alone at several ratios and measure the output error vs the dense model."""
    import json

    from rich.console import Console

    from surgery.console import fail as _fail, parse_shapes as _shapes

    try:
        if metric not in METRICS:
            raise SurgeryError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        try:
            rs = [float(x) for x in ratios.split(",") if x.strip()]
        except ValueError:
            raise SurgeryError(f"--ratios '{ratios}' is not a comma-separated list of numbers") from None
        if plot_path is not None:
            require_matplotlib()  # before the work, not after
            if not plot_path.parent.is_dir():
                raise SurgeryError(f"folder of --plot {plot_path} does not exist")
        rows = sensitivity(str(model), rs, criterion=criterion, calib=str(calib) if calib else None,
                           input_shapes=_shapes(input_shape), seed=seed)
        if plot_path is not None:
            plot(rows, plot_path, metric, title=f"{model.name}: sensitivity ({criterion})")
    except SurgeryError as e:

        _fail(str(e))  # fail() escapes markup and control characters
    if as_json:
        print(json.dumps({"groups": rows}, indent=1))
        return
    console = Console()
    if not rows:
        console.print(f"{model}: no prunable group")
        return
    console.print(table(rows, title=str(model), metric=metric))
    console.print(f"inputs: {rows[0]['inputs']}", highlight=False)
    if plot_path is not None:
        console.print(f"plot: {plot_path}", highlight=False)
