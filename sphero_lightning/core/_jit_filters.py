"""The compiled filters of a level's images (numba; loaded with :mod:`._jit`, only by fits that use the compiled
evaluation): the cubic B-spline prefilter as its recursive filter and the Gaussian pre-smoothing as a separable
filter, the same values as :mod:`.interpolation` 's dense matrix products to float32 rounding with a fraction of
their arithmetic. One task per slice. And the writer's compiled warp of one slice (:func:`prefilter_slice`,
:func:`sample_window`), on the calling thread."""

from __future__ import annotations

import math

import numpy as np

from ._jit import PAD, cubic_weights, njit, prange

#: The cubic B-spline prefilter's pole, and the causal initialisation's horizon (|pole|^k below 1e-13 beyond it).
POLE = math.sqrt(3.0) - 2.0
HORIZON = 23


@njit(inline="always")
def _iir_line(line, n):
    """Cubic B-spline coefficients of ``line[:n]`` in place (float64; whole-sample mirror boundaries): the causal and
    anti-causal recursions of Unser (1999), gain 6; exact for the mirror-extended line (to |pole|^HORIZON)."""
    z = POLE
    if n == 1:
        return
    if n > HORIZON:  # the causal start: sum of z^k s[k] (the terms beyond the horizon are below rounding)
        c0 = 0.0
        zk = 1.0
        for k in range(HORIZON):
            c0 += zk * line[k]
            zk *= z
    else:  # short lines: the mirror-periodic sum in closed form
        zn = z ** (n - 1)
        iz = 1.0 / z
        z2n = zn * zn * iz
        c0 = line[0] + zn * line[n - 1]
        zk = z
        for k in range(1, n - 1):
            c0 += (zk + z2n) * line[k]
            zk *= z
            z2n *= iz
        c0 /= 1.0 - zn * zn
    line[0] = c0
    for k in range(1, n):
        line[k] += z * line[k - 1]
    line[n - 1] = (z / (z * z - 1.0)) * (line[n - 1] + z * line[n - 2])
    for k in range(n - 2, -1, -1):
        line[k] = z * (line[k + 1] - line[k])
    for k in range(n):
        line[k] *= 6.0


@njit(inline="always")
def _iir_columns(tmp, h, w):
    """:func:`_iir_line` down every column of ``tmp[:h, :w]`` at once (row by row: contiguous, vectorized)."""
    z = POLE
    if h == 1:
        return
    c0 = np.zeros(w)
    if h > HORIZON:
        zk = 1.0
        for k in range(HORIZON):
            for c in range(w):
                c0[c] += zk * tmp[k, c]
            zk *= z
    else:
        zn = z ** (h - 1)
        iz = 1.0 / z
        z2n = zn * zn * iz
        for c in range(w):
            c0[c] = tmp[0, c] + zn * tmp[h - 1, c]
        zk = z
        for k in range(1, h - 1):
            for c in range(w):
                c0[c] += (zk + z2n) * tmp[k, c]
            zk *= z
            z2n *= iz
        for c in range(w):
            c0[c] /= 1.0 - zn * zn
    for c in range(w):
        tmp[0, c] = c0[c]
    for r in range(1, h):
        for c in range(w):
            tmp[r, c] += z * tmp[r - 1, c]
    a = z / (z * z - 1.0)
    for c in range(w):
        tmp[h - 1, c] = a * (tmp[h - 1, c] + z * tmp[h - 2, c])
    for r in range(h - 2, -1, -1):
        for c in range(w):
            tmp[r, c] = z * (tmp[r + 1, c] - tmp[r, c])


@njit(inline="always")
def _prefilter_one(x, out):
    """:func:`prefilter` of one ``(h, w)`` slice into ``out`` ``(h + 2 PAD, w + 2 PAD)``."""
    h, w = x.shape
    tmp = np.empty((h, w))
    line = np.empty(w)
    for r in range(h):
        for c in range(w):
            line[c] = x[r, c]
        _iir_line(line, w)
        for c in range(w):
            tmp[r, c] = line[c]
    _iir_columns(tmp, h, w)
    for r in range(h + 2 * PAD):
        rr = _mirror(r - PAD, h)
        for c in range(PAD):
            out[r, c] = 6.0 * tmp[rr, _mirror(c - PAD, w)]
            out[r, w + PAD + c] = 6.0 * tmp[rr, _mirror(w + c, w)]
        for c in range(w):
            out[r, c + PAD] = 6.0 * tmp[rr, c]


@njit(cache=True, parallel=True, nogil=True)
def prefilter(x, out):
    """``out[p]`` ``(h + 2 PAD, w + 2 PAD)``: the cubic B-spline coefficients of ``x[p]`` ``(h, w)`` along both axes
    (:func:`_iir_line`), with ``PAD`` mirrored coefficients on every side (:func:`.interpolation.bspline_prefilter`)."""
    for p in prange(x.shape[0]):
        _prefilter_one(x[p], out[p])


@njit(cache=True, nogil=True)
def prefilter_slice(x, out):
    """:func:`prefilter` of one slice ``x`` ``(h, w)`` on the calling thread (the writer's tasks each run on a thread
    of their own: numba's parallel loops must not be entered from several threads at once)."""
    _prefilter_one(x, out)


