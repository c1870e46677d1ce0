"""The LightningModule: a block of pairs, their learnable affine transforms, one solver step per step.

Lightning mapping (see README "Design"):

* one epoch = one block of ``pairs_per_block`` pairs per device; one training step = one evaluation of
  every still-active pair of the block at the solver's trial point, then one solver update;
* the parameter ``delta`` holds one row per (rank, slot): a rank fills only its own rows and scales its
  loss by the world size, so after DDP's gradient all-reduce every row holds exactly its own pair's
  gradient and all ranks hold identical parameters; per-pair losses are all-reduced the same way, so
  every rank takes the same decisions (no hang) and knows every pair's result;
* the pyramid callback moves the block from level to level; the early-stopping callback freezes
  converged pairs; when the last level is done ``on_train_batch_start`` returns -1 to end the epoch.
"""

from __future__ import annotations

import ctypes
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core.fastncc import ncc_and_gradient
from ..core.initialization import phase_correlation
from ..core.interpolation import (
    PAD,
    bspline_prefilter,
    bspline_sample,
    downscale,
    gaussian_blur,
    inside_weight,
    sample_positions,
    upsample2,
)
from ..core.losses import get_loss, ncc_loss
from ..core.solvers import make_solver
from ..core.transforms import FAMILIES, corner_displacement, family_basis, params_to_normalized
from ..errors import SpheroError
from ..storage.journal import Journal
from ..threads import share_cores

#: Interpolation of the moving slice inside the loss (see RegistrationModule).
INTERPOLATIONS = ("bspline", "bspline2x", "bicubic")
def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): keeps the resident size flat over thousands of blocks
    instead of creeping up with allocator fragmentation. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: A level starts from the Gauss-Newton model only for pairs matching at least this well (NCC); below it a pair barely
#: matches (``low_correlation`` in the output) and its slices' gradients say nothing about the loss's curvature.
NEWTON_MIN_NCC = 0.1
#: BFGS curvature model at the start of a level (see RegistrationModule).
CURVATURES = ("gauss_newton", "carried")


@dataclass
class Level:
    """One pyramid level: downscale factor, step budget, learning rate (first step length for BFGS)."""

    factor: float
    steps: int
    lr: float


