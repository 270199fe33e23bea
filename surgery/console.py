"""The command line's one-line errors and argument parsers, shared by every command."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from surgery.errors import SurgeryError

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as _usage
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _usage

err = Console(stderr=True)


def clean(text: str) -> str:
    """``text`` on one line with nothing a terminal acts on: names echoed from a model may
    hold newlines or escape sequences, and rich markup is not interpreted."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return escape(out)


def fail(msg: str, code: int = 2):
    """Print ``msg`` as the one error line on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {clean(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_app(app: typer.Typer) -> None:
    """Run the CLI with click's usage errors (missing argument, bad value, unknown option)
    printed as the same one ``error:`` line as every other error, exit status 2. Library
    warnings and log records stay off stderr (``SURGERY_LOG=DEBUG`` shows them), so that
    a refusal is one line."""
    level = logging.getLevelName(os.environ.get("SURGERY_LOG", "CRITICAL").upper())
    logging.basicConfig(level=level if isinstance(level, int) else logging.CRITICAL, format="%(name)s: %(message)s")
    if not sys.warnoptions and logging.getLogger().level > logging.WARNING:
        warnings.simplefilter("ignore")
    try:
        code = app(standalone_mode=False)
    except _usage.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        code = 0
    except _usage.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "surgery"
        err.print(f"[bold red]error:[/] {clean(e.format_message())} (see {cmd} --help)", highlight=False,
                  soft_wrap=True)
        code = 2
    except typer.Exit as e:
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


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
