"""Warping one window of the output from only the part of the source it needs, bit for bit as the whole slice.

The writer works one output chunk (or shard) at a time and reads only the source region that the chunk's
transform maps into. Two things make that region's result equal to the whole slice's to the last bit, so the
output does not depend on the chunking:

- :func:`prefilter_window` computes the cubic B-spline coefficients of a window with the same arithmetic as
  :func:`~sphero_lightning.core.interpolation.bspline_prefilter` does for the whole slice: along an axis longer
  than ``DENSE_MAX`` the prefilter is a truncated filter applied in windows that start at every multiple of
  ``_BAND`` of the full axis, so a region aligned to those windows (plus the filter's radius) repeats the very
  same products; a shorter axis uses the exact dense inverse and is always taken whole.
- :func:`window_canvas` places the window into an uninitialised tensor of the whole (padded) slice's size, so
  that sampling uses the very same normalised positions as on the whole slice. Only the window's pages are
  ever touched (the rest of the allocation stays virtual), so memory follows the window, not the slice.

``tests/test_windows.py`` checks both against the whole-slice computation with ``torch.equal``, with the rest of
the canvas filled with NaN (any read outside the window would show).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .interpolation import (
    _BAND,
    _RADIUS,
    DENSE_MAX,
    PAD,
    _axis_matrix,
    _prefilter_kernel,
    band_matrix,
    window_pixel_positions,
)

#: Extra samples kept on each side of what the interpolation kernel reads (floating-point slack in positions).
SLACK = 2
#: Value of the canvas outside the window; tests set NaN, so that a read outside the window shows.
CANVAS_FILL: float | None = None


def _band_windows(lo: int, hi: int, n: int) -> tuple[int, int]:
    """The ``_BAND`` windows ``[jlo, jhi)`` of an axis of length ``n`` holding padded coefficients ``[lo, hi)``."""
    ylo, yhi = max(0, lo - PAD), min(n, hi - PAD)
    if lo < PAD:  # mirrored coefficients at the start repeat samples 1..PAD
        yhi = max(yhi, PAD + 1)
    if hi > n + PAD:  # and at the end n-1-PAD..n-2
        ylo = min(ylo, n - 1 - PAD)
    return ylo // _BAND, -(-max(yhi, ylo + 1) // _BAND)


def source_span(lo: int, hi: int, n: int) -> tuple[int, int]:
    """Source samples ``[a, b)`` along an axis of length ``n`` that padded coefficients ``[lo, hi)`` depend on."""
    if n <= DENSE_MAX:
        return 0, n
    jlo, jhi = _band_windows(lo, hi, n)
    return max(0, jlo * _BAND - _RADIUS), min(n, jhi * _BAND + _RADIUS)


def _mirror_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample mirror of indices that lie at most ``n - 1`` outside ``0..n-1``."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def _banded_last(x: torch.Tensor, n: int, start: int, lo: int, hi: int) -> torch.Tensor:
    """Padded coefficients ``[lo, hi)`` along the last axis of ``x`` (samples ``start..`` of an axis of length
    ``n > DENSE_MAX``), as ``interpolation._fir_last`` followed by the mirrored ``PAD`` computes them."""
    kernel = _prefilter_kernel(_RADIUS, torch.float64, "cpu")
    jlo, jhi = _band_windows(lo, hi, n)
    g = torch.arange(jlo * _BAND, jhi * _BAND + 2 * _RADIUS, device=x.device)  # positions in the padded axis
    i = g - _RADIUS
    zero = i >= n + _RADIUS  # the zeros that fill the last window
    i = torch.where(zero, start, _mirror_index(i, n)) - start
    rows = x.reshape(-1, x.shape[-1])
    xp = rows[:, i]
    if bool(zero.any()):
        xp[:, zero] = 0
    band = band_matrix(kernel, x.dtype, x.device)
    # one contiguous (windows, samples) matrix, as matmul folds the whole axis's windows: a single window as a
    # (rows, 1, samples) view would take a batched path whose sums differ in the last bit
    win = xp.unfold(-1, _BAND + 2 * _RADIUS, _BAND).reshape(-1, _BAND + 2 * _RADIUS).contiguous()
    y = torch.mm(win, band).reshape(rows.shape[0], (jhi - jlo) * _BAND)
    p = torch.arange(lo, hi, device=x.device)
    return y[:, _mirror_index(p - PAD, n) - jlo * _BAND].reshape(*x.shape[:-1], hi - lo)


def prefilter_window(x: torch.Tensor, full_shape: tuple[int, int], start: tuple[int, int],
                     rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """Cubic B-spline coefficients ``rows x cols`` (padded indices, as in ``bspline_prefilter``'s output) of a
    slice of ``full_shape``, from the source samples ``x`` (``(h, w)``, top-left at ``start``), which must cover
    :func:`source_span` of both ranges. Equal to ``bspline_prefilter(whole slice)[rows, cols]`` bit for bit."""
    (hh, ww), (y0, x0) = full_shape, start
    h, w = x.shape
    if source_span(*rows, hh)[0] < y0 or source_span(*rows, hh)[1] > y0 + h \
            or source_span(*cols, ww)[0] < x0 or source_span(*cols, ww)[1] > x0 + w:
        raise ValueError(f"samples at {start} of size {(h, w)} do not cover coefficients {rows} x {cols} of {full_shape}")
    # along x first, then y: the order bspline_prefilter uses
    if ww <= DENSE_MAX:
        out = (x[None] @ _axis_matrix("prefilter", ww, 0.0, x.dtype, x.device).T)[..., cols[0]:cols[1]]
    else:
        out = _banded_last(x[None], ww, x0, *cols)
    if hh <= DENSE_MAX:
        out = (_axis_matrix("prefilter", hh, 0.0, x.dtype, x.device) @ out)[:, rows[0]:rows[1]]
    else:
        out = _banded_last(out.transpose(-1, -2), hh, y0, *rows).transpose(-1, -2)
    return out[0].contiguous()


def coefficient_bounds(p: torch.Tensor, n: int) -> tuple[int, int]:
    """Padded coefficients ``[lo, hi)`` along an axis of length ``n`` that B-spline sampling at positions ``p``
    (pixel units) reads: four around each position, and :data:`SLACK` more on each side."""
    i_lo, i_hi = math.floor(float(p.min())) + PAD, math.floor(float(p.max())) + PAD
    return max(0, min(n + 2 * PAD - 1, i_lo - 1 - SLACK)), min(n + 2 * PAD, max(1, i_hi + 3 + SLACK))


def sample_bounds(p: torch.Tensor, n: int) -> tuple[int, int]:
    """Samples ``[lo, hi)`` along an axis of length ``n`` that bicubic or bilinear sampling at ``p`` reads."""
    return (max(0, min(n - 1, math.floor(float(p.min())) - 1 - SLACK)),
            min(n, max(1, math.floor(float(p.max())) + 3 + SLACK)))


def window_canvas(block: torch.Tensor, size: tuple[int, int], at: tuple[int, int]) -> torch.Tensor:
    """``(1, 1, *size)`` tensor holding ``block`` at ``at``; the rest uninitialised (never read, never resident)."""
    canvas = torch.empty((1, 1, *size), dtype=block.dtype, device=block.device)
    if CANVAS_FILL is not None:
        canvas.fill_(CANVAS_FILL)
    canvas[0, 0, at[0]:at[0] + block.shape[0], at[1]:at[1] + block.shape[1]] = block
    return canvas


def corner_positions(theta: torch.Tensor, full_shape: tuple[int, int], out_shape: tuple[int, int],
                     offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions (pixel units) of an output window's four corner pixels: an affine map takes its extremes
    there, so they bound what the window samples without computing every position."""
    pts = [window_pixel_positions(theta, full_shape, (1, 1), (offset[0] + dy, offset[1] + dx), full_shape)
           for dy in (0, out_shape[0] - 1) for dx in (0, out_shape[1] - 1)]
    return torch.cat([p[0].flatten() for p in pts]), torch.cat([p[1].flatten() for p in pts])


def bspline_window(read: Callable[[int, int, int, int], torch.Tensor], theta: torch.Tensor, full_shape: tuple[int, int],
                   out_shape: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    """The coefficient canvas of one output window, reading only the source region it needs.

    ``read(y0, y1, x0, x1)`` returns those source samples as a float tensor. ``warp_coefficients(canvas, theta,
    full_shape, out_shape, offset, full_shape)`` then equals the same call on ``bspline_prefilter(whole slice)``.
    """
    hh, ww = full_shape
    px, py = corner_positions(theta, full_shape, out_shape, offset)
    rows, cols = coefficient_bounds(py, hh), coefficient_bounds(px, ww)
    (a, b), (c, d) = source_span(*rows, hh), source_span(*cols, ww)
    coeffs = prefilter_window(read(a, b, c, d), full_shape, (a, c), rows, cols)
    return window_canvas(coeffs, (hh + 2 * PAD, ww + 2 * PAD), (rows[0], cols[0]))
