"""The pair objective: how well a moving slice, warped by an affine transform, matches the fixed slice; its gradient
and its Gauss-Newton curvature. Lightning-free and storage-free: the training layer's module and the Python API
both evaluate pairs through it.

Parameters ``p`` are ``(B, n)`` free parameters of the transform family (see :func:`~.transforms.family_basis`);
``matrices(p)`` turns them into ``(B, 2, 3)`` normalized matrices (output position -> moving position). Slices
are ``(B, 1, h, w)`` float tensors; the moving ones are passed as what the loss samples them from
(:meth:`PairObjective.moving_coeffs`: B-spline coefficients for ``bspline``).
"""

from __future__ import annotations

from typing import Any, get_args

import torch
import torch.nn.functional as F

from ..errors import SpheroError
from . import kernels
from .fastncc import Rows, ncc_and_gradient, ncc_at_identity
from .frames import normalized_coords, pixel_coords
from .interpolation import (
    PAD,
    bspline_prefilter,
    bspline_sample,
    downscale,
    gaussian_blur,
    gaussian_kernel,
    inside_weight,
    sample_positions,
    upsample2,
)
from .losses import get_loss, ncc_loss
from .masks import sample_mask_autograd
from .settings import MODEL, Loss, LossInterpolation, Transformation
from .transforms import centred_corner_displacement, family_basis, params_jacobian, params_to_centered, params_to_normalized

INTERPOLATIONS = get_args(LossInterpolation)