@dataclass
class BlockState:
    """What the module knows about the block it is fitting (identical on every rank)."""

    index: int
    pairs: list[int]  # global pair index of each row, -1 for an empty slot; length world * B
    valid: torch.Tensor  # (R,) bool
    level: int = -1
    level_steps: int = 0
    steps: torch.Tensor | None = None  # (R,) evaluations while active, all levels
    done: bool = False
    level_counts: list[torch.Tensor] = field(default_factory=list)  # (R,) evaluations per level
    extra: dict[str, Any] = field(default_factory=dict)


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
        transformation: str = "rigid",
        scaling: bool = True,
        shear: bool = True,
        loss: str = "ncc",
        loss_kwargs: dict[str, Any] | None = None,
        optimizer: str = "bfgs",
        regularization: float = 0.5,
        init_std: float = 0.0,
        init_translation: str = "phase",
        smoothing: float = 0.7,
        interpolation: str = "bspline",
        curvature: str = "gauss_newton",
        pairs_per_block: int = 32,
    ) -> None:
        super().__init__()
        if transformation not in FAMILIES:
            raise SpheroError(f"unknown transformation {transformation!r}; choose one of {', '.join(FAMILIES)}")
        if init_translation not in ("phase", "none"):
            raise SpheroError(f"unknown init_translation {init_translation!r}; choose 'phase' or 'none'")
        if interpolation not in INTERPOLATIONS:
            raise SpheroError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if curvature not in CURVATURES:
            raise SpheroError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
        if smoothing < 0:
            raise SpheroError(f"smoothing must be >= 0 (pixels), got {smoothing}")
        if pairs_per_block < 1:
            raise SpheroError(f"pairs_per_block must be >= 1, got {pairs_per_block}")
        get_loss(loss)  # validates the name
        make_solver(optimizer, torch.zeros(1, 1), 1.0)  # validates the name
        # Lightning would log only these to TensorBoard; on_fit_start logs the whole run's settings instead.
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        self.loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.register_buffer("basis", family_basis(transformation, scaling, shear), persistent=False)
        self.levels: list[Level] = [Level(1.0, 200, 1e-2)]
        self.delta: torch.nn.Parameter | None = None
        self.block: BlockState | None = None
        self.solver = None
        self._level0: tuple[torch.Tensor, torch.Tensor] | None = None  # (level-0 images, moving coefficients)
        self.results: dict[int, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
        #: Pixels evaluated in one autograd pass (pairs x pixels per pair); bounds the memory of a step.
        self.max_pixels_per_pass = 1 << 20
        self.shape: tuple[int, int] | None = None
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

    def configure_pyramid(self, levels: list[Level]) -> None:
        """Set the curriculum (called by the pyramid callback before fitting)."""
        self.levels = list(levels)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            raise RuntimeError("RegistrationModule needs a datamodule that provides the pairs (ZarrPairDataModule)")
        self.shape = dm.slice_shape
        self.hparams.pairs_per_block = dm.pairs_per_block  # the block the data module settled on (large slices: fewer)
        self.n_pairs = dm.n_pairs
        self.pair_slices = [dm.pair_slices(p) for p in range(self.n_pairs)]
        self.timings = dm.timings  # shared with the datamodule: scan_s, read_s, wait_s; here fit_s; writer write_s
        self.journal = Journal(dm.journal_path, self.fingerprint(), dm.output_format)
        if dm.resume:
            self.results.update({p: r for p, r in self.journal.load().items() if p < self.n_pairs})
        rows = self.world * self.hparams.pairs_per_block
        dm.skip_blocks = {blk for blk in range(dm.n_blocks(self.world))
                          if all(p < 0 or p in self.results for p in self.block_pairs(blk))}
        if self.results and self.trainer.is_global_zero:
            print(f"sphero: resuming: {len(self.results)} of {self.n_pairs} pairs finished earlier "
                  f"(journal {self.journal.path}); {len(dm.skip_blocks)} of {dm.n_blocks(self.world)} blocks "
                  f"of {rows} skipped", file=sys.stderr)
        # float64: the solver works in float64 and the trial point must be evaluated exactly.
        self.delta = torch.nn.Parameter(torch.zeros(rows, self.basis.shape[0], dtype=torch.float64))

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the pairs' results; a journal with another fingerprint is not reused."""
        dm, src = self.trainer.datamodule, self.trainer.datamodule.source
        hp = {k: v for k, v in self.hparams.items() if k != "pairs_per_block"}
        extra = {type(cb).__name__: cb.fingerprint() for cb in self.trainer.callbacks if hasattr(cb, "fingerprint")}
        return {"array": dm.array, "shape": list(src.shape), "dtype": str(src.dtype), "n_slices": dm.n_slices,
                "damaged": {str(k): v for k, v in dm.damaged.items()}, "model": hp,
                "intensity": list(dm.intensity) if dm.intensity is not None else None,
                "pyramid": [[lv.factor, lv.steps, lv.lr] for lv in self.levels], **extra}

    def configure_optimizers(self) -> None:
        # Optimisation is per pair and batched (solvers.py), driven from training_step.
        return None

    def block_pairs(self, block: int) -> list[int]:
        """Global pair index of every row of ``block`` (-1 for empty slots); same on every rank."""
        b, w = self.hparams.pairs_per_block, self.world
        start = block * w * b
        return [p if p < self.n_pairs else -1 for p in range(start, start + w * b)]

    # ------------------------------------------------------------------ the math
    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        """``(R, n_free)`` free parameters to ``(R, 2, 3)`` normalized matrices (float64)."""
        return params_to_normalized(p @ self.basis.to(p), self.shape)

    def warped_moving(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving slices warped by free parameters ``p`` and the weight of their valid overlap.

        Parameters
        ----------
        p : torch.Tensor
            ``(B, n_free)`` free parameters.
        fixed, coeffs : torch.Tensor
            ``(B, 1, h, w)`` fixed slices and the moving slices at one level (their B-spline
            coefficients, padded, for ``interpolation="bspline"``).

        Returns
        -------
        warped, weight : torch.Tensor
            ``(B, 1, h, w)`` each; ``weight`` is 1 inside the warped moving slice, 0 outside.
        """
        theta = self.matrices(p).to(fixed.dtype)
        size = tuple(fixed.shape[-2:])
        if self.hparams.interpolation == "bspline":
            px, py = sample_positions(theta, size, size)
            warped = bspline_sample(coeffs, px, py)
        else:
            grid = F.affine_grid(theta, [theta.shape[0], 1, *size], align_corners=False)
            warped = F.grid_sample(coeffs, grid, mode="bicubic", padding_mode="border", align_corners=False)
            px = ((grid[..., 0] + 1) * size[1] - 1) / 2
            py = ((grid[..., 1] + 1) * size[0] - 1) / 2
        return warped, inside_weight(px, py, size).unsqueeze(1)

    def pair_losses(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor,
                    images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Loss of each pair at free parameters ``p`` (arguments as :meth:`warped_moving`).

        Returns
        -------
        torch.Tensor
            ``(B,)`` similarity loss plus regularisation. ``images``, when given, receives the detached
            ``warped`` moving slices and their ``weight``.
        """
        warped, weight = self.warped_moving(p, fixed, coeffs)
        if images is not None:
            images.update(warped=warped.detach(), weight=weight.detach())
        loss = self.loss_fn(fixed, warped, weight, **self.loss_kwargs).to(p.dtype)
        if self.hparams.regularization:
            loss = loss + self.penalty(p)
        return loss

    def penalty(self, p: torch.Tensor) -> torch.Tensor:
        """``(B,)`` regularisation part of the loss: weighted squared scale/shear deviation at free parameters ``p``."""
        q = p @ self.basis.to(p)
        return self.hparams.regularization * (q[:, 3:] ** 2).sum(-1)

    def pair_ncc(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Normalized cross-correlation of each pair over the valid overlap at ``p`` (whatever the loss is)."""
        warped, weight = self.warped_moving(p, fixed, coeffs)
        return (1 - ncc_loss(fixed, warped, weight)).to(p.dtype)

    def pair_ncc_identity(self, p: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """:meth:`pair_ncc` at the identity (``p`` only gives the rows), without resampling ``moving`` (the moving
        slices, not their coefficients): at the identity the ``bspline`` and ``bicubic`` interpolations return
        them exactly; ``bspline2x`` would smooth them slightly (about 1e-3 in NCC)."""
        theta = self.matrices(torch.zeros_like(p)).to(fixed.dtype)
        size = tuple(fixed.shape[-2:])
        weight = inside_weight(*sample_positions(theta, size, size), size).unsqueeze(1)
        return (1 - ncc_loss(fixed, moving, weight)).to(p.dtype)

    # ------------------------------------------------------------------ block and level life cycle
    def load_block(self, batch: dict[str, torch.Tensor]) -> None:
        """Receive this rank's slices of the current block and set up the block's state."""
        slices = batch["slices"]
        # grey values to about [0, 1] by the stack's own range (data.to_tensor); (B + 1, 1, H, W)
        self.block_slices = ((slices.float() - batch["offset"].float()) / batch["scale"].float()).unsqueeze(1)
        pairs = self.block_pairs(self.current_epoch)
        valid = torch.tensor([p >= 0 for p in pairs], device=self.device)
        self.block = BlockState(index=self.current_epoch, pairs=pairs, valid=valid,
                                steps=torch.zeros(len(pairs), dtype=torch.long, device=self.device))
        self.local_valid = valid[self.rows]
        n_local = int(self.local_valid.sum())
        if slices.shape[0] != n_local + 1 and n_local > 0:
            raise RuntimeError(f"block {self.current_epoch}: got {slices.shape[0]} slices for {n_local} pairs")
        self._level0 = None  # level-0 images, kept when the initialisation computes them
        self.x = self._initial_params()

    def _level_stack(self, factor: float) -> torch.Tensor:
        """The block's slices at one level (downscaled, pre-smoothed): ``(B + 1, 1, h, w)``."""
        imgs = downscale(self.block_slices, factor)
        if self.hparams.smoothing > 0:
            imgs = gaussian_blur(imgs, self.hparams.smoothing)
        return imgs

    def _moving_coeffs(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the loss samples the moving slices ``imgs[1:]`` from, for the configured interpolation."""
        mode = self.hparams.interpolation
        if mode == "bspline":
            return bspline_prefilter(imgs[1:])
        if mode == "bspline2x":
            return upsample2(imgs[1:])
        return imgs[1:]

    def _level_images(self, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed slices and moving coefficients at one level (as :meth:`pair_losses` takes them)."""
        imgs = self._level_stack(factor)
        return imgs[:-1], self._moving_coeffs(imgs)

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
                shift = phase_correlation(self.block_slices[:-1], self.block_slices[1:]).double()
                local = torch.zeros(self.hparams.pairs_per_block, 2, dtype=torch.float64, device=self.device)
                local[:n_local] = shift / (max(self.shape) / 2.0)
                est[self.rows] = local
            est = self._all_reduce(est)
            cand = x.clone()
            cand[:, :2] = est
            # Keep the estimate only where it beats the starting point at the coarsest level.
            imgs = self._level_stack(self.levels[0].factor)
            self._level0 = imgs, self._moving_coeffs(imgs)
            fixed, coeffs = imgs[:-1], self._level0[1]
            with torch.no_grad():
                keep = self._evaluate_rows(cand, fixed, coeffs) < self._evaluate_rows(x, fixed, coeffs)
            x = torch.where(keep.unsqueeze(-1), cand, x)
        return x

    def _evaluate_rows(self, x: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, fn: Any = None) -> torch.Tensor:
        """``fn`` (default :meth:`pair_losses`) of every row at ``x`` (``(R,)``, identical on all ranks; 0 for
        empty slots). Every rank must call it the same number of times (it all-reduces)."""
        fn = fn or self.pair_losses
        full = torch.zeros(x.shape[0], dtype=torch.float64, device=self.device)
        idx = torch.nonzero(self.local_valid).flatten()
        if len(idx):
            full[self.rows.start + idx] = fn(x[self.rows][idx], fixed[idx], coeffs[idx]).detach()
        return self._all_reduce(full)

    def start_level(self, level: int) -> None:
        """Move the block to pyramid ``level``: new images, fresh solver state, parameters kept."""
        blk = self.block
        lv = self.levels[level]
        blk.level, blk.level_steps = level, 0
        cached, self._level0 = self._level0, None
        if level == 0 and cached:
            imgs, coeffs = cached
        else:
            imgs = self._level_stack(lv.factor)
            coeffs = self._moving_coeffs(imgs)
        self.level_fixed, self.level_moving, self.level_coeffs = imgs[:-1], imgs[1:], coeffs
        self.level_shape = tuple(self.level_fixed.shape[-2:])
        previous = self.solver if level > 0 else None
        # Pairs that may start this level from the Gauss-Newton model: all at the first level; later only those that
        # matched with NCC >= NEWTON_MIN_NCC at the end of the coarser level (finer levels match less well), so no
        # Hessian is built for consecutive real sections that would reject it anyway
        if previous is None:
            self.newton_rows = torch.ones_like(blk.valid)
        else:
            ncc_prev = 1 - (previous.f - self.penalty(previous.x))
            self.newton_rows = torch.isfinite(ncc_prev) & (ncc_prev >= NEWTON_MIN_NCC)
        scale = (lv.factor / self.levels[level - 1].factor) ** 2 if level > 0 else 1.0
        blk.level_counts.append(torch.zeros_like(blk.steps))
        self.solver = make_solver(self.hparams.optimizer, self.x, lv.lr, active=blk.valid.clone(),
                                  previous=previous, curvature_scale=scale)

    @property
    def uses_gauss_newton(self) -> bool:
        return self.hparams.optimizer == "bfgs" and self.hparams.curvature == "gauss_newton" and self.hparams.loss == "ncc"

    def _gauss_newton_hessian(self, p: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor,
                              weight: torch.Tensor) -> torch.Tensor:
        """``(b, n, n)`` Gauss-Newton Hessian of each pair's NCC loss at ``p``, from one evaluation's images.

        The derivative of a warped slice with respect to the parameters is its spatial gradient times
        the derivative of the sample positions: ``J = grad m . d(px, py)/d theta . d theta/d p``. For NCC
        (``1 - NCC = 0.5 sum w (f~ - m~)^2`` with zero-mean, unit-variance slices) the Hessian is
        ``sum w Jc Jc^T / var`` (``Jc``: weighted-mean-free ``J``).
        ``J J^T`` of one slice counts every gradient of that slice as signal: it overestimates the curvature
        by ~20 % on noisy matching slices, and 10-100x on consecutive real ssTEM sections, whose fine texture
        does not continue from one section to the next. The loss's own Hessian is, integrating by parts, the
        cross product of the fixed and the warped moving slice's gradients (the term of the variance of the
        warped slice vanishes the same way; the ramp of the inside weight is left out), which counts only
        what the two slices share. That is used wherever it is positive definite: measured on the 30 ISBI
        sections, finest-level evaluations per pair 6.7 -> 4.1 against BFGS's carried model; elsewhere the
        fixed slice's own (short steps, safe). Costs a fraction of an evaluation (no sampling).
        """
        b, n = p.shape
        f, m, wt = fixed[:, 0].float(), warped[:, 0].float(), weight[:, 0].float()
        h, w = f.shape[-2:]
        eye = torch.eye(n, dtype=torch.float64, device=p.device)
        eps = 1e-6  # d theta / d p by central differences (theta is smooth and cheap; float64)
        cols = []
        for k in range(n):
            e = torch.zeros_like(p)
            e[:, k] = eps
            cols.append((self.matrices(p + e) - self.matrices(p - e)).reshape(b, 6) / (2 * eps))
        dtheta = torch.stack(cols, -1)  # (b, 6, n)
        # J_theta = (gx * c, gy * c) * (w/2, h/2) with c = (x, y, 1) in normalized coordinates, so every
        # sum over pixels of a product of two J entries is a moment sum P x^i y^j with i + j <= 2.
        xs = (2 * torch.arange(w, dtype=f.dtype, device=f.device) + 1) / w - 1
        ys = (2 * torch.arange(h, dtype=f.dtype, device=f.device) + 1) / h - 1
        xp = torch.stack([torch.ones_like(xs), xs, xs * xs], 1)  # (w, 3)
        yp = torch.stack([torch.ones_like(ys), ys, ys * ys], 1)  # (h, 3)
        ci = torch.tensor([1, 0, 0], device=f.device)  # power of x in c_k
        cj = torch.tensor([0, 1, 0], device=f.device)  # power of y in c_k
        ii, jj = ci.view(3, 1) + ci.view(1, 3), cj.view(3, 1) + cj.view(1, 3)
        scale = torch.tensor([w / 2, h / 2], dtype=torch.float64, device=f.device)

        def moments(img: torch.Tensor) -> torch.Tensor:  # (b, 3, 3): [j, i] = sum img y^j x^i
            return (yp.T @ (img @ xp)).double()

        def gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # exact derivative of the cubic B-spline interpolant at the pixel centres: central
            # differences of its coefficients (central differences of the pixels lose ~20 %)
            c = bspline_prefilter(img.unsqueeze(1))[:, 0]
            gx = (c[:, PAD:PAD + h, PAD + 1:PAD + w + 1] - c[:, PAD:PAD + h, PAD - 1:PAD + w - 1]) / 2
            gy = (c[:, PAD + 1:PAD + h + 1, PAD:PAD + w] - c[:, PAD - 1:PAD + h - 1, PAD:PAD + w]) / 2
            return gx, gy

        def second(ga: tuple[torch.Tensor, torch.Tensor], gb: tuple[torch.Tensor, torch.Tensor], wt: torch.Tensor
                   ) -> torch.Tensor:
            """(rows, 6, 6): sum w J_a J_b^T."""
            out = torch.empty(wt.shape[0], 6, 6, dtype=torch.float64, device=f.device)
            for a in range(2):
                for c in range(2):
                    r = moments(wt * ga[a] * gb[c])
                    out[:, 3 * a:3 * a + 3, 3 * c:3 * c + 3] = r[:, jj, ii] * (scale[a] * scale[c])
            return out

        def first(g: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            """(b, 6): sum w J."""
            return torch.cat([moments(wt * g[a])[:, cj, ci] * scale[a] for a in range(2)], 1)

        wsum = wt.sum((1, 2)).double().clamp_min(1e-8)
        gf, gm = gradients(f), gradients(m)
        ff, fm = first(gf), first(gm)
        cross = second(gf, gm, wt) - ff.unsqueeze(2) * fm.unsqueeze(1) / wsum.view(b, 1, 1)

        def variance(img: torch.Tensor) -> torch.Tensor:
            s1 = (wt * img).sum((1, 2)).double()
            s2 = (wt * img * img).sum((1, 2)).double()
            return (s2 - s1 * s1 / wsum).clamp_min(1e-12)

        vf, vm = variance(f), variance(m)
        cross = cross / torch.sqrt(vf * vm).view(b, 1, 1)
        cross = 0.5 * (cross + cross.transpose(1, 2))
        hp = dtheta.transpose(1, 2) @ cross @ dtheta
        # the cross product where it is positive definite (relative to its own size); elsewhere the fixed slice's own
        ev = torch.linalg.eigvalsh(hp)
        bad = ~(ev[:, 0] > 1e-7 * hp.diagonal(dim1=-2, dim2=-1).sum(-1))
        if bool(bad.any()):
            gfb = (gf[0][bad], gf[1][bad])
            own = second(gfb, gfb, wt[bad]) - (ff[bad].unsqueeze(2) * ff[bad].unsqueeze(1)) / wsum[bad].view(-1, 1, 1)
            hp[bad] = dtheta[bad].transpose(1, 2) @ (own / vf[bad].view(-1, 1, 1)) @ dtheta[bad]
        if self.hparams.regularization:  # the Hessian of penalty()
            b3 = self.basis[:, 3:].to(hp)
            hp = hp + 2 * self.hparams.regularization * (b3 @ b3.T)
        # keep it positive definite (a flat slice has no gradient)
        return hp + 1e-9 * hp.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12).view(b, 1, 1) * eye

    def next_level(self) -> None:
        """Carry the parameters over to the next, finer level."""
        self._log_level_end()
        self.x = self.solver.x.clone()
        self.start_level(self.block.level + 1)

    def _log_level_end(self) -> None:
        """TensorBoard ``loss/level_<k>``: mean loss of the block's pairs at the end of level k (x = block)."""
        from ..training.output import tensorboard_writer

        tb = tensorboard_writer(self._trainer) if self._trainer is not None and self.trainer.is_global_zero else None
        if tb is None:
            return
        f = self.solver.f[self.block.valid]
        f = f[torch.isfinite(f)]
        if len(f):
            tb.add_scalar(f"loss/level_{self.block.level}", float(f.mean()), global_step=self.block.index)

    def level_finished(self) -> bool:
        """Budget spent or every pair of the block converged (same answer on every rank)."""
        blk = self.block
        return blk.level_steps >= self.levels[blk.level].steps or not bool(self.solver.active.any())

    def finish_block(self) -> None:
        """Record every pair of the block (all ranks know all rows) and end the epoch."""
        blk = self.block
        self._log_level_end()
        self.x = self.solver.x.clone()
        theta = self.matrices(self.x)
        lv = self.levels[-1]
        # NCC over the valid overlap before (identity) and after, at the images of the level the block ended on
        # (the finest), whatever the loss; every rank calls this (all-reduce).
        # With the ncc loss the solver already knows NCC at its last evaluated point; the pair has moved since by
        # less than step_tol_px (a change of NCC of the order of 1e-7), so no extra resampling is spent on it.
        with torch.no_grad():
            ncc_before = self._evaluate_rows(self.x, self.level_fixed, self.level_moving, self.pair_ncc_identity).tolist()
            if self.hparams.loss == "ncc" and not self.loss_kwargs:
                ncc_after = (1 - (self.solver.f - self.penalty(self.x))).tolist()
            else:
                ncc_after = self._evaluate_rows(self.x, self.level_fixed, self.level_coeffs, self.pair_ncc).tolist()
        for row, pair in enumerate(blk.pairs):
            if pair < 0:
                continue
            self.results[pair] = {
                "pair_index": pair,
                "slice_indices": list(self.pair_slices[pair]),
                "matrix": theta[row].cpu().tolist(),
                "final_loss": float(self.solver.f[row]),
                "num_steps_taken": int(blk.steps[row]),
                "steps_per_level": [int(c[row]) for c in blk.level_counts],
                "status": "ok" if math.isfinite(float(self.solver.f[row])) else "failed",
                "finest_factor": lv.factor,
                "ncc_before": ncc_before[row],
                "ncc_after": ncc_after[row],
            }
        blk.done = True

    def step_displacement_px(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """Largest pixel displacement (at the current level's resolution) between two parameter sets."""
        d = corner_displacement(self.matrices(x_new), self.matrices(x_old), self.shape)
        return d / self.levels[self.block.level].factor

    def run_hparams(self) -> dict[str, Any]:
        """The settings of this run, by config group, for TensorBoard's HPARAMS tab and ``hparams.yaml``."""
        dm = self.trainer.datamodule
        src = dm.source
        groups: dict[str, Any] = {
            "model": {k: v for k, v in self.hparams.items() if k != "pairs_per_block" and not k.startswith("_")},
            "pyramid": {"levels": len(self.levels), "factors": [lv.factor for lv in self.levels],
                        "steps": [lv.steps for lv in self.levels], "learning_rate": [lv.lr for lv in self.levels]},
            "data": {"root": str(dm.root), "array": dm.array, "output": dm.output_path, "shape": list(src.shape),
                     "dtype": str(src.dtype), "spacing": dm.spacing, "n_slices": dm.n_slices, "n_pairs": dm.n_pairs,
                     "max_pairs": dm.max_pairs, "pairs_per_block": dm.pairs_per_block, "check_slices": dm.check_slices,
                     "min_contrast": dm.min_contrast, "resume": dm.resume,
                     "damaged_slices": ", ".join(map(str, sorted(dm.damaged))) or "none"},
            "trainer": {"accelerator": self.device.type, "world_size": self.world},
        }
        for cb in self.trainer.callbacks:
            group = getattr(cb, "config_group", None)
            if group and hasattr(cb, "settings"):
                groups[group] = cb.settings()
        return groups

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self) -> None:
        self._train_t0 = time.perf_counter()

    def on_train_end(self) -> None:
        self.timings["fit_s"] = time.perf_counter() - getattr(self, "_train_t0", time.perf_counter())

    def on_fit_start(self) -> None:
        # Here (data scanned, pyramid set) rather than Lightning's own logging right after this hook, which would
        # show only the model's settings; the loggers then save hparams.yaml with these.
        from lightning.pytorch.loggers import TensorBoardLogger

        from ..training.output import HPARAM_METRICS

        if self.trainer.is_global_zero and getattr(self.trainer, "enable_autolog_hparams", True):
            hp = self.run_hparams()
            for logger in self.trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # The HPARAMS tab's metrics get their values at the end of the run (output.log_panels).
                    logger.log_hyperparams(hp, metrics={k: float("nan") for k in HPARAM_METRICS})
                else:
                    logger.log_hyperparams(hp)

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

    def evaluate(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, curvature: bool | torch.Tensor = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Losses ``(b,)``, their gradients ``(b, n)`` and (optionally) Gauss-Newton Hessians ``(b, n, n)`` at ``p``.

        ``curvature``: True for every row's Hessian, or a ``(b,)`` mask of the rows that need one (the others get 0).

        Pairs go in equal passes of at most ``max_pixels_per_pass`` pixels, each pass's autograd graph freed
        before the next: the memory of a step stays bounded whatever the block and slice size (same math as one
        pass).
        """
        h, w = fixed.shape[-2:]
        per = max(1, self.max_pixels_per_pass // (h * w))
        per = -(-len(p) // -(-len(p) // per))  # equal passes (8 pairs in 2 passes: 4 + 4, not 7 + 1)
        losses, grads, hess = [], [], []
        if isinstance(curvature, torch.Tensor):
            want, curvature = curvature, bool(curvature.any())
        else:
            want = torch.full((len(p),), bool(curvature), dtype=torch.bool, device=p.device)
        for c0 in range(0, len(p), per):
            pc = p[c0:c0 + per].detach().clone().requires_grad_(True)
            images: dict[str, torch.Tensor] | None = {} if curvature else None
            if self.uses_fast_ncc:
                # the default objective: value and exact gradient without autograd through the images (fastncc.py);
                # autograd only through the small matrices(p) and the penalty
                theta = self.matrices(pc)
                lc, g_theta = ncc_and_gradient(theta.detach().to(fixed.dtype), fixed[c0:c0 + per], coeffs[c0:c0 + per],
                                               images=images)
                total = (theta * g_theta).sum()
                if self.hparams.regularization:
                    pen = self.penalty(pc)
                    total, lc = total + pen.sum(), lc + pen.detach()
                (gc,) = torch.autograd.grad(total, pc)
            else:
                lc = self.pair_losses(pc, fixed[c0:c0 + per], coeffs[c0:c0 + per], images)
                (gc,) = torch.autograd.grad(lc.sum(), pc)
            losses.append(lc.detach())
            grads.append(gc)
            if images is not None:
                n = pc.shape[1]
                hc = torch.zeros(len(pc), n, n, dtype=torch.float64, device=pc.device)
                rows = want[c0:c0 + per]
                if rows.any():
                    hc[rows] = self._gauss_newton_hessian(pc.detach()[rows], fixed[c0:c0 + per][rows],
                                                          images["warped"][rows], images["weight"][rows])
                hess.append(hc)
            del images, lc
        return torch.cat(losses), torch.cat(grads), (torch.cat(hess) if curvature else None)

    @property
    def uses_fast_ncc(self) -> bool:
        """Whether evaluations take the analytic path of :mod:`.fastncc` (ncc loss, bspline interpolation)."""
        return self.hparams.loss == "ncc" and self.hparams.interpolation == "bspline" and not self.loss_kwargs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:  # the profile of a run: time and steps per pyramid level (see benchmarks/real_sections.py)
            k = self.block.level
            self.timings[f"level{k}_s"] = self.timings.get(f"level{k}_s", 0.0) + time.perf_counter() - t0
            self.timings[f"level{k}_steps"] = self.timings.get(f"level{k}_steps", 0) + 1

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
        n = self.basis.shape[0]
        curv = torch.zeros(self.delta.shape[0], n, n, dtype=torch.float64, device=self.device) if need_curv else None
        if len(idx):
            losses, grads, hess = self.evaluate(self.delta.detach()[self.rows][idx], self.level_fixed[idx],
                                                self.level_coeffs[idx], fresh[self.rows][idx] if need_curv else False)
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
            ncc = 1 - (full - self.penalty(self.delta.detach()))
            ok = fresh & (curv.diagonal(dim1=-2, dim2=-1).sum(-1) > 0) & (ncc >= NEWTON_MIN_NCC)
            eye = torch.eye(n, dtype=curv.dtype, device=curv.device)
            solver.set_curvature(ok, torch.linalg.inv(torch.where(ok.view(-1, 1, 1), curv, eye)))
        was_active = solver.active.clone()
        accepted = solver.update(full, grad)
        blk.extra["accepted"] = accepted
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
