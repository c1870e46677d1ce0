"""Every option of ``sphero fit`` has one home here: its default (a frozen dataclass per option group), its choices
(a ``Literal`` per enumerated option) and its range (:data:`BOUNDS`).

The classes that take the options (the data module, the module, the callbacks: :data:`~..options.GROUPS`) name these
defaults in their ``__init__`` signatures (``transformation: Transformation = MODEL.transformation``), and so do the
core functions that take the same setting (:class:`~.objective.PairObjective`, :class:`~.fit.StoppingRule`,
:func:`~.stack.fit_stack` ...); LightningCLI, ``sphero fit --help``, the early checks (:mod:`~..options` reads the
same signatures), ``register_stack`` and ``configs/reg.yaml`` all say what is written here
(``tests/test_architecture.py`` compares them). Plain Python: no torch, importable at once.

>>> MODEL.transformation, SOLVE.neighbours, PYRAMID.levels, EARLY_STOPPING.step_tol_px
('rigid', 2, 4, 0.003)
>>> MODEL.replace(smoothing=0.5).smoothing  # a frozen copy with one setting changed
0.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SpheroError

# ---------------------------------------------------------------------------------------------------- choices
#: The transform family fitted to each pair.
Transformation = Literal["translation", "rigid", "similarity", "affine"]
#: The loss between the fixed and the warped moving slice.
Loss = Literal["ncc", "mse", "mae", "ssim"]
#: Interpolation of the moving slice inside the loss.
LossInterpolation = Literal["bspline", "bspline2x", "bicubic"]
Optimizer = Literal["bfgs", "adam"]
InitTranslation = Literal["phase", "none"]
#: BFGS curvature model at the start of a level.
Curvature = Literal["gauss_newton", "carried"]
#: Stripes removed from what the loss sees.
Destripe = Literal["none", "vertical", "horizontal", "both"]
#: ``--data.static_patterns``: what is done with patterns fixed in every slice.
StaticMode = Literal["leave_out", "keep"]
#: How the writer resamples slices for the output (``--output.interpolation``).
OutputInterpolation = Literal["bspline", "bicubic", "bilinear"]


# ---------------------------------------------------------------------------------------------------- defaults
class _Group:
    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataSettings(_Group):
    """``--data.*`` (:class:`~..training.data.ZarrPairDataModule`; its docstring says what each means)."""

    dst_group: str = "images/registered"
    max_pairs: int | None = None
    pairs_per_block: int = 32
    spacing: list[float] | None = None
    overwrite: bool = False
    check_slices: bool = True
    min_contrast: float = 0.05
    resume: bool = True
    output_root: str | None = None
    memory_budget_gb: float | None = None
    ignore_value: float | None = None
    mask_array: str | None = None
    destripe: Destripe = "none"
    static_patterns: StaticMode = "leave_out"


@dataclass(frozen=True)
class ModelSettings(_Group):
    """``--model.*`` (:class:`~..training.module.RegistrationModule`)."""

    transformation: Transformation = "rigid"
    scaling: bool = True
    shear: bool = True
    loss: Loss = "ncc"
    loss_kwargs: dict[str, Any] | None = None
    optimizer: Optimizer = "bfgs"
    regularization: float = 0.5
    init_std: float = 0.0
    init_translation: InitTranslation = "phase"
    smoothing: float = 0.7
    interpolation: LossInterpolation = "bspline"
    curvature: Curvature = "gauss_newton"


@dataclass(frozen=True)
class SolveSettings(_Group):
    """``--solve.*`` (:class:`~..training.volume.VolumeSolve`)."""

    neighbours: int = 2
    coarse_factor: float = 4.0
    reference: int = 0
    detrend: int | None = None
    highpass: float | None = None
    anchors: str | None = None


@dataclass(frozen=True)
class PyramidSettings(_Group):
    """``--pyramid.*`` (:class:`~..training.callbacks.PyramidSchedule`)."""

    levels: int = 4
    factors: float | list[float] = 2.0
    steps: int | list[int] = 100
    learning_rate: float | list[float] | None = None
    finest_max_pixels: int = 1 << 22


@dataclass(frozen=True)
class EarlyStoppingSettings(_Group):
    """``--early_stopping.*`` (:class:`~..training.callbacks.PairEarlyStopping`)."""

    enabled: bool = True
    window: int = 15
    tol: float = 1e-7
    step_tol_px: float | list[float] = 0.003
    coarse_step_tol_px: float = 0.01
    newton_step_tol_px: float = 0.02


@dataclass(frozen=True)
class OutputSettings(_Group):
    """``--output.*`` (:class:`~..training.writer.RegistrationWriter`)."""

    crop_borders: bool = True
    crop_safety_margin: int = 0
    interpolation: OutputInterpolation = "bspline"
    compression_level: int = 3
    chunks: list[int] | None = None
    shards: list[int] | None = None
    num_workers: int = 4
    scheduler: str = "threads"
    levels: int | None = None


DATA, MODEL, SOLVE = DataSettings(), ModelSettings(), SolveSettings()
PYRAMID, EARLY_STOPPING, OUTPUT = PyramidSettings(), EarlyStoppingSettings(), OutputSettings()
#: Each option group's defaults, by the group's name on the command line.
DEFAULTS = {"data": DATA, "model": MODEL, "solve": SOLVE, "pyramid": PYRAMID, "early_stopping": EARLY_STOPPING,
            "output": OUTPUT}


# ---------------------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Bound:
    """The range of a numeric option: at least ``low`` (more than it where ``open_low``), below ``high`` where given;
    ``note`` says what the values mean. A list value (per level) is checked item by item; None (off) passes."""

    low: float
    open_low: bool = False
    high: float | None = None
    note: str = ""

    def message(self, key: str, value: Any) -> str:
        rule = f"in [{self.low:g}, {self.high:g})" if self.high is not None else f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"--{key} must be {rule}{f' ({self.note})' if self.note else ''}, got {_shown(value)}"

    def holds(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, (list, tuple)):
            return all(self.holds(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # not a number: the type check's to say
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value < self.high)


def _shown(value: Any) -> str:
    """A value as the user wrote it: ``1`` for 1.0, lists item by item."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


