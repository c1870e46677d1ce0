"""``sphero fit``: the LightningCLI.

``--model.*`` the transform and loss, ``--data.*`` the input and output stores, ``--pyramid.*``,
``--early_stopping.*`` and ``--output.*`` the callbacks that are always present, ``--trainer.*`` devices,
strategy and nodes. Trainer options that would change the result (a partial or lower-precision fit) are
refused before any work, with one line saying why (:data:`~.state.RESULT_CHANGING`).
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ..errors import SpheroError, interrupted, os_error_message, report
from ..options import FIT_DESCRIPTION
from ..threads import launch_rank
from .callbacks import PairEarlyStopping, PyramidSchedule
from .data import ZarrPairDataModule
from .module import RegistrationModule
from .scope import RunScope, current_run
from .state import PLAIN_TRAINER as _PLAIN_DEFAULTS
from .state import quiet_lightning, result_changing
from .volume import VolumeSolve
from .writer import RegistrationWriter

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "sphero"}},
    "callbacks": [{"class_path": "sphero_lightning.training.callbacks.PairProgressBar"}],
}


#: Accelerators that need a device torch can see, and how to check for it.
def _accelerator_missing(name: str) -> str | None:
    import torch

    name = str(name).lower()
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        return (f"--trainer.accelerator {name}: torch sees no CUDA GPU here ({build}); "
                "use --trainer.accelerator cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "--trainer.accelerator mps: no Apple GPU (MPS) is available here; use --trainer.accelerator cpu (or auto)"
    return None


#: Groups shown first by ``sphero fit --help`` (the project's options), in this order; Lightning's follow.
HELP_ORDER = ("data", "model", "solve", "pyramid", "early_stopping", "output")


def skip_object_storage_imports() -> None:
    """Lightning asks, for the TensorBoard log folder, whether the file system is Azure, GCS or S3 storage by
    importing ``adlfs``, ``gcsfs`` and ``s3fs`` where they are installed: 0.5 s of start-up for ``s3fs`` alone here
    (any environment that reads Zarr from S3 has it). A file system can only be one of their classes if its module
    is already imported, so the same question is answered from ``sys.modules``, importing nothing."""
    try:
        from lightning.fabric.utilities import cloud_io
    except ImportError:  # pragma: no cover - another Lightning layout: keep its own check
        return
    if not hasattr(cloud_io, "_is_object_storage"):  # pragma: no cover
        return

    def is_object_storage(fs: Any) -> bool:
        for module, name in (("adlfs", "AzureBlobFileSystem"), ("gcsfs", "GCSFileSystem"), ("s3fs", "S3FileSystem")):
            cls = getattr(sys.modules.get(module), name, None)
            if cls is not None and isinstance(fs, cls):
                return True
        return False

    cloud_io._is_object_storage = is_object_storage


class SaveConfigWithLogs(SaveConfigCallback):
    """The run's full configuration beside its TensorBoard logs (``config.yaml``); nothing without a logger
    (Lightning would write it into the current directory, over a ``config.yaml`` the user may keep there)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run interrupted before any block was fitted leaves no log folder (it would hold a config and an empty
        TensorBoard run: logs/sphero/version_N with nothing to look at)."""
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        if (isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero and log_dir
                and not getattr(pl_module, "results", None)):
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)


class SpheroCLI(LightningCLI):
    """LightningCLI with the registration's callbacks as first-class option groups.

    ``--early_stopping.*``, ``--pyramid.*`` and ``--output.*`` configure callbacks that are always
    present (the fit is meaningless without them); ``--model.*`` the transform and loss; ``--data.*``
    the input; ``--trainer.*`` devices, strategy and nodes.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # validate/test/predict have nothing to evaluate here: only fit.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PairEarlyStopping, "early_stopping")
        parser.add_lightning_class_args(PyramidSchedule, "pyramid")
        parser.add_lightning_class_args(RegistrationWriter, "output")
        parser.add_lightning_class_args(VolumeSolve, "solve")
        parser.link_arguments("data.pairs_per_block", "model.pairs_per_block")
        parser.link_arguments("solve.neighbours", "data.neighbours")
        parser.link_arguments("solve.coarse_factor", "data.coarse_factor")
        # Class-path defaults go through the parser so that they are instantiated like config values.
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
        # --help: the project's options first, Lightning's Trainer after them.
        groups = parser._action_groups
        first = [g for key in HELP_ORDER for g in groups if getattr(g, "dest", None) == key or g.title == key]
        parser._action_groups = groups[:2] + first + [g for g in groups[2:] if g not in first]
        parser.usage = ("sphero fit --data.root STORE.zarr --data.array PATH [--data.* ...] [--model.* ...] [--pyramid.* ...]\n"
                        "                  [--solve.* ...] [--early_stopping.* ...] [--output.* ...] [--trainer.* ...] [--config FILE.yaml]")

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        trainer = cfg.get("trainer")
        if trainer is None:
            return
        # --trainer.enable_progress_bar false must also drop our default progress bar.
        if trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            trainer["callbacks"] = [c for c in trainer["callbacks"] if not str(c.get("class_path", "")).endswith("PairProgressBar")]
        bad = result_changing(trainer)
        if bad is not None:
            raise SpheroError(f"--trainer.{bad[0]} {bad[1]} would change the registration ({bad[2]}); remove it")
        if cfg.get("ckpt_path") is not None:
            raise SpheroError("--ckpt_path: sphero fit keeps no Lightning checkpoints; an interrupted run resumes from its "
                              "journal when the same command runs again (README: Interrupted runs); remove --ckpt_path")
        missing = _accelerator_missing(trainer.get("accelerator", "auto"))
        if missing:
            raise SpheroError(missing)
        run = current_run()
        if run is not None:
            run.share_cores()  # this run's share of the cores (threads.py), again before every block


