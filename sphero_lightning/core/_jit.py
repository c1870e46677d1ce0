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


@njit(inline="always")
def cubic_weights(f):
    """The cubic B-spline's four weights at fraction ``f`` (taps ``i - 1 .. i + 2``)."""
    omf = 1.0 - f
    f2 = f * f
    w0 = omf * omf * omf * (1.0 / 6.0)
    w1 = 2.0 / 3.0 - f2 + 0.5 * f2 * f
    w3 = f2 * f * (1.0 / 6.0)
    return w0, w1, 1.0 - w0 - w1 - w3, w3


@njit(inline="always", fastmath=_FAST)
def taps(p, px, py, coeffs, cm):
    """The cubic B-spline interpolant of coefficient image ``p`` at ``(px, py)`` (pixels), less ``cm``, and its x and
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
    wx0, wx1, wx2, wx3 = cubic_weights(tx)
    wy0, wy1, wy2, wy3 = cubic_weights(ty)
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
def pixel(p, fp, mp, r, c, px, py, half_w, half_h, inv_ramp, masked, w, h, fixed, coeffs, fmask, mmask, fm, cm):
    """One pixel of pair ``p`` (fixed image ``fp``, moving coefficients ``mp``): weight, weight derivative (x, y),
    centred moving value, its x and y derivatives, centred fixed value; weight -1 where the pixel samples outside the
    moving slice (nothing counts)."""
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
    mc, gx, gy = taps(mp, px, py, coeffs, cm)
    return wt, dwx, dwy, mc, gx, gy, fixed[fp, r, c] - fm

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
def interior(fp, mp, r, c, px, py, fixed, coeffs, fm, cm):
    """:func:`pixel` where the pixel lies further inside the moving slice than the ramp and nothing is masked:
    weight 1, no weight derivative, no branch (the bulk of a slice; the loop vectorizes)."""
    mc, gx, gy = taps(mp, px, py, coeffs, cm)
    return mc, gx, gy, fixed[fp, r, c] - fm

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

@njit(inline="always", fastmath=_FAST)
def add_curvature(k, wt, gx, gy, gfx, gfy, xn):
    """A row's 27 running sums of the Gauss-Newton curvature with one more pixel: [k: gx', gy', gx' mx, gx' my,
    gy' mx, gy' my, gx' gx', gx' gy', gy' gy'] times [i: 1, xn, xn^2], where g' is the fixed slice's derivative
    times the weight ``wt``."""
    wgx = gfx * wt
    wgy = gfy * wt
    xx = xn * xn
    v2 = wgx * gx
    v3 = wgx * gy
    v4 = wgy * gx
    v5 = wgy * gy
    v6 = wgx * gfx
    v7 = wgx * gfy
    v8 = wgy * gfy
    return (k[0] + wgx, k[1] + wgx * xn, k[2] + wgx * xx, k[3] + wgy, k[4] + wgy * xn, k[5] + wgy * xx,
            k[6] + v2, k[7] + v2 * xn, k[8] + v2 * xx, k[9] + v3, k[10] + v3 * xn, k[11] + v3 * xx,
            k[12] + v4, k[13] + v4 * xn, k[14] + v4 * xx, k[15] + v5, k[16] + v5 * xn, k[17] + v5 * xx,
            k[18] + v6, k[19] + v6 * xn, k[20] + v6 * xx, k[21] + v7, k[22] + v7 * xn, k[23] + v7 * xx,
            k[24] + v8, k[25] + v8 * xn, k[26] + v8 * xx)


@njit(inline="always")
def fixed_derivatives(fcoeffs, fp, r, c):
    """The fixed slice's interpolant derivatives at a pixel centre: central differences of its coefficients, halved."""
    return (0.5 * (fcoeffs[fp, PAD + r, PAD + c + 1] - fcoeffs[fp, PAD + r, PAD + c - 1]),
            0.5 * (fcoeffs[fp, PAD + r + 1, PAD + c] - fcoeffs[fp, PAD + r - 1, PAD + c]))


