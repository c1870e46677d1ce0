"""The default objective without autograd: NCC of a fixed slice and a cubic-B-spline-warped moving slice, and its
exact gradient with respect to the affine matrix, in one pass over the pixels.

Autograd through the B-spline sampling recorded ~250 elementwise operations per pass over a (B, h, w) block and
replayed them backwards; here the value and both spatial derivatives of the interpolant come from one
``grid_sample`` of 12 bilinear taps (each cubic weight pair merged into one bilinear tap, as for the value: the
derivative weights of a pair share their sign too), and the gradient is a weighted moment sum. Same loss as
:func:`~sphero_lightning.core.losses.ncc_loss` over the weight of :func:`~sphero_lightning.core.interpolation.inside_weight`
(the weight's own derivative on its one-pixel ramp included), to float rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import kernels
from .frames import normalized_coords, pixel_centre
from .interpolation import PAD, axis_taps, sample_taps
from .masks import sample_mask

_EPS = 1e-8


class Rows:
    """``base[index]`` without the copy: the rows of a block's slices (``base``, ``(N, 1, h, w)``) that a block's
    pairs use, for the compiled pass, which reads each pair's slice through the index (a block's pairs at distances
    1 and 2 use the same slices in orders no view can give; their copies cost a fit of 40 slices of 384 px a tenth of
    its time). Indexing gives rows of rows; anything else takes :meth:`tensor`, the copy."""

    def __init__(self, base: torch.Tensor, index: torch.Tensor) -> None:
        self.base, self.index = base, index

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: Any) -> Rows:
        return Rows(self.base, self.index[rows])

    def tensor(self) -> torch.Tensor:
        return self.base[self.index]


def plain(t: torch.Tensor | Rows | None) -> torch.Tensor | None:
    """A tensor of the rows (a copy for :class:`Rows`)."""
    return t.tensor() if isinstance(t, Rows) else t


def _numpy_rows(t: torch.Tensor | Rows) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``(N, h, w)`` array a compiled kernel reads and the rows it reads (None: every row, in order)."""
    if isinstance(t, Rows):
        return _numpy(t.base[:, 0]), t.index.numpy()
    return _numpy(t[:, 0]), None


#: Pixels sampled per chunk in :func:`sample_with_gradient`. The temporaries of a chunk (tap positions 32 bytes a
#: pixel, tap values 48) then stay below glibc's largest mmap threshold (32 MiB): larger temporaries are mapped
#: afresh and page-faulted in on every evaluation (that once made an interleaved tap grid cost as much as the
#: sampling).
CHUNK_PIXELS = 1 << 17


