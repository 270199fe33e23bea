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

Rows of an embedding table (``nn.Embedding``) are never cut here: the only rows the ONNX
analysis can prove unused are those gathered by indices the example's shapes fix
(position ids 0..L-1 of a length-L example), and removing them would tie the module to
that length (and break ``max_position_embeddings``).

transformers models (a module with a ``config`` and a ``from_pretrained``): the rules
update the layers' attributes and vote for ``config`` (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size`` or its alias ``n_inner``...).
With ``strict_config=True`` (the default) the architecture is then rebuilt from the
updated config on the meta device and every parameter and buffer must come out with the
pruned shape, so that ``model.save_pretrained(d)`` / ``type(model).from_pretrained(d)``
gives the pruned model back; otherwise :class:`SurgeryError` says what the config cannot
describe (layers that now differ, or e.g. BERT and GPT-2, whose attention derives the
head size from ``hidden_size / num_attention_heads``, so removing heads cannot be stated
in their config). ``strict_config=False`` keeps such a module (``report["torch"]["config"]``
says why from_pretrained would fail; save it with :func:`save`).

Criterion ``"taylor"`` (this path only): first-order Taylor importance. Per weight entry,
``|w * dL/dw|`` summed over the calibration batches (``calib``: an iterable of batches
like ``example_inputs``; default: the example inputs alone), each batch's gradient taken
separately, so gradients of opposite sign in different batches do not cancel. ``L`` is
``loss(outputs, batch)`` (a scalar tensor), by default ``0.5 * mean(y ** 2)`` summed over
every floating output ``y`` (the output energy: nonzero gradients even for a randomly
initialized model, no labels needed). Gradients are taken in eval mode (dropout off,
batch norm on its running statistics: the function the ONNX model computes), for every
floating parameter (frozen ones too; ``requires_grad`` and ``.grad`` are left as they
were). The per-parameter arrays are mapped onto the exported model's initializers through
:class:`TorchMap` (folded weights such as a transposed Linear weight by their probed
indices), and a unit's score is the sum over every weight entry it removes, across all
coupled layers (as ``l1``/``l2`` do with ``|w|``/``w**2``); buffers and forward-built
constants have no gradient and add nothing. A unit whose weights get no gradient (a dead
ReLU channel, a channel no consumer reads) scores 0 and goes first.

This module imports torch; nothing else in ``surgery`` does at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from surgery import pipeline
from surgery.analysis import Analysis
from surgery.errors import SurgeryError
from surgery.plan import Plan
from surgery.backends.torch_module import (
    Applied,
    NotRepresentable,
    apply_module_cuts,
    check_module,
    is_attention,
    rule_for,
)
from surgery.frontends.torch_export import TorchMap, eval_mode, export_module, flat_tensors, onnx_feeds, split_inputs
from surgery.passes.criteria import Criterion

__all__ = ["TorchResult", "load", "prune_module", "save", "taylor_importance"]

FORMAT = "surgery-torch/1"