def _run_cli(argv: list[str] | None, cli: SpheroCLI | None = None) -> SpheroCLI:
    """Parse ``argv`` and fit. ``cli``: an object made with ``SpheroCLI.__new__`` to run in, so that the caller still has
    it (its trainer and callbacks: what was written) when the run ends in an exception."""
    cli = cli if cli is not None else SpheroCLI.__new__(SpheroCLI)
    cli.__init__(
        RegistrationModule,
        ZarrPairDataModule,
        args=argv,
        trainer_defaults=_PLAIN_DEFAULTS,
        seed_everything_default=0,
        save_config_callback=SaveConfigWithLogs,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the solvers are per pair (optimizers.py): no --optimizer/--lr_scheduler
        # Parse errors raise (one line from main) instead of printing the whole usage.
        parser_kwargs={"exit_on_error": False, "fit": {"default_env": False, "exit_on_error": False,
                                                       "description": FIT_DESCRIPTION}},
    )
    return cli


def written_by(cli: SpheroCLI) -> str | None:
    """``store/path`` of the output the run behind ``cli`` has put in place, if it got that far."""
    trainer = getattr(cli, "trainer", None)
    for cb in getattr(trainer, "callbacks", None) or []:
        if isinstance(cb, RegistrationWriter) and cb.written:
            return cb.written
    return None


def _one_line(message: str) -> str:
    """jsonargparse's multi-line validation report as one line: key, given value, expected types."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    first = lines[0]
    if first.startswith("Parser key") and first.endswith(":"):
        key = first[len("Parser key"):].strip(' :"')
        clean = [re.sub(r"<class '([\w.]+)'>", r"\1", ln) for ln in lines[1:]]
        literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", clean[0]) if clean else None
        if literal:  # an enumerated option: name the choices
            choices = ", ".join(c.strip().strip("'\"") for c in literal.group(1).split(","))
            return f"invalid value {literal.group(2)!r} for {key} (choose one of: {choices})"
        given = next((ln.split(":", 1)[1].strip() for ln in clean if ln.startswith("Given value:")), None)
        if given is None:
            return f"invalid value for {key}: {clean[0] if clean else 'not accepted'}"
        expected = [ln[len("- Expected a"):].strip() for ln in clean if ln.startswith("- Expected a")]
        return f"invalid value {given!r} for {key}" + (f" (expected {' or '.join(expected)})" if expected else "")
    return first


def _message(exc: BaseException) -> str:
    """The one-line message of a user error from LightningCLI, jsonargparse or the file system."""
    if isinstance(exc, ArgumentError):
        return _one_line(str(exc).strip()) + " (see: sphero fit --help)"
    if isinstance(exc, OSError):
        return os_error_message(exc)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _noting_ctrl_c():
    """Note whether Ctrl-C (SIGINT) arrived: Lightning's trainer catches the KeyboardInterrupt itself and leaves by
    ``sys.exit(1)``, silently, so only this note tells that exit from a failure. Main thread only (signal handlers
    can be set nowhere else); the previous handler is restored afterwards."""
    seen = {"sigint": False}
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):
        seen["sigint"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted_fit(written: str | None) -> None:
    """Ctrl-C's one line (from rank 0 only: every DDP rank gets the signal): what is (not) in place, and what to do;
    on a terminal on a line of its own (not glued to the progress bar's)."""
    if launch_rank() != 0:
        raise SystemExit(130)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if written:
        interrupted("sphero fit", f"the output {written} was written before; only the alignment page may be missing "
                                  "(sphero report builds it)")
    interrupted("sphero fit", "no output was written at the final path (run the same command again to resume)")


def run_fit(argv: list[str], from_command_line: bool = False) -> SpheroCLI:
    """``sphero fit ARGS`` (``argv`` starts with ``fit``) as one run (:class:`~.scope.RunScope`: whatever it takes
    from the process, it gives back however it ends). From the command line LightningCLI reads ``sys.argv`` itself
    (DDP's launcher starts the other ranks with the same ``sys.argv``)."""
    quiet_lightning()
    skip_object_storage_imports()
    cli = SpheroCLI.__new__(SpheroCLI)
    with _noting_ctrl_c() as ctrl_c, RunScope():
        try:
            return _run_cli(None if from_command_line else argv, cli)
        except (SpheroError, ArgumentError, MisconfigurationException, OSError) as exc:
            report("sphero fit", _message(exc), exc)
        except KeyboardInterrupt:
            _interrupted_fit(written_by(cli))
        except SystemExit as exc:
            if ctrl_c["sigint"] and exc.code == 1:  # Lightning's own exit after catching Ctrl-C
                _interrupted_fit(written_by(cli))
            raise
