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

``tests/core/test_windows.py`` checks both against the whole-slice computation with ``torch.equal``, with the rest of
the canvas filled with NaN (any read outside the window would show).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .frames import normalized_coords, pixel_coords
from .interpolation import (
    _BAND,
    _RADIUS,
    DENSE_MAX,
    PAD,
    _axis_matrix,
    _prefilter_kernel,
    band_matrix,
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
    g0, g1 = jlo * _BAND - _RADIUS, jhi * _BAND + _RADIUS  # the samples the windows cover (beyond 0..n-1: mirrored, zeros)
    rows = x.flatten(0, -2)  # a view where it can be (the second pass's transposed input is read in place)
    xp = rows[:, max(g0, 0) - start:min(g1, n) - start]
    left, right = max(0, -g0), max(0, min(g1, n + _RADIUS) - n)
    zeros = max(0, g1 - n - _RADIUS)
    if left or right or zeros:
        # a window at either end of the axis: mirrored samples (as F.pad's reflect: the end sample not repeated) and
        # the zeros that fill the axis's last window, in one copy (F.pad's reflect on the CPU took 15 ms per 256 lines)
        xp = torch.cat([xp[:, 1:left + 1].flip(-1), xp, xp[:, xp.shape[-1] - 1 - right:xp.shape[-1] - 1].flip(-1),
                        xp.new_zeros(xp.shape[0], zeros)], -1)
    band = band_matrix(kernel, x.dtype, x.device)
    # one contiguous (windows, samples) matrix, as matmul folds the whole axis's windows: a single window as a
    # (rows, 1, samples) view would take a batched path whose sums differ in the last bit
    win = xp.unfold(-1, _BAND + 2 * _RADIUS, _BAND).reshape(-1, _BAND + 2 * _RADIUS).contiguous()
    del xp
    y = torch.mm(win, band).reshape(rows.shape[0], (jhi - jlo) * _BAND)
    del win
    if lo >= PAD and hi <= n + PAD:  # no mirrored coefficients: a plain slice
        y = y[:, lo - PAD - jlo * _BAND:hi - PAD - jlo * _BAND]
    else:
        y = y[:, _mirror_index(torch.arange(lo, hi, device=x.device) - PAD, n) - jlo * _BAND]
    return y.reshape(*x.shape[:-1], hi - lo)


def prefilter_window(x: torch.Tensor, full_shape: tuple[int, int], start: tuple[int, int],
                     rows: tuple[int, int], cols: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Cubic B-spline coefficients ``rows x cols`` (padded indices, as in ``bspline_prefilter``'s output) of a
    slice of ``full_shape``, from the source samples ``x`` (``(h, w)``, top-left at ``start``), which must cover
    :func:`source_span` of both ranges. Equal to ``bspline_prefilter(whole slice)[rows, cols]`` bit for bit.
    With ``out`` (a ``rows x cols`` tensor or view), written there and returned."""
    (hh, ww), (y0, x0) = full_shape, start
    h, w = x.shape
    if source_span(*rows, hh)[0] < y0 or source_span(*rows, hh)[1] > y0 + h \
            or source_span(*cols, ww)[0] < x0 or source_span(*cols, ww)[1] > x0 + w:
        raise ValueError(f"samples at {start} of size {(h, w)} do not cover coefficients {rows} x {cols} of {full_shape}")
    return _along_y(_along_x(x, ww, x0, cols), hh, y0, rows, out)


#: Rows (first pass) or columns (second pass) filtered at once on a long axis: bounds the temporaries of a window
#: (the windows matrix is 1.5x its input) without changing a bit (each output sample's sum is the same).
_LINES = 256


def _along_x(x: torch.Tensor, ww: int, x0: int, cols: tuple[int, int]) -> torch.Tensor:
    """The first pass (along x, as ``bspline_prefilter``): ``(1, h, cols)``."""
    if ww <= DENSE_MAX:
        return (x[None] @ _axis_matrix("prefilter", ww, 0.0, x.dtype, x.device).T)[..., cols[0]:cols[1]]
    out = torch.empty((1, x.shape[0], cols[1] - cols[0]), dtype=x.dtype, device=x.device)
    for r in range(0, x.shape[0], _LINES):
        out[0, r:r + _LINES] = _banded_last(x[r:r + _LINES], ww, x0, *cols)
    return out


def _along_y(along_x: torch.Tensor, hh: int, y0: int, rows: tuple[int, int], out: torch.Tensor | None) -> torch.Tensor:
    """The second pass (along y) of :func:`_along_x`'s result, into ``out`` if given."""
    if hh <= DENSE_MAX:
        result = (_axis_matrix("prefilter", hh, 0.0, along_x.dtype, along_x.device) @ along_x)[0, rows[0]:rows[1]]
        return result.contiguous() if out is None else out.copy_(result)
    if out is None:
        out = torch.empty((rows[1] - rows[0], along_x.shape[-1]), dtype=along_x.dtype, device=along_x.device)
    for c in range(0, along_x.shape[-1], _LINES):
        out[:, c:c + _LINES] = _banded_last(along_x[0, :, c:c + _LINES].T, hh, y0, *rows).T
    return out


def coefficient_bounds(p: torch.Tensor, n: int) -> tuple[int, int]:
    """Padded coefficients ``[lo, hi)`` along an axis of length ``n`` that B-spline sampling at positions ``p``
    (pixel units) reads: four around each position, and :data:`SLACK` more on each side."""
    i_lo, i_hi = math.floor(float(p.min())) + PAD, math.floor(float(p.max())) + PAD
    return max(0, min(n + 2 * PAD - 1, i_lo - 1 - SLACK)), min(n + 2 * PAD, max(1, i_hi + 3 + SLACK))


def sample_bounds(p: torch.Tensor, n: int) -> tuple[int, int]:
    """Samples ``[lo, hi)`` along an axis of length ``n`` that bicubic or bilinear sampling at ``p`` reads."""
    return (max(0, min(n - 1, math.floor(float(p.min())) - 1 - SLACK)),
            min(n, max(1, math.floor(float(p.max())) + 3 + SLACK)))


def window_canvas(block: torch.Tensor | None, size: tuple[int, int], at: tuple[int, int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1, 1, *size)`` tensor holding ``block`` at ``at`` (with ``None``, of ``dtype`` on ``device``, to be filled by
    the caller); the rest uninitialised (never read, never resident)."""
    if block is not None:
        dtype, device = block.dtype, block.device
    canvas = torch.empty((1, 1, *size), dtype=dtype, device=device)
    if CANVAS_FILL is not None:
        canvas.fill_(CANVAS_FILL)
    if block is not None:
        canvas[0, 0, at[0]:at[0] + block.shape[0], at[1]:at[1] + block.shape[1]] = block
    return canvas


def corner_positions(theta: torch.Tensor, full_shape: tuple[int, int], out_shape: tuple[int, int],
                     offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions (pixel units) of an output window's four corner pixels: an affine map takes its extremes
    there, so they bound what the window samples without computing every position. In float64 (the exact
    positions differ from these by rounding only; callers keep :data:`SLACK` samples more)."""
    (hh, ww), t = full_shape, theta[0].double().cpu().tolist()
    xs, ys = [], []
    for dy in (0, out_shape[0] - 1):
        for dx in (0, out_shape[1] - 1):
            gx, gy = normalized_coords(offset[1] + dx, ww), normalized_coords(offset[0] + dy, hh)
            xs.append(pixel_coords(t[0][0] * gx + t[0][1] * gy + t[0][2], ww))
            ys.append(pixel_coords(t[1][0] * gx + t[1][1] * gy + t[1][2], hh))
    return torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)


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
    x = read(a, b, c, d)
    along_x = _along_x(x, ww, c, cols)
    dtype, device = x.dtype, x.device
    del x  # the samples are not needed for the second pass: one slice less in memory per task
    canvas = window_canvas(None, (hh + 2 * PAD, ww + 2 * PAD), (rows[0], cols[0]), dtype, device)
    _along_y(along_x, hh, a, rows, canvas[0, 0, rows[0]:rows[1], cols[0]:cols[1]])
    return canvas
