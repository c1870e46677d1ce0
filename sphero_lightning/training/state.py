"""The enumerated options of the module; the fit's state (levels, the block being fitted) lives in :mod:`..core.fit`."""

from __future__ import annotations

import logging
import warnings

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