@njit(inline="always", fastmath=_FAST)
def band_row(acc, p, fp, mp, r, h, w, cx0, cx1, cx2, cy0, cy1, cy2, half_w, half_h, ramp, inv_ramp, masked, fixed, coeffs,
             fmask, mmask, fm, cm, fcoeffs, curv):
    """One row of pair ``p`` into its band's sums ``acc``: the loss's and the gradient's, and with ``curv`` (a constant
    where it is inlined: the other branch is compiled away) the Gauss-Newton curvature's."""
    yn = (2.0 * r + 1.0) / h - 1.0
    rx = cx1 * yn + cx2
    ry = cy1 * yn + cy2
    sums = (0.0,) * 18  # S1, Sf, Sm, Sff, Smm, Sfm, then the gradient's moments m0..m11 of the row
    ks = (0.0,) * 27
    # the columns further inside than the ramp (px and py are linear in c): the branch-free loop
    lo, hi = interior_columns(cx0, cy0, rx, ry, ramp, w, h, masked)
    for c in range(lo, hi):
        xn = (2.0 * c + 1.0) / w - 1.0
        mc, gx, gy, f = interior(fp, mp, r, c, cx0 * xn + rx, cy0 * xn + ry, fixed, coeffs, fm, cm)
        sums = add_pixel(sums, 1.0, mc, f, gx, gy, xn)
        if curv:
            gfx, gfy = fixed_derivatives(fcoeffs, fp, r, c)
            ks = add_curvature(ks, 1.0, gx, gy, gfx, gfy, xn)
    for k in range(w - (hi - lo)):  # the other columns: [0, lo) and [hi, w)
        c = k if k < lo else k + (hi - lo)
        xn = (2.0 * c + 1.0) / w - 1.0
        wt, dwx, dwy, mc, gx, gy, f = pixel(p, fp, mp, r, c, cx0 * xn + rx, cy0 * xn + ry, half_w, half_h, inv_ramp,
                                            masked, w, h, fixed, coeffs, fmask, mmask, fm, cm)
        if wt < 0.0:
            continue
        sums = add_pixel(sums, wt, mc, f, gx, gy, xn)
        if dwx != 0.0 or dwy != 0.0:
            ramp_sums(acc, dwx, dwy, f, mc, xn, yn)
        if curv and wt > 0.0:
            gfx, gfy = fixed_derivatives(fcoeffs, fp, r, c)
            ks = add_curvature(ks, wt, gx, gy, gfx, gfy, xn)
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
    if curv:  # [k][j: 1, yn, yn^2][i: 1, xn, xn^2]
        y2 = yn * yn
        for k in range(9):
            v0, v1, v2 = ks[3 * k], ks[3 * k + 1], ks[3 * k + 2]
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


@njit(cache=True, parallel=True, fastmath=_FAST, nogil=True)
def bands(theta, fixed, coeffs, fidx, midx, fmean, cmean, ramp, fmask, mmask, fcoeffs, want, out):
    """Loss and gradient sums ``out[p, band]`` of every pair and band of rows, and the Gauss-Newton curvature's sums of
    the pairs ``want`` (their fixed slices' coefficients ``fcoeffs``), in the same pass over the pixels. Pair ``p``'s
    fixed slice is ``fixed[fidx[p]]`` (and ``fcoeffs[fidx[p]]``), its moving slice's coefficients ``coeffs[midx[p]]``:
    the slices of a block are not copied per pair."""
    b = theta.shape[0]
    h, w = fixed.shape[1], fixed.shape[2]
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
        fp = fidx[p]
        mp = midx[p]
        if want[p]:
            for r in range(r_lo, min(h, r_lo + BAND_ROWS)):
                band_row(acc, p, fp, mp, r, h, w, cx0, cx1, cx2, cy0, cy1, cy2, half_w, half_h, ramp, inv_ramp, masked, fixed,
                         coeffs, fmask, mmask, fm, cm, fcoeffs, True)
        else:
            for r in range(r_lo, min(h, r_lo + BAND_ROWS)):
                band_row(acc, p, fp, mp, r, h, w, cx0, cx1, cx2, cy0, cy1, cy2, half_w, half_h, ramp, inv_ramp, masked, fixed,
                         coeffs, fmask, mmask, fm, cm, fcoeffs, False)


@njit(cache=True, parallel=True, fastmath=_FAST, nogil=True)
def identity_sums(fixed, moving, fidx, midx, ramp, fmask, mmask, out):
    """The NCC's sums S1, Sf, Sm, Sff, Smm, Sfm ``out[p, band, :6]`` of every pair (slices ``fixed[fidx[p]]`` and
    ``moving[midx[p]]``) at the identity: each pixel samples the moving slice at its own centre, where the interpolant
    is the slice itself, so no taps; the inside weight is the distance to the nearest border over the ramp (0 on the
    outermost pixels), times both masks."""
    b = fidx.shape[0]
    h, w = fixed.shape[1], fixed.shape[2]
    nband = (h + BAND_ROWS - 1) // BAND_ROWS
    inv_ramp = 1.0 / ramp
    masked = fmask.shape[0] > 0
    for task in prange(b * nband):
        p = task // nband
        acc = out[p, task % nband]
        r_lo = (task % nband) * BAND_ROWS
        fp = fidx[p]
        mp = midx[p]
        for r in range(r_lo, min(h, r_lo + BAND_ROWS)):
            dy = min(r, h - 1 - r)
            s0 = s1 = s2 = s3 = s4 = s5 = 0.0
            for c in range(w):
                wt = min(min(min(c, w - 1 - c), dy) * inv_ramp, 1.0)
                if masked:
                    wt *= fmask[p, r, c] * mmask[p, r, c]
                f = fixed[fp, r, c]
                m = moving[mp, r, c]
                wf = wt * f
                wm = wt * m
                s0 += wt
                s1 += wf
                s2 += wm
                s3 += wf * f
                s4 += wm * m
                s5 += wf * m
            acc[0] += s0
            acc[1] += s1
            acc[2] += s2
            acc[3] += s3
            acc[4] += s4
            acc[5] += s5