@dataclasses.dataclass
class TorchResult:
    module: nn.Module  # the pruned module (the user's classes)
    onnx: onnx.ModelProto  # the pruned ONNX model it was checked against
    report: dict
    plan: Plan  # the ONNX plan (tensor names of the exported model)
    module_cuts: dict[str, list[tuple[int, np.ndarray]]]  # qualified tensor name -> [(axis, removed)]
    result: Any = dataclasses.field(default=None, repr=False)  # the surgery.api.Result
    importance: dict | None = dataclasses.field(default=None, repr=False)  # taylor: group name -> unit scores

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
    criterion: str = "l2",
    calib=None,
    loss: Callable | None = None,
    strict_config: bool = True,
    **prune_kwargs,
) -> TorchResult:
    """Prune ``module`` (see the module doc). ``example_inputs``: a tensor, a tuple of
    positional arguments or a dict of keyword arguments. ``prune_kwargs`` are
    :func:`surgery.prune`'s (ratio, global_rank, round_to, keep, seed, input_shapes,
    verify_result, head_ratio, mlp_ratio, gqa, ...). The module is deep-copied unless
    ``inplace``; on any failure an in-place module is left as it was. Build the optimizer
    after pruning: the pruned parameters are new ``nn.Parameter`` objects.

    ``criterion="taylor"`` scores units by ``|w * dL/dw|`` (module doc) with gradients
    from ``calib`` (an iterable of batches like ``example_inputs``; default the example
    inputs) and ``loss(outputs, batch) -> scalar tensor`` (default
    ``0.5 * mean(output ** 2)`` over the floating outputs). For the data-aware ONNX
    criteria (``activation``, ``wanda``...), ``calib`` batches are turned into the exported
    model's feeds (an .npz path or a dict of arrays is passed on as is).

    ``strict_config``: for a transformers model, require that its updated config rebuilds
    exactly the pruned shapes (``save_pretrained`` / ``from_pretrained`` round-trip);
    see the module doc."""
    _check_args(module, criterion, loss)
    taylor = criterion == "taylor"
    batches = _calib_batches(calib, taylor)
    t0 = time.perf_counter()
    timings = {}
    proto = export_module(module, example_inputs, dynamic_shapes=dynamic_shapes)
    timings["export"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if prune_kwargs.get("input_shapes") is None:  # verify on the example's shapes (dynamic axes too)
        prune_kwargs["input_shapes"] = {k: tuple(v.shape) for k, v in onnx_feeds(proto, example_inputs).items()}
    m = _Mapped.of(proto, module, prune_kwargs["input_shapes"])
    keep = list(prune_kwargs.pop("keep", ()) or ())
    timings["map"] = time.perf_counter() - t1
    state = None
    if taylor:
        t1 = time.perf_counter()
        grads = taylor_importance(module, [example_inputs] if batches is None else batches, loss=loss)
        state = _TaylorState(_initializer_arrays(m.tmap, m.model, grads), {})
        timings["taylor"] = time.perf_counter() - t1
    if batches is not None and not taylor:  # data-aware ONNX criteria: the batches as feeds
        prune_kwargs["calib"] = [onnx_feeds(proto, b) for b in batches]
    elif calib is not None and not taylor:
        prune_kwargs["calib"] = calib  # .npz path or dict of arrays, keyed by the exported input names
    t1 = time.perf_counter()
    crit = Criterion("taylor", state.score) if state is not None else criterion  # bound to this module's gradients
    res = pipeline.prune_onnx(proto, keep=keep + m.protect, criterion=crit, **prune_kwargs)
    timings["prune_onnx"] = time.perf_counter() - t1
    sl = _apply_checked(module, res, m, example_inputs, inplace, timings)
    target, applied, pruned_proto = sl.target, sl.applied, sl.proto
    config = _config_report(target, applied, sl.baseline)
    if strict_config and config.get("from_pretrained") is False:
        if inplace:
            applied.undo()
        raise SurgeryError(
            f"from_pretrained cannot represent the pruned {type(target).__name__}: {config['why']}. The pruned module "
            f"itself is exact; pass strict_config=False to keep it anyway (then save it with "
            f"surgery.torch_api.save: save_pretrained would write a checkpoint from_pretrained cannot load)"
            f"{config.get('hint', '')}")
    report = dict(res.report)
    report["torch"] = _torch_report(sl, m, config, t0, timings, taylor, batches, loss)
    return TorchResult(target, pruned_proto, report, res.plan, sl.module_cuts, res,
                       importance=state.scores if state is not None else None)


def _torch_report(sl: "_Sliced", m: "_Mapped", config: dict, t0: float, timings: dict, taylor: bool, batches,
                  loss) -> dict:
    """``report["torch"]``: the module's side of a prune."""
    target, applied = sl.target, sl.applied
    by_id = {g.id: g for g in m.analysis.groups}
    out = {
        "params_before": sl.params_before,
        "params_after": _n_params(target),
        "max_abs_diff": sl.check["max_abs_diff"],
        "tolerance": sl.check["tolerance"],
        "protected_groups": [{"group": by_id[g].name, "why": why} for g, why in sorted(m.blocked.items())],
        "over_protected": m.over,
        "unmapped_cuts": sl.unmapped,  # forward-built constants the plan cut (the module must follow by itself)
        "constants_in_groups": m.constants,  # every such constant a prunable group would cut
        "changed_attributes": {k: {a: list(v) for a, v in d.items()} for k, d in applied.changed.items()},
        "config": config,
        "notes": applied.notes,
        "seconds": time.perf_counter() - t0,
        "timings": timings,
    }
    if taylor:
        out["taylor"] = {
            "batches": len(batches) if batches is not None else 1,
            "loss": getattr(loss, "__name__", type(loss).__name__) if loss is not None else "0.5 * mean(output ** 2)",
            "score": "sum over the batches and over every weight entry a unit removes of |w * dL/dw|",
        }
    return out


def _check_args(module, criterion: str, loss) -> None:
    if not isinstance(module, nn.Module):
        raise SurgeryError(f"prune_module expects a torch.nn.Module, got {type(module).__name__}")
    if loss is not None and criterion != "taylor":
        raise SurgeryError(f"loss= is for criterion='taylor' (gradients); criterion '{criterion}' does not use it")
    if loss is not None and not callable(loss):
        raise SurgeryError(f"loss must be a function (outputs, batch) -> scalar tensor, got {type(loss).__name__}")


@dataclasses.dataclass
class _Mapped:
    """The exported model as surgery.prune will load it, mapped onto the module: the groups
    the module cannot represent (protected by name) and the constants built in forward."""

    tmap: TorchMap
    model: object  # ir.Model
    analysis: object  # surgery.analysis.Analysis
    blocked: dict
    constants: list
    protect: list
    over: list

    @classmethod
    def of(cls, proto, module: nn.Module, input_shapes) -> "_Mapped":
        tmap = TorchMap(proto, module)
        model = pipeline.load(proto, input_shapes=input_shapes)  # as surgery.prune will load it
        analysis = Analysis(model)
        blocked, constants = _unrepresentable_groups(analysis, tmap, module, model)
        protect, over = _protect_names(analysis, blocked)
        return cls(tmap, model, analysis, blocked, constants, protect, over)


@dataclasses.dataclass
class _Sliced:
    target: nn.Module  # the pruned module (the user's, in place, or a copy)
    applied: Applied
    module_cuts: dict
    unmapped: list
    check: dict
    params_before: int
    baseline: Any  # what the config already missed before pruning (a pretrained model), else None
    proto: onnx.ModelProto  # the pruned ONNX model the module was checked against


def _apply_checked(module: nn.Module, res, m: _Mapped, example_inputs, inplace: bool, timings: dict) -> _Sliced:
    """Slice the plan into (a copy of) the module and check it against the pruned ONNX
    model. On a failed check an in-place module is restored."""
    t1 = time.perf_counter()
    cuts = res.plan.tensor_cuts()
    module_cuts, unmapped = m.tmap.to_module_cuts(cuts, m.model)
    params_before = _n_params(module)
    baseline = _rebuild_diff(module) if _is_pretrained(module) else None  # what the config already missed
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
    return _Sliced(target, applied, module_cuts, unmapped, check, params_before, baseline, pruned_proto)


# --------------------------------------------------------------------------- #
# transformers: can the config rebuild the pruned model?
# --------------------------------------------------------------------------- #


def _is_pretrained(module: nn.Module) -> bool:
    cfg = getattr(module, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and callable(getattr(type(module), "from_pretrained", None))


_SKIP_ATTRS = {"training"}


def _rebuild_diff(module: nn.Module) -> tuple[str | None, dict, dict]:
    """Rebuild ``type(module)(module.config)`` on the meta device: (the exception if that
    fails, {tensor: (module shape, rebuilt shape)}, {"module.attr": (module value, rebuilt
    value)} for the int/float/bool attributes of every submodule)."""
    try:
        with torch.device("meta"), _quiet_warnings():
            fresh = type(module)(copy.deepcopy(module.config))
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0] if msg else ''}", {}, {}
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    shapes = {k: (want[k], got[k]) for k in want if k in got and want[k] != got[k]}
    attrs = {}
    fresh_mods = dict(fresh.named_modules())
    for name, mod in module.named_modules():
        other = fresh_mods.get(name)
        if other is None or type(other) is not type(mod):
            continue
        for a, v in vars(mod).items():
            if a.startswith("_") or a in _SKIP_ATTRS or type(v) not in (int, float, bool):
                continue
            w = getattr(other, a, None)
            if type(w) is type(v) and w != v:
                attrs[f"{name}.{a}" if name else a] = (v, w)
    return None, shapes, attrs


