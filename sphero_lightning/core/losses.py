"""Image similarity losses over a weighted region, one value per pair.

Every loss takes ``fixed``, ``moving`` (the warped moving slice) and ``weight`` (``1`` where the
warped moving slice has content, ``0`` in its empty border, a ramp between), each ``(B, 1, H, W)``,
and returns ``(B,)``. Only weighted pixels count: letting the zero-padded border into the loss
biases the optimum (the reference pipeline's main error).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SpheroError
from .interpolation import gaussian_blur

_EPS = 1e-8


def _wmean(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
    return (x * w).sum((1, 2, 3)) / wsum


def ncc_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """``1 - NCC`` (normalized cross-correlation) over the weighted region; 0 is a perfect match.

    Invariant to per-slice contrast and brightness, so it is the default.
    """
    wsum = weight.sum((1, 2, 3)).clamp_min(eps)
    mf = _wmean(fixed, weight, wsum).view(-1, 1, 1, 1)
    mm = _wmean(moving, weight, wsum).view(-1, 1, 1, 1)
    df, dm = fixed - mf, moving - mm
    cov = (weight * df * dm).sum((1, 2, 3))
    vf = (weight * df * df).sum((1, 2, 3))
    vm = (weight * dm * dm).sum((1, 2, 3))
    return 1 - cov / torch.sqrt(vf * vm + eps)


def mse_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared difference (intensities in [0, 1])."""
    wsum = weight.sum((1, 2, 3)).clamp_min(_EPS)
    return _wmean((fixed - moving) ** 2, weight, wsum)


def mae_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean absolute difference (intensities in [0, 1]). Robust, but not smooth at 0."""
    wsum = weight.sum((1, 2, 3)).clamp_min(_EPS)
    return _wmean((fixed - moving).abs(), weight, wsum)


def ssim_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, sigma: float = 1.5,
              c1: float = 0.01**2, c2: float = 0.03**2) -> torch.Tensor:
    """``1 - SSIM`` with Gaussian windows (``sigma`` px), local statistics normalized by the weight.

    Intensities are expected in ``[0, 1]`` (``c1``, ``c2`` are the usual constants for that range).
    """
    ws = gaussian_blur(weight, sigma).clamp_min(_EPS)
    mu_f = gaussian_blur(weight * fixed, sigma) / ws
    mu_m = gaussian_blur(weight * moving, sigma) / ws
    s_ff = gaussian_blur(weight * fixed * fixed, sigma) / ws - mu_f**2
    s_mm = gaussian_blur(weight * moving * moving, sigma) / ws - mu_m**2
    s_fm = gaussian_blur(weight * fixed * moving, sigma) / ws - mu_f * mu_m
    ssim = ((2 * mu_f * mu_m + c1) * (2 * s_fm + c2)) / ((mu_f**2 + mu_m**2 + c1) * (s_ff + s_mm + c2))
    wsum = weight.sum((1, 2, 3)).clamp_min(_EPS)
    return 1 - _wmean(ssim, weight, wsum)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ncc": ncc_loss,
    "mse": mse_loss,
    "mae": mae_loss,
    "ssim": ssim_loss,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function called ``name`` (one of :data:`LOSSES`)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise SpheroError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
