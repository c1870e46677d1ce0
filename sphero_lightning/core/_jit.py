"""The compiled band kernels of :mod:`.kernels` (numba; imported only when a fit first needs them, so that a small
fit, and every command that fits nothing, never loads numba). Module-level functions: numba caches them on disk.
Each task of the parallel loop sums one band of :data:`BAND_ROWS` rows of one pair into its own row of ``out``
(:data:`WIDTH` sums), so the result does not depend on the number of threads."""

from __future__ import annotations

import math

import numba as _nb

#: Rows of a pair summed together before they are added to the pair's total (one task of the parallel loop).
BAND_ROWS = 32
PAD = 2  # the B-spline coefficients' padding (interpolation.PAD)
N_SUMS = 6  # S1, Sf, Sm, Sff, Smm, Sfm of the centred data
N_MOM = 24  # gradient moments [u: w m, w f, w][d: x, y][j: yn, 1][i: xn, 1]
N_RAMP = 48  # the weight's derivative times [d: x, y][q: 1, f, m, ff, mm, fm][j: yn, 1][i: xn, 1]
N_CURV = 81  # curvature sums [k: 9 products][j: 1, yn, yn^2][i: 1, xn, xn^2]
WIDTH = N_SUMS + N_MOM + N_RAMP + N_CURV

_nb.config.THREADING_LAYER = "workqueue"  # no second OpenMP runtime beside torch's
njit, prange = _nb.njit, _nb.prange

#: Reassociation and fused multiply-adds (the sums vectorize), but NaN and inf keep their meaning.
_FAST = {"contract", "reassoc", "nsz", "arcp"}


@njit(inline="always", fastmath=_FAST)
def tap_row(coeffs, p, y, ix, wx0, wx1, wx2, wx3, dx0, dx1, dx2, dx3):
    """One row of the 4 x 4 taps: the weighted sum of its four coefficients and of their x derivatives' weights."""
    a0 = coeffs[p, y, ix]
    a1 = coeffs[p, y, ix + 1]
    a2 = coeffs[p, y, ix + 2]
    a3 = coeffs[p, y, ix + 3]
    return wx0 * a0 + wx1 * a1 + wx2 * a2 + wx3 * a3, dx0 * a0 + dx1 * a1 + dx2 * a2 + dx3 * a3


@njit(inline="always", fastmath=_FAST)
def taps(p, px, py, coeffs, cm):
    """The cubic B-spline interpolant of pair ``p``'s coefficients at ``(px, py)`` (pixels), less ``cm``, and its x and
    y derivatives: the 4 x 4 taps with their weights and the weights' derivatives."""
    X = px + PAD
    Y = py + PAD
    ixf = math.floor(X)
    iyf = math.floor(Y)
    tx = X - ixf
    ty = Y - iyf
    ix = int(ixf) - 1
    iy = int(iyf) - 1
    tx2 = tx * tx
    ty2 = ty * ty
    omx = 1.0 - tx
    omy = 1.0 - ty
    wx0 = omx * omx * omx * (1.0 / 6.0)
    wx1 = 2.0 / 3.0 - tx2 + 0.5 * tx2 * tx
    wx3 = tx2 * tx * (1.0 / 6.0)
    wx2 = 1.0 - wx0 - wx1 - wx3
    wy0 = omy * omy * omy * (1.0 / 6.0)
    wy1 = 2.0 / 3.0 - ty2 + 0.5 * ty2 * ty
    wy3 = ty2 * ty * (1.0 / 6.0)
    wy2 = 1.0 - wy0 - wy1 - wy3
    dx0 = -0.5 * omx * omx
    dx1 = 1.5 * tx2 - 2.0 * tx
    dx3 = 0.5 * tx2
    dx2 = -(dx0 + dx1 + dx3)
    dy0 = -0.5 * omy * omy
    dy1 = 1.5 * ty2 - 2.0 * ty
    dy3 = 0.5 * ty2
    dy2 = -(dy0 + dy1 + dy3)
    v0, e0 = tap_row(coeffs, p, iy, ix, wx0, wx1, wx2, wx3, dx0, dx1, dx2, dx3)
    v1, e1 = tap_row(coeffs, p, iy + 1, ix, wx0, wx1, wx2, wx3, dx0, dx1, dx2, dx3)
    v2, e2 = tap_row(coeffs, p, iy + 2, ix, wx0, wx1, wx2, wx3, dx0, dx1, dx2, dx3)
    v3, e3 = tap_row(coeffs, p, iy + 3, ix, wx0, wx1, wx2, wx3, dx0, dx1, dx2, dx3)
    mc = wy0 * v0 + wy1 * v1 + wy2 * v2 + wy3 * v3 - cm
    gx = wy0 * e0 + wy1 * e1 + wy2 * e2 + wy3 * e3
    gy = dy0 * v0 + dy1 * v1 + dy2 * v2 + dy3 * v3
    return mc, gx, gy