@njit(inline="always")
def _mirror(i, n):
    """Whole-sample mirror of an index into ``0..n - 1``."""
    if n == 1:
        return 0
    period = 2 * n - 2
    i = i % period
    return period - i if i >= n else i


@njit(cache=True, parallel=True, nogil=True)
def blur(x, kernel, out):
    """``out[p]``: ``x[p]`` ``(h, w)`` filtered by the symmetric ``kernel`` (odd length) along both axes, replicated
    border (:func:`.interpolation.gaussian_blur`); sums in float64."""
    b, h, w = x.shape
    r = len(kernel) // 2
    for p in prange(b):
        tmp = np.zeros((h, w))
        line = np.empty(w + 2 * r)  # a row with its replicated border: the taps read it without clamping (vectorized)
        for y in range(h):
            for c in range(w + 2 * r):
                line[c] = x[p, y, min(max(c - r, 0), w - 1)]
            acc = tmp[y]
            for o in range(2 * r + 1):  # each pixel's sum in the order of the taps, as the torch filter's
                k = kernel[o]
                for c in range(w):
                    acc[c] += k * line[c + o]
        row = np.empty(w)
        for y in range(h):
            row[:] = 0.0
            for o in range(-r, r + 1):
                yy = min(max(y + o, 0), h - 1)
                k = kernel[o + r]
                for c in range(w):
                    row[c] += k * tmp[yy, c]
            for c in range(w):
                out[p, y, c] = row[c]


@njit(inline="always")
def _bilinear(c, x, y):
    """``c`` at padded position ``(x, y)``, bilinear, the position clamped to the array (``grid_sample``'s border)."""
    hh, ww = c.shape
    x = min(max(x, 0.0), ww - 1.0)
    y = min(max(y, 0.0), hh - 1.0)
    x0 = int(x)
    y0 = int(y)
    fx = x - x0
    fy = y - y0
    x1 = min(x0 + 1, ww - 1)
    y1 = min(y0 + 1, hh - 1)
    top = (1.0 - fx) * c[y0, x0] + fx * c[y0, x1]
    return (1.0 - fy) * top + fy * ((1.0 - fx) * c[y1, x0] + fx * c[y1, x1])


@njit(inline="always")
def _merged_taps(x):
    """The two merged bilinear taps of one axis at padded position ``x`` and the first one's weight (as
    :func:`.interpolation.axis_taps`)."""
    i = math.floor(x)
    w0, w1, w2, w3 = cubic_weights(x - i)
    return w0 + w1, i - 1.0 + w1 / (w0 + w1), i + 1.0 + w3 / (w2 + w3)


@njit(cache=True, nogil=True)
def sample_window(c, m, r0, c0, lo, hi, rounding, out):
    """``out`` ``(oh, ow)``: the cubic B-spline interpolant of the padded coefficients ``c`` at the source positions of
    output pixels ``r0 ..``, ``c0 ..``: ``px = m[0] x + m[1] y + m[2]`` and ``py = m[3] x + m[4] y + m[5]`` (pixel
    indices, a pixel matrix). Where the 4 x 4 taps lie inside ``c`` they are summed directly; further out (beyond the
    mirrored pad) as ``bspline_sample`` does: two merged bilinear taps a side, clamped to the border. With
    ``rounding``, rounded half to even and clipped to ``[lo, hi]``. On the calling thread."""
    hh, ww = c.shape
    oh, ow = out.shape
    for r in range(oh):
        rx = m[1] * (r0 + r) + m[2] + PAD
        ry = m[4] * (r0 + r) + m[5] + PAD
        for k in range(ow):
            x = m[0] * (c0 + k) + rx
            y = m[3] * (c0 + k) + ry
            if 1.0 <= x < ww - 2.0 and 1.0 <= y < hh - 2.0:
                ix = int(x)
                iy = int(y)
                a0, a1, a2, a3 = cubic_weights(x - ix)
                b0, b1, b2, b3 = cubic_weights(y - iy)
                ix -= 1
                iy -= 1
                v = b0 * (a0 * c[iy, ix] + a1 * c[iy, ix + 1] + a2 * c[iy, ix + 2] + a3 * c[iy, ix + 3])
                v += b1 * (a0 * c[iy + 1, ix] + a1 * c[iy + 1, ix + 1] + a2 * c[iy + 1, ix + 2] + a3 * c[iy + 1, ix + 3])
                v += b2 * (a0 * c[iy + 2, ix] + a1 * c[iy + 2, ix + 1] + a2 * c[iy + 2, ix + 2] + a3 * c[iy + 2, ix + 3])
                v += b3 * (a0 * c[iy + 3, ix] + a1 * c[iy + 3, ix + 1] + a2 * c[iy + 3, ix + 2] + a3 * c[iy + 3, ix + 3])
            else:
                gx, qx0, qx1 = _merged_taps(x)
                gy, qy0, qy1 = _merged_taps(y)
                v = gy * (gx * _bilinear(c, qx0, qy0) + (1.0 - gx) * _bilinear(c, qx1, qy0)) + \
                    (1.0 - gy) * (gx * _bilinear(c, qx0, qy1) + (1.0 - gx) * _bilinear(c, qx1, qy1))
            if rounding:
                v = min(max(np.rint(v), lo), hi)
            out[r, k] = v
