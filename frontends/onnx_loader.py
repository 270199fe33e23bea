"""ONNX frontend: validate an ONNX model, lower it into ``onnx_ir`` and normalize it.

Public API
----------
``load_onnx(source, *, input_shapes=None) -> onnx_ir.Model``
    ``source`` is a path to a binary ``.onnx`` file or an ``onnx.ModelProto``.
    The file is never modified. Checks, in order, each failing with a one-line
    :class:`~surgery.errors.SurgeryError` that names the problem and the file:
    the path exists and is a regular file; it parses as an ONNX ``ModelProto``
    (a cut-off file is reported as truncated); it has a graph; its default-domain
    opset is in ``[MIN_OPSET, onnx.defs.onnx_opset_version()]``; every external
    data reference is relative, stays inside the model's folder, and points at a
    file that holds ``offset + length`` bytes; ``onnx.checker`` accepts it.

    The model is then loaded lazily (external data stays memory-mapped through
    ``onnx_ir.ExternalTensor``; the protobuf is parsed once, without external
    data) and normalized for analysis:

    1. initializers that old exporters also list as graph inputs are removed from
       the inputs (they are weights, not inputs); ``ir_version`` is raised to 4
       when that happens, because IR < 4 requires initializers to be inputs;
    2. ``Constant`` nodes holding a tensor (``value``, ``value_float(s)``,
       ``value_int(s)``, ``value_string(s)``) become initializers named after the
       Constant's output (not when that output is a graph output);
    3. nodes of the main graph whose inputs are all initializers are evaluated
       (with onnxruntime, falling back to ``onnx.reference``) and replaced by
       initializers named after their outputs (see :func:`fold_constant_weights`);
       nothing else in the graph is touched (no fusion, no Identity/Dropout
       removal, no renaming of non-constant values);
    4. shapes are inferred (:func:`infer_shapes` without clearing what the file
       declares).

    Graph input and output names, dtypes and declared (dynamic) shapes are never
    changed.

``input_shapes``
    Validated by ``load_onnx`` (unknown input name, rank mismatch, a value that
    contradicts a static dim, or a negative dim -> SurgeryError) and stored in
    ``model.meta[META_INPUT_SHAPES]``. It is *not* applied to the graph: the
    declared dynamic axes stay dynamic and intermediate shapes keep their symbolic
    dims. Use :func:`concrete_input_shapes` to get the shapes to run or verify
    with.

``concrete_input_shapes(model, input_shapes=None) -> dict[str, tuple[int, ...]]``
    Declared dims, with each symbolic dim replaced by its override, by the value
    the same symbol got in another input's override, or by 1.

``infer_shapes(model) -> None``
    Re-infers every intermediate shape in place (clearing stale intermediate
    shapes first) and keeps the declared shapes of graph inputs and outputs; the
    inferred shape of a graph output is kept in
    ``value.meta[META_INFERRED_SHAPE]``. It runs ``onnx.shape_inference`` with
    ``data_prop=True, strict_mode=False`` on a proto from which big weights are
    temporarily detached (so lazy external data is never read and >2 GB models
    work), then fills dims that ONNX left unknown with what onnxruntime's
    sympy-based symbolic shape inference finds exactly: integers, or expressions
    over the graph inputs' own symbols (``batch``, ``5*batch``), never the fresh
    symbols it invents. It runs with ``auto_merge=False`` and
    ``guess_output_rank=False`` so it never guesses. This resolves e.g.
    ``Reshape(x, [N, -1])`` with a symbolic batch ``N`` (ONNX gives ``[N, unk]``).
    Measured on a 207-node conv net with a symbolic batch: ``onnx.shape_inference``
    and ``onnx_ir``'s ``ShapeInferencePass`` give the same shapes (206/207 without
    an unknown dim, ~15 ms vs ~25 ms); the symbolic pass completes the last one
    (~70 ms). ``ShapeInferencePass`` itself is not used: it does not clear stale
    shapes, is all-or-nothing in strict mode, and moves big initializers to the
    end of the initializer list (changing the external-data layout on save).
    Without ``sympy`` the refinement is skipped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import (
    RemoveUnusedNodesPass,
    LiftConstantsToInitializersPass,
    RemoveInitializersFromInputsPass,
)

from surgery.errors import SurgeryError
from surgery.irtools import weights_detached
from surgery.passes.fold_shapes import fold_static_shapes
from surgery.passes.shapes import complete_shapes

__all__ = [
    "META_FOLDED_FROM",
    "META_INFERRED_SHAPE",
    "META_INPUT_SHAPES",
    "META_SOURCE",
    "MIN_OPSET",
    "concrete_input_shapes",
    "fold_constant_weights",
    "infer_shapes",
    "iter_tensor_protos",
    "load_onnx",
    "referenced_files",
]

logger = logging.getLogger(__name__)

#: model.meta key: the validated ``input_shapes`` passed to :func:`load_onnx`.
META_INPUT_SHAPES = "surgery.input_shapes"
#: model.meta key: the path the model was loaded from ("<in-memory ModelProto>" otherwise).
META_SOURCE = "surgery.source"
#: value.meta key on folded initializers: names of the file's initializers they were computed from.
META_FOLDED_FROM = "surgery.folded_from"
#: value.meta key on graph outputs: the inferred shape (the declared one is left unchanged).
META_INFERRED_SHAPE = "surgery.inferred_shape"

#: Oldest default-domain opset accepted.
MIN_OPSET = 9

_PROTO_LABEL = "<in-memory ModelProto>"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Folding policy (see fold_constant_weights).
_FOLD_SHARED_INPUT_BYTES = 64 * 1024
_FOLD_GROWTH_ALLOWANCE_BYTES = 1024 * 1024
_FOLD_MAX_LAZY_INPUT_BYTES = 64 * 1024 * 1024
_NEVER_FOLD = frozenset(
    {
        # control flow / subgraphs
        "If",
        "Loop",
        "Scan",
        "SequenceMap",
        # non-deterministic
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Dropout",
        # keep quantized weights quantized (folding DQ would store them as float)
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Constant",
    }
)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


def load_onnx(
    source: str | os.PathLike | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ir.Model:
    """Validate, load and normalize an ONNX model (see the module docstring)."""
    if isinstance(source, onnx.ModelProto):
        label = _PROTO_LABEL
        proto = onnx.ModelProto()
        proto.CopyFrom(source)  # the IR keeps references into the proto: never share the caller's
        base_dir = None
        path = None
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        label = path
        proto = _read_model_proto(path)
        base_dir = os.path.dirname(os.path.abspath(path))
    else:
        raise SurgeryError(
            f"load_onnx expects a path or an onnx.ModelProto, got {type(source).__name__}"
        )

    _check_opset(proto, label)
    _check_external_data(proto, base_dir, label)
    _check_declared_dims(proto, label)
    _run_checker(proto if path is None else path, label)

    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad model
        raise SurgeryError(f"cannot convert {label!r} to onnx_ir: {_one_line(exc)}") from exc
    if base_dir is not None:
        # Absolute base dir: lazy tensors must not depend on the current directory,
        # and onnx_ir only runs its path-containment checks with a non-empty base dir.
        ir.external_data.set_base_dir(model.graph, base_dir)
    model.meta[META_SOURCE] = label

    _normalize(model, label)

    if input_shapes is not None:
        model.meta[META_INPUT_SHAPES] = _validate_input_shapes(model, input_shapes, label)
    return model


def concrete_input_shapes(
    model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Shapes to feed each graph input with when running or verifying ``model``.

    ``input_shapes`` (default: the ones stored by :func:`load_onnx`) override whole
    inputs. Any other symbolic dim takes the value its symbol got in an
    overridden input, else 1. An input with no declared shape must be overridden.
    """
    label = str(model.meta.get(META_SOURCE, "model"))
    if input_shapes is None:
        overrides = dict(model.meta.get(META_INPUT_SHAPES) or {})
    else:
        overrides = _validate_input_shapes(model, input_shapes, label)

    # Bind symbols from the overrides (same symbol name -> same value everywhere).
    bindings: dict[str, tuple[int, str]] = {}
    for value in model.graph.inputs:
        shape = overrides.get(value.name)
        if shape is None or value.shape is None:
            continue
        for dim, concrete in zip(value.shape, shape):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                seen = bindings.get(dim.value)
                if seen is not None and seen[0] != concrete:
                    raise SurgeryError(
                        f"input_shapes for {label!r} give symbolic dim {dim.value!r} two values: "
                        f"{seen[0]} (input {seen[1]!r}) and {concrete} (input {value.name!r})"
                    )
                bindings[dim.value] = (concrete, value.name)

    result: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.name in overrides:
            result[value.name] = tuple(overrides[value.name])
            continue
        if value.shape is None:
            raise SurgeryError(
                f"input {value.name!r} of {label!r} has no declared shape; "
                f"pass input_shapes={{{value.name!r}: (...)}}"
            )
        dims = []
        for dim in value.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif dim.value is not None and dim.value in bindings:
                dims.append(bindings[dim.value][0])
            else:
                dims.append(1)
        result[value.name] = tuple(dims)
    return result


