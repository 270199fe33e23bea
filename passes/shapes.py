"""Shape completion: fill shapes onnx's inference leaves unknown where the op keeps its
input's shape (newer or contrib normalization ops), so analysis can see the channels."""

from __future__ import annotations

import math

import onnx_ir as ir

from surgery.irtools import weights_detached

SAME_SHAPE = {
    ("", "GroupNormalization"), ("", "RMSNormalization"), ("", "LayerNormalization"),
    ("com.microsoft", "SimplifiedLayerNormalization"), ("com.microsoft", "LayerNormalization"),
    ("com.microsoft", "FastGelu"), ("com.microsoft", "QuickGelu"), ("com.microsoft", "Gelu"),
    ("com.microsoft", "BiasGelu"),
}


def complete_shapes(model: ir.Model) -> int:
    """Returns how many output shapes it filled."""
    filled = 0
    for node in model.graph:
        dom = "" if node.domain in ("", "ai.onnx") else node.domain
        if (dom, node.op_type) not in SAME_SHAPE:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is not None and x.shape is not None and y.shape is None:
            y.shape = ir.Shape(list(x.shape))
            if y.type is None and x.type is not None:
                y.type = x.type
            filled += 1
    return filled


# distinct sizes for symbolic input dims: odd primes that rarely equal a channel count,
# small enough to run (a sequence must fit the position table)
_PRIMES = (7, 5, 11, 13, 3, 17, 19, 23)


def _anonymous(d) -> bool:
    """Any dim that is not a static int: analysis sees it at a concrete size."""
    return not isinstance(d, int)


def concrete_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """For analysis only: every value's shape with each symbolic graph-input dim set to a
    distinct uncommon size (or the one ``--input-shape`` gave) and re-inferred.

    Exporters write head counts as -1 next to run-time batch and sequence sizes, and
    merge batch with heads (``[-1, S, D]``); with concrete sizes every reshape factors
    exactly. Row-major reshapes index the same way whatever the batch, so the
    factorization found holds for every size. The model keeps its symbols: only what
    the rules see is concrete."""
    import onnx


    values = {o.name: o for n in model.graph for o in n.outputs}
    if not any(v.shape is None or any(_anonymous(d) for d in v.shape) for v in values.values()):
        return {}
    sizes: dict[str, int] = {}
    given = model.meta.get("surgery.input_shapes") or {}
    saved = []
    for v in model.graph.inputs:
        if v.name in given and v.shape is not None:
            for d, n in zip(v.shape, given[v.name]):
                if not isinstance(d, int) and getattr(d, "value", None):
                    sizes.setdefault(d.value, int(n))
    for v in model.graph.inputs:
        saved.append((v, v.shape))
        if v.shape is None:
            continue
        dims = []
        for d in v.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                key = getattr(d, "value", None) or f"anon{len(sizes)}"
                sizes.setdefault(key, _PRIMES[len(sizes) % len(_PRIMES)])
                dims.append(sizes[key])
        v.shape = ir.Shape(dims)
    try:
        with weights_detached(model):
            proto = ir.serde.serialize_model(model)
    finally:
        for v, shp in saved:
            v.shape = shp
    # stale intermediate shapes would be kept by inference: drop them
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - analysis falls back to what it had
        return {}
    out: dict[str, tuple[int | None, ...]] = {}
    missing = []
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        v = values.get(vi.name)
        if v is None or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if v.shape is None:
            out[vi.name] = tuple(dims)
        elif len(v.shape) == len(dims):
            out[vi.name] = tuple(
                dims[k] if _anonymous(d) else (d if isinstance(d, int) else None) for k, d in enumerate(v.shape)
            )
    for name, v in values.items():
        got = out.get(name)
        if (got is None and v.shape is None) or (got is not None and None in [
                g for g, d in zip(got, v.shape or got) if _anonymous(d)]):
            missing.append(name)
    if missing:
        _fill_by_running(model, sizes, values, missing, out)
    return out


def _fill_by_running(model, sizes, values, missing, out) -> None:
    """Last resort: run the model once at those sizes with the unknown values exposed
    as outputs, and read their real shapes. Skipped for models with external data."""
    import numpy as np
    import onnxruntime as ort

    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return
    proto = ir.to_proto(model)
    del proto.graph.value_info[:]
    known = {o.name for o in proto.graph.output}
    import onnx

    for name in missing:
        if name not in known:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds = {}
    rng = np.random.default_rng(0)
    for inp in proto.graph.input:
        t = inp.type.tensor_type
        shp = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 1) for d in t.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if math.prod(shp) > 2**28:  # declared too large to make up: analysis keeps what it has
            return
        feeds[inp.name] = rng.standard_normal(shp).astype(dt) if dt.kind == "f" else np.zeros(shp, dt) + (dt == bool)  # noqa: E721 - a numpy dtype equals the type bool
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        res = sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - analysis keeps what it has
        return
    for name, arr in zip(names, res):
        v = values.get(name)
        if v is None or not hasattr(arr, "shape"):
            continue
        if v.shape is None:
            out[name] = tuple(int(d) for d in arr.shape)
        elif len(v.shape) == arr.ndim:
            out[name] = tuple(int(arr.shape[k]) if _anonymous(d) else (d if isinstance(d, int) else None)
                              for k, d in enumerate(v.shape))
