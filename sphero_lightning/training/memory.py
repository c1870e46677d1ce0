"""A stack given as an array fitted by the same components as ``sphero fit``, without its command line: the Python
API's path. The data module reads the array the caller gave (numpy, Zarr or dask) block by block, as ``sphero fit``
reads its store: nothing is copied beyond what a block needs. The Trainer runs the module, the data module and the
callbacks ``sphero fit`` uses, without logger, journal, lock, output array or page, so nothing is written to disk and
jsonargparse is never imported. The fit is one run (:class:`~.scope.RunScope`): whatever it takes from the process it
gives back when it returns or fails. Options are ``sphero fit``'s, by group (``model.loss``, ``pyramid.levels`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import SpheroError
from ..storage.checks import check_stack
from ..storage.slices import check_mask_shape
from .data import ZarrPairDataModule
from .scope import RunScope
from .state import OPTION_GROUPS, result_changing

#: The option groups of ``sphero fit`` a fit in memory takes (``output``: only the crop settings matter).
GROUPS = (*(group for group, _, _ in OPTION_GROUPS), "trainer")
#: Data options about stores and files, which a stack in memory has none of.
_STORE_ONLY = ("root", "array", "dst_group", "output_root", "overwrite", "resume", "mask_array", "spacing", "neighbours",
               "coarse_factor")


class ArrayPairs(ZarrPairDataModule):
    """The data module over an array the caller holds (``(Z, Y, X)`` numpy, Zarr or dask; ``mask`` likewise, or
    ``(Y, X)``): read block by block where it is, never copied whole; no store to write, so no lock, no journal and no
    output to check or write."""

    def __init__(self, arr: Any, mask: Any = None, **kwargs: Any) -> None:
        self._given, self._given_mask = arr, mask
        super().__init__(root="<memory>", array="stack", **kwargs)

    def validate(self) -> None:
        arr = self._given
        check_stack(tuple(arr.shape), arr.dtype, "stack")
        self._arr, self._mask = arr, self._given_mask
        self.pairs_per_block = self.plan(arr.shape[1] * arr.shape[2], np.dtype(arr.dtype).itemsize)
        self._spacing = [1.0, 1.0, 1.0]

    @property
    def journal_path(self) -> None:
        return None

    def release(self) -> None:
        return None

    def prepare_data(self) -> None:  # nothing on disk to claim
        return None


def split_options(options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{"model.loss": "mse", ...}`` by group; a one-line error for an option no group has."""
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in (options or {}).items():
        group, _, name = str(key).lstrip("-").partition(".")
        if group not in groups or not name:
            raise SpheroError(f"unknown option {key!r}: give sphero fit's options by group, e.g. 'model.loss' or "
                              f"'pyramid.levels' (groups: {', '.join(GROUPS)})")
        if group == "data" and name in _STORE_ONLY:
            raise SpheroError(f"option {key!r} does not apply to a stack in memory"
                              + ("; use 'solve.neighbours' / 'solve.coarse_factor'" if name in ("neighbours", "coarse_factor") else
                                 "; pass mask= for a mask array" if name == "mask_array" else ""))
        if (group, name) == ("model", "transformation"):
            raise SpheroError(f"option {key!r} is register_stack's own argument: pass transformation={value!r}")
        groups[group][name] = value
    bad = result_changing(groups["trainer"])
    if bad is not None:
        raise SpheroError(f"option 'trainer.{bad[0]}' = {bad[1]!r} would change the registration ({bad[2].replace('--', '')}); leave it out")
    if groups["trainer"].get("logger") not in (None, False):
        raise SpheroError("option 'trainer.logger': register_stack writes nothing to disk; sphero fit logs to TensorBoard")
    return groups


def check_options(group: str, cls: type, given: dict[str, Any]) -> None:
    """Each option of ``group`` is a parameter of ``cls`` and, where that is a choice (``Literal``), one of its values:
    else a one-line error naming the option, as ``sphero fit`` gives."""
    import inspect
    from typing import Literal, get_args, get_origin, get_type_hints

    params = inspect.signature(cls.__init__).parameters
    hints = get_type_hints(cls.__init__)
    for name, value in given.items():
        if name not in params or name == "self":
            known = ", ".join(f"{group}.{p}" for p in params if p not in ("self", "pairs_per_block") or group == "data")
            raise SpheroError(f"unknown option '{group}.{name}'; {group} options: {known}")
        hint = hints.get(name)
        if get_origin(hint) is Literal and value not in get_args(hint):
            raise SpheroError(f"option '{group}.{name}' must be one of {', '.join(map(str, get_args(hint)))}; got {value!r}")


def fit_array(stack: Any, transformation: str, accelerator: str, devices: Any, progress: bool,
              options: Mapping[str, Any] | None, mask: Any = None) -> dict[str, Any]:
    """Fit ``stack`` (``(Z, Y, X)`` array-like) in memory; what ``sphero fit`` writes into the output's attributes
    (``pairwise_transforms``, ``composed_transforms``, ``crop_box``, ``registration_log`` ...) as a dict."""
    from importlib import import_module

    import lightning as L

    from ..core.records import flag_outliers
    from .callbacks import PairEarlyStopping, PairProgressBar, PyramidSchedule
    from .module import RegistrationModule
    from .report import fit_record
    from .state import PLAIN_TRAINER, quiet_lightning
    from .volume import VolumeSolve
    from .writer import RegistrationWriter, compose_result

    groups = split_options(options)
    extra = groups["trainer"].pop("callbacks", None) or []
    extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
    for group, module, name in OPTION_GROUPS:
        check_options(group, getattr(import_module(module), name), groups[group])
    solve = VolumeSolve(**groups["solve"])
    output = RegistrationWriter(**groups["output"])  # its checks; only the crop settings are used
    early, pyramid = PairEarlyStopping(**groups["early_stopping"]), PyramidSchedule(**groups["pyramid"])
    model = RegistrationModule(transformation=transformation, **groups["model"])
    if mask is not None:
        mask = mask if hasattr(mask, "shape") and hasattr(mask, "ndim") else np.asarray(mask)
        check_mask_shape(tuple(mask.shape), tuple(stack.shape), "mask")
    dm = ArrayPairs(stack, mask, neighbours=solve.neighbours, coarse_factor=solve.coarse_factor, **groups["data"])
    quiet_lightning()
    with RunScope() as run:
        run.share_cores()
        L.seed_everything(0, verbose=False)  # as sphero fit (init_std noise)
        trainer = L.Trainer(**{**PLAIN_TRAINER, "logger": False, "enable_progress_bar": progress, "accelerator": accelerator,
                               "devices": devices, **groups["trainer"],  # the caller's own callbacks beside the fit's, not instead
                               "callbacks": [*([PairProgressBar()] if progress else []), early, pyramid, solve, *extra]})
        try:
            trainer.fit(model, datamodule=dm)
        except SystemExit:
            if trainer.interrupted:  # Lightning caught Ctrl-C and exits; a notebook gets its KeyboardInterrupt back
                raise KeyboardInterrupt from None
            raise
        vol = compose_result(dm, model, solve, output.crop_borders, output.crop_safety_margin)
    flag_outliers(vol.log)
    settings = {**fit_record(trainer, model), "crop_borders": output.crop_borders,
                "crop_safety_margin": output.crop_safety_margin}
    return {**vol.transforms(), "settings": settings, "first_is_identity": vol.own_frame}
