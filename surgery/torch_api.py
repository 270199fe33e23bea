"""PyTorch in and out: prune an ``nn.Module`` and get the user's own module back.

```python
from surgery.torch_api import prune_module, save, load
res = prune_module(model, torch.randn(1, 3, 224, 224), ratio=0.5)
res.module            # same classes, sliced parameters, updated layer attributes
res.report["torch"]   # {"max_abs_diff": ... vs the pruned ONNX model, "params_before": ...}
save(res, "pruned.pt")
model2 = load("pruned.pt", build=lambda: MyNet())
```

How: the module is exported (``frontends/torch_export.py``), pruned as ONNX
(``surgery.prune``; its mask-equivalence check runs as usual), the plan's weight cuts
are mapped back onto the module's own parameters, buffers and tensor attributes by
name, and applied (``backends/torch_module.py``). Groups the module cannot express
(``nn.MultiheadAttention`` heads, a weight the exporter computes arithmetically) are
protected before the policy runs and listed in ``report["torch"]["protected_groups"]``.
Finally the pruned module must reproduce the pruned ONNX model on the example inputs
(within ``1e-4 x max(1, max |output|)``), or :class:`SurgeryError` names the first
module that does not.

This module imports torch; nothing else in ``surgery`` does at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from surgery.errors import SurgeryError
from surgery.plan import Plan
from surgery.backends.torch_module import (
    NotRepresentable,
    apply_module_cuts,
    check_module,
    is_attention,
    rule_for,
)
from surgery.frontends.torch_export import TorchMap, export_module, onnx_feeds

__all__ = ["TorchResult", "load", "prune_module", "save"]

FORMAT = "surgery-torch/1"


@dataclasses.dataclass
class TorchResult:
    module: nn.Module  # the pruned module (the user's classes)
    onnx: onnx.ModelProto  # the pruned ONNX model it was checked against
    report: dict
    plan: Plan  # the ONNX plan (tensor names of the exported model)
    module_cuts: dict[str, list[tuple[int, np.ndarray]]]  # qualified tensor name -> [(axis, removed)]
    result: Any = dataclasses.field(default=None, repr=False)  # the surgery.api.Result

    def save(self, path) -> None:
        save(self, path)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_module(
    module: nn.Module,
    example_inputs,
    *,
    inplace: bool = False,
    dynamic_shapes=None,
    **prune_kwargs,
) -> TorchResult:
    """Prune ``module`` (see the module doc). ``example_inputs``: a tensor, a tuple of
    positional arguments or a dict of keyword arguments. ``prune_kwargs`` are
    :func:`surgery.prune`'s (ratio, criterion, global_rank, round_to, keep, seed,
    input_shapes, verify_result). The module is deep-copied unless ``inplace``; on any
    failure an in-place module is left as it was. Build the optimizer after pruning:
    the pruned parameters are new ``nn.Parameter`` objects."""
    from surgery import api
    from surgery.analysis import Analysis

    if not isinstance(module, nn.Module):
        raise SurgeryError(f"prune_module expects a torch.nn.Module, got {type(module).__name__}")
    t0 = time.perf_counter()
    timings = {}
    proto = export_module(module, example_inputs, dynamic_shapes=dynamic_shapes)
    timings["export"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if prune_kwargs.get("input_shapes") is None:  # verify on the example's shapes (dynamic axes too)
        prune_kwargs["input_shapes"] = {k: tuple(v.shape) for k, v in onnx_feeds(proto, example_inputs).items()}
    tmap = TorchMap(proto, module)
    model = api.load(proto, input_shapes=prune_kwargs["input_shapes"])  # as surgery.prune will load it
    analysis = Analysis(model)
    blocked, constants = _unrepresentable_groups(analysis, tmap, module, model)
    keep = list(prune_kwargs.pop("keep", ()) or ())
    protect, over = _protect_names(analysis, blocked)
    timings["map"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    res = api.prune(proto, keep=keep + protect, **prune_kwargs)
    timings["prune_onnx"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    cuts = res.plan.tensor_cuts()
    module_cuts, unmapped = tmap.to_module_cuts(cuts, model)
    params_before = _n_params(module)
    target = module if inplace else copy.deepcopy(module)
    applied = apply_module_cuts(target, module_cuts)
    timings["apply"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    pruned_proto = res.onnx
    try:
        check = check_module(target, pruned_proto, example_inputs)
    except SurgeryError as e:
        if inplace:
            applied.undo()
        if unmapped:
            names = ", ".join(f"'{u['tensor']}' (in {u['module'] or '?'})" for u in unmapped[:3])
            raise SurgeryError(f"{e}; note: the plan also cuts constants built in forward, which the module "
                               f"cannot follow: {names}") from e
        raise
    timings["check"] = time.perf_counter() - t1
    report = dict(res.report)
    by_id = {g.id: g for g in analysis.groups}
    report["torch"] = {
        "params_before": params_before,
        "params_after": _n_params(target),
        "max_abs_diff": check["max_abs_diff"],
        "tolerance": check["tolerance"],
        "protected_groups": [{"group": by_id[g].name, "why": why} for g, why in sorted(blocked.items())],
        "over_protected": over,
        "unmapped_cuts": unmapped,  # forward-built constants the plan cut (the module must follow by itself)
        "constants_in_groups": constants,  # every such constant a prunable group would cut
        "changed_attributes": {k: {a: list(v) for a, v in d.items()} for k, d in applied.changed.items()},
        "notes": applied.notes,
        "seconds": time.perf_counter() - t0,
        "timings": timings,
    }
    return TorchResult(target, pruned_proto, report, res.plan, module_cuts, res)


def _unrepresentable_groups(analysis, tmap: TorchMap, module: nn.Module, model) -> tuple[dict[int, str], list[dict]]:
    """(group id -> why the module cannot take it, forward-built constants a group cuts),
    for each prunable group (tried with one of its units on copies of the modules it
    touches)."""
    inits = model.graph.initializers
    out: dict[int, str] = {}
    constants: list[dict] = []
    for g in analysis.groups:
        if not g.prunable or not len(g.atoms):
            continue
        tcuts: dict[str, list] = {}
        for axis_id, idx in analysis.footprint(int(g.atoms[0])).items():
            kind, name, k = analysis.dims.axes[axis_id].key
            if kind == "value" and name in inits:
                tcuts.setdefault(name, []).append((int(k), idx))
        try:
            mcuts, unmapped = tmap.to_module_cuts(tcuts, model)
            _dry_run(module, mcuts)
        except NotRepresentable as e:
            out[g.id] = str(e)
            continue
        constants.extend({"group": g.name, "tensor": u["tensor"], "module": u["module"]} for u in unmapped)
    return out, constants


def _dry_run(module: nn.Module, mcuts: dict) -> None:
    """Apply ``mcuts`` to copies of the smallest modules whose rules must accept them."""
    tops: dict[str, dict] = {}
    for name, c in mcuts.items():
        parts = name.split(".")[:-1]
        top = None
        for k in range(len(parts), -1, -1):
            path = ".".join(parts[:k])
            mod = module.get_submodule(path) if path else module
            if rule_for(type(mod)) is not None or is_attention(mod):
                top = path
        if top is None:
            continue
        prefix = f"{top}." if top else ""
        tops.setdefault(top, {})[name[len(prefix):]] = c
    for top, rel in tops.items():
        mod = module.get_submodule(top) if top else module
        apply_module_cuts(copy.deepcopy(mod), rel, name_prefix=top)


def _keep_takes_group_names(analysis) -> bool:
    """Whether surgery.prune's keep= accepts a group name (protecting just that group)."""
    from surgery import api

    g = next((g for g in analysis.groups if g.prunable), None)
    if g is None or g.name in analysis.value_axes:
        return False
    try:
        return api._protected(analysis, [g.name]) == set(g.atoms.tolist())
    except SurgeryError:
        return False


