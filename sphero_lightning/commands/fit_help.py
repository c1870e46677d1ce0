"""``sphero fit --help``: the project's options first and short (one line of description each, from the classes'
own docstrings, markup removed), and only the Trainer options a registration takes (where it runs). ``sphero fit
--help-all`` prints the full LightningCLI help, every Trainer option and every description whole.
"""

from __future__ import annotations

import inspect
import re
import textwrap
import typing
from typing import Any

#: Options set from another group's (linked by the CLI): not options of their own.
LINKED = {"data.neighbours", "data.coarse_factor", "model.pairs_per_block"}
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


def parameters(doc: str) -> dict[str, str]:
    """The numpydoc ``Parameters`` section of ``doc``: name -> description (``a, b : type`` names several)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Parameters") + 2
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for ln in lines[start:]:
        if ln and not ln.startswith(" "):
            if ln.strip() in ("Returns", "Examples", "Raises", "Notes") or set(ln.strip()) == {"-"}:
                break
            names = [n.strip() for n in ln.split(":", 1)[0].split(",")]
            for n in names:
                out[n] = ""
        elif names:
            for n in names:
                out[n] = (out[n] + " " + ln.strip()).strip()
    return out


def _first_sentence(text: str) -> str:
    text = plain(text)
    for m in re.finditer(r"(?<=[a-z0-9)\]])[.] ", text):
        if not text[: m.start()].endswith(("e.g", "i.e", "etc")):
            return text[: m.start() + 1]
    return text


def _shown(value: Any) -> str:
    """A default as the command line spells it (null, true, false)."""
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if isinstance(value, (bool, type(None))) else str(value)


def _metavar(name: str, hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    return name.upper()


def short_help() -> str:
    """The text of ``sphero fit --help``."""
    from importlib import import_module

    from ..training.cli import FIT_DESCRIPTION
    from ..training.state import OPTION_GROUPS

    out = ["usage: sphero fit --data.root STORE.zarr --data.array PATH [--GROUP.OPTION VALUE ...] [--config FILE.yaml]",
           "", FIT_DESCRIPTION + ".", ""]
    for group, module, name in OPTION_GROUPS:
        cls = getattr(import_module(module), name)
        docs = parameters(cls.__doc__ or "")
        hints = typing.get_type_hints(cls.__init__)
        out.append(f"{group}:")
        for pname, param in inspect.signature(cls.__init__).parameters.items():
            if pname == "self" or f"{group}.{pname}" in LINKED:
                continue
            default = "required" if param.default is inspect.Parameter.empty or (group == "data" and pname in ("root", "array")) \
                else f"default {_shown(param.default)}"
            out.append(f"  --{group}.{pname} {_metavar(pname, hints.get(pname))}  ({default})")
            text = _first_sentence(docs.get(pname, ""))
            if text:
                out.append(textwrap.shorten(text, WIDTH - 6, placeholder=" ...").join(["      ", ""]))
    out.append("trainer (where it runs):")
    for pname, default, text in TRAINER:
        out.append(f"  --trainer.{pname} {pname.upper()}  (default {default})")
        out.append(f"      {text}")
    out += ["", "  --config FILE.yaml     settings from a file (configs/reg.yaml lists every option with its default)",
            "  --print_config         print the settings this command would run with, and exit",
            "  --help-all             every option with its whole description, and every Trainer option",
            "", "Every option in depth, and the test that guards it: docs/options.md."]
    return "\n".join(out) + "\n"
