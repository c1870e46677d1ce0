"""``sphero fit --help``: the project's options first and short (one line of description each, from the classes'
own docstrings, markup removed), and only the Trainer options a registration takes (where it runs). ``sphero fit
--help-all`` prints the full LightningCLI help, every Trainer option and every description whole.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from ..options import FIT_DESCRIPTION, LINKED, REQUIRED, Option, fit_options

#: The Trainer options that decide where a registration runs; the others are in --help-all (many would change the
#: result and are refused).
TRAINER = (("accelerator", "auto", "cpu, gpu (CUDA) or auto"),
           ("devices", "auto", "how many devices (or which: [0, 2]); several GPUs or CPU processes split the blocks"),
           ("strategy", "auto", "ddp for several devices (auto chooses it)"),
           ("num_nodes", "1", "machines, for a cluster run (torchrun, SLURM)"))
WIDTH = 118


def plain(text: str) -> str:
    """Docstring markup out: ``:class:`~a.B``` -> ``B``, double backquotes -> none.

    >>> plain("see :func:`~sphero_lightning.core.masks.destripe` and ``--data.root``")
    'see destripe and --data.root'
    """
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def _first_sentence(text: str) -> str:
    text = plain(text)
    for m in re.finditer(r"(?<=[a-z0-9)\]])[.] ", text):
        if not text[: m.start()].endswith(("e.g", "i.e", "etc")):
            return text[: m.start() + 1]
    return text


def _shown(value: Any) -> str:
    """A default as the command line spells it (null, true, false)."""
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if isinstance(value, (bool, type(None))) else str(value)


def _metavar(option: Option) -> str:
    if option.choices is not None:
        return "{" + ",".join(option.choices) + "}"
    return option.name.upper()


def short_help() -> str:
    """The text of ``sphero fit --help``, from the options' own declarations (:mod:`~sphero_lightning.options`: read
    from the source, so the help answers without importing torch or Lightning)."""
    out = ["usage: sphero fit --data.root STORE.zarr --data.array PATH [--GROUP.OPTION VALUE ...] [--config FILE.yaml]",
           "", FIT_DESCRIPTION + ".", ""]
    group = None
    for key, option in fit_options().items():
        if key in LINKED:
            continue
        if option.group != group:
            group = option.group
            out.append(f"{group}:")
        default = "required" if option.default is REQUIRED or key in ("data.root", "data.array") \
            else f"default {_shown(option.default)}"
        out.append(f"  --{key} {_metavar(option)}  ({default})")
        text = _first_sentence(option.doc)
        if text:
            out.append(textwrap.shorten(text, WIDTH - 6, placeholder=" ...").join(["      ", ""]))
    out.append("trainer (where it runs):")
    for pname, default, text in TRAINER:
        out.append(f"  --trainer.{pname} {pname.upper()}  (default {default})")
        out.append(f"      {text}")
    out += ["  --trainer.enable_progress_bar false", "      no progress display (where stderr is not a terminal, a line every 30 s)",
            "  --trainer.logger false", "      no TensorBoard logs (the alignment page then goes to logs/ beside the store)",
            "", "  --config FILE.yaml     settings from a file (configs/reg.yaml lists every option with its default)",
            "  --print_config         print the settings this command would run with, and exit",
            "  --help-all             every option with its whole description, and every Trainer option",
            "", "environment:",
            "  SPHERO_NUM_THREADS=N   torch threads per process (default: the cores, shared between the sphero runs going",
            "                         on at once; the time line says how many a run used); SPHERO_DEBUG=1: tracebacks",
            "", "Every option in depth, and the test that guards it: docs/options.md."]
    return "\n".join(out) + "\n"