def _config_report(module: nn.Module, applied, baseline) -> dict:
    """{"updated": {key: [old, new]}, "from_pretrained": True | False | None (not a
    transformers model), "why", "hint"}: whether ``type(module)(module.config)`` builds
    every parameter and buffer with the pruned shape and every layer attribute (a head
    count, ``num_key_value_groups``, ``scaling``...) with its pruned value. ``baseline``:
    :func:`_rebuild_diff` of the module before the cut (differences it already had are
    not the cut's)."""
    out: dict = {"updated": {k: list(v) for k, v in applied.config.items()}, "from_pretrained": None}
    if baseline is None or not _is_pretrained(module):
        return out
    cfg = module.config
    heads_changed = sorted({f"{type(module.get_submodule(name)).__name__}" for name, attrs in applied.changed.items()
                            if any(a in ("num_heads", "num_attention_heads", "n_head", "n_heads") for a in attrs)})
    hint = ""
    if heads_changed and not hasattr(cfg, "head_dim"):
        hint = (f"; {', '.join(heads_changed)} {'derives' if len(heads_changed) == 1 else 'derive'} the head size "
                f"from config.hidden_size / config.num_attention_heads (the config has no head_dim), so removing "
                f"heads cannot be stated in {type(cfg).__name__}: prune with head_ratio=0 to keep from_pretrained "
                f"working")
    if applied.conflicts:
        diff = "; ".join(f"config.{k} would have to be each of {v}" for k, v in applied.conflicts.items())
        out.update({"from_pretrained": False, "why": f"its layers now differ ({diff}) and the config holds one "
                    f"value for every layer", "hint": hint or "; prune every layer alike (no global_rank or "
                    "targets) to keep from_pretrained working"})
        return out
    failed, shapes, attrs = _rebuild_diff(module)
    if failed is not None and baseline[0] is None:
        out.update({"from_pretrained": False, "hint": hint,
                    "why": f"{type(module).__name__}(config) fails with the updated config: {failed}"})
        return out
    shapes = {k: v for k, v in shapes.items() if k not in baseline[1]}
    attrs = {k: v for k, v in attrs.items() if k not in baseline[2]}
    changed = ", ".join(f"{k}={v[1]}" for k, v in applied.config.items()) or "unchanged"
    if shapes:
        k, (want, got) = next(iter(shapes.items()))
        more = f" ({len(shapes) - 1} more tensors differ)" if len(shapes) > 1 else ""
        out.update({"from_pretrained": False, "hint": hint, "mismatched": sorted(shapes),
                    "why": f"the updated config ({changed}) builds '{k}' with shape {list(got)}, the pruned "
                           f"model has {list(want)}{more}"})
        return out
    if attrs:
        k, (want, got) = next(iter(attrs.items()))
        more = f" ({len(attrs) - 1} more attributes differ)" if len(attrs) > 1 else ""
        out.update({"from_pretrained": False, "hint": hint, "mismatched": sorted(attrs),
                    "why": f"the updated config ({changed}) builds {k} = {got!r}, the pruned model has {want!r}{more}"})
        return out
    out["from_pretrained"] = failed is None
    return out


