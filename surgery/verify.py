"""Verification: run the pruned model in onnxruntime and check mask-equivalence.

The masked original is the input model with every weight slice the plan removes
set to zero. Where the cut is exact it must give the pruned model's outputs to
float tolerance; where a normalization spans a cut axis it cannot, and the
report says so instead of claiming either way.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from surgery.errors import SurgeryError

_NP = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_,
    ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8,
}


@dataclasses.dataclass
class VerifyResult:
    max_abs_diff: float | None
    exact: bool | None
    why: str
    validated: bool = True  # the output loads in onnxruntime (False only when that could not be checked)

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "exact": self.exact, "why": self.why, "validated": self.validated}


MAX_FEED_ELEMENTS = 2**28  # elements of one made-up verification input


def random_feeds(model: ir.Model, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        dt = _NP.get(v.dtype, np.float32)
        shp = shapes[v.name]
        if math.prod(shp) > MAX_FEED_ELEMENTS:  # a declared [1, 3, 2**20, 2**20] is no input to make up
            raise SurgeryError(f"cannot verify: input '{v.name}' of shape {'x'.join(map(str, shp))} is too large "
                               f"to make up (more than {MAX_FEED_ELEMENTS} elements); use --no-verify or --input-shape")
        if np.issubdtype(dt, np.floating):
            feeds[v.name] = rng.standard_normal(shp).astype(dt)
        elif dt == np.bool_:
            feeds[v.name] = np.ones(shp, dtype=dt)
        else:
            feeds[v.name] = np.zeros(shp, dtype=dt)
    return feeds


def session(proto: onnx.ModelProto | str) -> ort.InferenceSession:
    """An onnxruntime session (no graph optimization, no log lines) on a proto or a file path."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = proto if isinstance(proto, str) else proto.SerializeToString()
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise SurgeryError(f"onnxruntime cannot load the model: {(str(e).splitlines() or [type(e).__name__])[0]}") from e


def load_error(path: str) -> str | None:
    """Why the ONNX file at ``path`` fails onnx's checker or an onnxruntime session, or None."""
    try:
        onnx.checker.check_model(path)
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f"onnx.checker: {(str(e).splitlines() or [type(e).__name__])[0]}"
    try:
        session(path)
    except SurgeryError as e:
        return str(e)
    return None


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(proto)
    try:
        return sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        shapes = ", ".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in feeds.items())
        raise SurgeryError(f"onnxruntime cannot run the model on inputs {shapes}: {str(e).splitlines()[0]}") from e


def masked(original: onnx.ModelProto, plan_tensors: dict[str, list[tuple[int, np.ndarray]]]) -> onnx.ModelProto:
    """The original with every removed weight slice set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(original)
    for init in out.graph.initializer:
        cuts = plan_tensors.get(init.name)
        if not cuts:
            continue
        arr = onnx.numpy_helper.to_array(init).copy()
        for axis, idx in cuts:
            sl = [slice(None)] * arr.ndim
            sl[axis] = idx
            arr[tuple(sl)] = 0
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    return out


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise SurgeryError(f"pruned model output shape {y.shape} differs from the original's {x.shape}")
        if x.size and np.issubdtype(x.dtype, np.number):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            same = (x64 == y64) | (np.isnan(x64) & np.isnan(y64))  # equal infinities and NaNs agree
            with np.errstate(invalid="ignore"):
                d = np.where(same, 0.0, np.abs(x64 - y64))
            worst = max(worst, float(np.nan_to_num(d, nan=np.inf).max()))
    return worst


def tolerance(ref: list[np.ndarray]) -> float:
    finite = [np.abs(r[np.isfinite(r)]) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)]
    scale = max((float(f.max()) for f in finite if f.size), default=1.0)
    return 1e-4 * max(1.0, scale)


def verify(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    plan_tensors: dict[str, list[tuple[int, np.ndarray]]],
    feeds: dict[str, np.ndarray],
    inexact_reason: str | None,
) -> VerifyResult:
    out_pruned = run(pruned, feeds)
    out_masked = run(masked(original, plan_tensors), feeds)
    diff = compare(out_masked, out_pruned)
    if inexact_reason:
        return VerifyResult(diff, None, f"not exact by construction: {inexact_reason}")
    tol = tolerance(out_masked)
    if diff <= tol:
        return VerifyResult(diff, True, f"mask-equivalent within {tol:.1e}")
    return VerifyResult(diff, False, f"outputs differ from the masked original by {diff:.3g} (tolerance {tol:.1e})")


def load_check(source: str, verify_report: dict):
    """For a run without verification: a check of the written output that it loads (onnx
    checker and an onnxruntime session), noted in ``verify_report``. An output that does
    not load is refused, unless the input does not load either (ops this onnxruntime lacks):
    then the report and stderr say plainly that the output was not validated."""
    def check(path) -> None:
        problem = load_error(str(path))
        if problem is None:
            verify_report["why"] += "; the output loads in onnxruntime"
            return
        base = load_error(source)
        if base is None:
            raise SurgeryError(f"the pruned model does not load ({problem}) though the input does; "
                               "this is a bug, please report it")
        verify_report["validated"] = False
        verify_report["why"] += f"; not validated: the input does not load either ({base})"
    return check
