"""Coarse translation estimate by phase correlation, to widen the capture range.

Gradient-based fitting only sees a jump of tens of pixels if the pyramid is coarse enough and the
content is smooth enough; phase correlation finds it directly, in one FFT per pair, whatever its size
(up to half the slice).
"""

from __future__ import annotations

import torch

from .interpolation import downscale

#: Larger side (px) of the slices the fit's phase correlation works on: its estimate only has to bring a pair within
#: the coarsest pyramid level's reach (a pixel of that level is 8 or more of the slice's; at 128 px a 2048 px slice's
#: estimate is within a few pixels), and at 256 px it cost a fit of 40 slices of 384 px 7 % of its time (2.6 ms a
#: slice, as much as the finest level's evaluations of the slice's pairs).
FIT_SIZE = 128


def _hann(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    wy = torch.hann_window(h, periodic=False, dtype=like.dtype, device=like.device)
    wx = torch.hann_window(w, periodic=False, dtype=like.dtype, device=like.device)
    return wy[:, None] * wx[None, :]


def phase_correlation(fixed: torch.Tensor, moving: torch.Tensor, max_size: int = 256) -> torch.Tensor:
    """Translation of ``moving`` against ``fixed``, in pixels of the given images.

    Parameters
    ----------
    fixed, moving : torch.Tensor
        ``(B, 1, H, W)`` images.
    max_size : int
        The images are downscaled (anti-aliased) until their larger side is at most this; the peak
        is refined to subpixel by a parabola fit, then scaled back.

    Returns
    -------
    torch.Tensor
        ``(B, 2)`` float ``(dx, dy)`` such that ``moving(x + dx, y + dy) ~ fixed(x, y)``: the
        translation of the transform mapping the fixed frame into the moving slice.
    """
    h, w = fixed.shape[-2:]
    sf, small = _spectra(fixed, max_size)
    sm, _ = _spectra(moving, max_size)
    return _peak(sm, sf, (h, w), small)


def consecutive_phase_correlation(slices: torch.Tensor, max_size: int = 256, fixed: torch.Tensor | None = None,
                                  moving: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`phase_correlation` of every consecutive pair of ``slices`` (``(N + 1, 1, H, W)``; fixed ``k``,
    moving ``k + 1``): ``(N, 2)``; or of the pairs whose slices are at positions ``fixed`` and ``moving``. Each slice
    is downscaled and transformed once, not once per pair it is in."""
    spec, small = _spectra(slices, max_size)
    if fixed is None:
        return _peak(spec[1:], spec[:-1], tuple(slices.shape[-2:]), small)
    return _peak(spec[moving], spec[fixed], tuple(slices.shape[-2:]), small)


def _spectra(images: torch.Tensor, max_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Spectra of the mean-free, Hann-windowed images downscaled to at most ``max_size`` a side, and that size."""
    h, w = images.shape[-2:]
    factor = max(1.0, max(h, w) / max_size)
    f = downscale(images.float(), factor)[:, 0]
    hh, ww = f.shape[-2:]
    f = (f - f.mean((-2, -1), keepdim=True)) * _hann(hh, ww, f)
    return torch.fft.rfft2(f), (hh, ww)


def _box3(hh: int, ww: int, like: torch.Tensor) -> torch.Tensor:
    """``(hh, ww // 2 + 1)``: the transfer function of the circular 3 x 3 mean on an ``(hh, ww)`` grid (rfft layout)."""
    ky = torch.fft.fftfreq(hh, dtype=torch.float64, device=like.device)
    kx = torch.fft.rfftfreq(ww, dtype=torch.float64, device=like.device)
    box = ((1 + 2 * torch.cos(2 * torch.pi * ky)) / 3)[:, None] * ((1 + 2 * torch.cos(2 * torch.pi * kx)) / 3)[None, :]
    return box.to(like.dtype)


def _peak(moving: torch.Tensor, fixed: torch.Tensor, size: tuple[int, int], small: tuple[int, int]) -> torch.Tensor:
    """The translation (pixels of ``size``) from the spectra of moving and fixed images (``small`` pixels)."""
    h, w = size
    hh, ww = small
    # the cross-power spectrum, each frequency scaled to unit magnitude (in its real and imaginary parts: complex abs
    # and division took twice the time)
    parts = torch.view_as_real(moving * torch.conj(fixed))
    parts = parts * (parts * parts).sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()
    # A light blur makes the peak robust to noise and to the small rotations that smear it: a circular 3 x 3 mean, as
    # its transfer function times the spectrum (shifted sums of the correlation took 10 ms for 32 pairs of 256 x 256)
    corr = torch.fft.irfft2(torch.view_as_complex(parts) * _box3(hh, ww, parts), s=(hh, ww))
    b = corr.shape[0]
    flat = corr.reshape(b, -1).argmax(-1)
    py, px = flat // ww, flat % ww

    def refine(vals_m: torch.Tensor, vals_0: torch.Tensor, vals_p: torch.Tensor) -> torch.Tensor:
        denom = vals_m - 2 * vals_0 + vals_p
        return torch.where(denom.abs() > 1e-12, 0.5 * (vals_m - vals_p) / denom, torch.zeros_like(denom))

    idx = torch.arange(b, device=corr.device)
    c0 = corr[idx, py, px]
    dx = refine(corr[idx, py, (px - 1) % ww], c0, corr[idx, py, (px + 1) % ww])
    dy = refine(corr[idx, (py - 1) % hh, px], c0, corr[idx, (py + 1) % hh, px])
    sx = px.to(corr.dtype) + dx.clamp(-0.5, 0.5)
    sy = py.to(corr.dtype) + dy.clamp(-0.5, 0.5)
    sx = torch.where(sx > ww / 2, sx - ww, sx)
    sy = torch.where(sy > hh / 2, sy - hh, sy)
    return torch.stack([sx * (w / ww), sy * (h / hh)], -1)
