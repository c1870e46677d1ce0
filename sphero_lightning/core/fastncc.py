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

import torch
import torch.nn.functional as F

from .interpolation import PAD, axis_taps

_EPS = 1e-8


#: Pixels sampled per chunk in :func:`sample_with_gradient`. The tap grid of a chunk (96 bytes a pixel) then stays
#: below glibc's largest mmap threshold (32 MiB): larger temporaries are mapped afresh and page-faulted in on every
#: evaluation, which made the grid's construction cost as much as the sampling (512 x 512, 4 pairs: 35 -> ~18 ms a
#: pair for the sampling).
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


def _sample_chunk(coeffs: torch.Tensor, px: torch.Tensor, py: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, _, hh, ww = coeffs.shape
    qx0, qx1, rx0, rx1, gx0, ex0 = axis_taps(px + PAD, ww)
    qy0, qy1, ry0, ry1, gy0, ey0 = axis_taps(py + PAD, hh)
    oh, ow = px.shape[-2:]
    grid = torch.empty(b, 12, oh, ow, 2, dtype=px.dtype, device=px.device)  # written in place: no stacked copies
    for k, (tx, ty) in enumerate(((qx0, qy0), (qx1, qy0), (qx0, qy1), (qx1, qy1), (rx0, qy0), (rx1, qy0), (rx0, qy1),
                                  (rx1, qy1), (qx0, ry0), (qx1, ry0), (qx0, ry1), (qx1, ry1))):
        grid[:, k, :, :, 0] = tx
        grid[:, k, :, :, 1] = ty
    grid = grid.view(b, 12 * oh, ow, 2)
    taps = F.grid_sample(coeffs, grid, mode="bilinear", padding_mode="border", align_corners=False).reshape(b, 12, oh, ow)
    # the second tap of each pair has weight 1 - g (value) or -e (derivative): lerps and differences
    t = taps.unbind(1)
    value = torch.lerp(torch.lerp(t[3], t[2], gx0), torch.lerp(t[1], t[0], gx0), gy0)
    dx = torch.lerp(t[6] - t[7], t[4] - t[5], gy0).mul_(ex0)
    dy = torch.lerp(t[9] - t[11], t[8] - t[10], gx0).mul_(ey0)
    return value, dx, dy


def _ncc_from_sums(s: torch.Tensor) -> torch.Tensor:
    """``1 - NCC`` from the weighted sums ``[S1, Sf, Sm, Sff, Smm, Sfm]`` (``(B, 6)``, centred data)."""
    s1 = s[:, 0].clamp_min(_EPS)
    cov = s[:, 5] - s[:, 1] * s[:, 2] / s1
    vf = s[:, 3] - s[:, 1] ** 2 / s1
    vm = s[:, 4] - s[:, 2] ** 2 / s1
    return 1 - cov / torch.sqrt(vf * vm + _EPS)


def ncc_and_gradient(theta: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor, ramp: float = 1.0,
                     images: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - NCC`` of each pair and its gradient with respect to ``theta``.

    Two passes over the pixels in chunks of rows (:data:`CHUNK_PIXELS`), so every temporary stays small: the first
    samples the moving slice and sums the NCC's moments, the second (once the loss's derivatives with respect to
    those sums are known) sums the gradient. The derivative of the inside weight lives on its one-pixel ramp along
    the border; those few pixels are gathered in the first pass and summed apart.

    Parameters
    ----------
    theta : torch.Tensor
        ``(B, 2, 3)`` normalized matrices (output position -> moving position).
    fixed, coeffs : torch.Tensor
        ``(B, 1, h, w)`` fixed slices and ``(B, 1, h + 2 PAD, w + 2 PAD)`` B-spline coefficients of the moving ones.
    images : dict, optional
        Receives ``warped`` and ``weight`` (``(B, 1, h, w)``), as :meth:`RegistrationModule.pair_losses` gives them,
        and ``moving_dx``, ``moving_dy``: the interpolant's derivatives at the sample positions (per moving pixel).

    Returns
    -------
    loss : ``(B,)`` float64; grad : ``(B, 2, 3)`` float64.
    """
    b = theta.shape[0]
    h, w = fixed.shape[-2:]
    dt, dev = fixed.dtype, fixed.device
    th = theta.to(torch.float64)
    # pixel position = (size / 2) (theta @ [xn, yn, 1] + 1) - 1/2, xn = (2 X + 1) / w - 1
    xn = (2 * torch.arange(w, device=dev, dtype=torch.float64) + 1) / w - 1
    yn = (2 * torch.arange(h, device=dev, dtype=torch.float64) + 1) / h - 1
    cx = (w / 2) * th[:, 0]  # (B, 3): coefficients of xn, yn, 1
    cy = (h / 2) * th[:, 1]
    cx[:, 2] += (w - 1) / 2
    cy[:, 2] += (h - 1) / 2
    xcol = (cx[:, 0, None] * xn).view(b, 1, w)  # the xn term of px, per column
    ycol = (cy[:, 0, None] * xn).view(b, 1, w)
    xrow = (cx[:, 1, None] * yn + cx[:, 2, None]).view(b, h, 1)  # the yn and constant terms, per row
    yrow = (cy[:, 1, None] * yn + cy[:, 2, None]).view(b, h, 1)
    fmean = fixed[:, 0].mean((1, 2), dtype=torch.float64).to(dt).view(b, 1, 1)
    cmean = coeffs[:, 0].mean((1, 2), dtype=torch.float64).to(dt).view(b, 1, 1)
    rows = max(1, CHUNK_PIXELS // max(1, b * w))
    chunks = [(r0, min(r0 + rows, h)) for r0 in range(0, h, rows)]
    # pass 1: sample, weight, moments of centred data (NCC is invariant to the shifts; they keep float32 sums accurate)
    mc_all = torch.empty(b, h, w, dtype=dt, device=dev)
    mx_all, my_all, wt_all = torch.empty_like(mc_all), torch.empty_like(mc_all), torch.empty_like(mc_all)
    s = torch.zeros(b, 6, dtype=torch.float64, device=dev)
    ramp_pix = []  # (pair, row, col, d weight / d px, d weight / d py) of the pixels on the weight's ramp
    half_w, half_h = (w - 1) / 2, (h - 1) / 2
    for r0, r1 in chunks:
        px = (xrow[:, r0:r1] + xcol).to(dt)
        py = (yrow[:, r0:r1] + ycol).to(dt)
        m, mx, my = _sample_chunk(coeffs, px, py)
        mc = m.sub_(cmean)
        # the inside weight (interpolation.inside_weight): distance to the nearest border, clamped to the ramp
        ux, uy = px - half_w, py - half_h
        dxm = ux.abs().neg_().add_(half_w)  # min(px, w - 1 - px)
        dym = uy.abs().neg_().add_(half_h)
        d = torch.minimum(dxm, dym)
        wt = (d / ramp).clamp_(0.0, 1.0)
        on = (d >= 0) & (d <= ramp)  # as clamp's gradient: both ends of the ramp included
        if bool(on.any()):
            pb, pr, pc = on.nonzero(as_tuple=True)
            x_side = (dxm[pb, pr, pc] <= dym[pb, pr, pc]).to(dt)
            # d min(px, w - 1 - px) / d px = +1 on the left half, -1 on the right (ties: left, as torch.minimum)
            sx = torch.where(ux[pb, pr, pc] <= 0, 1.0, -1.0).to(dt)
            sy = torch.where(uy[pb, pr, pc] <= 0, 1.0, -1.0).to(dt)
            ramp_pix.append((pb, pr + r0, pc, x_side * sx / ramp, (1 - x_side) * sy / ramp))
        f = fixed[:, 0, r0:r1] - fmean
        wf, wm = wt * f, wt * mc
        s += torch.stack([wt.sum((1, 2), dtype=torch.float64), wf.sum((1, 2), dtype=torch.float64),
                          wm.sum((1, 2), dtype=torch.float64), (wf * f).sum((1, 2), dtype=torch.float64),
                          (wm * mc).sum((1, 2), dtype=torch.float64), (wf * mc).sum((1, 2), dtype=torch.float64)], 1)
        mc_all[:, r0:r1], mx_all[:, r0:r1], my_all[:, r0:r1], wt_all[:, r0:r1] = mc, mx, my, wt
    s = s.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _ncc_from_sums(s)
        (a64,) = torch.autograd.grad(loss.sum(), s)
    a = a64.to(dt).view(b, 6, 1, 1)
    # pass 2: dL/dtheta_0j = (w/2) sum gx [xn, yn, 1]_j, likewise row 1 with h/2 and gy, where g = dL/dm * dm/dpos
    xp = torch.stack([xn, torch.ones_like(xn)], 1).to(dt)  # (w, 2): xn, 1
    yp = torch.stack([yn, torch.ones_like(yn)], 1).to(dt)  # (h, 2): yn, 1
    mom = torch.zeros(2, b, 2, 2, dtype=torch.float64, device=dev)  # [row][pair, j, i] = sum g yn^(1-j) xn^(1-i)
    for r0, r1 in chunks:
        f = fixed[:, 0, r0:r1] - fmean
        mc = mc_all[:, r0:r1]
        dl_dm = (a[:, 4] * 2 * mc).add_(a[:, 5] * f).add_(a[:, 2]).mul_(wt_all[:, r0:r1])  # through Sm, Smm, Sfm
        for k, grad_img in enumerate((mx_all, my_all)):
            g = dl_dm * grad_img[:, r0:r1]
            mom[k] += (yp[r0:r1].T @ (g @ xp)).double()
    grad = torch.empty(b, 2, 3, dtype=torch.float64, device=dev)
    for k, half in enumerate((w / 2, h / 2)):
        grad[:, k, 0] = half * mom[k][:, 1, 0]  # sum g xn
        grad[:, k, 1] = half * mom[k][:, 0, 1]  # sum g yn
        grad[:, k, 2] = half * mom[k][:, 1, 1]  # sum g
    if ramp_pix:
        # dL/dw through every sum, on the ramp only: times d w / d pos, summed like g above
        pb, pr, pc, wx, wy = (torch.cat(v) for v in zip(*ramp_pix))
        f = fixed[pb, 0, pr, pc] - fmean.view(b)[pb]
        mc = mc_all[pb, pr, pc]
        ap = a64[pb]  # (k, 6)
        dl_dw = ap[:, 0] + f * (ap[:, 1] + ap[:, 3] * f + ap[:, 5] * mc) + mc * (ap[:, 2] + ap[:, 4] * mc)
        basis = torch.stack([xn[pc], yn[pr], torch.ones_like(xn[pc])], 1)  # (k, 3)
        for k, (dw, half) in enumerate(((wx, w / 2), (wy, h / 2))):
            grad[:, k].index_add_(0, pb, half * (dl_dw * dw.double()).unsqueeze(1) * basis)
    if images is not None:
        # and the interpolant's exact derivatives at the sample positions (per pixel of the moving slice)
        images.update(warped=(mc_all + cmean).unsqueeze(1), weight=wt_all.unsqueeze(1), moving_dx=mx_all.unsqueeze(1),
                      moving_dy=my_all.unsqueeze(1))
    return loss.detach(), grad
