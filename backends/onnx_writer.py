"""ONNX backend: write an ``onnx_ir.Model`` to disk atomically.

Public API
----------
``save_onnx(model, path, *, external_data=None) -> None``
    Writes ``path`` and, with external data, ``<file name>.data`` beside it
    (``model.onnx`` -> ``model.onnx.data``, the torch.onnx convention; see
    :func:`external_data_location`). Tensors bigger than
    ``EXTERNAL_TENSOR_MIN_BYTES`` go to the data file; smaller ones stay inline,
    so if no tensor is that big no data file is written.

    ``external_data``: ``True`` external, ``False`` one self-contained file (the
    weights of a model loaded from external data are read into the proto), ``None``
    external when the initializers total more than ``AUTO_EXTERNAL_BYTES``
    (protobuf cannot serialize 2 GB).

    Atomic: the model (and the data file) are written under temporary names in
    the destination folder, flushed to disk, and renamed into place with
    ``os.replace`` (data file first, then model); the location stored in the
    model is the final relative name. On any error the temporaries are removed,
    existing files at the destination are left as they were, and a one-line
    ``SurgeryError`` naming the file is raised.

    The model object is not modified. Overwriting the file the model was loaded
    from is allowed but is the caller's decision: if the destination data file is
    the one the model's lazy tensors read, those tensors are invalidated (as
    onnx_ir does) rather than silently reading the new bytes, so reload the saved
    model to keep working with it. A stale ``<file name>.data`` from an earlier
    external save is not deleted when saving without external data.

``uses_external_data(path) -> bool``
    True if the ONNX file at ``path`` references external data (reads only the
    protobuf, never the data).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets

import onnx
import onnx_ir as ir

from surgery.errors import SurgeryError
from surgery.frontends.onnx_loader import iter_tensor_protos

__all__ = [
    "AUTO_EXTERNAL_BYTES",
    "EXTERNAL_TENSOR_MIN_BYTES",
    "external_data_location",
    "save_onnx",
    "uses_external_data",
]

logger = logging.getLogger(__name__)

#: ``external_data=None`` switches to external data above this many initializer bytes.
AUTO_EXTERNAL_BYTES = 1_800_000_000
#: With external data, tensors of more than this many bytes leave the proto (onnx's default).
EXTERNAL_TENSOR_MIN_BYTES = 1024
_PROTOBUF_LIMIT = 2**31 - 1


def external_data_location(path: str | os.PathLike) -> str:
    """The relative location ``save_onnx`` stores external data at for ``path``."""
    return os.path.basename(os.fspath(path)) + ".data"


def save_onnx(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` atomically (see the module docstring)."""
    path = os.fspath(path)
    dest_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(dest_dir):
        raise SurgeryError(f"cannot write ONNX file {path!r}: folder {dest_dir!r} does not exist")
    if os.path.isdir(path):
        raise SurgeryError(f"cannot write ONNX file {path!r}: it is a directory")

    total = _initializer_bytes(model)
    if external_data is None:
        external_data = total > AUTO_EXTERNAL_BYTES
    elif not external_data and total > _PROTOBUF_LIMIT:
        raise SurgeryError(
            f"cannot write {path!r} as a single file: its weights take {total / 2**30:.2f} GiB, "
            "over protobuf's 2 GB limit; use external_data=True"
        )

    base = os.path.basename(path)
    token = secrets.token_hex(6)
    final_model = os.path.join(dest_dir, base)
    tmp_model = os.path.join(dest_dir, f".{base}.{token}.tmp")
    final_data_rel = external_data_location(path)
    tmp_data_rel = f".{final_data_rel}.{token}.tmp"
    final_data = os.path.join(dest_dir, final_data_rel)
    tmp_data = os.path.join(dest_dir, tmp_data_rel)
    if os.path.lexists(tmp_model) or os.path.lexists(tmp_data):  # pragma: no cover
        raise SurgeryError(f"cannot write ONNX file {path!r}: temporary name clash, retry")

    owned: list[str] = []  # temporaries this call created, and only those are removed
    try:
        if external_data:
            owned.append(tmp_data)  # unique name: onnx_ir creates it
            proto = _serialize_external(model, dest_dir, tmp_data_rel)
            wrote_data = _relocate(proto, tmp_data_rel, final_data_rel)
        else:
            proto = _serialize_inline(model)
            wrote_data = False
        _check_locations(proto, {final_data_rel} if wrote_data else set(), path)
        data = proto.SerializeToString()
        del proto
        with open(tmp_model, "xb") as f:
            owned.append(tmp_model)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        del data
        if wrote_data:
            _fsync_file(tmp_data)
            _invalidate_readers_of(model, final_data)
            os.replace(tmp_data, final_data)
        elif external_data:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_data)  # nothing went external: drop the empty data file
        os.replace(tmp_model, final_model)
        _fsync_dir(dest_dir)
    except BaseException as exc:
        for leftover in owned:
            with contextlib.suppress(OSError):
                os.remove(leftover)
        if isinstance(exc, SurgeryError) or not isinstance(exc, Exception):
            raise
        raise SurgeryError(
            f"cannot write ONNX file {path!r}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def uses_external_data(path: str | os.PathLike) -> bool:
    """True if the ONNX file at ``path`` references external data."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SurgeryError(f"ONNX file {path!r} does not exist or is not a file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeryError(f"{path!r} is not a readable ONNX file: {_one_line(exc)}") from exc
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensor_protos(proto))


# --------------------------------------------------------------------------- #


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for v in graph.initializers.values()]


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)


def _serialize_external(model: ir.Model, dest_dir: str, tmp_data_rel: str) -> onnx.ModelProto:
    """Write big initializers to ``dest_dir/tmp_data_rel``; return the proto (model unchanged)."""
    values = _initializers(model)
    saved = [v.const_value for v in values]
    try:
        # Streams tensor by tensor (lazy external tensors are copied file to file);
        # existing external tensors below the threshold are read into the proto.
        ir.external_data.unload_from_model(
            model, dest_dir, tmp_data_rel, size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES
        )
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(values, saved):
            value.const_value = tensor


def _serialize_inline(model: ir.Model) -> onnx.ModelProto:
    """Serialize with every initializer's bytes in the proto (model unchanged).

    ``ir.save``/``serialize_model`` keep an ``ExternalTensor`` as a reference to
    its *original* location, which would dangle beside a file written elsewhere.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in _initializers(model):
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                swapped.append((value, tensor))
                value.const_value = ir.Tensor(
                    tensor.numpy(),  # memory-mapped; read once by serialization
                    dtype=tensor.dtype,
                    name=tensor.name,
                    doc_string=tensor.doc_string,
                    metadata_props=dict(tensor.metadata_props),
                )
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _relocate(proto: onnx.ModelProto, old: str, new: str) -> bool:
    """Point external references at ``old`` to ``new``; True if there were any."""
    found = False
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and os.path.normpath(entry.value) == old:
                entry.value = new
                found = True
    return found


def _check_locations(proto: onnx.ModelProto, allowed: set[str], path: str) -> None:
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location not in allowed:
            raise SurgeryError(
                f"cannot write ONNX file {path!r}: tensor {tensor.name!r} would reference "
                f"external data {location!r}, which is not written with it"
            )


def _invalidate_readers_of(model: ir.Model, data_path: str) -> None:
    """Invalidate lazy tensors that read the data file about to be replaced."""
    if not os.path.exists(data_path):
        return
    stale = []
    for value in _initializers(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        try:
            same = os.path.samefile(tensor.path, data_path)
        except OSError:
            same = False
        if same:
            tensor.release()
            tensor.invalidate()
            stale.append(tensor.name)
    if stale:
        logger.warning(
            "%d weights of the saved model were read from %s, which was just replaced; "
            "they are invalidated, reload the saved model to keep using it",
            len(stale),
            data_path,
        )


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _one_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
