"""The fit of a whole stack as plain functions: levels, stopping, blocks, bridging rounds, the volume and its QC.

:func:`fit_stack` registers a stack from a slice reader without Lightning, Zarr or a command line, and returns what
``sphero fit`` writes (:class:`StackResult`; ``tests/core/test_stack.py``: equal to the command bit for bit). The
Lightning layer drives the same pieces from its hooks: the pyramid callback's levels (:func:`pyramid_levels`), the
early-stopping callback's rule (:func:`stopping_rule`), the data module's pairs and blocks
(:class:`~.pairs.StackPairs`), the module's block images (:func:`~.masks.block_images`) and block fit
(:class:`~.fit.BlockFit`), the volume callback's bridging rounds (:data:`MAX_BRIDGE_ROUNDS`,
:func:`~.volume.bridge_pairs`), the writer's volume (:func:`compose_stack`) and QC (:func:`~.records.flag_outliers`).

>>> from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack
>>> from sphero_lightning.core.objective import PairObjective
>>> s = make_stack(em_like_image(192, seed=1), 4, (96, 96), seed=2)  # 4 slices cut with known transforms
>>> out = fit_stack(lambda zs: s.stack[zs], 4, (96, 96), PairObjective("rigid"), pyramid_levels(3),
...                 stopping_rule(3), intensity=(0.0, 255.0))
>>> sorted(tuple(r["slice_indices"]) for r in out.fitted.values())  # two neighbours: consecutive and distance-2 pairs
[(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
>>> bool(composed_error(out.volume.later.numpy(), s.composed, (96, 96)).max() < 0.05)  # px, slices 1..3
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..errors import SpheroError
from .crop import crop_box
from .fit import FitSettings, Level, StoppingRule, fit_block
from .frames import FIRST_KEY, Affine, Frame, pixel_matrices
from .kernels import worth
from .masks import block_images, to_tensor
from .objective import PairObjective
from .pairs import StackPairs, block_layout
from .records import PairRecord, flag_outliers, in_stack, mark_untrusted
from .settings import DATA, EARLY_STOPPING, MODEL, OUTPUT, PYRAMID, SOLVE, Destripe
from .volume import Priors, bridge_pairs, compose_volume

#: Learning rates of the reference pipeline (Adam), per level from coarse to fine.
ADAM_LR = [1e-3, 1e-3, 5e-4, 1e-4]
#: Rounds of bridging pairs at most (each after the pairs before it are fitted).
MAX_BRIDGE_ROUNDS = 2


def pyramid_levels(levels: int = PYRAMID.levels, factors: list[float] | float = PYRAMID.factors,
                   steps: list[int] | int = PYRAMID.steps, learning_rate: list[float] | float | None = PYRAMID.learning_rate,
                   optimizer: str = MODEL.optimizer, base: float = 1.0) -> list[Level]:
    """The pyramid's levels, coarse to fine (``--pyramid.*``): factors ``[f**(levels-1), ..., f, 1]`` from a number
    (or the list given), times ``base`` (a power of 2 for large slices); the step budget and the learning rate per
    level (one value or one per level; default 0.01 for bfgs, the reference's Adam rates for adam).

    >>> [(lv.factor, lv.steps, lv.lr) for lv in pyramid_levels(3, steps=[50, 50, 20])]
    [(4.0, 50, 0.01), (2.0, 50, 0.01), (1.0, 20, 0.01)]
    """
    fac = per_level(factors, levels, "pyramid factors") if isinstance(factors, (list, tuple)) else \
        [float(factors) ** (levels - 1 - i) for i in range(levels)]
    st = [int(s) for s in per_level(steps, levels, "pyramid steps")]
    lr = learning_rate
    if lr is None:
        lr = ADAM_LR[-levels:] if optimizer == "adam" and levels <= 4 else (1e-3 if optimizer == "adam" else 1e-2)
    return [Level(f * base, s, r) for f, s, r in zip(fac, st, per_level(lr, levels, "learning_rate"))]


def large_slice_base(shape: tuple[int, int], finest_factor: float, finest_max_pixels: int) -> float:
    """The smallest power of 2 that brings the finest level (``finest_factor``) of ``shape`` slices under
    ``finest_max_pixels`` (``--pyramid.finest_max_pixels``): every factor is multiplied by it.

    >>> large_slice_base((8192, 8192), 1.0, 1 << 22), large_slice_base((512, 512), 1.0, 1 << 22)
    (4.0, 1.0)
    """
    base, (h, w) = 1.0, shape
    while (h / (base * finest_factor)) * (w / (base * finest_factor)) > finest_max_pixels:
        base *= 2
    return base


def per_level(value: float | list[float], levels: int, name: str) -> list[float]:
    """One value per level: ``value`` repeated, or the list checked for length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise SpheroError(f"{name} has {len(value)} entries but there are {levels} pyramid levels; give one value or {levels}")
        return [float(v) for v in value]
    return [float(value)] * levels


def stopping_rule(levels: int, step_tol_px: float | list[float] = EARLY_STOPPING.step_tol_px,
                  coarse_step_tol_px: float = EARLY_STOPPING.coarse_step_tol_px, window: int = EARLY_STOPPING.window,
                  tol: float = EARLY_STOPPING.tol, newton_step_tol_px: float = EARLY_STOPPING.newton_step_tol_px,
                  enabled: bool = EARLY_STOPPING.enabled) -> StoppingRule:
    """The early-stopping rule of ``levels`` pyramid levels (``--early_stopping.*``): ``step_tol_px`` at the finest
    level and ``coarse_step_tol_px`` at the others, or ``step_tol_px`` as a list, one per level.

    >>> stopping_rule(3).tols
    [0.01, 0.01, 0.003]
    """
    if isinstance(step_tol_px, (list, tuple)):
        tols = per_level(step_tol_px, levels, "early_stopping.step_tol_px")
    else:
        tols = [float(coarse_step_tol_px)] * (levels - 1) + [float(step_tol_px)]
    return StoppingRule(tols, window, tol, newton_step_tol_px, enabled)


def choose_evaluation(objective: PairObjective, n_pairs: int, finest: float) -> None:
    """Set ``objective.compiled``: the compiled evaluation where a fit of ``n_pairs`` pairs of ``objective.shape``
    slices at the finest factor ``finest`` is big enough to gain from it (:func:`~.kernels.worth`); decided once per
    fit, the same for every block."""
    h, w = objective.shape
    objective.compiled = worth(n_pairs, round(h / finest) * round(w / finest))


@dataclass
class VolumeResult:
    """The volume from its pairs (:func:`compose_stack`): what the writer writes and the Python API returns.

    ``fitted``: every fitted pair's record; ``composed``: ``(n, 2, 3)`` normalized transforms of the slices that are
    warped (slices 1..n where slice 0 keeps its frame, else all); ``pairwise``: ``(Z - 1, 2, 3)`` the consecutive pairs'
    transforms; ``log``: one record per consecutive pair (statuses and the solve's residuals); ``solved``: the solve's
    record (None for the plain chain); ``first``: slice 0's transform; ``own_frame``: whether it is the identity (the
    output in slice 0's frame); ``later``: the composed transforms of slices 1..n (the output's
    ``composed_transforms``); ``box``: the crop ``[top, bottom, left, right]`` in pixels; ``shape``: the slices'."""

    fitted: list[PairRecord]
    composed: torch.Tensor
    pairwise: torch.Tensor
    log: list[PairRecord]
    solved: dict[str, Any] | None
    first: torch.Tensor
    own_frame: bool
    later: torch.Tensor
    box: list[int]
    shape: tuple[int, int]

    @cached_property
    def composed_pixel(self) -> np.ndarray:
        """``(n, 3, 3)`` pixel matrices of slices 1..n to the output's frame (pystackreg's ``tmats``)."""
        return pixel_matrices(self.later.numpy(), self.shape, None if self.own_frame else self.first.numpy())

    def transforms(self) -> dict[str, Any]:
        """The transforms and the log as the output's attributes and the Python API's result hold them."""
        return {"pairwise_transforms": self.pairwise.tolist(), "composed_transforms": self.later.tolist(),
                "composed_transforms_pixel": self.composed_pixel.tolist(),
                **({} if self.own_frame else {FIRST_KEY: self.first.tolist()}), "registration_log": self.log,
                "crop_box": self.box, **({"volume_solve": self.solved} if self.solved is not None else {})}


def compose_stack(n_slices: int, fitted: list[PairRecord], damaged: dict[int, str], shape: tuple[int, int],
                  neighbours: int = SOLVE.neighbours, reference: int = SOLVE.reference, priors: Priors | None = None,
                  family: tuple[str, bool, bool] = ("affine", True, True), crop_borders: bool = OUTPUT.crop_borders,
                  margin: int = OUTPUT.crop_safety_margin) -> VolumeResult:
    """The composed transforms (:func:`~.volume.compose_volume`), untrusted pairs marked
    (:func:`~.records.mark_untrusted`), and the crop box (:func:`~.crop.crop_box`; the whole slice without
    ``crop_borders``)."""
    composed, pairwise, log, solved = compose_volume(n_slices, fitted, damaged, shape, neighbours=neighbours,
                                                     reference=reference, priors=priors, family=family)
    mark_untrusted(log)
    first = composed[0]  # slice 0's: the identity, unless the output takes another slice's frame (--solve.reference)
    own_frame = Affine(first, Frame.NORMALIZED, shape).is_identity()
    composed = composed[1:] if own_frame else composed  # what is warped (every slice's where slice 0 moves too)
    later = composed if own_frame else composed[1:]
    pixel = Affine(composed, Frame.NORMALIZED, shape).to(Frame.PIXEL).matrix.numpy()
    box = crop_box(pixel, shape, margin) if crop_borders else [0, shape[0], 0, shape[1]]
    return VolumeResult(fitted, composed, pairwise, log, solved, first, own_frame, later, box, tuple(shape))


@dataclass
class StackResult:
    """What :func:`fit_stack` found: every fitted pair's record by pair (``fitted``, bridges included), the volume
    (``volume``, its log QC-marked) and the QC's outliers (``outliers``), the pairs' slices (``pairs``)."""

    fitted: dict[int, PairRecord]
    pairs: StackPairs
    volume: VolumeResult
    outliers: list[dict[str, Any]] = field(default_factory=list)


#: A reader of slices: ``read(indices)`` -> ``(k, H, W)`` raw slices, or ``(slices, masks)`` with ``(k, H, W)`` masks
#: (1 = use; None: no masks).
SliceReader = Callable[[list[int]], Any]


def fit_stack(read: SliceReader, n_slices: int, shape: tuple[int, int], objective: PairObjective, levels: list[Level],
              stopping: StoppingRule, *, intensity: tuple[float, float], settings: FitSettings | None = None,
              damaged: Mapping[int, str] | None = None, neighbours: int = SOLVE.neighbours,
              coarse_factor: float = SOLVE.coarse_factor, pairs_per_block: int = DATA.pairs_per_block,
              destripe: Destripe = DATA.destripe, reference: int = SOLVE.reference, priors: Priors | None = None,
              crop_borders: bool = OUTPUT.crop_borders, margin: int = OUTPUT.crop_safety_margin,
              done: Mapping[int, PairRecord] | None = None,
              on_block: Callable[[dict[int, PairRecord]], None] | None = None) -> StackResult:
    """Register a stack of ``n_slices`` slices of ``shape`` read by ``read`` (:data:`SliceReader`), as ``sphero fit``
    does with the same settings: the pairs of the usable slices (``damaged`` left out and bridged), block by block
    (``pairs_per_block``), each block's slices normalised by the stack's grey-value range ``intensity`` and fitted
    coarse to fine (``levels``, ``stopping``, ``settings``); then up to :data:`MAX_BRIDGE_ROUNDS` rounds of bridging
    pairs where the solve needs them; then the volume (``reference``, ``priors``, the crop) and the QC.

    Resume hooks: ``done`` holds results known already (a journal's; used where their slices are the same pair's), and
    ``on_block`` hears every result so far after each fitted block (to save a journal)."""
    damaged = dict(damaged or {})
    good = [z for z in range(n_slices) if z not in damaged]
    pairs = StackPairs.of(good, neighbours, coarse_factor)
    objective.shape = tuple(shape)
    choose_evaluation(objective, len(pairs.pairs), levels[-1].factor)
    results: dict[int, PairRecord] = {}
    known = dict(done or {})
    fitted_upto = 0
    for rounds in range(MAX_BRIDGE_ROUNDS + 1):
        for p in range(fitted_upto, len(pairs.pairs)):
            if p in known and tuple(known[p]["slice_indices"]) == pairs.pairs[p]:
                results[p] = known[p]
        for start, stop in pairs.blocks(pairs_per_block):
            if stop <= fitted_upto or all(p in results for p in range(start, stop)):
                continue
            results.update(_fit_block(read, pairs, start, stop, pairs_per_block, objective, levels, stopping, settings,
                                      intensity, destripe))
            if on_block is not None:
                on_block(dict(results))
        fitted_upto = len(pairs.pairs)
        if neighbours < 2 or rounds == MAX_BRIDGE_ROUNDS:
            break
        bridges = bridge_pairs(n_slices, [results[p] for p in range(len(pairs.pairs))], damaged, tuple(shape))
        if not bridges:
            break
        pairs.add(bridges)
    fitted = [results[p] for p in range(len(pairs.pairs))]
    volume = compose_stack(n_slices, fitted, damaged, tuple(shape), neighbours, reference, priors,
                           objective.family, crop_borders, margin)
    outliers = flag_outliers(volume.log)
    return StackResult(results, pairs, volume, outliers)


def _fit_block(read: SliceReader, pairs: StackPairs, start: int, stop: int, size: int, objective: PairObjective,
               levels: list[Level], stopping: StoppingRule, settings: FitSettings | None, intensity: tuple[float, float],
               destripe: Destripe) -> dict[int, PairRecord]:
    """One block's pairs ``start..stop`` fitted (rows padded to ``size``, as the Lightning module lays them out)."""
    slices, fixed, moving = block_layout(pairs.pairs[start:stop])
    got = read(slices)
    raw, masks = got if isinstance(got, tuple) else (got, None)
    data, offset, scale = to_tensor(np.asarray(raw), *intensity)
    images, block_masks = block_images(data, offset, scale, levels[-1].factor,
                                       None if masks is None else torch.from_numpy(np.asarray(masks)), destripe)
    rows = [p if p < stop else -1 for p in range(start, start + size)]
    out = fit_block(objective, levels, images, torch.tensor(fixed), torch.tensor(moving), rows,
                    [pairs.stop[p] if p >= 0 else 1.0 for p in rows], block_masks, settings, stopping)
    return {p: in_stack(r, p, pairs.pairs[p]) for p, r in out.items()}
