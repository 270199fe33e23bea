"""The Python API: load, analyze, prune, apply a plan, save.

``prune`` dispatches: ``sequential`` to surgery.sequential, a PyTorch module to
surgery.torch_api, an ONNX model to the one-shot pipeline (surgery.pipeline)."""

from __future__ import annotations

from typing import Iterable

from surgery.errors import SurgeryError
from surgery.options import PruneOptions
from surgery.pipeline import Result, analyze, apply, is_torch_module, load, prune_onnx, save

__all__ = ["Result", "analyze", "apply", "load", "prune", "save"]


def prune(
    source,
    example_inputs=None,
    *,
    ratio: float | None = None,  # 0.5 unless a target is given
    criterion: str = "l2",
    global_rank: bool = False,
    round_to: int = 1,
    keep: Iterable[str] = (),
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    verify_result: bool = True,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    head_dim_ratio: float = 0.0,
    gqa: str = "kv",
    target_params: float | None = None,  # targets: passes/targets.py
    target_flops: float | None = None,
    calib=None,  # calibration: passes/stats.py
    calib_samples: int | None = None,
    calib_batch: int = 16,
    compensate: str | None = None,  # compensation: passes/compensate.py
    loss=None,  # PyTorch path only: the loss of the taylor criterion
    strict_config: bool = True,  # PyTorch path only: refuse what from_pretrained cannot reload
    sequential: bool = False,  # sequential: one group at a time (surgery/sequential.py)
) -> Result:
    """Remove ``ratio`` of the units of every prunable group (channels, heads, ...), lowest
    ``criterion`` score first. ``ratio`` counts units, not parameters.

    Per kind of group: ``head_ratio`` (attention heads; default ``ratio``), ``mlp_ratio``
    (units between two linear layers; default ``ratio``), ``hidden_ratio`` (the residual
    stream, inexact; default ``ratio``), ``head_dim_ratio`` (channels inside every head;
    default 0). ``gqa="kv"`` removes whole key/value heads with the query heads that
    share them; ``gqa="query"`` removes query heads evenly from every key/value group.

    ``target_params`` / ``target_flops`` (instead of ``ratio``): the fraction of parameters
    or FLOPs KEPT; units go in the global ranking until it is reached (passes/targets.py),
    and ``report["target"]`` says how close it came.

    ``calib``: calibration data (an .npz path, a dict of arrays whose first axis indexes
    samples, or an iterable of input dicts; passes/stats.py), required by the data-aware
    criteria (``activation``, ``wanda``, ``flap``, ``obs``) and by ``compensate`` ("bias"
    or "lstsq": re-fit the consumers of removed channels, passes/compensate.py; the
    uncompensated cut is what ``report["verify"]`` checks). ``calib_samples`` caps the
    samples used, ``calib_batch`` the samples per onnxruntime run.

    ``sequential``: prune the groups one at a time in graph order, re-collecting each one's
    statistics from the already pruned (and compensated) earlier layers (surgery/sequential.py)."""

    # every option validated once, here, before the dispatch
    options = PruneOptions(ratio=ratio, criterion=criterion, global_rank=global_rank, round_to=round_to, keep=keep,
        seed=seed, input_shapes=input_shapes, verify_result=verify_result, head_ratio=head_ratio,
        mlp_ratio=mlp_ratio, hidden_ratio=hidden_ratio, head_dim_ratio=head_dim_ratio, gqa=gqa,
        target_params=target_params, target_flops=target_flops, calib=calib, calib_samples=calib_samples,
        calib_batch=calib_batch, compensate=compensate, loss=loss, strict_config=strict_config).as_kwargs()
    if sequential:  # one group at a time (surgery/sequential.py)
        from surgery.sequential import prune_sequential

        return prune_sequential(source, example_inputs, **options)
    if is_torch_module(source):  # PyTorch in and out (surgery.torch_api)
        if compensate is not None:
            raise SurgeryError("compensate= is not supported for PyTorch modules: the torch backend maps only the cut back")
        from surgery.torch_api import prune_module

        return prune_module(source, example_inputs, **options)
    return prune_onnx(source, example_inputs, **options)
