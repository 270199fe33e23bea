"""The command line's one-line errors and argument parsers, shared by every command."""

from __future__ import annotations

import typer
from rich.console import Console

from surgery.errors import SurgeryError

err = Console(stderr=True)


def fail(msg: str, code: int = 2):
    """Print ``msg`` as the one error line on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """--input-shape NAME:DxDxD values -> {name: dims}."""
    out = {}
    for s in specs or []:
        name, sep, dims = s.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise SurgeryError(f"--input-shape '{s}' is not NAME:DxDxD (e.g. input:1x3x224x224)") from None
    return out