def take(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` at ``positions``: a view where they are a run of consecutive rows (consecutive pairs: the
    chain costs no copy), else a copy.

    >>> take(torch.arange(5), torch.tensor([1, 2, 3])), take(torch.arange(5), torch.tensor([0, 2]))
    (tensor([1, 2, 3]), tensor([0, 2]))
    """
    n = len(positions)
    if n and bool((positions[1:] - positions[:-1] == 1).all()):
        return t[int(positions[0]): int(positions[0]) + n]
    return t[positions]


class PairObjective:
    """The loss of registering moving slices onto fixed ones, for batches of pairs.

    Parameters
    ----------
    transformation : {"translation", "rigid", "similarity", "affine"}
        Transform family. ``similarity`` is rotation + one isotropic scale + translation.
    scaling, shear : bool
        For ``affine``: whether per-axis scale and horizontal shear are free.
    loss : {"ncc", "mse", "mae", "ssim"}
        Similarity between the fixed slice and the warped moving slice, over pixels inside the warped moving slice.
    loss_kwargs : dict, optional
        Extra keyword arguments of the loss (e.g. ``{"sigma": 1.5}`` for ssim).
    regularization : float
        Weight of the squared deviation of the scale and shear parameters from identity.
    smoothing : float
        Sigma (pixels of each level) of a Gaussian applied to both slices (:meth:`level_stack`).
    interpolation : {"bspline", "bspline2x", "bicubic"}
        How the moving slice is resampled inside the loss.
    shape : (h, w), optional
        Full-resolution slice shape (the frame of the parameters); set before evaluating.

    Examples
    --------
    >>> import torch
    >>> obj = PairObjective("rigid", shape=(64, 64))
    >>> fixed = torch.rand(2, 1, 64, 64)
    >>> loss, grad, _ = obj.evaluate(torch.zeros(2, 3, dtype=torch.float64), fixed, obj.moving_coeffs(fixed))
    >>> loss.shape, grad.shape
    (torch.Size([2]), torch.Size([2, 3]))
    """

    def __init__(self, transformation: Transformation = MODEL.transformation, scaling: bool = MODEL.scaling,
                 shear: bool = MODEL.shear, loss: Loss = MODEL.loss, loss_kwargs: dict[str, Any] | None = MODEL.loss_kwargs,
                 regularization: float = MODEL.regularization, smoothing: float = MODEL.smoothing,
                 interpolation: LossInterpolation = MODEL.interpolation,
                 shape: tuple[int, int] | None = None) -> None:
        if interpolation not in INTERPOLATIONS:
            raise SpheroError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if smoothing < 0:
            raise SpheroError(f"smoothing must be >= 0 (pixels), got {smoothing}")
        self.transformation, self.loss, self.interpolation = transformation, loss, interpolation
        self.regularization, self.smoothing = float(regularization), float(smoothing)
        self.loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.basis = family_basis(transformation, scaling, shear)  # (n_free, 6)
        self.family = (transformation, scaling, shear)  # as given: the volume projects onto it (core.volume)
        self.shape = shape
        #: Pixels evaluated in one pass (pairs x pixels per pair); bounds the memory of an evaluation.
        self.max_pixels_per_pass = 1 << 20
        #: Whether the default objective's evaluations on the CPU take the compiled pass of :mod:`.kernels` (set by
        #: the fit, once: :func:`~.kernels.worth`); it keeps no per-pixel temporaries, so every row goes in one pass.
        self.compiled = False

    @property
    def n_params(self) -> int:
        return self.basis.shape[0]

    def to(self, device: torch.device | str) -> PairObjective:
        self.basis = self.basis.to(device)
        return self

    def displacement_px(self, x_old: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """``(B,)`` largest displacement (full-resolution pixels) of any slice corner between two parameter sets."""
        basis = self.basis.to(x_new)
        return centred_corner_displacement(params_to_centered(x_new @ basis, self.shape)
                                           - params_to_centered(x_old @ basis, self.shape), self.shape)

    def matrices(self, p: torch.Tensor) -> torch.Tensor:
        """``(R, n_free)`` free parameters to ``(R, 2, 3)`` normalized matrices (float64)."""
        return params_to_normalized(p @ self.basis.to(p), self.shape)

    def warped_moving(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor,
                      masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The moving slices warped by free parameters ``p`` and the weight of their valid overlap.

        Parameters
        ----------
        p : torch.Tensor
            ``(B, n_free)`` free parameters.
        fixed, coeffs : torch.Tensor
            ``(B, 1, h, w)`` fixed slices and the moving slices at one level (their B-spline
            coefficients, padded, for ``interpolation="bspline"``).

        masks : optional
            ``(fixed_mask, moving_mask)``, ``(B, 1, h, w)`` each (1 = use): the weight also leaves out what the fixed
            slice's mask and the moving slice's mask, warped with it, leave out (:mod:`.masks`).

        Returns
        -------
        warped, weight : torch.Tensor
            ``(B, 1, h, w)`` each; ``weight`` is 1 inside the warped moving slice, 0 outside.
        """
        theta = self.matrices(p).to(fixed.dtype)
        size = tuple(fixed.shape[-2:])
        if self.interpolation == "bspline":
            px, py = sample_positions(theta, size, size)
            warped = bspline_sample(coeffs, px, py)
        else:
            grid = F.affine_grid(theta, [theta.shape[0], 1, *size], align_corners=False)
            warped = F.grid_sample(coeffs, grid, mode="bicubic", padding_mode="border", align_corners=False)
            px = pixel_coords(grid[..., 0], size[1])
            py = pixel_coords(grid[..., 1], size[0])
        weight = inside_weight(px, py, size)
        if masks is not None:
            weight = weight * masks[0][:, 0] * sample_mask_autograd(masks[1][:, 0], px, py)
        return warped, weight.unsqueeze(1)

    def pair_losses(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor,
                    images: dict[str, torch.Tensor] | None = None,
                    masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Loss of each pair at free parameters ``p`` (arguments as :meth:`warped_moving`).

        Returns
        -------
        torch.Tensor
            ``(B,)`` similarity loss plus regularisation. ``images``, when given, receives the detached
            ``warped`` moving slices and their ``weight``.
        """
        warped, weight = self.warped_moving(p, fixed, coeffs, masks)
        if images is not None:
            images.update(warped=warped.detach(), weight=weight.detach())
        loss = self.loss_fn(fixed, warped, weight, **self.loss_kwargs).to(p.dtype)
        if self.regularization:
            loss = loss + self.penalty(p)
        return loss

    def penalty(self, p: torch.Tensor) -> torch.Tensor:
        """``(B,)`` regularisation part of the loss: weighted squared scale/shear deviation at free parameters ``p``."""
        q = p @ self.basis.to(p)
        return self.regularization * (q[:, 3:] ** 2).sum(-1)

    def penalty_gradient(self, p: torch.Tensor) -> torch.Tensor:
        """``(B, n)``: the gradient of :meth:`penalty` at ``p``."""
        b3 = self.basis[:, 3:].to(p)
        return 2 * self.regularization * (p @ b3) @ b3.T

    def pair_ncc(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalized cross-correlation of each pair over the valid overlap at ``p`` (whatever the loss is)."""
        warped, weight = self.warped_moving(p, fixed, coeffs, masks)
        return (1 - ncc_loss(fixed, warped, weight)).to(p.dtype)

    def pair_ncc_identity(self, p: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                          masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`pair_ncc` at the identity (``p`` only gives the rows), without resampling ``moving`` (the moving
        slices, not their coefficients): at the identity the ``bspline`` and ``bicubic`` interpolations return
        them exactly; ``bspline2x`` would smooth them slightly (about 1e-3 in NCC)."""
        theta = self.matrices(torch.zeros_like(p[:1])).to(fixed.dtype)
        size = tuple(fixed.shape[-2:])
        # the same weight for every pair: computed once, expanded (no copy)
        weight = inside_weight(*sample_positions(theta, size, size), size).unsqueeze(1).expand(len(fixed), -1, -1, -1)
        if masks is not None:
            weight = weight * masks[0] * masks[1]
        return (1 - ncc_loss(fixed, moving, weight)).to(p.dtype)

    def runs_compiled(self, t: torch.Tensor) -> bool:
        """Whether work on ``t`` takes the compiled CPU path: the fit chose it (:attr:`compiled`), and ``t`` is float32
        on the CPU."""
        return self.compiled and t.device.type == "cpu" and t.dtype == torch.float32

    def pair_ncc_identity_compiled(self, p: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                                   masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`pair_ncc_identity` by the compiled sums over the slices (:func:`~.kernels.identity_sums`: one pass,
        no taps; the same NCC to rounding)."""
        return ncc_at_identity(fixed, moving, masks).to(p.dtype)

    def level_stack(self, slices: torch.Tensor, factor: float) -> torch.Tensor:
        """``slices`` (``(N, 1, H, W)``, grey values about [0, 1]) at one level: downscaled, pre-smoothed."""
        imgs = downscale(slices, factor)
        if self.smoothing > 0 and self.runs_compiled(imgs):
            kernel = gaussian_kernel(self.smoothing).double().numpy()
            return torch.from_numpy(kernels.gaussian_blur(imgs[:, 0].numpy(), kernel, torch.get_num_threads())).unsqueeze(1)
        if self.smoothing > 0:
            imgs = gaussian_blur(imgs, self.smoothing)
        return imgs

    def moving_coeffs(self, moving: torch.Tensor) -> torch.Tensor:
        """What the loss samples the ``moving`` slices from, for the configured interpolation."""
        mode = self.interpolation
        if mode == "bspline":
            return bspline_prefilter(moving)
        if mode == "bspline2x":
            return upsample2(moving)
        return moving

    def gauss_newton_hessian(self, p: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor,
                              moving_grad: tuple[torch.Tensor, torch.Tensor] | None = None, dense: bool = False) -> torch.Tensor:
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

        ``moving_grad``: the moving slice's interpolant derivatives at the sample positions (``(b, 1, h, w)`` each,
        per moving pixel): the warped slice's gradient is then those by the chain rule, exact and without
        prefiltering the warped slice again. The default evaluation (:mod:`.fastncc`) sums the same moments in
        its own pass over the pixels and calls :meth:`gauss_newton_from_moments` directly.
        """
        f, m, wt = fixed[:, 0].float(), warped[:, 0].float(), weight[:, 0].float()
        h, w = f.shape[-2:]
        xs = normalized_coords(torch.arange(w, dtype=f.dtype, device=f.device), w)
        ys = normalized_coords(torch.arange(h, dtype=f.dtype, device=f.device), h)
        xq = torch.stack([torch.ones_like(xs), xs, xs * xs], 1)  # (w, 3)
        yq = torch.stack([torch.ones_like(ys), ys, ys * ys], 1)  # (h, 3)

        def moments(img: torch.Tensor) -> torch.Tensor:  # (b, 3, 3): [j, i] = sum img y^j x^i
            return (yq.T @ (img @ xq)).double()

        def gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # exact derivative of the cubic B-spline interpolant at the pixel centres: central
            # differences of its coefficients (central differences of the pixels lose ~20 %)
            c = bspline_prefilter(img.unsqueeze(1))[:, 0]
            gx = (c[:, PAD:PAD + h, PAD + 1:PAD + w + 1] - c[:, PAD:PAD + h, PAD - 1:PAD + w - 1]) / 2
            gy = (c[:, PAD + 1:PAD + h + 1, PAD:PAD + w] - c[:, PAD - 1:PAD + h - 1, PAD:PAD + w]) / 2
            return gx, gy

        gf = gradients(f)
        md = gradients(m) if moving_grad is None else (moving_grad[0][:, 0].float(), moving_grad[1][:, 0].float())
        wgf = (wt * gf[0], wt * gf[1])
        def wsum_of(img: torch.Tensor) -> torch.Tensor:
            return (wt * img).sum((1, 2)).double()

        def pairs(a: tuple[torch.Tensor, ...], c: tuple[torch.Tensor, ...]) -> torch.Tensor:  # (b, 2, 2, 3, 3)
            return torch.stack([torch.stack([moments(u * v) for v in c], 1) for u in a], 1)

        # S1, Sf, Sm, Sff, Smm (Sfm is not used)
        sums = torch.stack([wt.sum((1, 2)).double(), wsum_of(f), wsum_of(m), wsum_of(f * f), wsum_of(m * m),
                            torch.zeros(len(p), dtype=torch.float64, device=p.device)], 1)
        return self.gauss_newton_from_moments(
            p, sums, fixed_first=torch.stack([moments(g) for g in wgf], 1),
            moving_first=torch.stack([moments(wt * g) for g in md], 1), cross=pairs(wgf, md), own=pairs(wgf, gf),
            size=(h, w), chain=moving_grad is not None, dense=dense)

    def gauss_newton_from_moments(self, p: torch.Tensor, sums: torch.Tensor, fixed_first: torch.Tensor,
                                  moving_first: torch.Tensor, cross: torch.Tensor, own: torch.Tensor,
                                  size: tuple[int, int], chain: bool = True, dense: bool = False) -> torch.Tensor:
        """:meth:`gauss_newton_hessian` from moment sums over the pixels (see
        :func:`~.fastncc.ncc_and_gradient`'s ``curvature`` for their layout). ``chain``: the moving derivatives
        are the interpolant's at the sample positions (per moving pixel), turned into the warped slice's by the
        chain rule here; otherwise they are the warped slice's own. ``dense``: no tensor read on the host (see
        :meth:`evaluate`)."""
        b, n = p.shape
        h, w = size
        dev = p.device
        eye = torch.eye(n, dtype=torch.float64, device=dev)
        dtheta = params_jacobian(p, self.basis, self.shape)  # (b, 6, n)
        if chain:
            # d/dX m(px, py) = m_x dpx/dX + m_y dpy/dX (pixel units: px = theta00 X + theta01 (w/h) Y + ...):
            # the warped slice's derivative c = sum_d m_d A[d, c]
            th = self.matrices(p)
            a = torch.stack([torch.stack([th[:, 0, 0], th[:, 0, 1] * (w / h)], 1),
                             torch.stack([th[:, 1, 0] * (h / w), th[:, 1, 1]], 1)], 1)  # (b, d, c)
            cross = torch.einsum("badji,bdc->bacji", cross, a)
            moving_first = torch.einsum("bdji,bdc->bcji", moving_first, a)
        # J_theta = (gx * c, gy * c) * (w/2, h/2) with c = (x, y, 1) in normalized coordinates, so every
        # sum over pixels of a product of two J entries is a moment sum P x^i y^j with i + j <= 2.
        ci = torch.tensor([1, 0, 0], device=dev)  # power of x in c_k
        cj = torch.tensor([0, 1, 0], device=dev)  # power of y in c_k
        ii, jj = ci.view(3, 1) + ci.view(1, 3), cj.view(3, 1) + cj.view(1, 3)
        scale = torch.tensor([w / 2, h / 2], dtype=torch.float64, device=dev)
        sc2 = (scale.view(2, 1) * scale.view(1, 2)).view(1, 2, 1, 2, 1)

        def second(blocks: torch.Tensor) -> torch.Tensor:  # (r, 2, 2, 3, 3) moments -> (r, 6, 6) sum w J_a J_c^T
            return (blocks[..., jj, ii].permute(0, 1, 3, 2, 4) * sc2).reshape(-1, 6, 6)

        def first(m1: torch.Tensor) -> torch.Tensor:  # (r, 2, 3, 3) -> (r, 6) sum w J
            return (m1[..., cj, ci] * scale.view(1, 2, 1)).reshape(-1, 6)

        wsum = sums[:, 0].clamp_min(1e-8)
        vf = (sums[:, 3] - sums[:, 1] ** 2 / wsum).clamp_min(1e-12)
        vm = (sums[:, 4] - sums[:, 2] ** 2 / wsum).clamp_min(1e-12)
        ff, fm = first(fixed_first), first(moving_first)
        hc = second(cross) - ff.unsqueeze(2) * fm.unsqueeze(1) / wsum.view(b, 1, 1)
        hc = hc / torch.sqrt(vf * vm).view(b, 1, 1)
        hc = 0.5 * (hc + hc.transpose(1, 2))
        hp = dtheta.transpose(1, 2) @ hc @ dtheta
        # the cross product where it is positive definite (relative to its own size); elsewhere the fixed slice's own
        floor = 1e-7 * hp.diagonal(dim1=-2, dim2=-1).sum(-1)
        if dense:  # the same test without the eigenvalue solver's error check (a wait on a GPU)
            bad = torch.linalg.cholesky_ex(hp - floor.view(b, 1, 1) * eye)[1] != 0
            ho = second(own) - (ff.unsqueeze(2) * ff.unsqueeze(1)) / wsum.view(-1, 1, 1)
            hp = torch.where(bad.view(b, 1, 1), dtheta.transpose(1, 2) @ (ho / vf.view(-1, 1, 1)) @ dtheta, hp)
        else:
            bad = ~(torch.linalg.eigvalsh(hp)[:, 0] > floor)
            if bool(bad.any()):
                ho = second(own[bad]) - (ff[bad].unsqueeze(2) * ff[bad].unsqueeze(1)) / wsum[bad].view(-1, 1, 1)
                hp[bad] = dtheta[bad].transpose(1, 2) @ (ho / vf[bad].view(-1, 1, 1)) @ dtheta[bad]
        if self.regularization:  # the Hessian of penalty()
            b3 = self.basis[:, 3:].to(hp)
            hp = hp + 2 * self.regularization * (b3 @ b3.T)
        # keep it positive definite (a flat slice has no gradient)
        return hp + 1e-9 * hp.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12).view(b, 1, 1) * eye

    def evaluate(self, p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, curvature: bool | torch.Tensor = False,
                 fixed_coeffs: torch.Tensor | None = None, masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                 dense: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Losses ``(b,)``, their gradients ``(b, n)`` and (optionally) Gauss-Newton Hessians ``(b, n, n)`` at ``p``.

        ``curvature``: True for every row's Hessian, or a ``(b,)`` mask of the rows that need one (the others get 0).
        ``fixed_coeffs``: the fixed slices' B-spline coefficients (:meth:`level_coeffs`), which the default
        objective's curvature is made from (computed here when not given). ``masks``: see :meth:`warped_moving`.

        Pairs go in equal passes of at most ``max_pixels_per_pass`` pixels, each pass's autograd graph freed
        before the next: the memory of a step stays bounded whatever the block and slice size (same math as one
        pass). ``dense``: the same results without reading any tensor on the host (no ``.item()``, no boolean
        indexing): curvature computed for every row of a pass and kept where ``curvature`` asks, the weight ramp's
        gradient as dense sums (:func:`~.fastncc.ncc_and_gradient`); what a fit on a GPU runs (no wait per step).
        """
        h, w = fixed.shape[-2:]
        one_pass = self.runs_compiled(fixed) and self.uses_fast_ncc and not dense
        per = max(1, len(p) if one_pass else self.max_pixels_per_pass // (h * w))
        per = -(-len(p) // -(-len(p) // per))  # equal passes (8 pairs in 2 passes: 4 + 4, not 7 + 1)
        losses, grads, hess = [], [], []
        if isinstance(curvature, torch.Tensor):
            want, curvature = curvature, (True if dense else bool(curvature.any()))
        else:
            want = torch.full((len(p),), bool(curvature), dtype=torch.bool, device=p.device)
        for c0 in range(0, len(p), per):
            pc = p[c0:c0 + per].detach().clone().requires_grad_(not self.uses_fast_ncc)
            rows = want[c0:c0 + per]
            curv = curvature if dense else bool(rows.any())
            mk = None if masks is None else (masks[0][c0:c0 + per], masks[1][c0:c0 + per])
            n = pc.shape[1]
            hc = torch.zeros(len(pc), n, n, dtype=torch.float64, device=pc.device) if curvature else None
            if self.uses_fast_ncc:
                # the default objective: value, exact gradient and the curvature's moment sums in one pass over the
                # pixels, without autograd through the images (fastncc.py); autograd only through matrices(p)
                theta = self.matrices(pc)
                fc = None
                if curv:
                    fc = fixed_coeffs[c0:c0 + per] if fixed_coeffs is not None else bspline_prefilter(fixed[c0:c0 + per])
                mom: dict[str, torch.Tensor] | None = {} if curv else None
                lc, g_theta = ncc_and_gradient(theta.detach().to(fixed.dtype), fixed[c0:c0 + per], coeffs[c0:c0 + per],
                                               fixed_coeffs=fc, curvature=mom, masks=mk, dense=dense, compiled=self.compiled)
                # the chain rule through the matrices in closed form, and the penalty's gradient
                gc = torch.einsum("bk,bkn->bn", g_theta.reshape(len(pc), 6), params_jacobian(pc, self.basis, self.shape))
                if self.regularization:
                    lc, gc = lc + self.penalty(pc), gc + self.penalty_gradient(pc)
                if mom and dense:
                    hc = torch.where(rows.view(-1, 1, 1), self.gauss_newton_from_moments(pc.detach(), *(mom[k] for k in (
                        "sums", "fixed_first", "moving_first", "cross", "own")), size=(h, w), dense=True), hc)
                elif mom:
                    hc[rows] = self.gauss_newton_from_moments(pc.detach()[rows], *(mom[k][rows] for k in (
                        "sums", "fixed_first", "moving_first", "cross", "own")), size=(h, w))
            else:
                images: dict[str, torch.Tensor] | None = {} if curv else None
                lc = self.pair_losses(pc, fixed[c0:c0 + per], coeffs[c0:c0 + per], images, mk)
                (gc,) = torch.autograd.grad(lc.sum(), pc)
                if images and dense:
                    hc = torch.where(rows.view(-1, 1, 1), self.gauss_newton_hessian(
                        pc.detach(), fixed[c0:c0 + per], images["warped"], images["weight"], dense=True), hc)
                elif images:
                    hc[rows] = self.gauss_newton_hessian(pc.detach()[rows], fixed[c0:c0 + per][rows], images["warped"][rows],
                                                          images["weight"][rows])
            losses.append(lc.detach())
            grads.append(gc)
            if hc is not None:
                hess.append(hc)
        return torch.cat(losses), torch.cat(grads), (torch.cat(hess) if curvature else None)

    def level_coeffs(self, imgs: torch.Tensor, fixed: torch.Tensor | None = None, moving: torch.Tensor | None = None,
                     rows: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What one level's evaluations sample from, for slices ``imgs`` (``(N + 1, 1, h, w)``): the fixed slices'
        B-spline coefficients (what the default objective's curvature is made of; None for the others, which do
        not use them) and :meth:`moving_coeffs`. One prefilter of all N + 1 slices gives both. Pairs are consecutive
        slices, or those at positions ``fixed`` and ``moving`` of ``imgs`` (:func:`take`; ``rows``: :class:`.Rows`)."""
        if fixed is None or moving is None:
            fixed = torch.arange(len(imgs) - 1, device=imgs.device)
            moving = fixed + 1
        if self.uses_fast_ncc:
            if self.runs_compiled(imgs):  # the recursive filter
                c = torch.from_numpy(kernels.bspline_prefilter(imgs[:, 0].numpy(), torch.get_num_threads())).unsqueeze(1)
            else:
                c = bspline_prefilter(imgs)
            pick = Rows if rows else take
            return pick(c, fixed), pick(c, moving)
        return None, self.moving_coeffs(take(imgs, moving))

    @property
    def uses_fast_ncc(self) -> bool:
        """Whether evaluations take the analytic path of :mod:`.fastncc` (ncc loss, bspline interpolation)."""
        return self.loss == "ncc" and self.interpolation == "bspline" and not self.loss_kwargs
