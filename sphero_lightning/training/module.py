"""The LightningModule: a block of pairs, their learnable affine transforms, one solver step per step.

One epoch = one block of pairs per device; one training step = one evaluation of every active pair at the solver's
trial point, then one solver update. ``delta`` holds one row per (rank, slot); a rank fills its own rows and scales
its loss by the world size, so after DDP's all-reduce every rank holds every pair's gradient and takes the same
decisions. The pyramid and early-stopping callbacks drive levels and freezing (README "Design").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, get_args

import lightning as L
import torch
import torch.distributed as dist

from ..core.fit import BlockFit, BlockState, FitSettings, Ranks
from ..core.masks import block_images
from ..core.objective import PairObjective
from ..core.records import PairRecord, in_stack
from ..core.settings import (
    DATA,
    MODEL,
    Curvature,
    InitTranslation,
    Loss,
    LossInterpolation,
    Optimizer,
    Transformation,
    check_bounds,
)
from ..core.stack import choose_evaluation
from ..errors import SpheroError
from ..storage.journal import Journal
from ..threads import release_memory
from .report import log_level_end, log_run_settings
from .scope import current_run
from .state import Level


@dataclass
class FitTimes:
    """Where a fit's time went in this process: ``fit_s`` from the first block to the end of the last, on ``threads``
    torch threads; per pyramid level ``k`` the seconds and the number of its training steps (``level_s[k]``,
    ``level_steps[k]``)."""

    fit_s: float = 0.0
    threads: int = 0  # torch threads the fit ran on (this process's share of the cores)
    level_s: dict[int, float] = field(default_factory=dict)
    level_steps: dict[int, int] = field(default_factory=dict)


class RegistrationModule(L.LightningModule):
    """Affine registration of consecutive slice pairs, many pairs at a time.

    Parameters
    ----------
    transformation : {"translation", "rigid", "similarity", "affine"}
        Transform family fitted to each pair (rigid: rotation and translation); ``similarity`` is rotation + one
        isotropic scale + translation.
    scaling : bool
        For ``affine``: whether the two per-axis scales are free (the other families ignore it: translation and rigid fit
        no scale, similarity one isotropic scale; the output records what was fitted).
    shear : bool
        For ``affine``: whether the horizontal shear is free (the other families fit none).
    loss : {"ncc", "mse", "mae", "ssim"}
        Similarity between the fixed slice and the warped moving slice, over pixels inside the
        warped moving slice only.
    loss_kwargs : dict, optional
        Extra keyword arguments of the loss (e.g. ``{"sigma": 1.5}`` for ssim).
    optimizer : {"bfgs", "adam"}
        ``bfgs``: per-pair quasi-Newton with line search (converges in tens of steps; default).
        ``adam``: the reference pipeline's optimiser (hundreds of steps).
    regularization : float
        Weight of the squared deviation of the scale and shear parameters from identity.
    init_std : float
        Standard deviation of Gaussian noise added to the initial parameters (the reference
        pipeline's ``init_std``); 0 starts from identity (plus the translation estimate).
    init_translation : {"phase", "none"}
        ``phase``: start each pair from a phase-correlation translation estimate, kept only where it
        lowers the loss at the coarsest level. Widens the capture range to tens of pixels.
    smoothing : float
        Sigma (pixels of each level) of a Gaussian applied to both slices before fitting. Interpolating
        a noisy slice smooths its noise by an amount that depends on the sub-pixel shift, which pulls
        the optimum; a light blur of both slices removes most of that bias (measured: 0.0088 -> 0.0029 px
        per pair at noise sigma 6, see README). 0 disables it.
    interpolation : {"bspline", "bspline2x", "bicubic"}
        How the moving slice is resampled inside the loss (README, "Measured"). ``bspline``
        (prefiltered cubic B-spline, default): the most accurate (0.005 px on the benchmark stacks).
        ``bspline2x``: exact 2x B-spline upsampling once per level, then torch's bicubic (0.013 px, no
        faster since most pairs need one evaluation per level). ``bicubic``: torch's Keys kernel on the
        slice (0.022 px, ~1.25x faster).
    curvature : {"gauss_newton", "carried"}
        BFGS's curvature model at the start of each pyramid level. ``gauss_newton`` (default; ncc loss):
        every pair that matches at all (NCC >= 0.1 at the level's first evaluation) starts the level from
        the Gauss-Newton Hessian of the loss, built from the fixed and warped moving slices' gradients, so
        the first step of a level is already a Newton step (what TurboReg's Marquardt-Levenberg does): a
        pair of matching slices usually converges in one evaluation per level, consecutive real sections
        in ~4 at the finest level (6.7 with ``carried``). ``carried``: the previous level's BFGS model,
        rescaled by the curvature measured along the level's first step.
    pairs_per_block : int
        Pairs fitted together per device (set from ``data.pairs_per_block``).
    """

    #: :class:`~sphero_lightning.core.fit.BlockFit`'s ``sync_free`` (None: on where the slices are not on the CPU)
    sync_free: bool | None = None

    def __init__(self, transformation: Transformation = MODEL.transformation, scaling: bool = MODEL.scaling,
                 shear: bool = MODEL.shear, loss: Loss = MODEL.loss,
                 loss_kwargs: dict[str, Any] | None = MODEL.loss_kwargs, optimizer: Optimizer = MODEL.optimizer,
                 regularization: float = MODEL.regularization, init_std: float = MODEL.init_std,
                 init_translation: InitTranslation = MODEL.init_translation, smoothing: float = MODEL.smoothing,
                 interpolation: LossInterpolation = MODEL.interpolation, curvature: Curvature = MODEL.curvature,
                 pairs_per_block: int = DATA.pairs_per_block) -> None:
        super().__init__()
        for name, value, kind in (("transformation", transformation, Transformation), ("loss", loss, Loss),
                                  ("optimizer", optimizer, Optimizer), ("init_translation", init_translation, InitTranslation),
                                  ("interpolation", interpolation, LossInterpolation), ("curvature", curvature, Curvature)):
            if value not in get_args(kind):  # jsonargparse checks the command line; this, Python callers
                raise SpheroError(f"unknown {name} {value!r}; choose one of {', '.join(get_args(kind))}")
        check_bounds("model", pairs_per_block=pairs_per_block, smoothing=smoothing)
        # Lightning would log only these to TensorBoard; on_fit_start logs the whole run's settings instead.
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.objective = PairObjective(transformation, scaling, shear, loss, loss_kwargs, regularization, smoothing,
                                       interpolation)
        self.levels: list[Level] = [Level(1.0, 200, 1e-2)]
        self.delta: torch.nn.Parameter | None = None
        self.fit: BlockFit | None = None  # the block being fitted
        self.results: dict[int, PairRecord] = {}
        self.times = FitTimes()
        self.n_pairs = 0
        self.steps_run = 0  # training steps of this process (Lightning's logging step; global_step stays 0 without optimizers)

    # ------------------------------------------------------------------ layout
    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    @property
    def rows(self) -> slice:
        """This rank's rows of ``delta``."""
        b = self.hparams.pairs_per_block
        return slice(self.rank * b, (self.rank + 1) * b)

    def configure_pyramid(self, levels: list[Level]) -> None:  # the curriculum, from the pyramid callback
        self.levels = list(levels)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            raise RuntimeError("RegistrationModule needs a datamodule that provides the pairs (ZarrPairDataModule)")
        self.shape = dm.slice_shape
        self.objective.shape = self.shape
        self.objective.to(self.device)
        self.hparams.pairs_per_block = dm.pairs_per_block  # the block the data module settled on (large slices: fewer)
        self.times = FitTimes()  # this fit's (a module fitted again starts from zero)
        hp = {k: v for k, v in self.hparams.items() if k != "pairs_per_block"}
        # no journal where the data live in memory (the Python API): nothing to resume from
        self.journal = None if dm.journal_path is None else Journal(
            dm.journal_path, dm.fingerprint(hp, self.levels, self.trainer.callbacks), dm.output_format)
        self._journaled = self.journal.load() if dm.resume and self.journal is not None else {}
        self.n_pairs = 0
        self.add_pairs(dm)
        rows = self.world * self.hparams.pairs_per_block
        if self.results and self.trainer.is_global_zero:
            print(f"sphero: resuming: {len(self.results)} of {self.n_pairs} pairs finished earlier "
                  f"(journal {self.journal.path}); {len(dm.skip_blocks)} of {dm.n_blocks(self.world)} blocks "
                  f"of {rows} skipped", file=sys.stderr)
        if self.world > 1 and self.trainer.is_global_zero:  # several processes: say so (two on one CPU share its cores)
            print(f"sphero: {self.world} processes ({type(self.trainer.strategy).__name__}, {self.device.type}), "
                  f"{torch.get_num_threads()} torch thread(s) each; every block is split between them", file=sys.stderr)
        choose_evaluation(self.objective, self.n_pairs, self.levels[-1].factor if self.levels else 1.0)
        # float64: the solver works in float64 and the trial point must be evaluated exactly.
        self.delta = torch.nn.Parameter(torch.zeros(rows, self.objective.basis.shape[0], dtype=torch.float64))

    def record(self) -> dict[str, Any]:
        """The model's settings as the output records them: ``scaling`` and ``shear`` as the family fitted them (a rigid
        fit: false, whatever the switches; similarity: ``"isotropic"``), the loss's interpolation under its own name
        (``loss_interpolation``), nothing private to the command line."""
        hp = {k: v for k, v in self.hparams.items() if k != "pairs_per_block" and not k.startswith("_")}
        family = hp["transformation"]
        hp["scaling"] = {"affine": bool(hp["scaling"]), "similarity": "isotropic"}.get(family, False)
        hp["shear"] = family == "affine" and bool(hp["shear"])
        return {("loss_interpolation" if k == "interpolation" else k): v for k, v in hp.items()}

    def add_pairs(self, dm: Any) -> None:
        """Take the data module's pairs from ``n_pairs`` on (all at set-up; bridges found after the others were fitted):
        their results from the journal where it has them for the same slices, and the blocks that need no fitting."""
        old, self.n_pairs = self.n_pairs, dm.n_pairs
        self.pair_slices = [dm.pair_slices(p) for p in range(self.n_pairs)]
        self.pair_stop = list(dm.pair_stop)
        self.results.update({p: r for p, r in self._journaled.items()
                             if old <= p < self.n_pairs and tuple(r["slice_indices"]) == tuple(self.pair_slices[p])})
        dm.skip({blk for blk in range(dm.n_blocks(self.world)) if all(p < 0 or p in self.results for p in self.block_pairs(blk))})

    def configure_optimizers(self) -> None:  # optimisation is per pair and batched (optimizers.py), from training_step
        return None

    def block_pairs(self, block: int) -> list[int]:
        """Global pair index of every row of ``block`` (-1 for empty slots); same on every rank."""
        b, w = self.hparams.pairs_per_block, self.world
        start, stop = self.trainer.datamodule.block_range(block, w)
        return [p if p < stop else -1 for p in range(start, start + w * b)]

    # ------------------------------------------------------------------ block and level life cycle (core.fit)
    def load_block(self, batch: dict[str, torch.Tensor]) -> None:
        """Receive this rank's slices of the current block and set up its fit (:class:`~..core.fit.BlockFit`)."""
        # grey values to about [0, 1] by the stack's own range (data.to_tensor), at the finest level's resolution one
        # slice at a time; what the loss leaves out (data.ignore_value, data.mask_array) and sees (data.destripe)
        slices, masks = block_images(batch["slices"], batch["offset"], batch["scale"], self.levels[-1].factor,
                                     batch.get("masks"), batch.get("destripe", "none"))
        pairs = self.block_pairs(self.current_epoch)
        hp = self.hparams
        self.fit = BlockFit(self.objective, self.levels, slices, batch["fixed"], batch["moving"], pairs,
                            [self.pair_stop[p] if p >= 0 else 1.0 for p in pairs], masks,
                            FitSettings(hp.optimizer, hp.curvature, hp.init_std, hp.init_translation),
                            Ranks(self.rows, self._all_reduce, self._gradients), index=self.current_epoch,
                            sync_free=self.sync_free)

    def _gradients(self, trial: torch.Tensor, idx: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Every row's gradient: a linear surrogate with exactly this rank's gradients, all-reduced by DDP into every
        row of ``delta`` (the Lightning mapping of the learnable transforms)."""
        with torch.no_grad():
            self.delta.copy_(trial)
        if len(idx):
            total = (self.delta[self.rows][idx] * grads).sum() * self.world
        else:
            total = (self.delta * 0).sum()  # keeps DDP's all-reduce in step with the other ranks
        self.delta.grad = None
        self.manual_backward(total)
        return self.delta.grad.detach().clone() if self.delta.grad is not None else torch.zeros_like(self.delta)

    @property
    def block(self) -> BlockState | None:
        return None if self.fit is None else self.fit.block

    @property
    def solver(self) -> Any:
        return None if self.fit is None else self.fit.solver

    @property
    def last_level(self) -> int:
        return self.fit.last_level

    def level_finished(self) -> bool:
        return self.fit.level_finished()

    def step_displacement_px(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        return self.fit.step_displacement_px(x_old, x_new)

    def next_level(self) -> None:
        """Record the pairs that stop at this level, carry the parameters over to the next, finer level."""
        log_level_end(self._trainer, self.fit.block, self.fit.solver.f)
        self.fit.next_level()
        self._take_results()

    def finish_block(self) -> None:
        """Record every pair of the block not recorded yet (all ranks know all rows) and end the epoch."""
        log_level_end(self._trainer, self.fit.block, self.fit.solver.f)
        self.fit.finish()
        self._take_results()

    def _take_results(self) -> None:
        for pair, r in self.fit.results.items():
            self.results[pair] = in_stack(r, pair, self.pair_slices[pair])

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self) -> None:
        self._train_t0 = time.perf_counter()

    def on_train_end(self) -> None:
        self.times.fit_s = time.perf_counter() - getattr(self, "_train_t0", time.perf_counter())
        self.times.threads = torch.get_num_threads()

    def on_fit_start(self) -> None:
        # Here (data scanned, pyramid set) rather than Lightning's own logging right after this hook, which would
        # show only the model's settings; the loggers then save hparams.yaml with these.
        log_run_settings(self.trainer, self)

    def on_train_epoch_start(self) -> None:
        run = current_run()
        if run is not None:  # the run's share of the cores: other sphero runs may have started or ended since the last block
            run.share_cores()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if batch_idx == 0:
            if batch.get("skip"):  # finished in an earlier run (journal)
                self.fit = None
                return -1
            self.load_block(batch)
            self.fit.start_level(0)
        if self.block is None or self.block.done:
            return -1
        return None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:  # the profile of a run: time and steps per pyramid level (see benchmarks/real_sections.py)
            t, k = self.times, self.block.level
            t.level_s[k], t.level_steps[k] = t.level_s.get(k, 0.0) + time.perf_counter() - t0, t.level_steps.get(k, 0) + 1

    def _step(self) -> torch.Tensor:
        """One evaluation of every active pair of the block at its solver's trial point, then one solver update."""
        mean_loss = self.fit.step()
        # Lightning writes step metrics every log_every_n_steps training steps (counted like steps_run);
        # self.global_step would not do: it counts optimizer steps, and there are none here.
        self.steps_run += 1
        if self.steps_run % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("loss/step", mean_loss.float(), on_step=True, prog_bar=False, rank_zero_only=True, batch_size=1)
        return mean_loss

    def on_train_epoch_end(self) -> None:
        blk = self.block
        if blk is None:
            return
        if not blk.done:  # budget of the epoch ended early (e.g. max_steps): keep what we have
            self.finish_block()
        if self.trainer.is_global_zero and self.journal is not None:
            self.journal.save(self.results)
        losses = [self.results[p]["final_loss"] for p in blk.pairs if p >= 0]
        if losses:
            self.log("loss/block_final", float(sum(losses) / len(losses)), on_epoch=True, rank_zero_only=True, batch_size=1)
        self.fit = None  # the block's images and solver go now, not when the next block has been read beside them
        release_memory()