def sample_with_gradient(coeffs: torch.Tensor, px: torch.Tensor, py: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cubic B-spline value and its x and y derivatives at pixel positions (no autograd).

    ``coeffs``: ``(B, 1, H + 2 PAD, W + 2 PAD)`` from :func:`~sphero_lightning.core.interpolation.bspline_prefilter`;
    ``px, py``: ``(B, h, w)`` in pixel-index units. Returns three ``(B, h, w)`` tensors. Works in chunks of rows of
    at most :data:`CHUNK_PIXELS` pixels (one row at least).
    """
    b, oh, ow = px.shape
    rows = max(1, CHUNK_PIXELS // max(1, b * ow))
    if rows >= oh:
        return _sample_chunk(coeffs, px, py)
    out = torch.empty(3, b, oh, ow, dtype=px.dtype, device=px.device)
    for r0 in range(0, oh, rows):
        for dst, src in zip(out.unbind(0), _sample_chunk(coeffs, px[:, r0:r0 + rows], py[:, r0:r0 + rows])):
            dst[:, r0:r0 + rows] = src
    return out[0], out[1], out[2]


#: The 12 taps of :func:`_sample_chunk`: (x plane, y plane) of ``[qx0, qx1, rx0, rx1, qy0, qy1, ry0, ry1]``.
#: Value: (q, q) pairs; x derivative: (r, q); y derivative: (q, r).
_TAPS = ((0, 4), (1, 4), (0, 5), (1, 5), (2, 4), (3, 4), (2, 5), (3, 5), (0, 6), (1, 6), (0, 7), (1, 7))


def _sample_chunk(coeffs: torch.Tensor, px: torch.Tensor, py: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, _, hh, ww = coeffs.shape
    oh, ow = px.shape[-2:]
    planes = torch.empty(8, b, oh, ow, dtype=px.dtype, device=px.device)
    gx0, ex0 = axis_taps(px + PAD, ww, planes[:4])
    gy0, ey0 = axis_taps(py + PAD, hh, planes[4:])
    t = [v[:, 0] for v in sample_taps(coeffs, planes, _TAPS)]
    # the second tap of each pair has weight 1 - g (value) or -e (derivative): lerps and differences
    value = torch.lerp(torch.lerp(t[3], t[2], gx0), torch.lerp(t[1], t[0], gx0), gy0)
    dx = torch.lerp(t[6] - t[7], t[4] - t[5], gy0).mul_(ex0)
    dy = torch.lerp(t[9] - t[11], t[8] - t[10], gx0).mul_(ey0)
    return value, dx, dy


def ncc_and_gradient(theta: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, ramp: float = 1.0,
                     fixed_coeffs: torch.Tensor | None = None, curvature: dict[str, torch.Tensor] | None = None,
                     masks: tuple[torch.Tensor, torch.Tensor] | None = None, dense: bool = False, compiled: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - NCC`` of each pair and its gradient with respect to ``theta``.

    One pass over the pixels in chunks of rows (:data:`CHUNK_PIXELS`), so every temporary stays small: each chunk
    samples the moving slice (value and derivatives) and adds to the NCC's moment sums and to the moment sums the
    gradient is made of once the loss's derivatives with respect to those sums are known. The derivative of the
    inside weight lives on its one-pixel ramp along the border; those few pixels are gathered and summed apart.

    Parameters
    ----------
    theta : torch.Tensor
        ``(B, 2, 3)`` normalized matrices (output position -> moving position).
    fixed, coeffs : torch.Tensor
        ``(B, 1, h, w)`` fixed slices and ``(B, 1, h + 2 PAD, w + 2 PAD)`` B-spline coefficients of the moving ones.
    fixed_coeffs, curvature : optional
        With ``curvature`` (a dict) and the fixed slices' B-spline coefficients (the same shape as ``coeffs``), the
        same pass also sums what :meth:`~sphero_lightning.core.objective.PairObjective.gauss_newton_hessian` is made
        of, into ``curvature``: ``sums`` (``(B, 6)``: S1, Sf, Sm, Sff, Smm, Sfm of the slices, centred by the torch
        path, as they are by the compiled one: only their variances and covariance are used), ``fixed_first``
        (``(B, 2, 3, 3)``: sum w gf_a y^j x^i), ``moving_first`` (the same of the interpolant's derivatives m_d,
        linear entries only), ``cross`` (``(B, 2, 2, 3, 3)``: sum w gf_a m_d y^j x^i) and ``own`` (sum w gf_a gf_c
        y^j x^i); gf: the fixed slice's interpolant derivatives at the pixel centres, x and y normalized.
    masks : optional
        ``(fixed_mask, moving_mask)``, ``(B, 1, h, w)`` each (1 = use; :mod:`.masks`): the weight is the inside weight
        times the fixed slice's mask times the moving slice's mask sampled (bilinear) where the moving slice is
        sampled; the derivative of the sampled mask on its boundary is gathered with the ramp's.
    dense : bool
        Sum the ramp's (and the mask boundary's) part of the gradient over every pixel (times their weight
        derivative, 0 off the ramp) as moments of the six products ``dL/dw`` is made of, instead of gathering the
        ramp's pixels: no tensor is read on the host (a GPU fit never waits), more arithmetic (what the CPU path
        avoids). The same gradient to rounding.
    compiled : bool
        On the CPU, the compiled pass of :mod:`.kernels` (numba) where it is installed: the same sums in one pass over
        the pixels, ~3x faster (the fit decides: :func:`~.kernels.worth`).

    Returns
    -------
    loss : ``(B,)`` float64; grad : ``(B, 2, 3)`` float64.
    """
    if (compiled and kernels.available() and not dense and fixed.device.type == "cpu" and fixed.dtype == torch.float32
            and coeffs.dtype == torch.float32):
        return _compiled(theta, fixed, coeffs, ramp, fixed_coeffs, curvature, masks)
    fixed, coeffs, fixed_coeffs = plain(fixed), plain(coeffs), plain(fixed_coeffs)
    b = theta.shape[0]
    h, w = fixed.shape[-2:]
    dt, dev = fixed.dtype, fixed.device
    th = theta.to(torch.float64)
    # pixel position = (size / 2) (theta @ [xn, yn, 1] + 1) - 1/2, xn = (2 X + 1) / w - 1; in float64, rounded once
    # (positions summed in float32 moved gradients of poorly matching pairs by ~0.3 %)
    xn = normalized_coords(torch.arange(w, device=dev, dtype=torch.float64), w)
    yn = normalized_coords(torch.arange(h, device=dev, dtype=torch.float64), h)
    half_w, half_h = pixel_centre((h, w))
    cx = (w / 2) * th[:, 0]  # (B, 3): coefficients of xn, yn, 1
    cy = (h / 2) * th[:, 1]
    cx[:, 2] += half_w
    cy[:, 2] += half_h
    xcol = (cx[:, 0, None] * xn).view(b, 1, w)  # the xn term of px, per column
    ycol = (cy[:, 0, None] * xn).view(b, 1, w)
    xrow = (cx[:, 1, None] * yn + cx[:, 2, None]).view(b, h, 1)  # the yn and constant terms, per row
    yrow = (cy[:, 1, None] * yn + cy[:, 2, None]).view(b, h, 1)
    fmean = fixed[:, 0].mean((1, 2), dtype=torch.float64).to(dt).view(b, 1, 1)
    cmean = coeffs[:, 0].mean((1, 2), dtype=torch.float64).to(dt).view(b, 1, 1)
    rows = max(1, CHUNK_PIXELS // max(1, b * w))
    xp = torch.stack([xn, torch.ones_like(xn)], 1).to(dt)  # (w, 2): xn, 1
    yp = torch.stack([yn, torch.ones_like(yn)], 1)  # (h, 2): yn, 1 (float64: rows are summed in float64)
    want = curvature is not None
    if want:
        if fixed_coeffs is None:
            raise ValueError("curvature needs fixed_coeffs (the fixed slices' B-spline coefficients)")
        cf = fixed_coeffs[:, 0]
        xq = torch.stack([torch.ones_like(xn), xn, xn * xn], 1).to(dt)  # (w, 3): 1, x, x^2
        yq = torch.stack([torch.ones_like(yn), yn, yn * yn], 1)  # (h, 3), float64
        # sum of [w gfx, w gfy, w gfx mx, w gfx my, w gfy mx, w gfy my, w gfx gfx, w gfx gfy, w gfy gfy] y^j x^i
        cm = torch.zeros(9, b, 3, 3, dtype=torch.float64, device=dev)
    # One pass: the NCC's sums s = [S1, Sf, Sm, Sff, Smm, Sfm] of the centred data, and, for the gradient, the
    # moments M(u) = sum u [xn, 1] x [yn, 1] of u = (w m, w f, w) times the interpolant's x and y derivatives:
    # dL/dm = w (2 a4 m + a5 f + a2) with a = dL/ds (known only at the end), so the gradient's moment sums are
    # 2 a4 M(w m g) + a5 M(w f g) + a2 M(w g). The NCC's sums in float64; the moments along rows in float32.
    s = torch.zeros(b, 6, dtype=torch.float64, device=dev)
    mom = torch.zeros(3, 2, b, 2, 2, dtype=torch.float64, device=dev)  # [u][x or y derivative][pair, j, i]
    ramp_pix = []  # (pair, row, col, d weight / d px, d weight / d py, f, m) of the pixels on the weight's ramp
    # dense: [x or y][1, f, m, f f, m m, f m][pair, j, i] moments of d weight / d pos times each product
    ramp_mom = torch.zeros(2, 6, b, 2, 2, dtype=torch.float64, device=dev) if dense else None
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        px = (xrow[:, r0:r1] + xcol).to(dt)
        py = (yrow[:, r0:r1] + ycol).to(dt)
        m, mx, my = _sample_chunk(coeffs, px, py)
        mc = m.sub_(cmean)
        f = fixed[:, 0, r0:r1] - fmean
        # the inside weight (interpolation.inside_weight): distance to the nearest border, clamped to the ramp
        ux, uy = px - half_w, py - half_h
        dxm = ux.abs().neg_().add_(half_w)  # min(px, w - 1 - px)
        dym = uy.abs().neg_().add_(half_h)
        d = torch.minimum(dxm, dym)
        wts = torch.empty(3, b, r1 - r0, w, dtype=dt, device=dev)  # w m, w f, w
        wt = torch.div(d, ramp, out=wts[2]).clamp_(0.0, 1.0)
        on = (d >= 0) & (d <= ramp)  # as clamp's gradient: both ends of the ramp included
        if masks is not None:
            fm = masks[0][:, 0, r0:r1].to(dt)
            mv, mvx, mvy = sample_mask(masks[1][:, 0].to(dt), px, py)
            inner = wt * fm  # the weight without the moving mask
            on_mask = ((mvx != 0) | (mvy != 0)) & (inner > 0)
            wt.mul_(mv).mul_(fm)
            on = on & (fm * mv > 0)
            if dense:
                k = (inner * on_mask).double()
                dwx, dwy = k * mvx.double(), k * mvy.double()
            elif bool(on_mask.any()):
                pb, pr, pc = on_mask.nonzero(as_tuple=True)
                k = inner[pb, pr, pc]
                ramp_pix.append((pb, pr + r0, pc, k * mvx[pb, pr, pc], k * mvy[pb, pr, pc], f[pb, pr, pc], mc[pb, pr, pc]))
        if dense:
            x_side = (dxm <= dym).double()
            k = on.double() * ((fm * mv).double() if masks is not None else 1.0) / ramp
            sx, sy = torch.where(ux <= 0, 1.0, -1.0).double(), torch.where(uy <= 0, 1.0, -1.0).double()
            dwx, dwy = (k * x_side * sx, k * (1 - x_side) * sy) if masks is None else (
                dwx + k * x_side * sx, dwy + k * (1 - x_side) * sy)
            fd, md = f.double(), mc.double()
            for q, prod in enumerate((1.0, fd, md, fd * fd, md * md, fd * md)):
                for a, dw in enumerate((dwx, dwy)):
                    ramp_mom[a, q] += yp[r0:r1].T @ ((dw * prod) @ xp.double())
        elif bool(on.any()):
            pb, pr, pc = on.nonzero(as_tuple=True)
            x_side = (dxm[pb, pr, pc] <= dym[pb, pr, pc]).to(dt)
            # d min(px, w - 1 - px) / d px = +1 on the left half, -1 on the right (ties: left, as torch.minimum)
            sx = torch.where(ux[pb, pr, pc] <= 0, 1.0, -1.0).to(dt)
            sy = torch.where(uy[pb, pr, pc] <= 0, 1.0, -1.0).to(dt)
            k = (fm * mv)[pb, pr, pc] if masks is not None else 1.0
            ramp_pix.append((pb, pr + r0, pc, k * x_side * sx / ramp, k * (1 - x_side) * sy / ramp, f[pb, pr, pc], mc[pb, pr, pc]))
        wm, wf = torch.mul(wt, mc, out=wts[0]), torch.mul(wt, f, out=wts[1])
        s += torch.stack([_row_sums(wt), _row_sums(wf), _row_sums(wm), _row_sums(wf * f), _row_sums(wm * mc),
                          _row_sums(wf * mc)], 1)
        for k, g in enumerate((mx, my)):
            mom[:, k] += yp[r0:r1].T @ ((wts * g) @ xp).double()
        if want:
            # the fixed slice's interpolant derivatives at the pixel centres: central differences of its coefficients
            # (times 2; halved below)
            prod = torch.empty(9, b, r1 - r0, w, dtype=dt, device=dev)
            gfx = cf[:, PAD + r0:PAD + r1, PAD + 1:PAD + w + 1] - cf[:, PAD + r0:PAD + r1, PAD - 1:PAD + w - 1]
            gfy = cf[:, PAD + r0 + 1:PAD + r1 + 1, PAD:PAD + w] - cf[:, PAD + r0 - 1:PAD + r1 - 1, PAD:PAD + w]
            wgx, wgy = torch.mul(gfx, wt, out=prod[0]), torch.mul(gfy, wt, out=prod[1])
            for k, (u, v) in enumerate(((wgx, mx), (wgx, my), (wgy, mx), (wgy, my), (wgx, gfx), (wgx, gfy), (wgy, gfy))):
                torch.mul(u, v, out=prod[2 + k])
            cm += yq[r0:r1].T @ (prod @ xq).double()
    loss, a64 = _ncc_and_derivatives(s)
    # dL/dtheta_0j = (w/2) sum gx [xn, yn, 1]_j, likewise row 1 with h/2 and gy, where g = dL/dm * dm/dpos
    mm = (torch.stack([2 * a64[:, 4], a64[:, 5], a64[:, 2]]).view(3, 1, b, 1, 1) * mom).sum(0)  # (2, b, 2, 2)
    grad = torch.empty(b, 2, 3, dtype=torch.float64, device=dev)
    for k, half in enumerate((w / 2, h / 2)):
        grad[:, k, 0] = half * mm[k][:, 1, 0]  # sum g xn
        grad[:, k, 1] = half * mm[k][:, 0, 1]  # sum g yn
        grad[:, k, 2] = half * mm[k][:, 1, 1]  # sum g
    if dense:  # dL/dw = a0 + a1 f + a2 m + a3 f f + a4 m m + a5 f m (see below): sum_q a_q times its moments
        rm = torch.einsum("bq,aqbji->abji", a64, ramp_mom)
        for k, half in enumerate((w / 2, h / 2)):
            grad[:, k, 0] += half * rm[k][:, 1, 0]
            grad[:, k, 1] += half * rm[k][:, 0, 1]
            grad[:, k, 2] += half * rm[k][:, 1, 1]
    if ramp_pix:
        # dL/dw through every sum, on the ramp only: times d w / d pos, summed like g above
        pb, pr, pc, wx, wy, f, mc = (torch.cat(v) for v in zip(*ramp_pix))
        f, mc, ap = f.double(), mc.double(), a64[pb]  # ap: (k, 6)
        dl_dw = ap[:, 0] + f * (ap[:, 1] + ap[:, 3] * f + ap[:, 5] * mc) + mc * (ap[:, 2] + ap[:, 4] * mc)
        basis = torch.stack([xn[pc], yn[pr], torch.ones_like(xn[pc])], 1)  # (k, 3)
        for k, (dw, half) in enumerate(((wx, w / 2), (wy, h / 2))):
            grad[:, k].index_add_(0, pb, half * (dl_dw * dw.double()).unsqueeze(1) * basis)
    if want:
        cm[:2] *= 0.5
        cm[2:6] *= 0.5
        cm[6:] *= 0.25
        own = torch.stack([cm[6], cm[7], cm[7], cm[8]], 1).view(b, 2, 2, 3, 3)
        # moments of w m_d with [yn, 1] x [xn, 1] (mom[2]) as [j, i] powers (the quadratic ones are not needed)
        mfirst = torch.zeros(b, 2, 3, 3, dtype=torch.float64, device=dev)
        lin = mom[2].transpose(0, 1)  # (b, 2, 2, 2): [pair, d, 1 - j, 1 - i]
        mfirst[:, :, :2, :2] = lin.flip(-1).flip(-2)
        curvature.update(sums=s, fixed_first=cm[:2].transpose(0, 1), moving_first=mfirst,
                         cross=cm[2:6].transpose(0, 1).reshape(b, 2, 2, 3, 3), own=own)
    return loss, grad


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


def _numpy_masks(masks: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The fixed and moving ``(B, 1, h, w)`` masks as the ``(B, h, w)`` float32 arrays the compiled kernels read."""
    return (None, None) if masks is None else (_numpy(masks[0][:, 0].float()), _numpy(masks[1][:, 0].float()))


def _compiled(theta: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, ramp: float,
              fixed_coeffs: torch.Tensor | None, curvature: dict[str, torch.Tensor] | None,
              masks: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ncc_and_gradient` on the CPU by the compiled pass of :mod:`.kernels` (the same sums, then the same
    assembly of the loss, the gradient and the curvature's moments)."""
    b = theta.shape[0]
    h, w = fixed.shape[-2:]
    want = curvature is not None
    if want and fixed_coeffs is None:
        raise ValueError("curvature needs fixed_coeffs (the fixed slices' B-spline coefficients)")
    # no centring: every sum is taken in float64 here (the torch path centres its float32 data for precision; NCC and
    # its gradient are the same function of the sums either way)
    zero = np.zeros(b)
    (f, fidx), (c, midx) = _numpy_rows(fixed), _numpy_rows(coeffs)
    if want:  # the fixed slices' coefficients are read through the fixed slices' rows
        fc, fcidx = _numpy_rows(fixed_coeffs)
        if (fcidx is None) != (fidx is None) or (fidx is not None and not np.array_equal(fcidx, fidx)):
            f, fidx, fc = _numpy(plain(fixed)[:, 0]), None, _numpy(plain(fixed_coeffs)[:, 0])
    sums, mom, ramp_mom, cm = (torch.from_numpy(a) for a in kernels.ncc_sums(
        _numpy(theta.to(torch.float64)), f, c, zero, zero, ramp, *_numpy_masks(masks), fc if want else None, np.full(b, want), torch.get_num_threads(), fidx, midx))
    loss, a64 = _ncc_and_derivatives(sums)
    mm = 2 * a64[:, 4].view(b, 1, 1, 1) * mom[:, 0] + a64[:, 5].view(b, 1, 1, 1) * mom[:, 1] + a64[:, 2].view(b, 1, 1, 1) * mom[:, 2]
    mm = mm + torch.einsum("bq,bdqji->bdji", a64, ramp_mom)  # dL/dw through every sum, times d w / d pos
    grad = torch.empty(b, 2, 3, dtype=torch.float64)
    for k, half in enumerate((w / 2, h / 2)):
        grad[:, k, 0] = half * mm[:, k, 1, 0]  # sum g xn
        grad[:, k, 1] = half * mm[:, k, 0, 1]  # sum g yn
        grad[:, k, 2] = half * mm[:, k, 1, 1]  # sum g
    if want:  # cm: [pair][k][j: 1, yn, yn^2][i: 1, xn, xn^2], already halved per derivative of the fixed slice
        mfirst = torch.zeros(b, 2, 3, 3, dtype=torch.float64)
        mfirst[:, :, :2, :2] = mom[:, 2].flip(-1).flip(-2)
        curvature.update(sums=sums, fixed_first=cm[:, :2], moving_first=mfirst,
                         cross=cm[:, 2:6].reshape(b, 2, 2, 3, 3), own=cm[:, [6, 7, 7, 8]].reshape(b, 2, 2, 3, 3))
    return loss, grad


def ncc_at_identity(fixed: torch.Tensor, moving: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ramp: float = 1.0) -> torch.Tensor:
    """``(B,)`` NCC of ``(B, 1, h, w)`` float32 CPU slices at the identity by the compiled sums
    (:func:`~.kernels.identity_sums`), over :func:`ncc_and_gradient` 's weight: what it gives at the identity to
    rounding, without sampling (the interpolant is the slice itself at its pixel centres)."""
    (f, fidx), (m, midx) = _numpy_rows(fixed), _numpy_rows(moving)
    sums = kernels.identity_sums(f, m, ramp, *_numpy_masks(masks), torch.get_num_threads(), fidx, midx)
    loss, _ = _ncc_and_derivatives(torch.from_numpy(sums))
    return 1 - loss


def _ncc_and_derivatives(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - NCC`` from the weighted sums ``[S1, Sf, Sm, Sff, Smm, Sfm]`` (``(B, 6)``, centred data) and its derivatives
    with respect to the six sums, in closed form (``(B,)``, ``(B, 6)``): what autograd gave, without building a graph
    for it at every evaluation (~2 ms each)."""
    s1 = s[:, 0].clamp_min(_EPS)
    sf, sm = s[:, 1], s[:, 2]
    cov = s[:, 5] - sf * sm / s1
    vf = s[:, 3] - sf * sf / s1
    vm = s[:, 4] - sm * sm / s1
    d = torch.sqrt(vf * vm + _EPS)
    loss = 1 - cov / d
    dcov = -1 / d
    dvf = cov * vm / (2 * d ** 3)
    dvm = cov * vf / (2 * d ** 3)
    a = torch.empty_like(s)
    a[:, 0] = torch.where(s[:, 0] > _EPS, (dcov * sf * sm + dvf * sf * sf + dvm * sm * sm) / (s1 * s1), 0.0)
    a[:, 1] = -(dcov * sm + 2 * dvf * sf) / s1
    a[:, 2] = -(dcov * sf + 2 * dvm * sm) / s1
    a[:, 3], a[:, 4], a[:, 5] = dvf, dvm, dcov
    return loss, a


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sums of ``(B, rows, w)`` in float64. Summing rows in float32 first was faster, but left the loss
    ~1e-7 off: near an optimum, where successive losses differ by less, that decided which trial points were
    accepted."""
    return x.sum((1, 2), dtype=torch.float64)