def infer_shapes(model: ir.Model) -> None:
    """Re-infer all intermediate shapes in place (after a rewrite).

    Intermediate shapes (outputs of nodes, in the main graph and in subgraphs)
    are cleared first; dtypes are kept. Graph inputs and outputs keep their
    declared shapes and dtypes.
    """
    _infer_shapes(model, clear=True)


def fold_constant_weights(model: ir.Model) -> int:
    """Fold main-graph nodes whose inputs are all initializers; return how many.

    A folded node is replaced by initializers named after its outputs (so
    ``Constant -> Transpose -> Conv`` leaves ``Conv`` reading one initializer).
    Each new initializer records in ``value.meta[META_FOLDED_FROM]`` the names of
    the original initializers it was computed from. Not folded: non-default
    domains, control flow, random ops, Q/DQ (weights stay quantized), nodes
    producing graph outputs, nodes that read a weight > 64 KiB that something
    else also reads (folding would duplicate and "untie" it), nodes reading a
    memory-mapped external weight > 64 MiB (folding would pull it into RAM; a
    model bigger than memory must stay lazy), and nodes whose result would be
    more than 1 MiB bigger than their inputs (e.g. Expand/Tile).
    Evaluation uses onnxruntime (the runtime verification uses, so numerics are
    the ones it would compute), with ``onnx.reference`` as a fallback; a node
    neither can evaluate stays.
    """
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        return 0
    graph_outputs = {id(v) for v in graph.outputs}
    folded = 0
    for node in list(graph):
        if not _foldable(node, graph_outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        if any(_shared_and_large(v, node) for v in inputs):
            continue
        if any(
            isinstance(v.const_value, ir.ExternalTensor)
            and v.const_value.nbytes > _FOLD_MAX_LAZY_INPUT_BYTES
            for v in inputs
        ):
            continue  # keep big memory-mapped weights lazy (models larger than RAM)
        in_bytes = sum(v.const_value.nbytes for v in {id(v): v for v in inputs}.values())
        arrays = [None if v is None else v.const_value.numpy() for v in node.inputs]
        estimate = _generated_elements(node.op_type, arrays)
        if estimate is not None and estimate > in_bytes + _FOLD_GROWTH_ALLOWANCE_BYTES:
            continue  # do not even materialize e.g. ConstantOfShape([100000, 100000])
        results = _evaluate_node(node, opset, arrays)
        if results is None:
            continue
        out_bytes = sum(int(np.asarray(r).nbytes) for r in results if r is not None)
        if out_bytes > in_bytes + _FOLD_GROWTH_ALLOWANCE_BYTES:
            logger.debug("not folding %s: result too large (%d bytes)", node.op_type, out_bytes)
            continue
        _replace_with_initializers(graph, node, results)
        folded += 1
    return folded


def iter_tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a ModelProto: initializers, sparse tensors, attribute
    tensors, subgraphs, functions and training info."""
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _iter_node_tensors(node)
    for info in model.training_info:
        yield from _iter_graph_tensors(info.initialization)
        yield from _iter_graph_tensors(info.algorithm)


def referenced_files(path: str | os.PathLike) -> set[str]:
    """The model file and every external-data file it names (all graphs, attributes,
    sparse tensors), as absolute paths; the data files are not opened. Raises the
    loader's one-line SurgeryError for anything that is not an ONNX file."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    files = {os.path.realpath(path)}
    for tensor in iter_tensor_protos(_read_model_proto(path)):
        for entry in tensor.external_data:
            if entry.key == "location" and isinstance(entry.value, str):
                files.add(os.path.realpath(os.path.join(base, entry.value)))
    return files


# --------------------------------------------------------------------------- #
# reading and validation
# --------------------------------------------------------------------------- #


def _read_model_proto(path: str) -> onnx.ModelProto:
    if not os.path.lexists(path):
        raise SurgeryError(f"ONNX file {path!r} does not exist")
    if not os.path.exists(path):
        raise SurgeryError(f"ONNX file {path!r} does not exist (broken symbolic link)")
    if os.path.isdir(path):
        raise SurgeryError(f"{path!r} is a directory, not an ONNX file")
    if not os.path.isfile(path):
        raise SurgeryError(f"{path!r} is not a regular file, so not an ONNX file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SurgeryError(f"cannot read ONNX file {path!r}: {exc.strerror or exc}") from exc
    if not data:
        raise SurgeryError(f"{path!r} is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        if _looks_truncated(data):
            raise SurgeryError(
                f"ONNX file {path!r} is truncated: its {len(data)} bytes end in the middle "
                "of a field (incomplete download or copy?)"
            ) from exc
        raise SurgeryError(
            f"{path!r} is not an ONNX file (it does not parse as an ONNX ModelProto)"
        ) from exc
    finally:
        del data
    if not proto.HasField("graph"):
        raise SurgeryError(f"{path!r} is not an ONNX model: it has no graph")
    return proto


_WIRE_TYPES = {
    # FieldDescriptor.TYPE_* -> protobuf wire type
    1: 1,  # double
    2: 5,  # float
    3: 0,  # int64
    4: 0,  # uint64
    5: 0,  # int32
    6: 1,  # fixed64
    7: 5,  # fixed32
    8: 0,  # bool
    9: 2,  # string
    11: 2,  # message
    12: 2,  # bytes
    13: 0,  # uint32
    14: 0,  # enum
    15: 5,  # sfixed32
    16: 1,  # sfixed64
    17: 0,  # sint32
    18: 0,  # sint64
}


def _looks_truncated(data: bytes) -> bool:
    """True if ``data`` is a well-formed prefix of a ModelProto cut inside a field.

    Walks the top-level protobuf fields: they must all be ModelProto fields with
    the right wire type, the first must be ``ir_version`` (every writer puts it
    first), and one of them must run past the end of the data.
    """
    expected = {
        field.number: _WIRE_TYPES.get(field.type, -1)
        for field in onnx.ModelProto.DESCRIPTOR.fields
    }
    n = len(data)
    pos = 0

    def varint(p: int) -> tuple[int | None, int]:
        result = shift = 0
        while p < n:
            byte = data[p]
            p += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, p
            shift += 7
            if shift > 63:
                return None, p
        return None, p  # ran off the end

    first = True
    while pos < n:
        key, pos = varint(pos)
        if key is None:
            return not first
        field, wire = key >> 3, key & 7
        if expected.get(field) != wire or (first and field != 1):
            return False
        first = False
        if wire == 0:
            value, pos = varint(pos)
            if value is None:
                return True
        elif wire == 2:
            length, pos = varint(pos)
            if length is None or pos + length > n:
                return True
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return False
        if pos > n:
            return True
    return False


def _check_opset(proto: onnx.ModelProto, label: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain not in ("", "ai.onnx"):
            continue
        version = entry.version
        if version < MIN_OPSET:
            raise SurgeryError(
                f"{label!r} uses ONNX opset {version}, older than the oldest supported "
                f"({MIN_OPSET}); upgrade it with onnx.version_converter"
            )
        if version > newest:
            raise SurgeryError(
                f"{label!r} uses ONNX opset {version}, newer than the newest this onnx "
                f"{onnx.__version__} knows ({newest}); upgrade onnx"
            )


def _check_external_data(proto: onnx.ModelProto, base_dir: str | None, label: str) -> None:
    file_sizes: dict[str, int] = {}
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = tensor.name or "<unnamed>"
        location = info.get("location", "")
        if isinstance(location, bytes):  # protobuf hands back invalid UTF-8 as bytes
            raise SurgeryError(
                f"external data location {location!r} of tensor {name!r} in {label!r} is not valid UTF-8"
            )
        if not location:
            raise SurgeryError(
                f"tensor {name!r} in {label!r} is stored as external data but has no location"
            )
        if base_dir is None:
            raise SurgeryError(
                f"{label} references external data file {location!r} (tensor {name!r}); "
                "load the model from its .onnx path so the data file can be found"
            )
        if _is_absolute(location):
            raise SurgeryError(
                f"external data location {location!r} of tensor {name!r} in {label!r} is an "
                "absolute path; refused for safety (it must be relative to the model's folder)"
            )
        normalized = os.path.normpath(location.replace("\\", "/"))
        if normalized == ".." or normalized.startswith(".." + os.sep):
            raise SurgeryError(
                f"external data location {location!r} of tensor {name!r} in {label!r} escapes "
                "the model's folder; refused for safety"
            )
        full = os.path.join(base_dir, normalized)
        size = file_sizes.get(full)
        if size is None:
            size = _check_data_file(full, location, name, base_dir, label)
            file_sizes[full] = size
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else None
        except ValueError as exc:
            raise SurgeryError(
                f"tensor {name!r} in {label!r} has a malformed external data offset/length"
            ) from exc
        needed = _tensor_proto_nbytes(tensor)
        if length is not None and needed is not None and length < needed:
            raise SurgeryError(
                f"external data of tensor {name!r} in {label!r} declares {length} bytes but its "
                f"shape and type need {needed}"
            )
        span = length if length is not None else needed
        if offset < 0 or (span is not None and offset + span > size):
            raise SurgeryError(
                f"external data of tensor {name!r} lies beyond the end of {location!r} "
                f"(offset {offset} + length {span} > file size {size}): the data file is "
                f"truncated or does not belong to {label!r}"
            )


def _check_data_file(full: str, location: str, name: str, base_dir: str, label: str) -> int:
    if not os.path.exists(full):
        raise SurgeryError(
            f"external data file {location!r} (tensor {name!r}) of {label!r} is missing: "
            f"expected at {full!r}"
        )
    if not os.path.isfile(full):
        raise SurgeryError(
            f"external data location {location!r} (tensor {name!r}) of {label!r} is not a "
            "regular file"
        )
    # onnx_ir refuses, when the data is first read, files that resolve outside the
    # model's folder through a symlink and files with several hard links; say so now.
    real_base = os.path.realpath(base_dir)
    real = os.path.realpath(full)
    if os.path.commonpath([real_base, real]) != real_base:
        raise SurgeryError(
            f"external data file {location!r} of {label!r} resolves through a symbolic link "
            f"to {real!r}, outside the model's folder; refused for safety"
        )
    st = os.stat(real)
    if st.st_nlink > 1:
        raise SurgeryError(
            f"external data file {location!r} of {label!r} has {st.st_nlink} hard links; "
            "onnx_ir refuses such files for safety (copy it to a file of its own)"
        )
    return st.st_size


def _is_absolute(location: str) -> bool:
    return (
        os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or (len(location) >= 2 and location[1] == ":" and location[0].isalpha())
    )


def _tensor_proto_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        dtype = ir.DataType(tensor.data_type)
        bits = dtype.bitwidth
    except Exception:  # noqa: BLE001 - strings, undefined: size unknown
        return None
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def _run_checker(model: onnx.ModelProto | str, label: str) -> None:
    try:
        # With a path the checker resolves external data next to the file (with a
        # proto it would look in the current directory); it never reads the data.
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise SurgeryError(f"onnx.checker rejects {label!r}: {_one_line(exc)}") from exc
    except ValueError as exc:  # e.g. a >2 GB in-memory proto
        raise SurgeryError(f"onnx.checker cannot check {label!r}: {_one_line(exc)}") from exc


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    return _walk_tensors(_graph_items(graph))


def _iter_node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    return _walk_tensors(_node_items(node))


def _walk_tensors(items: Iterator) -> Iterator[onnx.TensorProto]:
    """The tensors of ``items``, descending into the subgraphs among them in place, in
    the same order as a recursive walk, with a stack of iterators instead of recursion."""
    stack = [items]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, onnx.GraphProto):
            stack.append(_graph_items(item))
        else:
            yield item


def _graph_items(graph: onnx.GraphProto) -> Iterator:
    """A graph's tensors and, where its nodes' attributes hold them, its subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_items(node)


def _node_items(node: onnx.NodeProto) -> Iterator:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _check_declared_dims(proto: onnx.ModelProto, label: str) -> None:
    """A declared size of -1 (some exporters write it for "unknown") becomes unknown; any
    other negative size is an error (onnx's shape inference aborts the process on one)."""
    g = proto.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                if d.dim_value != -1:
                    raise SurgeryError(f"{label!r}: '{vi.name}' declares size {d.dim_value} on axis {k}; "
                                       "sizes are at least 0 (-1 for unknown)")
                d.ClearField("dim_value")


def _one_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


# --------------------------------------------------------------------------- #
# normalization
# --------------------------------------------------------------------------- #


def _normalize(model: ir.Model, label: str) -> None:
    try:
        if RemoveInitializersFromInputsPass()(model).modified and (model.ir_version or 0) < 4:
            model.ir_version = 4  # IR < 4 requires every initializer to be a graph input
        _lift_constants(model)
        count = fold_constant_weights(model)
        if count:
            logger.debug("folded %d constant nodes of %s", count, label)
        _infer_shapes(model, clear=False)
        # ops onnx cannot infer but that keep their input's shape, then re-propagate
        if complete_shapes(model):
            _infer_shapes(model, clear=False)
        # static shape arithmetic -> literals, then fold what that made constant
        for _ in range(3):
            if not fold_static_shapes(model):
                break
            fold_constant_weights(model)
            RemoveUnusedNodesPass()(model)
            _infer_shapes(model, clear=False)
    except SurgeryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SurgeryError(f"cannot normalize {label!r}: {_one_line(exc)}") from exc


def _lift_constants(model: ir.Model) -> None:
    has_sparse = any(
        node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and any(name not in _LIFTABLE_CONSTANT_ATTRS for name in node.attributes)
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    # lift_all_constants=True raises on sparse_value; in that (rare) case lift only `value`.
    LiftConstantsToInitializersPass(lift_all_constants=not has_sparse, size_limit=0)(model)


_LIFTABLE_CONSTANT_ATTRS = frozenset(
    {"value", "value_float", "value_floats", "value_int", "value_ints", "value_string", "value_strings"}
)


def _foldable(node: ir.Node, graph_outputs: set[int]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
        return False
    if _rule_keeps_names(node):
        return False
    inputs = [v for v in node.inputs if v is not None]
    if not inputs:
        return False
    for value in inputs:
        if not value.is_initializer() or value.is_graph_input() or value.const_value is None:
            return False
    for attr in node.attributes.values():
        if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return False
    return not any(id(out) in graph_outputs for out in node.outputs)


def _rule_keeps_names(node: ir.Node) -> bool:
    """Weight arithmetic a channel rule understands (Transpose, Reshape, Mul, Cast of a
    weight) stays in the graph: the cut then slices the weights the file stores, under
    their own names, so a plan can be checked against the input model. Integer shape
    arithmetic is still folded."""
    from surgery.passes.rules import RULES

    if ("", node.op_type) not in RULES:
        return False
    if all(o.dtype is not None for o in node.outputs):
        return all(o.dtype.is_floating_point() for o in node.outputs)
    data = node.inputs[0] if node.inputs else None
    return data is not None and data.const_value is not None and data.const_value.dtype.is_floating_point()


def _shared_and_large(value: ir.Value, node: ir.Node) -> bool:
    if value.const_value.nbytes <= _FOLD_SHARED_INPUT_BYTES:
        return False
    return value.is_graph_output() or any(user is not node for user, _ in value.uses())


def _generated_elements(op_type: str, arrays: list[np.ndarray | None]) -> int | None:
    """Output element count of ops whose size comes from an input's value, else None."""
    try:
        if op_type == "ConstantOfShape":
            return math.prod(int(d) for d in np.asarray(arrays[0]).reshape(-1))
        if op_type == "Expand":
            target = tuple(int(d) for d in np.asarray(arrays[1]).reshape(-1))
            return math.prod(np.broadcast_shapes(np.shape(arrays[0]), target))
        if op_type == "Tile":
            repeats = [int(r) for r in np.asarray(arrays[1]).reshape(-1)]
            return math.prod(d * r for d, r in zip(np.shape(arrays[0]), repeats))
    except Exception:  # noqa: BLE001 - malformed: let evaluation fail and skip
        return None
    return None


def _evaluate_node(node: ir.Node, opset: int, arrays: list[np.ndarray | None]) -> list[Any] | None:
    proto_node = ir.serde.serialize_node(node)
    in_names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    out_names = [f"out{i}" if out.name else "" for i, out in enumerate(node.outputs)]
    del proto_node.input[:]
    proto_node.input.extend(in_names)
    del proto_node.output[:]
    proto_node.output.extend(out_names)
    proto_node.name = "fold"
    feeds = {n: a for n, a in zip(in_names, arrays) if a is not None}
    graph = onnx.helper.make_graph(
        [proto_node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(
                n, int(v.const_value.dtype), list(v.const_value.shape.numpy())
            )
            for n, v in zip(in_names, node.inputs)
            if n
        ],
        [onnx.helper.make_empty_tensor_value_info(n) for n in out_names if n],
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph, opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets)
    )
    wanted = [n for n in out_names if n]
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        outputs = session.run(wanted, feeds)
    except Exception as ort_exc:  # noqa: BLE001
        try:
            from onnx.reference import ReferenceEvaluator

            outputs = ReferenceEvaluator(model).run(wanted, feeds)
        except Exception as ref_exc:  # noqa: BLE001
            logger.debug(
                "cannot fold %s %r: onnxruntime: %s; onnx.reference: %s",
                node.op_type, node.name, ort_exc, ref_exc,
            )
            return None
    it = iter(outputs)
    return [next(it) if out.name else None for out in node.outputs]


def _replace_with_initializers(graph: ir.Graph, node: ir.Node, results: list[Any]) -> None:
    sources: list[str] = []
    for value in node.inputs:
        if value is None:
            continue
        for name in value.meta.get(META_FOLDED_FROM, (value.name,)):
            if name not in sources:
                sources.append(name)
    replacements = []
    for out, array in zip(node.outputs, results):
        if array is None or not out.name:
            continue
        array = np.asarray(array)
        tensor = ir.Tensor(array, dtype=_matching_dtype(out.dtype, array), name=out.name)
        new = ir.Value(
            name=out.name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
            metadata_props=dict(out.metadata_props),
        )
        new.meta[META_FOLDED_FROM] = tuple(sources)
        replacements.append((out, new))
    for out, new in replacements:
        out.replace_all_uses_with(new)
    old_inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for out, new in replacements:
        out.name = None
        graph.register_initializer(new)
    for value in old_inputs:
        if (
            value.is_initializer()
            and not value.uses()
            and not value.is_graph_output()
            and not value.is_graph_input()
            and value.name in graph.initializers
            and graph.initializers[value.name] is value
        ):
            graph.initializers.pop(value.name)


def _matching_dtype(dtype: ir.DataType | None, array: np.ndarray) -> ir.DataType | None:
    """The declared dtype if the evaluated array is stored as it, else None (infer)."""
    try:
        return dtype if dtype is not None and np.dtype(dtype.numpy()) == array.dtype else None
    except Exception:  # noqa: BLE001
        return None


def _validate_input_shapes(
    model: ir.Model, input_shapes: Mapping[str, Any], label: str
) -> dict[str, tuple[int, ...]]:
    if not isinstance(input_shapes, Mapping):
        raise SurgeryError(
            f"input_shapes for {label!r} must be a dict of input name -> shape tuple"
        )
    inputs = {v.name: v for v in model.graph.inputs}
    valid = ", ".join(repr(n) for n in inputs) or "none"
    result: dict[str, tuple[int, ...]] = {}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise SurgeryError(
                f"input_shapes names {name!r}, which is not an input of {label!r} "
                f"(valid inputs: {valid})"
            )
        try:
            dims = tuple(int(d) for d in shape)
            ok = all(d >= 0 and d == d2 for d, d2 in zip(dims, shape))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise SurgeryError(
                f"input_shapes[{name!r}] for {label!r} must be a tuple of non-negative ints, "
                f"got {shape!r}"
            )
        declared = inputs[name].shape
        if declared is not None:
            if len(declared) != len(dims):
                raise SurgeryError(
                    f"input_shapes[{name!r}] = {dims} has rank {len(dims)} but input {name!r} "
                    f"of {label!r} has rank {len(declared)} (declared {_fmt_shape(declared)})"
                )
            for axis, (dim, concrete) in enumerate(zip(declared, dims)):
                if isinstance(dim, int) and dim != concrete:
                    raise SurgeryError(
                        f"input_shapes[{name!r}] = {dims} sets axis {axis} to {concrete} but "
                        f"{label!r} fixes it at {dim} (declared {_fmt_shape(declared)})"
                    )
        result[name] = dims
    return result


def _fmt_shape(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d.value) for d in shape) + "]"


# --------------------------------------------------------------------------- #
# shape inference
# --------------------------------------------------------------------------- #


def _infer_shapes(model: ir.Model, *, clear: bool) -> None:
    main = model.graph
    declared_inputs = [(v, v.shape, v.type) for v in main.inputs]
    declared_outputs = [(v, v.shape, v.type) for v in main.outputs]
    main_outputs = {id(v) for v in main.outputs}
    if clear:
        for graph in model.graphs():
            for node in graph:
                for out in node.outputs:
                    if id(out) not in main_outputs:
                        out.shape = None

    with weights_detached(model):
        proto = ir.serde.serialize_model(model)

    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # noqa: BLE001 - keep what we have
        logger.warning("onnx shape inference failed: %s", _one_line(exc))
        inferred = None
    symbolic = (
        _ort_symbolic_shapes(inferred if inferred is not None else proto)
        if inferred is None or _has_unknown_dims(inferred)
        else None
    )

    if inferred is not None:
        for graph, mapping in _inferred_values(model, inferred):
            for node in graph:
                for out in node.outputs:
                    other = mapping.get(out.name) if out.name else None
                    if other is None:
                        continue
                    if other.shape is not None:
                        out.shape = other.shape
                    if other.type is not None and (out.type is None or out.dtype != other.dtype):
                        out.type = other.type

    if symbolic:
        input_symbols = {
            dim.value
            for value in main.inputs
            if value.shape is not None
            for dim in value.shape
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None
        }
        for node in main:
            for out in node.outputs:
                refined = _fill_unknown_dims(out.shape, symbolic.get(out.name), input_symbols)
                if refined is not None:
                    out.shape = refined

    for value, shape, type_ in declared_inputs:
        value.shape, value.type = shape, type_
    for value, shape, type_ in declared_outputs:
        if value.producer() is not None and value.shape is not None and value.shape != shape:
            value.meta[META_INFERRED_SHAPE] = value.shape
        value.shape, value.type = shape, type_ if type_ is not None else value.type


def _inferred_values(model: ir.Model, inferred: onnx.ModelProto):
    """(graph, value name -> inferred Value) for every graph of ``model``.

    Without subgraphs only the main graph's value infos are read (node outputs get
    their shapes from ``value_info``, then ``output``, as the deserializer does):
    deserializing the whole inferred model (every node again) cost as much as the
    inference itself on long graphs."""
    if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in model.graph for a in node.attributes.values()):
        mapping: dict[str, ir.Value] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.output]:
            mapping[info.name] = ir.serde.deserialize_value_info_proto(info, mapping.get(info.name))
        return [(model.graph, mapping)]
    inferred_model = ir.serde.deserialize_model(inferred)
    return [(graph, ir.convenience.create_value_mapping(inferred_graph))
            for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs())]


def _has_unknown_dims(proto: onnx.ModelProto) -> bool:
    """Whether onnx's inference left a node output without a rank or with an unnamed dim."""
    known = {vi.name: vi for vi in [*proto.graph.value_info, *proto.graph.output]}
    for node in proto.graph.node:
        for name in node.output:
            vi = known.get(name)
            if not name:
                continue
            if vi is None or not vi.type.tensor_type.HasField("shape"):
                return True
            if any(not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__"))
                   for d in vi.type.tensor_type.shape.dim):
                return True
    return False


def _symbolic_shape_inference_class():
    """onnxruntime's SymbolicShapeInference, imported from its file: importing it as
    ``onnxruntime.tools.symbolic_shape_infer`` runs ``onnxruntime/tools/__init__``, which
    imports torch when torch is installed (seconds per process)."""
    import importlib.util
    import sys

    name = "_surgery_ort_symbolic_shape_infer"
    mod = sys.modules.get(name)
    if mod is None:
        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
        # its warnings ("unsupported broadcast ...") are about dims it gives up on, which
        # we only take when it is sure: not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    return mod.SymbolicShapeInference


def _ort_symbolic_shapes(proto: onnx.ModelProto) -> dict[str, list[int | str | None]] | None:
    """Main-graph value shapes from onnxruntime's symbolic shape inference.

    Uses the class directly: its ``infer_shapes`` static method writes
    ``sym_shape_infer_temp.onnx`` into the current directory when inference is
    incomplete, and raises. Partial results are fine here. Any failure -> None.
    """
    try:
        SymbolicShapeInference = _symbolic_shape_inference_class()
    except Exception:  # noqa: BLE001 - optional (needs sympy)
        return None
    try:
        engine = SymbolicShapeInference(2**31 - 1, False, False, 0)
        engine._preprocess(proto)  # noqa: SLF001
        for _ in range(16):
            if not engine.run_:
                break
            engine._infer_impl()  # noqa: SLF001
        out = engine.out_mp_
    except Exception as exc:  # noqa: BLE001
        logger.debug("onnxruntime symbolic shape inference failed: %s", _one_line(exc))
        return None
    shapes: dict[str, list[int | str | None]] = {}
    for info in list(out.graph.value_info) + list(out.graph.output):
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        ]
    return shapes


def _is_unknown_dim(dim: int | ir.SymbolicDim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and (dim.value is None or dim.value.startswith("unk__"))


_SYMPY_FUNCTIONS = frozenset({"floor", "ceiling", "Max", "Min", "Mod"})


def _fill_unknown_dims(
    shape: ir.Shape | None, other: list[int | str | None] | None, input_symbols: set[str]
) -> ir.Shape | None:
    """``shape`` with unknown dims replaced by the dims ``other`` knows exactly.

    Accepted: integers, and expressions over the graph inputs' own symbols
    (``batch``, ``5*batch``); not the fresh symbols the inference invents.
    """
    if shape is None or other is None or len(shape) != len(other):
        return None
    dims: list[int | ir.SymbolicDim] = []
    changed = False
    for dim, candidate in zip(shape, other):
        if _is_unknown_dim(dim) and (
            isinstance(candidate, int)
            or (
                isinstance(candidate, str)
                and set(_IDENTIFIER.findall(candidate)) <= input_symbols | _SYMPY_FUNCTIONS
            )
        ):
            dims.append(candidate if isinstance(candidate, int) else ir.SymbolicDim(candidate))
            changed = True
        else:
            dims.append(dim)
    return ir.Shape(dims) if changed else None
