"""``sphero``: the command line.

``sphero fit`` is a LightningCLI; ``sphero ingest`` (TIFF to Zarr), ``sphero apply`` (a registration onto
another array), ``sphero export`` (pixel-unit matrices and CSV) and ``sphero demo`` (a self-check) are plain
commands.
"""

from __future__ import annotations

import os
import re
import sys

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from .callbacks import PairEarlyStopping, PyramidSchedule, RegistrationWriter
from .data import ZarrPairDataModule
from .errors import SpheroError
from .model import RegistrationModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "sphero"}},
    "callbacks": [{"class_path": "sphero_lightning.callbacks.PairProgressBar"}],
}
_PLAIN_DEFAULTS = {
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,
    "log_every_n_steps": 10,
    "max_epochs": -1,  # replaced by the number of blocks at setup
}


class SpheroCLI(LightningCLI):
    """LightningCLI with the registration's callbacks as first-class option groups.

    ``--early_stopping.*``, ``--pyramid.*`` and ``--output.*`` configure callbacks that are always
    present (the fit is meaningless without them); ``--model.*`` the transform and loss; ``--data.*``
    the input; ``--trainer.*`` devices, strategy and nodes.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PairEarlyStopping, "early_stopping")
        parser.add_lightning_class_args(PyramidSchedule, "pyramid")
        parser.add_lightning_class_args(RegistrationWriter, "output")
        parser.link_arguments("data.pairs_per_block", "model.pairs_per_block")
        # Class-path defaults go through the parser so that they are instantiated like config values.
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})

    def before_instantiate_classes(self) -> None:
        # --trainer.enable_progress_bar false must also drop our default progress bar.
        cfg = self.config.get(self.subcommand, self.config)
        trainer = cfg.get("trainer")
        if trainer is not None and trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            trainer["callbacks"] = [c for c in trainer["callbacks"] if not str(c.get("class_path", "")).endswith("PairProgressBar")]


def _run_cli(argv: list[str] | None) -> SpheroCLI:
    return SpheroCLI(
        RegistrationModule,
        ZarrPairDataModule,
        args=argv,
        trainer_defaults=_PLAIN_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # Parse errors raise (one line from main) instead of printing the whole usage.
        parser_kwargs={"exit_on_error": False, "fit": {"default_env": False, "exit_on_error": False}},
    )


def _one_line(message: str) -> str:
    """jsonargparse's multi-line validation report as one line: key, given value, expected types."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    first = lines[0]
    if first.startswith("Parser key") and first.endswith(":"):
        key = first[len("Parser key"):].strip(' :"')
        clean = [re.sub(r"<class '([\w.]+)'>", r"\1", ln) for ln in lines[1:]]
        given = next((ln.split(":", 1)[1].strip() for ln in clean if ln.startswith("Given value:")), None)
        if given is None:
            return f"invalid value for {key}: {clean[0] if clean else 'not accepted'}"
        expected = [ln[len("- Expected a"):].strip() for ln in clean if ln.startswith("- Expected a")]
        return f"invalid value {given!r} for {key}" + (f" (expected {' or '.join(expected)})" if expected else "")
    return first


def _run_tool(name: str, argv: list[str]) -> None:
    """The commands that are not LightningCLI subcommands, with the same one-line user errors."""
    from importlib import import_module

    try:
        import_module(f"sphero_lightning.{name}").main(argv)
    except SpheroError as exc:
        print(f"sphero {name}: error: {exc}", file=sys.stderr)
        if os.environ.get("SPHERO_DEBUG"):
            raise
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> SpheroCLI | None:
    """Run ``sphero`` with ``argv`` (default ``sys.argv[1:]``); usable in-process.

    User errors print one line to stderr and exit with status 2; nothing is written.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("demo", "ingest", "apply", "export"):
        _run_tool(argv[0], argv[1:])
        return None
    try:
        # From the command line LightningCLI reads sys.argv itself (passing it again only earns a warning).
        return _run_cli(None if from_command_line else argv)
    except (SpheroError, ArgumentError) as exc:
        msg = str(exc).strip()
        if isinstance(exc, ArgumentError):
            msg = _one_line(msg) + (f" (see: sphero {argv[0]} --help)" if argv and not argv[0].startswith("-") else
                                    " (commands: sphero fit, ingest, apply, export, demo; see: sphero fit --help)")
        print(f"sphero: error: {msg}", file=sys.stderr)
        if os.environ.get("SPHERO_DEBUG"):
            raise
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("sphero: interrupted; no output was written at the final path", file=sys.stderr)
        raise SystemExit(130) from None


def entry() -> None:
    """Console-script entry point."""
    main()