#: The one home of every numeric option's range: the early checks of the command line
#: (:mod:`~sphero_lightning.commands.precheck`) and the classes that take the options (for Python callers and config
#: files) both check against it, with the same message.
BOUNDS: dict[str, Bound] = {
    "data.min_contrast": Bound(0, high=1),
    "data.pairs_per_block": Bound(1),
    "data.max_pairs": Bound(1, note="or null for all pairs"),
    "data.memory_budget_gb": Bound(0, open_low=True),
    "model.pairs_per_block": Bound(1),
    "model.smoothing": Bound(0, note="pixels"),
    "solve.neighbours": Bound(1),
    "solve.coarse_factor": Bound(1, note="1: pairs further apart fitted at full resolution"),
    "solve.reference": Bound(0, note="a slice index"),
    "solve.detrend": Bound(0, note="a polynomial degree"),
    "solve.highpass": Bound(0, open_low=True, note="a number of slices"),
    "pyramid.levels": Bound(1),
    "pyramid.factors": Bound(1),
    "pyramid.steps": Bound(1),
    "pyramid.finest_max_pixels": Bound(64),
    "early_stopping.window": Bound(1),
    "early_stopping.step_tol_px": Bound(0),
    "early_stopping.coarse_step_tol_px": Bound(0),
    "early_stopping.newton_step_tol_px": Bound(0),
    "output.crop_safety_margin": Bound(0),
    "output.num_workers": Bound(1),
    "output.levels": Bound(1, note="1: the full resolution only"),
}


def check_bounds(group: str, **values: Any) -> None:
    """Raise :class:`~sphero_lightning.errors.SpheroError` for the first of ``values`` (``name=value`` of ``group``'s
    options) outside its :data:`BOUNDS`.

    >>> check_bounds("solve", neighbours=2, highpass=None)
    >>> check_bounds("solve", neighbours=0)
    Traceback (most recent call last):
    ...
    sphero_lightning.errors.SpheroError: --solve.neighbours must be >= 1, got 0
    """
    for name, value in values.items():
        bound = BOUNDS[f"{group}.{name}"]
        if not bound.holds(value):
            raise SpheroError(bound.message(f"{group}.{name}", value))