def _protect_names(analysis, blocked: dict[int, str]) -> tuple[list[str], list[str]]:
    """keep= names that protect exactly the blocked groups where some value allows it
    (else the group's first weight, which may protect more; listed second)."""
    if not blocked:
        return [], []
    if _keep_takes_group_names(analysis):
        return [g.name for g in analysis.groups if g.id in blocked], []
    bad_atoms = set()
    for g in analysis.groups:
        if g.id in blocked:
            bad_atoms.update(g.atoms.tolist())
    good_atoms = set()
    for g in analysis.groups:
        if g.prunable and g.id not in blocked:
            good_atoms.update(g.atoms.tolist())
    names, over = [], []
    covered: set[int] = set()
    axis_values: dict[int, list[str]] = {}
    for v, axes in analysis.value_axes.items():
        for a in axes:
            axis_values.setdefault(a, []).append(v)
    for g in analysis.groups:
        if g.id not in blocked:
            continue
        need = set(g.atoms.tolist()) - covered
        cands = []
        for a in g.axes:
            cands.extend(axis_values.get(a, []))
        seen = set()
        for v in cands:
            if not need:
                break
            if v in seen:
                continue
            seen.add(v)
            touch = analysis.atoms_touching(analysis.value_axes[v])
            if touch & need and not (touch & good_atoms):
                names.append(v)
                covered |= touch
                need -= touch
        if need:
            first = g.weight_slices_names()[0].tensor
            names.append(first)
            over.append(first)
            covered |= analysis.atoms_touching(analysis.value_axes[first])
    return names, over


# --------------------------------------------------------------------------- #
# save / load
# --------------------------------------------------------------------------- #


def save(result: TorchResult, path) -> None:
    """One file (torch.save): the ONNX plan as JSON, the cuts by module tensor name, and
    the pruned state_dict. Loadable with ``torch.load(..., weights_only=True)``."""
    torch.save({
        "format": FORMAT,
        "plan": json.dumps(result.plan.as_dict()),
        "module_cuts": {k: [[int(a), [int(i) for i in np.asarray(idx).tolist()]] for a, idx in v]
                        for k, v in result.module_cuts.items()},
        "state_dict": result.module.state_dict(),
    }, path)


def load(path, build: Callable[[], nn.Module], *, map_location=None, strict: bool = True) -> nn.Module:
    """Build the original architecture with ``build()``, replay the cuts on it by name,
    then load the pruned state_dict (``weights_only=True``)."""
    try:
        data = torch.load(path, weights_only=True, map_location=map_location)
    except FileNotFoundError as e:
        raise SurgeryError(f"file not found: {path}") from e
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"{path} is not a surgery torch checkpoint: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SurgeryError(f"{path} is not a surgery torch checkpoint (format {FORMAT})")
    module = build()
    if not isinstance(module, nn.Module):
        raise SurgeryError(f"build() returned {type(module).__name__}, not an nn.Module")
    cuts = {k: [(int(a), np.asarray(idx, dtype=np.int64)) for a, idx in v] for k, v in data["module_cuts"].items()}
    apply_module_cuts(module, cuts)
    try:
        module.load_state_dict(data["state_dict"], strict=strict)
    except RuntimeError as e:
        raise SurgeryError(f"the pruned state_dict does not fit the rebuilt module: {str(e).splitlines()[0]}") from e
    return module


def plan_of(path) -> dict:
    """The ONNX plan stored in a checkpoint written by :func:`save`."""
    return json.loads(torch.load(path, weights_only=True)["plan"])