@njit(inline="always", fastmath=_FAST)
def pixel(p, r, c, px, py, half_w, half_h, inv_ramp, masked, w, h, fixed, coeffs, fmask, mmask, fm, cm):
    """One pixel: weight, weight derivative (x, y), centred moving value, its x and y derivatives, centred fixed
    value; weight -1 where the pixel samples outside the moving slice (nothing counts)."""
    ux = px - half_w
    uy = py - half_h
    dxm = half_w - abs(ux)
    dym = half_h - abs(uy)
    d = min(dxm, dym)
    if d < 0.0:
        return -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    wt = min(d * inv_ramp, 1.0)
    fmv = 1.0
    dwx = 0.0
    dwy = 0.0
    if masked:
        fmv = fmask[p, r, c]
        x0f = math.floor(px)
        y0f = math.floor(py)
        fx = px - x0f
        fy = py - y0f
        x0 = min(max(int(x0f), 0), w - 1)
        y0 = min(max(int(y0f), 0), h - 1)
        x1 = min(max(int(x0f) + 1, 0), w - 1)
        y1 = min(max(int(y0f) + 1, 0), h - 1)
        m00 = mmask[p, y0, x0]
        m01 = mmask[p, y0, x1]
        m10 = mmask[p, y1, x0]
        m11 = mmask[p, y1, x1]
        top = m00 + (m01 - m00) * fx
        bottom = m10 + (m11 - m10) * fx
        mv = top + (bottom - top) * fy
        mvx = (m01 - m00) + ((m11 - m10) - (m01 - m00)) * fy
        mvy = bottom - top
        inner = wt * fmv
        if (mvx != 0.0 or mvy != 0.0) and inner > 0.0:  # the moving mask's boundary
            dwx = inner * mvx
            dwy = inner * mvy
        wt = inner * mv
        fmv = fmv * mv
    if d * inv_ramp <= 1.0 and fmv > 0.0:  # the inside weight's ramp along the border
        if dxm <= dym:
            dwx += (1.0 if ux <= 0.0 else -1.0) * fmv * inv_ramp
        else:
            dwy += (1.0 if uy <= 0.0 else -1.0) * fmv * inv_ramp
    mc, gx, gy = taps(p, px, py, coeffs, cm)
    return wt, dwx, dwy, mc, gx, gy, fixed[p, r, c] - fm

@njit(inline="always")
def inside_range(a, b0, lo, hi, w):
    """Columns ``c`` (half-open, one column inside each end to spare rounding) with ``lo < a c + b0 < hi``."""
    if a > 0.0:
        c0 = (lo - b0) / a
        c1 = (hi - b0) / a
    elif a < 0.0:
        c0 = (hi - b0) / a
        c1 = (lo - b0) / a
    elif lo < b0 < hi:
        return 0, w
    else:
        return 0, 0
    first = max(0, math.ceil(c0) + 1)
    last = min(w, math.floor(c1))
    return first, max(first, last)

@njit(inline="always")
def interior_columns(cx0, cy0, rx, ry, ramp, w, h, masked):
    """The columns ``[lo, hi)`` of a row whose pixels sample further inside the moving slice than the ramp (none
    with masks): there the weight is 1 and has no derivative."""
    if masked:
        return 0, 0
    x_lo, x_hi = inside_range(2.0 * cx0 / w, rx - cx0 + cx0 / w, ramp, (w - 1) - ramp, w)
    y_lo, y_hi = inside_range(2.0 * cy0 / w, ry - cy0 + cy0 / w, ramp, (h - 1) - ramp, w)
    lo = max(x_lo, y_lo)
    return lo, max(lo, min(x_hi, y_hi))


@njit(inline="always", fastmath=_FAST)
def interior(p, r, c, px, py, fixed, coeffs, fm, cm):
    """:func:`pixel` where the pixel lies further inside the moving slice than the ramp and nothing is masked:
    weight 1, no weight derivative, no branch (the bulk of a slice; the loop vectorizes)."""
    mc, gx, gy = taps(p, px, py, coeffs, cm)
    return mc, gx, gy, fixed[p, r, c] - fm