class _quiet_warnings:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# --------------------------------------------------------------------------- #
# criterion "taylor": |w * dL/dw|
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _TaylorState:
    """The taylor criterion bound to one module's gradients: ``score`` is what
    :func:`prune_module` passes as the criterion (no registry entry, no global state)."""

    arrays: dict[str, np.ndarray]  # ONNX initializer name -> summed |w * g| (its shape)
    scores: dict[str, np.ndarray]  # group name -> unit scores (filled as the criterion runs)
    per_atom: tuple | None = None  # (analysis, per-atom sums) of the last analysis scored

    def score(self, group, ctx) -> np.ndarray:
        """Per unit: the summed |w * dL/dw| of the weights it removes."""
        if self.per_atom is None or self.per_atom[0] is not group.analysis:
            self.per_atom = (group.analysis, _per_atom(group.analysis, self.arrays))
        scores = self.per_atom[1][group.atoms]
        self.scores[group.name] = scores
        return scores


def _per_atom(analysis, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Per atom: the sum of ``arrays[name]`` over every entry of initializer ``name`` it
    removes along each cut axis (:meth:`Analysis.weight_stat` with given arrays in place of
    ``elementwise(weight)``)."""
    vec = np.zeros(analysis.dims.n_elements, dtype=np.float64)
    for ax_id, (name, k, value) in analysis._initializer_axes().items():
        arr = arrays.get(name)
        if arr is None:
            continue
        shape = tuple(int(d) for d in value.shape)
        if arr.shape != shape:
            raise SurgeryError(f"internal error: taylor scores of '{name}' have shape {list(arr.shape)}, "
                               f"the weight {list(shape)}")
        ax = analysis.dims.axes[ax_id]
        other = tuple(j for j in range(arr.ndim) if j != k)
        vec[ax.offset: ax.offset + ax.size] = arr.sum(axis=other, dtype=np.float64)
    return analysis.atom_sums(vec)


def _default_loss(outputs, batch) -> torch.Tensor:
    ys = [y for y in flat_tensors(outputs) if y.is_floating_point()]
    if not ys:
        raise SurgeryError("the module returns no floating tensor: give criterion='taylor' a loss= function")
    return sum(0.5 * y.float().square().mean() for y in ys)


def taylor_importance(module: nn.Module, batches, *, loss: Callable | None = None) -> dict[str, np.ndarray]:
    """Per parameter (every qualified name, shared ones under each): ``sum over batches of
    |w * dL/dw|`` (float32, the parameter's shape), in eval mode. ``batches``: an iterable
    of batches, each a tensor, tuple or dict as ``example_inputs``. ``loss(outputs,
    batch)`` must return a scalar tensor (default ``0.5 * mean(output ** 2)`` over the
    floating outputs). Parameters' ``requires_grad`` and ``.grad`` are left untouched."""
    if isinstance(batches, torch.Tensor):
        raise SurgeryError("taylor_importance takes an iterable of batches; wrap a single batch in a list")
    todo = list(batches)
    if not todo:
        raise SurgeryError("criterion 'taylor' got no calibration batch")
    loss_fn = loss or _default_loss
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.is_floating_point():
            params.setdefault(id(p), p)
            names.setdefault(id(p), []).append(name)
    plist = list(params.values())
    if not plist:
        raise SurgeryError(f"{type(module).__name__} has no floating parameters to take gradients of")
    flags = [p.requires_grad for p in plist]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in plist]  # as big as the model
    try:
        for p in plist:
            p.requires_grad_(True)
        with eval_mode(module), torch.enable_grad():
            for b, batch in enumerate(todo):
                args, kwargs = split_inputs(batch)
                try:
                    out = module(*args, **kwargs)
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()
                    raise SurgeryError(f"taylor: the module fails on calibration batch {b}: "
                                       f"{type(e).__name__}: {msg[0] if msg else ''}") from e
                value = loss_fn(out, batch)
                if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                    raise SurgeryError(f"taylor: loss must return a scalar floating tensor, got "
                                       f"{type(value).__name__}{list(value.shape) if isinstance(value, torch.Tensor) else ''}")
                if not value.requires_grad:
                    raise SurgeryError("taylor: the loss does not depend on the module's parameters (no gradient)")
                grads = torch.autograd.grad(value.reshape(()), plist, allow_unused=True)
                for a, p, g in zip(acc, plist, grads):
                    if g is not None:
                        a += (p.detach().float() * g.float()).abs()
    finally:
        for p, f in zip(plist, flags):
            p.requires_grad_(f)
    out_arrays: dict[str, np.ndarray] = {}
    for a, p in zip(acc, plist):
        arr = a.cpu().numpy()
        for n in names[id(p)]:
            out_arrays[n] = arr
    return out_arrays


def _initializer_arrays(tmap: TorchMap, model, per_param: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-parameter arrays -> per ONNX initializer of the loaded ``model``: a parameter
    used directly gives its array; a weight the loader folded (a transposed Linear weight)
    takes each entry from the parameter entry the probing found; constants, buffers and
    weights computed by arithmetic get none (no gradient)."""
    out: dict[str, np.ndarray] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is None or value.shape is None:
            continue
        d = tmap.derivation(name, model)
        shape = tuple(int(x) for x in value.shape)
        if d["kind"] == "direct":
            arr = per_param.get(d["source"])
            if arr is not None and arr.shape == shape:
                out[name] = arr
        elif d["kind"] == "index" and all(q in per_param for q in d["sources"]):
            arr = np.zeros(shape, dtype=np.float32)
            for s, q in enumerate(d["sources"]):
                src = per_param[q]
                sel = d["src"] == s
                arr[sel] = src[tuple(d["idx"][a][sel] for a in range(src.ndim))]
            out[name] = arr
    return out


def _calib_batches(calib, taylor: bool) -> list | None:
    """The calibration batches for the torch path: None, or a list of batches (each like
    ``example_inputs``). An .npz path or a dict (ONNX-style, keyed by input names) is
    left to :func:`surgery.prune` (None here), except for taylor, which needs batches."""
    if calib is None:
        return None
    if isinstance(calib, (str, os.PathLike, dict)):
        if taylor:
            raise SurgeryError("criterion 'taylor' takes calib= as an iterable of batches like example_inputs "
                               f"(tensors, tuples or dicts of tensors), not {type(calib).__name__}")
        return None
    if isinstance(calib, torch.Tensor):
        raise SurgeryError("calib= is an iterable of batches like example_inputs; wrap a single batch in a list: "
                           "calib=[x]")
    try:
        batches = list(calib)
    except TypeError as e:
        raise SurgeryError(f"calib= must be an iterable of batches like example_inputs, got "
                           f"{type(calib).__name__}") from e
    if not batches:
        raise SurgeryError("calib= holds no batch")
    return batches


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
            _embedding_rows(module, mcuts)
            _dry_run(module, mcuts)
        except NotRepresentable as e:
            out[g.id] = str(e)
            continue
        constants.extend({"group": g.name, "tensor": u["tensor"], "module": u["module"]} for u in unmapped)
    return out, constants


def _embedding_rows(module: nn.Module, mcuts: dict) -> None:
    """Refuse to cut rows of an embedding table (see the module doc)."""
    for name, c in mcuts.items():
        owner, _, attr = name.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and attr == "weight" and any(a == 0 for a, _ in c):
            raise NotRepresentable(
                f"rows of '{owner}' ({type(mod).__name__}) look unused only because the example inputs' shapes fix "
                f"the indices it is read at (positions 0..L-1 of a length-L example); removing them would tie the "
                f"module to those shapes")


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
    g = next((g for g in analysis.groups if g.prunable), None)
    if g is None or g.name in analysis.value_axes:
        return False
    try:
        return pipeline.protected_atoms(analysis, [g.name]) == set(g.atoms.tolist())
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
