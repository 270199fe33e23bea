"""Where a run may write, checked before any work, and writing it all at the end.

A run writes a model (and maybe its ``.data`` file), a report and a plan. The
contract with an unattended caller: either every output is in place, or none is
and nothing else was touched. So every target is checked up front (never one of
the input's files, external data of Constant nodes and subgraphs included; never
an existing FIFO, device, socket or folder; a writable folder), and the writes
are ordered: the model is written atomically by the ONNX backend and checked,
then the JSON files go to temporaries renamed into place; a failure at any step
removes what this run wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import stat
from pathlib import Path

from surgery.backends.onnx_writer import external_data_location
from surgery.errors import SurgeryError
from surgery.frontends.onnx_loader import referenced_files


@dataclasses.dataclass(frozen=True)
class Outputs:
    model: Path
    report: Path | None = None
    plan: Path | None = None


def default_output(model: Path) -> Path:
    name = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.pruned.onnx")


def check_outputs(model: Path, out: Path | None, report: Path | None = None,
                  plan: Path | None = None) -> Outputs:
    """Refuse, before any work, every output that would overwrite the input (model or any
    data file it names), another output, a non-regular file, or go where nothing can be written."""
    out = default_output(model) if out is None else out
    inputs = _input_files(model)
    targets = [("output", out), ("output data", out.parent / external_data_location(out))]
    targets += [(what, p) for what, p in (("--report", report), ("--plan", plan)) if p is not None]
    seen: dict[str, str] = {}
    for what, p in targets:
        r = os.path.realpath(p)
        if r in inputs:
            raise SurgeryError(f"{what} {p} would overwrite the input model or its data; surgery never writes its input")
        if r in seen:
            raise SurgeryError(f"{what} {p} is also the {seen[r]}")
        seen[r] = what
        _check_target(what, p)
    return Outputs(out, report, plan)


def _input_files(model: Path) -> set[str]:
    if not model.is_file():
        return {os.path.realpath(model)}  # the loader names the problem
    try:
        return referenced_files(model)
    except SurgeryError:
        return {os.path.realpath(model)}  # not an ONNX file: the loader says so


def _check_target(what: str, p: Path) -> None:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise SurgeryError(f"{what} {p} cannot be used: {e.strerror or e}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise SurgeryError(f"{what} {p} is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise SurgeryError(f"{what} {p} exists and is not a regular file (a device, FIFO or socket); refused")
    folder = p.parent
    if not folder.is_dir():
        raise SurgeryError(f"folder of {what} {p} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SurgeryError(f"folder of {what} {p} is not writable")


def write_all(outputs: Outputs, save_model, report: dict, plan: dict | None, check=None) -> None:
    """Write the model with ``save_model(path)`` (atomic), run ``check(path)`` on it (it may
    add to ``report`` or raise), then stage and rename the JSON files; on any failure
    every file this call wrote is removed again."""
    model_files = [outputs.model, outputs.model.parent / external_data_location(outputs.model)]
    fresh = [p for p in model_files if not os.path.lexists(p)]
    staged: list[tuple[Path, Path]] = []
    done = False
    try:
        save_model(outputs.model)
        if check is not None:
            check(outputs.model)
        for path, data in ((outputs.report, report), (outputs.plan, plan)):
            if path is not None and data is not None:
                tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
                staged.append((tmp, path))
                with open(tmp, "x") as f:
                    json.dump(data, f, indent=1)
        for tmp, path in staged:
            os.replace(tmp, path)
        done = True
    except OSError as e:
        raise SurgeryError(f"cannot write {e.filename or 'an output'}: {e.strerror or e}") from e
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if not done:
            for p in fresh:
                with contextlib.suppress(OSError):
                    os.remove(p)