@njit(inline="always")
def pixel_map(theta, p, w, h):
    """Pair ``p``'s sampling position in pixels, ``px = cx0 xn + cx1 yn + cx2`` and ``py = cy0 xn + cy1 yn + cy2``, from
    its normalized matrix ``theta[p]`` (``xn``, ``yn``: the pixel centre in [-1, 1])."""
    return ((w / 2.0) * theta[p, 0, 0], (w / 2.0) * theta[p, 0, 1], (w / 2.0) * theta[p, 0, 2] + (w - 1) / 2.0,
            (h / 2.0) * theta[p, 1, 0], (h / 2.0) * theta[p, 1, 1], (h / 2.0) * theta[p, 1, 2] + (h - 1) / 2.0)


@njit(inline="always", fastmath=_FAST)
def add_pixel(s, wt, mc, f, gx, gy, xn):
    """A row's 18 running sums of :func:`bands` with one more pixel of weight ``wt`` (1 inside the ramp, where the
    products by it fold away): S1, Sf, Sm, Sff, Smm, Sfm, then [u: w m, w f, w][d: x, y][i: xn, 1] of u times d."""
    wm = wt * mc
    wf = wt * f
    return (s[0] + wt, s[1] + wf, s[2] + wm, s[3] + wf * f, s[4] + wm * mc, s[5] + wf * mc,
            s[6] + wm * gx * xn, s[7] + wm * gx, s[8] + wm * gy * xn, s[9] + wm * gy,
            s[10] + wf * gx * xn, s[11] + wf * gx, s[12] + wf * gy * xn, s[13] + wf * gy,
            s[14] + wt * gx * xn, s[15] + wt * gx, s[16] + wt * gy * xn, s[17] + wt * gy)


@njit(inline="always")
def ramp_sums(acc, dwx, dwy, f, mc, xn, yn):
    """Where the weight has a derivative (a thin border and mask boundaries): its moments, per sum it enters."""
    for k in range(2):
        dw = dwx if k == 0 else dwy
        if dw == 0.0:
            continue
        for q in range(6):
            pq = 1.0 if q == 0 else (f if q == 1 else (mc if q == 2 else (f * f if q == 3 else (
                mc * mc if q == 4 else f * mc))))
            base = N_SUMS + N_MOM + (k * 6 + q) * 4
            v = dw * pq
            acc[base] += v * yn * xn
            acc[base + 1] += v * yn
            acc[base + 2] += v * xn
            acc[base + 3] += v

@njit(cache=True, parallel=True, fastmath=_FAST, nogil=True)
def bands(theta, fixed, coeffs, fmean, cmean, ramp, fmask, mmask, out):
    """Loss and gradient sums (no curvature): ``out[p, band]`` of every pair and band of rows."""
    b, h, w = fixed.shape
    nband = (h + BAND_ROWS - 1) // BAND_ROWS
    half_w = (w - 1) / 2.0
    half_h = (h - 1) / 2.0
    inv_ramp = 1.0 / ramp
    masked = fmask.shape[0] > 0
    for task in prange(b * nband):
        p = task // nband
        acc = out[p, task % nband]
        r_lo = (task % nband) * BAND_ROWS
        cx0, cx1, cx2, cy0, cy1, cy2 = pixel_map(theta, p, w, h)
        fm = fmean[p]
        cm = cmean[p]
        for r in range(r_lo, min(h, r_lo + BAND_ROWS)):
            yn = (2.0 * r + 1.0) / h - 1.0
            rx = cx1 * yn + cx2
            ry = cy1 * yn + cy2
            sums = (0.0,) * 18  # S1, Sf, Sm, Sff, Smm, Sfm, then the gradient's moments m0..m11 of the row
            # the columns further inside than the ramp (px and py are linear in c): the branch-free loop
            lo, hi = interior_columns(cx0, cy0, rx, ry, ramp, w, h, masked)
            for c in range(lo, hi):
                xn = (2.0 * c + 1.0) / w - 1.0
                mc, gx, gy, f = interior(p, r, c, cx0 * xn + rx, cy0 * xn + ry, fixed, coeffs, fm, cm)
                sums = add_pixel(sums, 1.0, mc, f, gx, gy, xn)
            for k in range(w - (hi - lo)):  # the other columns: [0, lo) and [hi, w)
                c = k if k < lo else k + (hi - lo)
                xn = (2.0 * c + 1.0) / w - 1.0
                wt, dwx, dwy, mc, gx, gy, f = pixel(p, r, c, cx0 * xn + rx, cy0 * xn + ry, half_w, half_h, inv_ramp,
                                                    masked, w, h, fixed, coeffs, fmask, mmask, fm, cm)
                if wt < 0.0:
                    continue
                sums = add_pixel(sums, wt, mc, f, gx, gy, xn)
                if dwx != 0.0 or dwy != 0.0:
                    ramp_sums(acc, dwx, dwy, f, mc, xn, yn)
            for k in range(N_SUMS):
                acc[k] += sums[k]
            # [u][d] x (yn xn, yn, xn, 1)
            for k in range(6):
                sx, s1_ = sums[N_SUMS + 2 * k], sums[N_SUMS + 2 * k + 1]
                base = N_SUMS + 4 * k
                acc[base] += yn * sx
                acc[base + 1] += yn * s1_
                acc[base + 2] += sx
                acc[base + 3] += s1_

