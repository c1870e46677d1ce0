"""``sphero``: the command line.

This module only dispatches: it imports neither torch nor Lightning, so ``sphero --help`` and
``sphero --version`` answer at once. ``sphero fit`` is a LightningCLI (:mod:`.fit_cli`); ``sphero ingest``
(TIFF to Zarr), ``sphero apply`` (a registration onto another array), ``sphero export`` (pixel-unit matrices
and CSV), ``sphero report`` (the alignment page) and ``sphero demo`` (a self-check) are plain commands.

Every user error is one line on stderr naming the problem and the fix, exit status 2, no traceback
(``SPHERO_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._version import __version__
from ..errors import SpheroError, interrupted, os_error_message, report

#: The commands, with one line each for ``sphero --help``.
COMMANDS = {
    "fit": "register a Zarr stack: fit the pairwise transforms, compose, crop, write the aligned stack",
    "ingest": "TIFF stack or folder of TIFF slices -> Zarr array (with OME-NGFF metadata)",
    "apply": "put a finished registration onto another array of the stack (labels, another channel)",
    "export": "a registration's transforms as pystackreg/TurboReg matrices (.npy) and a CSV",
    "report": "a registration as one HTML page: reslices before/after, drift and NCC curves, flagged pairs",
    "demo": "cut a stack with known misalignment, register it, print the error (no data needed)",
}

USAGE = f"""usage: sphero COMMAND [options]

Align the slices of a serial-section or block-face EM stack stored in Zarr.

commands:
{chr(10).join(f"  {name:<8} {text}" for name, text in COMMANDS.items())}

options:
  -h, --help     show this help and exit
  --version      show the version and exit

See 'sphero COMMAND --help'. Quick start:
  sphero demo
  sphero fit --data.root stack.zarr --data.array images/50-4-4
"""


@contextmanager
def _imports(quick: bool) -> Iterator[None]:
    """Where ``quick`` (a command line's own process), the garbage collector rests while the command's modules import
    (torch, Lightning: ~0.5 M objects, no garbage worth the search; 7 full collections took 0.6-0.8 s of every
    ``sphero fit``), and what they created is then left out of every later collection (``gc.freeze``)."""
    if not quick or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _run_tool(name: str, argv: list[str], quick: bool = False) -> None:
    """The commands that are not LightningCLI subcommands, with the same one-line user errors."""
    from importlib import import_module

    try:
        with _imports(quick):
            tool = import_module(f"sphero_lightning.commands.{name}")
        tool.main(argv)
    except SpheroError as exc:
        report(f"sphero {name}", str(exc), exc)
    except OSError as exc:
        report(f"sphero {name}", os_error_message(exc), exc)
    except KeyboardInterrupt:
        interrupted(f"sphero {name}", "nothing was written at the final path")


def main(argv: list[str] | None = None) -> Any:
    """Run ``sphero`` with ``argv`` (default ``sys.argv[1:]``); usable in-process.

    Returns the :class:`~sphero_lightning.training.cli.SpheroCLI` of a ``fit`` run (``None`` for the other commands).
    User errors print one line to stderr and exit with status 2; nothing is written.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        if not argv:
            raise SystemExit(2)
        return None
    if argv[0] == "--version":
        print(f"sphero {__version__}")
        return None
    command = argv[0]
    if command in ("ingest", "apply", "export", "report", "demo"):
        _run_tool(command, argv[1:], from_command_line)
        return None
    if command != "fit":
        hint = " (the Lightning subcommands validate, test and predict have nothing to do here)" \
            if command in ("validate", "test", "predict") else ""
        error = SpheroError(f"unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)} "
                                      "(see: sphero --help)")
        report("sphero", str(error), error)
    if "--help-all" in argv:  # the whole LightningCLI help: every option and Trainer option, descriptions whole
        argv = [("--help" if a == "--help-all" else a) for a in argv]
    elif any(a in ("-h", "--help") for a in argv[1:]):
        from .fit_help import short_help

        print(short_help(), end="")
        raise SystemExit(0)
    from .precheck import bare_switches, check_fit_arguments

    argv = [argv[0], *bare_switches(argv[1:])]  # --data.overwrite alone means true, as sphero ingest --overwrite
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself from the command line (DDP relaunches with it)
    if not any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config") for a in argv):
        try:  # the commonest mistakes in well under a second, before torch and Lightning load
            check_fit_arguments(argv[1:])
        except SpheroError as exc:
            report("sphero fit", str(exc), exc)
    with _imports(from_command_line):
        from ..training.cli import run_fit
    return run_fit(argv, from_command_line)


def entry() -> None:
    """Console-script entry point."""
    main()
