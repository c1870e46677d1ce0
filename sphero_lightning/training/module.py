"""The LightningModule: a block of pairs, their learnable affine transforms, one solver step per step.

One epoch = one block of pairs per device; one training step = one evaluation of every active pair at the solver's
trial point, then one solver update. ``delta`` holds one row per (rank, slot); a rank fills its own rows and scales
its loss by the world size, so after DDP's all-reduce every rank holds every pair's gradient and takes the same
decisions. The pyramid and early-stopping callbacks drive levels and freezing (README "Design").
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, get_args

import lightning as L
import torch
import torch.distributed as dist

from ..core.initialization import consecutive_phase_correlation
from ..core.masks import kept_fraction, loss_images, pair_masks
from ..core.objective import Loss, LossInterpolation, PairObjective, Transformation, take
from ..core.solvers import make_solver
from ..errors import SpheroError
from ..storage.journal import Journal
from ..threads import release_memory, share_cores
from .report import log_level_end, log_run_settings
from .state import MAX_STEP_PX, NEWTON_MIN_NCC, NEWTON_TRUST_NCC, BlockState, Curvature, InitTranslation, Level, Optimizer


class RegistrationModule(L.LightningModule):
    """Affine registration of consecutive slice pairs, many pairs at a time.

    Parameters
    ----------
    transformation : {"translation", "rigid", "similarity", "affine"}
        Transform family. ``similarity`` is rotation + one isotropic scale + translation.
    scaling, shear : bool
        For ``affine``: whether per-axis scale and horizontal shear are free.
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

    def __init__(
        self,
        transformation: Transformation = "rigid",
        scaling: bool = True,
        shear: bool = True,
        loss: Loss = "ncc",
        loss_kwargs: dict[str, Any] | None = None,
        optimizer: Optimizer = "bfgs",
        regularization: float = 0.5,
        init_std: float = 0.0,
        init_translation: InitTranslation = "phase",
        smoothing: float = 0.7,
        interpolation: LossInterpolation = "bspline",
        curvature: Curvature = "gauss_newton",
        pairs_per_block: int = 32,
    ) -> None:
        super().__init__()
        for name, value, kind in (("transformation", transformation, Transformation), ("loss", loss, Loss),
                                  ("optimizer", optimizer, Optimizer), ("init_translation", init_translation, InitTranslation),
                                  ("interpolation", interpolation, LossInterpolation), ("curvature", curvature, Curvature)):
            if value not in get_args(kind):  # jsonargparse checks the command line; this, Python callers
                raise SpheroError(f"unknown {name} {value!r}; choose one of {', '.join(get_args(kind))}")
        if pairs_per_block < 1:
            raise SpheroError(f"pairs_per_block must be >= 1, got {pairs_per_block}")
        # Lightning would log only these to TensorBoard; on_fit_start logs the whole run's settings instead.
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.objective = PairObjective(transformation, scaling, shear, loss, loss_kwargs, regularization, smoothing,
                                       interpolation)
        self.levels: list[Level] = [Level(1.0, 200, 1e-2)]
        self.delta: torch.nn.Parameter | None = None
        self.block: BlockState | None = None
        self.solver = None
        self._level0: tuple[torch.Tensor, torch.Tensor] | None = None  # (level-0 images, moving coefficients)
        self.block_masks: torch.Tensor | None = None  # what the loss leaves out, per slice of the block (or None)
        self.results: dict[int, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
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
        self.timings = dm.timings  # shared with the datamodule: scan_s, read_s, wait_s; here fit_s; writer write_s
        hp = {k: v for k, v in self.hparams.items() if k != "pairs_per_block"}
        self.journal = Journal(dm.journal_path, dm.fingerprint(hp, self.levels, self.trainer.callbacks), dm.output_format)
        self._journaled = self.journal.load() if dm.resume else {}
        self.n_pairs = 0
        self.add_pairs(dm)
        rows = self.world * self.hparams.pairs_per_block
        if self.results and self.trainer.is_global_zero:
            print(f"sphero: resuming: {len(self.results)} of {self.n_pairs} pairs finished earlier "
                  f"(journal {self.journal.path}); {len(dm.skip_blocks)} of {dm.n_blocks(self.world)} blocks "
                  f"of {rows} skipped", file=sys.stderr)
        # float64: the solver works in float64 and the trial point must be evaluated exactly.
        self.delta = torch.nn.Parameter(torch.zeros(rows, self.objective.basis.shape[0], dtype=torch.float64))

    def add_pairs(self, dm: Any) -> None:
        """Take the data module's pairs from ``n_pairs`` on (all at set-up; bridges found after the others were fitted):
        their results from the journal where it has them for the same slices, and the blocks that need no fitting."""
        old, self.n_pairs = self.n_pairs, dm.n_pairs
        self.pair_slices = [dm.pair_slices(p) for p in range(self.n_pairs)]
        self.pair_stop = list(dm.pair_stop)
        self.results.update({p: r for p, r in self._journaled.items()
                             if old <= p < self.n_pairs and tuple(r["slice_indices"]) == tuple(self.pair_slices[p])})
        dm.skip_blocks = {blk for blk in range(dm.n_blocks(self.world))
                          if all(p < 0 or p in self.results for p in self.block_pairs(blk))}

    def configure_optimizers(self) -> None:  # optimisation is per pair and batched (solvers.py), from training_step
        return None

    def block_pairs(self, block: int) -> list[int]:
        """Global pair index of every row of ``block`` (-1 for empty slots); same on every rank."""
        b, w = self.hparams.pairs_per_block, self.world
        start, stop = self.trainer.datamodule.block_range(block, w)
        return [p if p < stop else -1 for p in range(start, start + w * b)]

    # ------------------------------------------------------------------ the math
    # ------------------------------------------------------------------ block and level life cycle
    def load_block(self, batch: dict[str, torch.Tensor]) -> None:
        """Receive this rank's slices of the current block and set up the block's state."""
        slices = batch["slices"]
        # grey values to about [0, 1] by the stack's own range (data.to_tensor); (B + 1, 1, H, W)
        # at the finest level's resolution, one slice at a time: a large slice never exists in full as floats twice
        base = self.levels[-1].factor
        # what the loss leaves out (data.ignore_value, data.mask_array) and sees (data.destripe)
        self.block_slices, self.block_masks = loss_images(
            ((s[None, None].float() - batch["offset"].float()) / batch["scale"].float() for s in slices), base,
            batch.get("masks"), batch.get("destripe", "none"))
        self.block_base = base
        pairs = self.block_pairs(self.current_epoch)
        valid = torch.tensor([p >= 0 for p in pairs], device=self.device)
        self.block = BlockState(index=self.current_epoch, pairs=pairs, valid=valid,
                                steps=torch.zeros(len(pairs), dtype=torch.long, device=self.device))
        # the level each row stops at: the finest, or a coarser one for pairs further apart (--solve.coarse_factor)
        finest, stops = self.levels[-1].factor, [self.pair_stop[p] if p >= 0 else 1.0 for p in pairs]
        self.row_last = torch.tensor([max((k for k, lv in enumerate(self.levels) if lv.factor >= stop * finest * (1 - 1e-9)),
                                          default=0) for stop in stops], device=self.device)
        self.local_valid = valid[self.rows]
        n_local = int(self.local_valid.sum())
        # where each of this rank's pairs finds its fixed and moving slice among the block's slices
        self.block_fixed, self.block_moving = batch["fixed"], batch["moving"]
        if n_local and len(self.block_fixed) != n_local:
            raise RuntimeError(f"block {self.current_epoch}: got {len(self.block_fixed)} pairs of slices for {n_local} pairs")
        self._level0 = None  # level-0 images, kept when the initialisation computes them
        self.level_masks = pair_masks(self.block_masks, self.levels[0].factor / base, self.objective.smoothing,
                                      self.block_fixed, self.block_moving)
        self.x = self._initial_params()

    def _initial_params(self) -> torch.Tensor:
        """Identity (plus ``init_std`` noise), then the phase-correlation translation where it helps."""
        rows, n = self.delta.shape
        x = torch.zeros(rows, n, dtype=torch.float64, device=self.device)
        if self.hparams.init_std > 0:
            # Same generator state on all ranks (seeded by the CLI), so rows stay identical.
            x = x + self.hparams.init_std * torch.randn(rows, n, dtype=torch.float64).to(self.device)
        if self.hparams.init_translation == "phase":
            n_local = int(self.local_valid.sum())
            est = torch.zeros(rows, 2, dtype=torch.float64, device=self.device)
            if n_local:
                shift = consecutive_phase_correlation(self.block_slices, fixed=self.block_fixed, moving=self.block_moving).double()
                local = torch.zeros(self.hparams.pairs_per_block, 2, dtype=torch.float64, device=self.device)
                local[:n_local] = shift / (max(self.block_slices.shape[-2:]) / 2.0)
                est[self.rows] = local
            est = self._all_reduce(est)
            cand = x.clone()
            cand[:, :2] = est
            # Keep the estimate only where it beats the starting point at the coarsest level.
            imgs = self.objective.level_stack(self.block_slices, self.levels[0].factor / self.block_base)
            self._level0 = imgs, *self.objective.level_coeffs(imgs, self.block_fixed, self.block_moving)
            fixed, coeffs = take(imgs, self.block_fixed), self._level0[2]
            with torch.no_grad():
                keep = self._evaluate_rows(cand, fixed, coeffs) < self._evaluate_rows(x, fixed, coeffs)
            x = torch.where(keep.unsqueeze(-1), cand, x)
        return x

    def _evaluate_rows(self, x: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """``fn`` (default :meth:`pair_losses`) of every row at ``x`` (``(R,)``, identical on all ranks; 0 for
        empty slots). Every rank must call it the same number of times (it all-reduces)."""
        fn = fn or self.objective.pair_losses
        full = torch.zeros(x.shape[0], dtype=torch.float64, device=self.device)
        idx = torch.nonzero(self.local_valid).flatten()
        if len(idx):
            full[self.rows.start + idx] = fn(x[self.rows][idx], fixed[idx], coeffs[idx], masks=self._masks(idx)).detach()
        return self._all_reduce(full)

    def _masks(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:  # of the local pairs idx
        return None if self.level_masks is None else (self.level_masks[0][idx], self.level_masks[1][idx])

    def start_level(self, level: int) -> None:
        """Move the block to pyramid ``level``: new images, fresh solver state, parameters kept."""
        blk = self.block
        lv = self.levels[level]
        blk.level, blk.level_steps = level, 0
        cached, self._level0 = self._level0, None
        if level == 0 and cached:
            imgs, fixed_coeffs, coeffs = cached
        else:
            imgs = self.objective.level_stack(self.block_slices, lv.factor / self.block_base)
            fixed_coeffs, coeffs = self.objective.level_coeffs(imgs, self.block_fixed, self.block_moving)
        self.level_fixed, self.level_moving, self.level_coeffs = take(imgs, self.block_fixed), take(imgs, self.block_moving), coeffs
        self.level_fixed_coeffs = fixed_coeffs
        self.level_masks = pair_masks(self.block_masks, lv.factor / self.block_base, self.objective.smoothing,
                                      self.block_fixed, self.block_moving)
        self.level_shape = tuple(self.level_fixed.shape[-2:])
        previous = self.solver if level > 0 else None
        # Pairs that may start this level from the Gauss-Newton model: all at the first level; later only those that
        # matched with NCC >= NEWTON_MIN_NCC at the end of the coarser level (finer levels match less well), so no
        # Hessian is built for consecutive real sections that would reject it anyway
        if previous is None:
            self.newton_rows = torch.ones_like(blk.valid)
        else:
            ncc_prev = 1 - (previous.f - self.objective.penalty(previous.x))
            self.newton_rows = torch.isfinite(ncc_prev) & (ncc_prev >= NEWTON_MIN_NCC)
        scale = (lv.factor / self.levels[level - 1].factor) ** 2 if level > 0 else 1.0
        blk.level_counts.append(torch.zeros_like(blk.steps))
        # below the coarsest level, steps of at most MAX_STEP_PX pixels of the level: the coarser level left the pair
        # about that close, and a longer step on a weakly matching pair can land in another basin of the finer loss
        trust = {"step_length": self.step_displacement_px, "max_length": MAX_STEP_PX} if level > 0 else {}
        self.solver = make_solver(self.hparams.optimizer, self.x, lv.lr, active=blk.valid & (self.row_last >= level),
                                  previous=previous, curvature_scale=scale, **trust)

    @property
    def uses_gauss_newton(self) -> bool:
        return self.hparams.optimizer == "bfgs" and self.hparams.curvature == "gauss_newton" and self.hparams.loss == "ncc"

    def next_level(self) -> None:
        """Record the pairs that stop at this level, carry the parameters over to the next, finer level."""
        blk = self.block
        log_level_end(self._trainer, blk, self.solver.f)
        ending = blk.valid & (self.row_last == blk.level)
        if bool(ending.any()):
            self._record(ending)
        self.x = self.solver.x.clone()
        self.start_level(blk.level + 1)

    @property
    def last_level(self) -> int:
        """The finest level any pair of the block is fitted to."""
        return int(self.row_last[self.block.valid].max()) if bool(self.block.valid.any()) else len(self.levels) - 1

    def level_finished(self) -> bool:
        """Budget spent or every pair of the block converged (same answer on every rank)."""
        blk = self.block
        return blk.level_steps >= self.levels[blk.level].steps or not bool(self.solver.active.any())

    def finish_block(self) -> None:
        """Record every pair of the block not recorded yet (all ranks know all rows) and end the epoch."""
        blk = self.block
        log_level_end(self._trainer, blk, self.solver.f)
        self.x = self.solver.x.clone()
        self._record(blk.valid & (self.row_last >= blk.level))
        blk.done = True

    def _record(self, rows: torch.Tensor) -> None:
        """The results of ``rows`` (``(R,)`` bool), fitted as far as they go: the current level. NCC over the valid
        overlap before (identity) and after, at this level's images, whatever the loss; every rank calls this (it
        all-reduces). With the ncc loss the solver already knows NCC at its last evaluated point; the pair has moved
        since by less than step_tol_px (a change of NCC of the order of 1e-7), so no extra resampling is spent on it."""
        blk, lv = self.block, self.levels[self.block.level]
        theta = self.objective.matrices(self.solver.x)
        with torch.no_grad():
            ncc_before = self._evaluate_rows(self.solver.x, self.level_fixed, self.level_moving, self.objective.pair_ncc_identity).tolist()
            if self.hparams.loss == "ncc" and not self.objective.loss_kwargs:
                ncc_after = (1 - (self.solver.f - self.objective.penalty(self.solver.x))).tolist()
            else:
                ncc_after = self._evaluate_rows(self.solver.x, self.level_fixed, self.level_coeffs, self.objective.pair_ncc).tolist()
            kept = self._evaluate_rows(self.solver.x, self.level_fixed, self.level_coeffs, kept_fraction).tolist()
        for row in torch.nonzero(rows).flatten().tolist():
            pair, f = blk.pairs[row], float(self.solver.f[row])
            self.results[pair] = {
                "pair_index": pair, "slice_indices": list(self.pair_slices[pair]), "matrix": theta[row].cpu().tolist(),
                "final_loss": f, "num_steps_taken": int(blk.steps[row]),
                "steps_per_level": [int(c[row]) for c in blk.level_counts], "status": "ok" if math.isfinite(f) else "failed",
                "finest_factor": lv.factor, "ncc_before": ncc_before[row], "ncc_after": ncc_after[row],
                **({"mask_kept": kept[row]} if self.block_masks is not None else {})}

    def step_displacement_px(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Largest pixel displacement (at the current level's resolution) between two parameter sets."""
        return self.objective.displacement_px(x_old, x_new) / self.levels[self.block.level].factor

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self) -> None:
        self._train_t0 = time.perf_counter()

    def on_train_end(self) -> None:
        self.timings["fit_s"] = time.perf_counter() - getattr(self, "_train_t0", time.perf_counter())

    def on_fit_start(self) -> None:
        # Here (data scanned, pyramid set) rather than Lightning's own logging right after this hook, which would
        # show only the model's settings; the loggers then save hparams.yaml with these.
        log_run_settings(self.trainer, self)

    def on_train_epoch_start(self) -> None:
        share_cores()  # other sphero processes may have started or ended since the last block

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if batch_idx == 0:
            if batch.get("skip"):  # finished in an earlier run (journal)
                self.block = None
                return -1
            self.load_block(batch)
            self.start_level(0)
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
            t, k = self.timings, self.block.level
            t[f"level{k}_s"], t[f"level{k}_steps"] = t.get(f"level{k}_s", 0.0) + time.perf_counter() - t0, t.get(f"level{k}_steps", 0) + 1

    def _step(self) -> torch.Tensor:
        """One evaluation of every active pair of the block at its solver's trial point, then one solver update."""
        blk, solver = self.block, self.solver
        trial = solver.trial()
        with torch.no_grad():
            self.delta.copy_(trial)
        active_local = solver.active[self.rows] & self.local_valid
        idx = torch.nonzero(active_local).flatten()
        # First evaluation of a level's rows: Gauss-Newton curvature from the same images (same on all ranks).
        fresh = solver.active & ~solver.evaluated & self.newton_rows if self.uses_gauss_newton else None
        need_curv = fresh is not None and bool(fresh.any())
        n = self.objective.basis.shape[0]
        curv = torch.zeros(self.delta.shape[0], n, n, dtype=torch.float64, device=self.device) if need_curv else None
        if len(idx):
            fc = self.level_fixed_coeffs[idx] if need_curv and self.level_fixed_coeffs is not None else None
            losses, grads, hess = self.objective.evaluate(self.delta.detach()[self.rows][idx], self.level_fixed[idx],
                                                          self.level_coeffs[idx], fresh[self.rows][idx] if need_curv else False,
                                                          fixed_coeffs=fc, masks=self._masks(idx))
            if hess is not None:
                curv[self.rows.start + idx] = hess
            # a linear surrogate with exactly these gradients: DDP all-reduces them into every row of delta
            total = (self.delta[self.rows][idx] * grads).sum() * self.world
        else:
            losses = self.delta.new_zeros(0)
            total = (self.delta * 0).sum()  # keeps DDP's all-reduce in step with the other ranks
        self.delta.grad = None
        self.manual_backward(total)
        grad = self.delta.grad.detach().clone() if self.delta.grad is not None else torch.zeros_like(self.delta)
        full = torch.zeros(self.delta.shape[0], dtype=torch.float64, device=self.device)
        full[self.rows.start + idx] = losses
        full = self._all_reduce(full)
        if curv is not None:
            curv = self._all_reduce(curv)
            # The Gauss-Newton model is the loss's Hessian only where the slices match (NCC near 1: the true Hessian
            # is about NCC times it); consecutive real sections that differ more keep BFGS's own model (and the
            # strict step tolerance: see PairEarlyStopping).
            ncc = 1 - (full - self.objective.penalty(self.delta.detach()))
            ok = fresh & (curv.diagonal(dim1=-2, dim2=-1).sum(-1) > 0) & (ncc >= NEWTON_MIN_NCC)
            eye = torch.eye(n, dtype=curv.dtype, device=curv.device)
            # where the slices match well the model is the loss's Hessian to within ~20 %: its first step may be trusted
            solver.set_curvature(ok, torch.linalg.inv(torch.where(ok.view(-1, 1, 1), curv, eye)),
                                 trusted=ncc >= NEWTON_TRUST_NCC)
        was_active = solver.active.clone()
        accepted = solver.update(full, grad)
        blk.accepted = accepted
        blk.steps += was_active.long()
        blk.level_counts[-1] += was_active.long()
        blk.level_steps += 1
        mean_loss = full[was_active].mean() if was_active.any() else full.new_zeros(())
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
        if self.trainer.is_global_zero:
            self.journal.save(self.results)
        release_memory()
        losses = [self.results[p]["final_loss"] for p in blk.pairs if p >= 0]
        if losses:
            self.log("loss/block_final", float(sum(losses) / len(losses)), on_epoch=True, rank_zero_only=True, batch_size=1)