@njit(cache=True, parallel=True, fastmath=_FAST, nogil=True)
def curvature(theta, fixed, coeffs, fmean, cmean, ramp, fmask, mmask, fcoeffs, want, out):
    """The Gauss-Newton curvature's sums of the pairs ``want`` (one pass, beside :func:`bands`)."""
    b, h, w = fixed.shape
    nband = (h + BAND_ROWS - 1) // BAND_ROWS
    half_w = (w - 1) / 2.0
    half_h = (h - 1) / 2.0
    inv_ramp = 1.0 / ramp
    masked = fmask.shape[0] > 0
    for task in prange(b * nband):
        p = task // nband
        if not want[p]:
            continue
        acc = out[p, task % nband]
        r_lo = (task % nband) * BAND_ROWS
        cx0, cx1, cx2, cy0, cy1, cy2 = pixel_map(theta, p, w, h)
        fm = fmean[p]
        cm = cmean[p]
        for r in range(r_lo, min(h, r_lo + BAND_ROWS)):
            yn = (2.0 * r + 1.0) / h - 1.0
            rx = cx1 * yn + cx2
            ry = cy1 * yn + cy2
            # sum over the row of [k: gx', gy', gx' mx, gx' my, gy' mx, gy' my, gx' gx', gx' gy', gy' gy'] times
            # [i: 1, xn, xn^2], where g' is the weighted fixed slice's derivative
            k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = k8 = 0.0
            x0 = x1 = x2 = x3 = x4 = x5 = x6 = x7 = x8 = 0.0
            q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = q8 = 0.0
            lo, hi = interior_columns(cx0, cy0, rx, ry, ramp, w, h, masked)
            for c in range(w):
                xn = (2.0 * c + 1.0) / w - 1.0
                if lo <= c < hi:  # weight 1: the branch-free sample
                    wt = 1.0
                    _mc, gx, gy, _f = interior(p, r, c, cx0 * xn + rx, cy0 * xn + ry, fixed, coeffs, fm, cm)
                else:
                    wt, _dwx, _dwy, _mc, gx, gy, _f = pixel(p, r, c, cx0 * xn + rx, cy0 * xn + ry, half_w, half_h,
                                                            inv_ramp, masked, w, h, fixed, coeffs, fmask, mmask, fm, cm)
                    if wt <= 0.0:
                        continue
                # the fixed slice's interpolant derivatives at the pixel centres: central differences of its
                # coefficients, halved
                gfx = 0.5 * (fcoeffs[p, PAD + r, PAD + c + 1] - fcoeffs[p, PAD + r, PAD + c - 1])
                gfy = 0.5 * (fcoeffs[p, PAD + r + 1, PAD + c] - fcoeffs[p, PAD + r - 1, PAD + c])
                wgx = gfx * wt
                wgy = gfy * wt
                xx = xn * xn
                k0 += wgx
                x0 += wgx * xn
                q0 += wgx * xx
                k1 += wgy
                x1 += wgy * xn
                q1 += wgy * xx
                v = wgx * gx
                k2 += v
                x2 += v * xn
                q2 += v * xx
                v = wgx * gy
                k3 += v
                x3 += v * xn
                q3 += v * xx
                v = wgy * gx
                k4 += v
                x4 += v * xn
                q4 += v * xx
                v = wgy * gy
                k5 += v
                x5 += v * xn
                q5 += v * xx
                v = wgx * gfx
                k6 += v
                x6 += v * xn
                q6 += v * xx
                v = wgx * gfy
                k7 += v
                x7 += v * xn
                q7 += v * xx
                v = wgy * gfy
                k8 += v
                x8 += v * xn
                q8 += v * xx
            y2 = yn * yn
            for k, (v0, v1, v2) in enumerate(((k0, x0, q0), (k1, x1, q1), (k2, x2, q2), (k3, x3, q3), (k4, x4, q4),
                                              (k5, x5, q5), (k6, x6, q6), (k7, x7, q7), (k8, x8, q8))):
                base = N_SUMS + N_MOM + N_RAMP + 9 * k
                acc[base] += v0
                acc[base + 1] += v1
                acc[base + 2] += v2
                acc[base + 3] += yn * v0
                acc[base + 4] += yn * v1
                acc[base + 5] += yn * v2
                acc[base + 6] += y2 * v0
                acc[base + 7] += y2 * v1
                acc[base + 8] += y2 * v2

