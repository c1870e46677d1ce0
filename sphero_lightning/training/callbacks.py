"""Callbacks: the pyramid curriculum, per-pair early stopping, the progress bar (the writer: ``writer.py``)."""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from ..core.fit import SMALL_RUN, StoppingRule  # noqa: F401 - SMALL_RUN: named in the docstring
from ..core.settings import EARLY_STOPPING, PYRAMID, check_bounds
from ..core.stack import large_slice_base, pyramid_levels, stopping_rule
from ..errors import SpheroError
from .module import RegistrationModule
from .state import Level


class PyramidSchedule(L.Callback):
    """Coarse-to-fine curriculum: each block is fitted level by level, parameters carried over.

    A level ends when its step budget is spent or every pair of the block has converged; after the
    finest level the block (the epoch) ends.

    Parameters
    ----------
    levels : int
        Number of pyramid levels (the reference pipeline's ``pyramid_levels``).
    factors : float or list of float
        A number ``f`` gives downscale factors ``[f**(levels-1), ..., f, 1]`` (``pyramid_factors``);
        a list gives them explicitly, coarse to fine.
    steps : int or list of int
        Step budget per level (``pyramid_epochs``). A BFGS step is one evaluation of every pair.
    learning_rate : float or list of float, optional
        Step length per level (one value, or one per level): for ``adam`` the step size (default the reference's
        ``[1e-3, 1e-3, 5e-4, 1e-4]``); for ``bfgs`` the length of the first step (default 0.01, about 2 px on a 384 px slice).
        Parameter units: see ``transforms.py`` (translation in half slice widths, angles in radians).
    finest_max_pixels : int
        The finest level holds at most this many pixels: larger slices (block-face, 8k-16k px) are fitted with
        every factor multiplied by the power of 2 that brings them under it (8192 x 8192 with the default 4 Mpx:
        factors [32, 16, 8, 4], the finest level 2048 x 2048), so the cost of a pair stops growing with the slice
        area; reading and writing stay full resolution. The run says what it chose.
    """

    def __init__(self, levels: int = PYRAMID.levels, factors: float | list[float] = PYRAMID.factors,
                 steps: int | list[int] = PYRAMID.steps,
                 learning_rate: float | list[float] | None = PYRAMID.learning_rate,
                 finest_max_pixels: int = PYRAMID.finest_max_pixels) -> None:
        check_bounds("pyramid", levels=levels, factors=factors, steps=steps, finest_max_pixels=finest_max_pixels)
        given = pyramid_levels(levels, factors, steps)  # the factors and steps per level (their lengths checked)
        fac = [lv.factor for lv in given]
        if any(fine > coarse for coarse, fine in itertools.pairwise(fac)):
            raise SpheroError(f"pyramid factors go from coarse to fine, each at most the one before (e.g. [4, 2, 1]); "
                              f"got {[float(f) for f in fac]}")
        st = [lv.steps for lv in given]
        self.factors, self.steps, self.learning_rate = fac, st, learning_rate
        self.n_levels, self.finest_max_pixels = levels, int(finest_max_pixels)
        self.base = 1.0  # the power of 2 every factor is multiplied by for large slices (set at setup)

    def levels_for(self, optimizer: str) -> list[Level]:
        return pyramid_levels(self.n_levels, self.factors, self.steps, self.learning_rate, optimizer, self.base)

    def base_factor(self, shape: tuple[int, int]) -> float:
        """The smallest power of 2 that brings the finest level of ``shape`` slices under ``finest_max_pixels``."""
        return large_slice_base(shape, min(self.factors), self.finest_max_pixels)

    def setup(self, trainer: L.Trainer, pl_module: RegistrationModule, stage: str) -> None:
        dm = trainer.datamodule
        smallest = min(dm.slice_shape)
        self.base = self.base_factor(dm.slice_shape)
        if self.base > 1 and trainer.is_global_zero:
            h, w = dm.slice_shape
            f = min(self.factors) * self.base
            print(f"sphero: slices of {h} x {w} px: the finest pyramid level is at 1/{f:g} resolution "
                  f"({round(h / f)} x {round(w / f)} px; --pyramid.finest_max_pixels {self.finest_max_pixels})", file=sys.stderr)
        if max(self.factors) * self.base * 8 > smallest:
            raise SpheroError(f"the coarsest pyramid level (downscale factor {max(self.factors) * self.base:g}) leaves fewer than 8 pixels of a {smallest} px slice; "
                             f"use fewer levels (--pyramid.levels) or smaller factors (--pyramid.factors)")
        pl_module.configure_pyramid(self.levels_for(pl_module.hparams.optimizer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: RegistrationModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        blk = pl_module.block
        if blk is None or blk.done or not pl_module.level_finished():
            return
        if blk.level < pl_module.last_level:
            pl_module.next_level()
        else:
            pl_module.finish_block()



class PairEarlyStopping(L.Callback):
    """Per-pair early stopping: a converged pair stops moving; the others go on.

    The rule (:class:`~..core.fit.StoppingRule`), per pair and level:

    * **flat loss**: over its last ``window`` accepted iterates the loss varied by less than ``tol`` (the reference
      pipeline's ``stop_window``, ``stop_tol``): the pair is frozen at its best point;
    * **short step**: the step its solver proposes moves no pixel more than the level's tolerance (pixels of the
      level): ``step_tol_px`` at the finest level, ``coarse_step_tol_px`` at the coarser ones, ``newton_step_tol_px``
      where the level started from a trusted Gauss-Newton model (slices matching at NCC >= 0.8), and at least
      :data:`~..core.fit.EARLY_STOP_TOL_PX` for pairs that end at a coarser level (``--solve.coarse_factor``). The
      level ends for the pair, which takes that last step unevaluated; the step counts only once the solver has
      confirmed its curvature model (``BatchBFGS.confirmed``) or after :data:`SMALL_RUN` short proposals in a row.

    Why each part is there, and what it was measured against (348 real pairs, ``benchmarks/convergence.py``):
    docs/benchmarks.md, "Convergence on real pairs".

    Parameters
    ----------
    enabled : bool
        Stop converged pairs early (false: every level runs its whole step budget).
    window : int
        Accepted iterates over which the loss must be flat (the reference pipeline's ``stop_window``).
    tol : float
        Largest change of the loss over the window that counts as flat (the reference's ``stop_tol``).
    step_tol_px : float or list of float
        A level ends for a pair whose confirmed next step moves no pixel more than this at the finest level (pixels of
        the level; a list: one value per level, coarse to fine).
    coarse_step_tol_px : float
        The step rule's tolerance at the coarser levels (pixels of the level).
    newton_step_tol_px : float
        The same for pairs whose level started from a trusted Gauss-Newton model (slices matching at NCC >= 0.8).
    """

    def __init__(self, enabled: bool = EARLY_STOPPING.enabled, window: int = EARLY_STOPPING.window,
                 tol: float = EARLY_STOPPING.tol, step_tol_px: float | list[float] = EARLY_STOPPING.step_tol_px,
                 coarse_step_tol_px: float = EARLY_STOPPING.coarse_step_tol_px,
                 newton_step_tol_px: float = EARLY_STOPPING.newton_step_tol_px) -> None:
        check_bounds("early_stopping", window=window, step_tol_px=step_tol_px, coarse_step_tol_px=coarse_step_tol_px,
                     newton_step_tol_px=newton_step_tol_px)
        self.coarse_step_tol_px = coarse_step_tol_px
        self.enabled, self.window, self.tol, self.step_tol_px = enabled, window, tol, step_tol_px
        self.newton_step_tol_px = newton_step_tol_px
        self.rule: StoppingRule | None = None  # the rule itself (core.fit), made at setup for the pyramid's levels

    #: Config group of these settings (``--early_stopping.*``), for the logged hyperparameters.
    config_group = "early_stopping"

    def setup(self, trainer: L.Trainer, pl_module: RegistrationModule, stage: str) -> None:
        pyramid = next((cb for cb in trainer.callbacks if isinstance(cb, PyramidSchedule)), None)
        levels = pyramid.n_levels if pyramid is not None else len(pl_module.levels)
        self.rule = stopping_rule(levels, self.step_tol_px, self.coarse_step_tol_px, self.window, self.tol,
                                  self.newton_step_tol_px, self.enabled)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change a pair's result (for the progress journal)."""
        return {"enabled": self.enabled, "window": self.window, "tol": self.tol, "step_tol_px": self.step_tol_px,
                "coarse_step_tol_px": self.coarse_step_tol_px, "newton_step_tol_px": self.newton_step_tol_px}

    def settings(self) -> dict[str, Any]:
        return self.fingerprint()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: RegistrationModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.fit is not None:
            self.rule.after_step(pl_module.fit)


class PairProgressBar(ProgressBar):
    """Progress in pairs (the unit users think in): pairs done of the total, pairs per second and time left,
    with the pyramid level and the pairs still active in the current block (redrawn at most once a second, so a
    long block still shows it is moving)."""

    #: Seconds between redraws of the level and active pairs within a block.
    refresh_s = 1.0
    #: tqdm's shortest time between two redraws (s).
    mininterval = 0.1

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar = None
        self._drawn = 0.0

    def disable(self) -> None:
        self._enabled = False

    def set_total(self, n_pairs: int) -> None:
        """More pairs than at the start (bridging pairs fitted after the others)."""
        if self.bar is not None:
            extra = n_pairs - self.bar.total
            self.bar.total = n_pairs
            self.bridges += extra
            self.bar.set_description(self._desc())

    def _desc(self) -> str:
        """What the bar counts: every fitted pair, said by kind (the run's summary counts consecutive pairs only)."""
        kinds = [f"{self.consecutive} consecutive"] + ([f"{self.over} over one slice or more"] if self.over else []) + \
            ([f"{self.bridges} bridging"] if self.bridges else [])
        return f"registering pairs ({' + '.join(kinds)})" if len(kinds) > 1 else "registering"

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: RegistrationModule) -> None:
        if self._enabled and trainer.is_global_zero:
            from ..storage.tasks import progress_bar

            done = len(pl_module.results)  # resumed from the journal; tqdm's rate counts only the pairs after these
            at = {z: q for q, z in enumerate(getattr(trainer.datamodule, "good", []))}
            self.consecutive = sum(1 for i, j in pl_module.pair_slices if i in at and j in at and at[j] - at[i] == 1)
            self.over, self.bridges = pl_module.n_pairs - self.consecutive, 0
            self.bar = progress_bar(pl_module.n_pairs, self._desc(), "pair", initial=done, mininterval=self.mininterval)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: RegistrationModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bar is None or pl_module.block is None or pl_module.block.done:
            return
        now = time.monotonic()
        if now - self._drawn >= self.refresh_s:
            self._drawn = now
            blk = pl_module.block
            self.bar.set_postfix(level=f"{blk.level + 1}/{len(pl_module.levels)}", active=int(pl_module.solver.active.sum()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: RegistrationModule) -> None:
        if self.bar is not None and pl_module.block is not None:
            self.bar.set_postfix_str("", refresh=False)  # the block is done: no level or active pairs to show
            self.bar.update(sum(1 for p in pl_module.block.pairs if p >= 0))

    def on_train_end(self, trainer: L.Trainer, pl_module: RegistrationModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
