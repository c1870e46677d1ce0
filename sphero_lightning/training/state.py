"""The enumerated options of the module; the fit's state (levels, the block being fitted) lives in :mod:`..core.fit`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from ..core.fit import MAX_STEP_PX, NEWTON_MIN_NCC, NEWTON_TRUST_NCC, BlockState, Level  # noqa: F401 - their home is core.fit
from ..options import GROUPS

#: ``sphero fit``'s option groups in the order a user needs them, and the class each configures (module, class name):
#: :data:`~sphero_lightning.options.GROUPS` as importable names.
OPTION_GROUPS = tuple((group, "sphero_lightning." + path.removesuffix(".py").replace("/", "."), cls) for group, path, cls in GROUPS)

#: The Trainer settings every fit runs with (the CLI's defaults, the Python API's): no checkpoints, no sanity steps,
#: one epoch per block (the number of epochs is set at setup).
PLAIN_TRAINER = {
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,
    "log_every_n_steps": 10,
    "max_epochs": -1,  # replaced by the number of blocks at setup
}


#: Trainer options that would change the registration, with the value that leaves it exact and why.
#: A pair is fitted to convergence within one epoch (one block); anything that cuts epochs or steps short,
#: or lowers the arithmetic's precision, degrades the transforms silently, so these are refused.
RESULT_CHANGING: dict[str, tuple[tuple[Any, ...], str]] = {
    "fast_dev_run": ((False, 0, None), "fits one step of one block only"),
    "precision": ((None, "32-true", "32", 32), "the fit is built and validated for float32 images and float64 parameters"),
    "max_epochs": ((None, -1), "the number of epochs is the number of blocks; use --data.max_pairs to fit fewer pairs"),
    "min_epochs": ((None,), "the number of epochs is the number of blocks"),
    "max_steps": ((None, -1), "stops pairs before they converge; use --pyramid.steps for the budget per level"),
    "min_steps": ((None,), "steps are per pair and level; use --pyramid.steps"),
    "max_time": ((None,), "stops pairs before they converge"),
    "limit_train_batches": ((None, 1.0, 1), "stops pairs before they converge"),
    "overfit_batches": ((0, 0.0, None), "not meaningful for a registration"),
    "accumulate_grad_batches": ((1, None), "each step is one solver update of every pair"),
    "gradient_clip_val": ((None,), "the solver takes exact steps; use --pyramid.learning_rate to change the first step"),
}


def result_changing(trainer: Mapping[str, Any]) -> tuple[str, Any, str] | None:
    """The first Trainer setting of ``trainer`` that would change the registration: ``(name, value, why)``, or None."""
    for key, (allowed, why) in RESULT_CHANGING.items():
        if trainer.get(key) not in allowed:
            return key, trainer.get(key), why
    return None


def quiet_lightning() -> None:
    """Keep Lightning's chatter out of the user's terminal: only what they can act on stays.

    Lightning's INFO lines (accelerator availability, seed, a logging-service tip, "max_epochs reached") and
    warnings that describe how this program is built (no optimizer: the solvers are per pair; torch's pytree
    deprecation inside Lightning) say nothing a user can change. Lightning's real warnings still show.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (r".*configure_optimizers.* returned `None`", r".*treespec, LeafSpec", r".*LightningCLI's args parameter",
                    r".*does not have many workers", r".*litlogger", r".*`isinstance\(treespec",
                    # loss/block_final is the same on every rank (the pairs' losses are all-reduced): no sync needed
                    r".*when logging on epoch level in distributed setting"):
        warnings.filterwarnings("ignore", message=pattern)
    # deprecations inside the libraries (Lightning's use of jsonargparse, torch's pytree): nothing a user can act on
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(lightning|jsonargparse|torch)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|jsonargparse)(\.|$)")
