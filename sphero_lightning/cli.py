"""``sphero``: the command line. ``sphero fit`` is a LightningCLI; ``sphero demo`` runs a self-check."""

from __future__ import annotations

import os
import sys

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


def _run_cli(argv: list[str]) -> SpheroCLI:
    return SpheroCLI(
        RegistrationModule,
        ZarrPairDataModule,
        args=argv,
        trainer_defaults=_PLAIN_DEFAULTS,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"default_env": False}},
    )


def main(argv: list[str] | None = None) -> SpheroCLI | None:
    """Run ``sphero`` with ``argv`` (default ``sys.argv[1:]``); usable in-process.

    User errors print one line to stderr and exit with status 2; nothing is written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        demo_main(argv[1:])
        return None
    try:
        return _run_cli(argv)
    except SpheroError as exc:
        print(f"sphero: error: {exc}", file=sys.stderr)
        if os.environ.get("SPHERO_DEBUG"):
            raise
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("sphero: interrupted; no output was written at the final path", file=sys.stderr)
        raise SystemExit(130) from None


def entry() -> None:
    """Console-script entry point."""
    main()
