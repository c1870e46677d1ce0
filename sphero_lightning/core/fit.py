"""The coarse-to-fine fit of a block of pairs, as plain torch: levels, one solver step, the stopping rule.

A block is a batch of pairs fitted together: the slices they need (``(N, 1, H, W)``, grey values about [0, 1], at
the resolution of the block's finest level) and, per row, where its fixed and moving slice sit among them. The fit
goes level by level (coarse to fine, parameters carried over): at each level the solver evaluates every active row
at its trial point (one :meth:`~.objective.PairObjective.evaluate` of the whole block), updates, and
:class:`StoppingRule` freezes the rows that converged; a level ends when its step budget is spent or no row is
active. :func:`fit_block` runs all of it; the Lightning layer drives the same pieces from its hooks (the module
steps, the pyramid callback moves levels, the early-stopping callback applies the rule), with :class:`Ranks` doing
what several processes need (each fills its own rows; losses, gradients and curvatures are summed over processes).

>>> import torch; from sphero_lightning.core.objective import PairObjective
>>> from sphero_lightning.core.synthetic import em_like_image
>>> img = torch.from_numpy(em_like_image(96, seed=0) / 255.0).float()[None, None]
>>> slices = torch.cat([img[..., 8:72, 8:72], img[..., 8:72, 6:70]])  # the second slice's content 2 px to the right
>>> out = fit_block(PairObjective("translation", shape=(64, 64)), [Level(2.0, 50, 1e-2), Level(1.0, 50, 1e-2)],
...                 slices, torch.tensor([0]), torch.tensor([1]))
>>> round(out[0]["matrix"][0][2] * 32, 1)  # the translation in pixels (normalized units are half a slice width)
2.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .fastncc import Rows, plain
from .initialization import FIT_SIZE, consecutive_phase_correlation
from .masks import kept_fraction, pair_masks
from .objective import PairObjective, take
from .optimizers import BatchSolver, make_solver
from .records import PairRecord, fitted_pair
from .settings import EARLY_STOPPING, MODEL

#: A level starts from the Gauss-Newton model only for pairs matching at least this well (NCC); below it a pair barely
#: matches (``low_correlation`` in the output) and its slices' gradients say nothing about the loss's curvature.
NEWTON_MIN_NCC = 0.1
#: ... and its model is trusted before any step only for pairs matching at least this well (NCC at the level's first
#: evaluation: the loss's Hessian to within ~20 %); below, a short proposed step counts once a step has confirmed the
#: model (optimizers.BatchBFGS.confirmed; docs/benchmarks.md, "Convergence on real pairs").
NEWTON_TRUST_NCC = 0.8
#: Longest step (pixels of the level) below the coarsest pyramid level: the coarser level left the pair about that
#: close to the finer level's optimum, and a longer step on a weakly matching pair can jump into another basin of the
#: finer loss, so that when it ends would decide where it ends.
MAX_STEP_PX = 1.0
#: Consecutive evaluations with a proposed step below the tolerance after which a level ends even unconfirmed.
SMALL_RUN = 3
#: Step tolerance (px of the level) of a pair whose last level is coarser than the finest (``--solve.coarse_factor``):
#: its answer only tests cycles (inconsistent: >= solve.MIN_CYCLE_PX) and a stand-in is refitted at full resolution.
EARLY_STOP_TOL_PX = 0.05


def reads_state(steps: int) -> bool:
    """Whether a sync-free fit reads its block's state (has every pair converged?) after ``steps`` steps of a level:
    after 1, 2, 3, 4, 6, 8, 12, 16, 24, ... steps (powers of 2 and three times them, at most 1.5x apart): at most
    ``2 log2(budget) + 1`` reads a level whatever the block, and at most half again the steps a level needs.

    >>> [n for n in range(1, 100) if reads_state(n)]
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96]
    """
    if steps < 1:
        return False
    odd = steps >> ((steps & -steps).bit_length() - 1)  # steps without its factors of 2
    return odd in (1, 3)


def level_displacement_px(objective: PairObjective, factor: float, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
    """``(R,)`` largest displacement between two ``(R, n)`` parameter sets in pixels of a level of ``factor``."""
    return objective.displacement_px(x_old, x_new) / factor


@dataclass
class Level:
    """One pyramid level: downscale factor, step budget, learning rate (first step length for BFGS)."""

    factor: float
    steps: int
    lr: float

    def record(self) -> dict[str, float]:  # as the output and the API record it
        return {"factor": self.factor, "steps": self.steps, "learning_rate": self.lr}


@dataclass
class BlockState:
    """What the fit knows about the block it is fitting (identical on every process)."""

    index: int
    pairs: list[int]  # global pair index of each row, -1 for an empty slot
    valid: torch.Tensor  # (R,) bool
    level: int = -1
    level_steps: int = 0
    steps: torch.Tensor | None = None  # (R,) evaluations while active, all levels
    done: bool = False
    level_counts: list[torch.Tensor] = field(default_factory=list)  # (R,) evaluations per level
    accepted: torch.Tensor | None = None  # (R,) bool: rows whose last evaluation the solver accepted


@dataclass
class FitSettings:
    """How a block is fitted (the module's options of the same names)."""

    optimizer: str = MODEL.optimizer
    curvature: str = MODEL.curvature
    init_std: float = MODEL.init_std
    init_translation: str = MODEL.init_translation


class Ranks:
    """The processes a block is split over. Alone (the default): every row is this process's and nothing is summed.
    The Lightning module gives its own: ``rows`` (this process's rows), ``reduce`` (sum over processes) and
    ``gradients`` (the rows' gradients summed through DDP's own all-reduce of the module's parameter)."""

    def __init__(self, rows: slice | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gradients: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.rows, self._reduce, self._gradients = rows, reduce, gradients

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._reduce is None else self._reduce(t)

    def gradients(self, trial: torch.Tensor, idx: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """``(R, n)`` every row's gradient from this process's rows ``idx`` (local) evaluated at ``trial``."""
        if self._gradients is not None:
            return self._gradients(trial, idx, grads)
        full = torch.zeros_like(trial)
        full[self.rows.start + idx] = grads
        return full


class StoppingRule:
    """Per-pair convergence at a level (see :class:`~sphero_lightning.training.callbacks.PairEarlyStopping`, which
    carries the options and documents the rule): the loss flat over ``window`` accepted iterates, or a confirmed
    proposed step shorter than the level's tolerance (``tols``: pixels of each level)."""

    def __init__(self, tols: list[float], window: int = EARLY_STOPPING.window, tol: float = EARLY_STOPPING.tol,
                 newton_step_tol_px: float = EARLY_STOPPING.newton_step_tol_px, enabled: bool = EARLY_STOPPING.enabled) -> None:
        self.tols, self.window, self.tol, self.newton_step_tol_px, self.enabled = tols, window, tol, newton_step_tol_px, enabled
        self._key: tuple[int, int, int] | None = None

    def after_step(self, fit: BlockFit) -> None:
        """Freeze (flat loss) or finish (short confirmed step) the rows of ``fit`` that converged at its level."""
        blk, solver = fit.block, fit.solver
        if not self.enabled or blk is None or blk.done or blk.accepted is None:
            return
        key = (blk.index, blk.level, id(solver))
        if key != self._key:
            self._key = key
            rows, dev = solver.x.shape[0], solver.x.device
            self.losses = torch.full((rows, self.window), float("inf"), dtype=torch.float64, device=dev)
            self.count, self.small_run = (torch.zeros(rows, dtype=torch.long, device=dev) for _ in range(2))
        acc = blk.accepted
        self.losses = torch.where(acc.unsqueeze(-1), torch.cat([self.losses[:, 1:], solver.f.unsqueeze(-1)], 1), self.losses)
        self.count += acc.long()
        flat = (self.count >= self.window) & ((self.losses.amax(1) - self.losses.amin(1)) < self.tol)
        step = fit.step_displacement_px(solver.x, solver.x + solver.pending_step())
        tol = self.tols[blk.level]
        # rows whose level started from a trusted Newton model: a looser step rule
        tol = torch.where(solver.trusted, max(tol, self.newton_step_tol_px), tol)
        if blk.level < len(self.tols) - 1:  # rows that end at a level coarser than the finest
            tol = torch.where(fit.row_last < len(self.tols) - 1, torch.clamp(tol, min=EARLY_STOP_TOL_PX), tol)
        small = solver.evaluated & (step < tol)
        self.small_run = torch.where(small, self.small_run + 1, torch.zeros_like(self.small_run))
        # a short proposed step ends the level only where the model that proposed it is confirmed (or the steps have
        # stayed short for SMALL_RUN evaluations: the noise floor of the loss, where no step confirms anything)
        still = small & (solver.confirmed | (self.small_run >= SMALL_RUN))
        solver.freeze(solver.active & flat)
        solver.finish(solver.active & still)


class BlockFit:
    """One block of pairs fitted coarse to fine (see the module's description).

    Parameters
    ----------
    objective : PairObjective
        The pair objective (its ``shape`` set to the full-resolution slice shape).
    levels : list of Level
        Coarse to fine; factors relative to full resolution.
    slices : torch.Tensor
        ``(N, 1, h, w)`` this process's slices of the block at the finest level's factor ``levels[-1].factor``.
    fixed, moving : torch.Tensor
        ``(P,)`` positions in ``slices`` of each local pair's fixed and moving slice.
    pairs : list of int
        Global pair index of every row of the block (-1: empty slot), all processes' rows.
    stop_factor : list of float
        Per row: the multiple of the finest factor the row stops at (1: the finest level).
    masks : torch.Tensor, optional
        ``(N, 2, h, w)`` from :func:`~.masks.loss_images`.
    settings, ranks, index :
        :class:`FitSettings`; :class:`Ranks`; the block's number (for the stopping rule's bookkeeping).
    sync_free : bool, optional
        Read the device's state on the host only at :func:`reads_state` 's steps of a level: rows active at the last
        read are evaluated at every step (masked per row), and whether every pair has converged is asked then only.
        The same transforms (to rounding), evaluating converged rows until the next read; what a GPU needs (a host
        read waits for the device). Default: on where ``slices`` are not on the CPU.
    """

    def __init__(self, objective: PairObjective, levels: list[Level], slices: torch.Tensor, fixed: torch.Tensor,
                 moving: torch.Tensor, pairs: list[int], stop_factor: list[float], masks: torch.Tensor | None = None,
                 settings: FitSettings | None = None, ranks: Ranks | None = None, index: int = 0,
                 sync_free: bool | None = None) -> None:
        self.objective, self.levels, self.settings = objective, levels, settings or FitSettings()
        self.sync_free = slices.device.type != "cpu" if sync_free is None else bool(sync_free)
        self.slices, self.masks, self.fixed, self.moving = slices, masks, fixed, moving
        self.base, dev, n_rows = levels[-1].factor, slices.device, len(pairs)
        self.ranks = ranks or Ranks(rows=slice(0, n_rows))
        valid_host = torch.tensor([p >= 0 for p in pairs])  # known on the host: no device read needed for it
        valid = valid_host.to(dev)
        self.block = BlockState(index=index, pairs=pairs, valid=valid, steps=torch.zeros(n_rows, dtype=torch.long, device=dev))
        finest = levels[-1].factor
        # the level each row stops at: the finest, or a coarser one for pairs further apart (--solve.coarse_factor)
        self.row_last = torch.tensor([max((k for k, lv in enumerate(levels) if lv.factor >= stop * finest * (1 - 1e-9)),
                                          default=0) for stop in stop_factor], device=dev)
        self.local_valid_host = valid_host[self.ranks.rows]
        self.local_valid = self.local_valid_host.to(dev)
        self.n_local = n_local = int(self.local_valid_host.sum())
        if n_local and len(fixed) != n_local:
            raise RuntimeError(f"block {index}: got {len(fixed)} pairs of slices for {n_local} pairs")
        self.solver: BatchSolver | None = None
        self.results: dict[int, PairRecord] = {}
        self._level0 = None  # level-0 images, kept when the initialisation computes them
        self.level_masks = pair_masks(masks, levels[0].factor / self.base, objective.smoothing, fixed, moving)
        self.x = self._initial_params(n_rows)

    def _initial_params(self, rows: int) -> torch.Tensor:
        """Identity (plus ``init_std`` noise), then the phase-correlation translation where it helps."""
        n, dev = self.objective.n_params, self.slices.device
        x = torch.zeros(rows, n, dtype=torch.float64, device=dev)
        if self.settings.init_std > 0:
            # the same generator state on every process (seeded by the caller), so rows stay identical
            x = x + self.settings.init_std * torch.randn(rows, n, dtype=torch.float64).to(dev)
        if self.settings.init_translation == "phase":
            n_local = self.n_local
            est = torch.zeros(rows, 2, dtype=torch.float64, device=dev)
            if n_local:
                shift = consecutive_phase_correlation(self.slices, FIT_SIZE, fixed=self.fixed, moving=self.moving).double()
                local = torch.zeros(self.ranks.rows.stop - self.ranks.rows.start, 2, dtype=torch.float64, device=dev)
                local[:n_local] = shift / (max(self.slices.shape[-2:]) / 2.0)
                est[self.ranks.rows] = local
            est = self.ranks.reduce(est)
            cand = x.clone()
            cand[:, :2] = est
            # keep the estimate only where it beats the starting point at the coarsest level
            imgs = self.objective.level_stack(self.slices, self.levels[0].factor / self.base)
            self._level0 = imgs, *self.objective.level_coeffs(imgs, self.fixed, self.moving, rows=self.by_rows(imgs))
            fixed, coeffs = take(imgs, self.fixed), plain(self._level0[2])
            with torch.no_grad():
                keep = self.evaluate_rows(cand, fixed, coeffs) < self.evaluate_rows(x, fixed, coeffs)
            x = torch.where(keep.unsqueeze(-1), cand, x)
        return x

    def evaluate_rows(self, x: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """``fn`` (default the objective's ``pair_losses``) of every row at ``x`` (``(R,)``, the same on every
        process; 0 for empty slots). Every process must call it the same number of times (it sums over them)."""
        fn = fn or self.objective.pair_losses
        full = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        idx = torch.nonzero(self.local_valid).flatten()
        if len(idx):
            full[self.ranks.rows.start + idx] = fn(x[self.ranks.rows][idx], fixed[idx], coeffs[idx], masks=self._masks(idx)).detach()
        return self.ranks.reduce(full)

    def _masks(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:  # of the local pairs idx
        return None if self.level_masks is None else (self.level_masks[0][idx], self.level_masks[1][idx])

    def start_level(self, level: int) -> None:
        """Move the block to pyramid ``level``: new images, fresh solver state, parameters kept."""
        blk, lv = self.block, self.levels[level]
        blk.level, blk.level_steps = level, 0
        cached, self._level0 = self._level0, None
        if level == 0 and cached:
            imgs, fixed_coeffs, coeffs = cached
        else:
            imgs = self.objective.level_stack(self.slices, lv.factor / self.base)
            fixed_coeffs, coeffs = self.objective.level_coeffs(imgs, self.fixed, self.moving, rows=self.by_rows(imgs))
        pick = Rows if self.by_rows(imgs) else take  # the compiled pass reads the block's slices through the rows
        self.level_fixed, self.level_moving = pick(imgs, self.fixed), pick(imgs, self.moving)
        self.level_coeffs, self.level_fixed_coeffs = coeffs, fixed_coeffs
        self.level_masks = pair_masks(self.masks, lv.factor / self.base, self.objective.smoothing, self.fixed, self.moving)
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
        # (a function of the objective and the level, not a bound method: the solver must not refer back to this fit,
        # or every finished block stays in memory until Python's cycle collector happens to run)
        trust = {"step_length": partial(level_displacement_px, self.objective, lv.factor), "max_length": MAX_STEP_PX} \
            if level > 0 else {}
        active = blk.valid & (self.row_last >= level)
        self.solver = make_solver(self.settings.optimizer, self.x, lv.lr, active=active, previous=previous,
                                  curvature_scale=scale, sync_free=self.sync_free, **trust)
        # sync-free: the rows evaluated at every step of this level (one host read a level)
        self.level_rows = torch.nonzero(active[self.ranks.rows] & self.local_valid).flatten() if self.sync_free else None

    def by_rows(self, imgs: torch.Tensor) -> bool:  # a level's pair images as Rows of imgs (compiled: no copies)
        return self.objective.uses_fast_ncc and self.objective.runs_compiled(imgs) and not self.sync_free

    @property
    def uses_gauss_newton(self) -> bool:
        return (self.settings.optimizer == "bfgs" and self.settings.curvature == "gauss_newton"
                and self.objective.loss == "ncc")

    def step_displacement_px(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Largest pixel displacement (at the current level's resolution) between two parameter sets."""
        return level_displacement_px(self.objective, self.levels[self.block.level].factor, x_old, x_new)

    @property
    def last_level(self) -> int:
        """The finest level any pair of the block is fitted to."""
        return int(self.row_last[self.block.valid].max()) if bool(self.block.valid.any()) else len(self.levels) - 1

    def level_finished(self) -> bool:
        """Budget spent or every pair of the block converged (the same answer on every process). Sync-free, the
        latter is asked only after :func:`reads_state` 's numbers of steps."""
        steps = self.block.level_steps
        if steps >= self.levels[self.block.level].steps:
            return True
        if not self.sync_free:
            return not bool(self.solver.active.any())
        if not reads_state(steps):
            return False
        active = self.solver.active.cpu()  # the one read: also leaves the rows still active to evaluate
        self.level_rows = torch.nonzero(active[self.ranks.rows] & self.local_valid_host).flatten().to(self.slices.device)
        return not bool(active.any())

    def next_level(self) -> None:
        """Record the pairs that stop at this level, carry the parameters over to the next, finer level."""
        blk = self.block
        ending = blk.valid & (self.row_last == blk.level)
        if bool(ending.any()):
            self._record(ending)
        self.x = self.solver.x.clone()
        self.start_level(blk.level + 1)

    def finish(self) -> None:
        """Record every pair of the block not recorded yet."""
        blk = self.block
        self.x = self.solver.x.clone()
        self._record(blk.valid & (self.row_last >= blk.level))
        blk.done = True

    def _record(self, rows: torch.Tensor) -> None:
        """The results of ``rows`` (``(R,)`` bool), fitted as far as they go: the current level. NCC over the valid
        overlap before (identity) and after, at this level's images, whatever the loss; every process calls this (it
        sums over them). With the ncc loss the solver already knows NCC at its last evaluated point; the pair has moved
        since by less than step_tol_px (a change of NCC of the order of 1e-7), so no extra resampling is spent on it."""

        blk, lv, obj = self.block, self.levels[self.block.level], self.objective
        theta = obj.matrices(self.solver.x)
        with torch.no_grad():
            # NCC at the identity, from the slices themselves: compiled where the fit is
            by_kernel = obj.uses_fast_ncc and obj.runs_compiled(self.level_fixed)
            ncc_before = self.evaluate_rows(self.solver.x, self.level_fixed, self.level_moving,
                                            obj.pair_ncc_identity_compiled if by_kernel else obj.pair_ncc_identity).tolist()
            if obj.loss == "ncc" and not obj.loss_kwargs:
                ncc_after = (1 - (self.solver.f - obj.penalty(self.solver.x))).tolist()
            else:
                ncc_after = self.evaluate_rows(self.solver.x, self.level_fixed, self.level_coeffs, obj.pair_ncc).tolist()
            kept = self.evaluate_rows(self.solver.x, self.level_fixed, self.level_coeffs, kept_fraction).tolist()
        # one read of each tensor, whatever the number of rows
        losses, steps, matrices = self.solver.f.tolist(), blk.steps.tolist(), theta.cpu().tolist()
        per_level = torch.stack(blk.level_counts, 1).tolist()
        for row in torch.nonzero(rows).flatten().tolist():
            pair, f = blk.pairs[row], losses[row]
            self.results[pair] = fitted_pair(  # slice_indices: the caller's (the block knows positions only)
                pair, (), matrices[row], final_loss=f, num_steps_taken=steps[row], steps_per_level=per_level[row],
                finest_factor=lv.factor, ncc_before=ncc_before[row], ncc_after=ncc_after[row],
                mask_kept=kept[row] if self.masks is not None else None)

    def step(self) -> torch.Tensor:
        """One evaluation of every active pair of the block at its solver's trial point, then one solver update.
        Returns the mean loss of the rows that were active."""
        blk, solver, obj, rows = self.block, self.solver, self.objective, self.ranks.rows
        trial, dense = solver.trial(), self.sync_free
        idx = self.level_rows if dense else torch.nonzero(solver.active[rows] & self.local_valid).flatten()
        # First evaluation of a level's rows: Gauss-Newton curvature from the same images (same on all processes);
        # sync-free, at the level's first step only (a row whose first evaluation failed goes on with BFGS's model)
        fresh = solver.active & ~solver.evaluated & self.newton_rows if self.uses_gauss_newton else None
        need_curv = fresh is not None and (blk.level_steps == 0 if dense else bool(fresh.any()))
        n = obj.n_params
        curv = torch.zeros(trial.shape[0], n, n, dtype=torch.float64, device=trial.device) if need_curv else None
        grads = trial.new_zeros(0, n)
        full = torch.zeros(trial.shape[0], dtype=torch.float64, device=trial.device)
        if len(idx):
            fc = self.level_fixed_coeffs[idx] if need_curv and self.level_fixed_coeffs is not None else None
            losses, grads, hess = obj.evaluate(trial[rows][idx], self.level_fixed[idx], self.level_coeffs[idx],
                                               fresh[rows][idx] if need_curv else False, fixed_coeffs=fc,
                                               masks=self._masks(idx), dense=dense)
            if hess is not None:
                curv[rows.start + idx] = hess
            full[rows.start + idx] = losses
        grad = self.ranks.gradients(trial, idx, grads)
        full = self.ranks.reduce(full)
        if curv is not None:
            curv = self.ranks.reduce(curv)
            # The Gauss-Newton model is the loss's Hessian only where the slices match (NCC near 1: the true Hessian
            # is about NCC times it); consecutive real sections that differ more keep BFGS's own model (and the
            # strict step tolerance: see StoppingRule).
            ncc = 1 - (full - obj.penalty(trial))
            ok = fresh & (curv.diagonal(dim1=-2, dim2=-1).sum(-1) > 0) & (ncc >= NEWTON_MIN_NCC)
            eye = torch.eye(n, dtype=curv.dtype, device=curv.device)
            # where the slices match well the model is the loss's Hessian to within ~20 %: its first step may be trusted
            model = torch.where(ok.view(-1, 1, 1), curv, eye)
            # sync-free: no error check (a singular model is a failed step, which the line search handles)
            hinv = torch.linalg.inv_ex(model)[0] if dense else torch.linalg.inv(model)
            solver.set_curvature(ok, hinv, trusted=ncc >= NEWTON_TRUST_NCC)
        was_active = solver.active.clone()
        blk.accepted = solver.update(full, grad)
        blk.steps += was_active.long()
        blk.level_counts[-1] += was_active.long()
        blk.level_steps += 1
        if dense:
            return torch.where(was_active, full, 0.0).sum() / was_active.sum().clamp_min(1)
        return full[was_active].mean() if was_active.any() else full.new_zeros(())


def fit_block(objective: PairObjective, levels: list[Level], slices: torch.Tensor, fixed: torch.Tensor,
              moving: torch.Tensor, pairs: list[int] | None = None, stop_factor: list[float] | None = None,
              masks: torch.Tensor | None = None, settings: FitSettings | None = None,
              stopping: StoppingRule | None = None, sync_free: bool | None = None) -> dict[int, PairRecord]:
    """Fit one block of pairs coarse to fine without Lightning; the results per pair (as the output's log records
    them; ``slice_indices`` empty: the block knows positions only). ``pairs`` default ``0..P-1``; ``stop_factor`` default 1 for every pair;
    ``stopping`` default the options' defaults (``--early_stopping.*``); ``sync_free``: see :class:`BlockFit`."""
    pairs = list(range(len(fixed))) if pairs is None else pairs
    stop_factor = [1.0] * len(pairs) if stop_factor is None else stop_factor
    stopping = stopping or StoppingRule([0.01] * (len(levels) - 1) + [0.003])
    fit = BlockFit(objective, levels, slices, fixed, moving, pairs, stop_factor, masks, settings, sync_free=sync_free)
    fit.start_level(0)
    while not fit.block.done:
        fit.step()
        stopping.after_step(fit)
        if fit.level_finished():
            if fit.block.level < fit.last_level:
                fit.next_level()
            else:
                fit.finish()
    return fit.results
