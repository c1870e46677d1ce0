"""Image resampling: cubic B-spline interpolation and anti-aliased pyramid downscaling.

Why cubic B-splines: the interpolation model inside the loss limits accuracy at the finest level.
torch's ``bicubic`` (Keys, a = -0.75) is not exact for the smooth part of the image and its
derivative is only C0, which biases the optimum by a few hundredths of a pixel. A prefiltered cubic
B-spline (Unser 1999; what TurboReg uses) interpolates exactly, is C2, and is what reaches
sub-hundredth-of-a-pixel accuracy here.

Sampling uses the four-bilinear-lookups form of the cubic B-spline (Sigg & Hadwiger, GPU Gems 2,
ch. 20): because every B-spline weight is positive, a 4 x 4 neighbourhood folds into 2 x 2 bilinear
taps at shifted positions. That is one ``grid_sample`` call on four times the points, runs on any
device, and autograd through it gives the exact spline derivative with respect to the positions.

The interpolant passes through the samples (pixel-index positions ``0..W-1``; :mod:`.warping` warps whole slices):

>>> img = torch.arange(30.0).reshape(1, 1, 5, 6)
>>> ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
>>> bool(torch.allclose(bspline_sample(bspline_prefilter(img), xs[None], ys[None]), img, atol=1e-4))
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .frames import normalized_coords, pixel_coords

#: Pole of the cubic B-spline prefilter.
_POLE = math.sqrt(3.0) - 2.0
#: Half-length of the truncated prefilter; |pole|**16 < 1e-9.
_RADIUS = 16
#: Mirrored border kept around the coefficients, so that the 4 x 4 support is exact at the edges.
PAD = 2


def _prefilter_kernel(radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    h = (-6.0 * _POLE / (1.0 - _POLE**2)) * _POLE ** k.abs()
    h = h / h.sum()  # exact unit DC gain despite truncation
    return h.to(dtype=dtype, device=device)


#: Up to this many pixels along an axis, separable filters are one dense matrix product per axis (exact, faster on a CPU
#: than a one-channel convolution or the banded product longer axes use).
DENSE_MAX = 768
_BAND = 64
_MATRICES: dict[tuple, torch.Tensor] = {}


def drop_device_matrices() -> int:
    """Forget the cached filter matrices on a device other than the CPU (a run's end); returns how many. CPU ones stay."""
    gone = [key for key, m in _MATRICES.items() if m.device.type != "cpu"]
    for key in gone:
        del _MATRICES[key]
    return len(gone)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    return k / k.sum()


def _mirror(i: torch.Tensor, n: int) -> torch.Tensor:
    """Whole-sample mirror of indices into ``0..n-1`` (``-1 -> 1``, ``n -> n - 2``)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n - 2
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _axis_matrix(kind: str, n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Dense matrix of a separable filter along one axis of length ``n`` (cached).

    ``prefilter``: ``(n + 2 PAD, n)``, samples to cubic B-spline coefficients with mirror boundaries
    (exact inverse of ``[1 4 1] / 6``), with ``PAD`` mirrored coefficients at each end.
    ``blur``: ``(n, n)``, Gaussian of ``sigma`` px, radius ``3 sigma``, replicated border.
    """
    key = (kind, n, float(sigma), dtype, str(device))
    m = _MATRICES.get(key)
    if m is None:
        if kind == "prefilter":
            t = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j, wgt in ((i - 1, 1.0), (i, 4.0), (i + 1, 1.0)):
                    t[i, int(_mirror(torch.tensor(j), n))] += wgt / 6
            coef = torch.linalg.inv(t)
            # entries decay as |pole|**distance: below 1e-20 they change nothing in float32 or float64 results, but
            # as float32 denormals they made the matrix product 17x slower (290 against 17 ms for 9 x 512^2)
            coef = torch.where(coef.abs() < 1e-20, 0.0, coef)
            rows = _mirror(torch.arange(-PAD, n + PAD), n)
            m = coef[rows]
        else:
            k = gaussian_kernel(sigma)
            r = (len(k) - 1) // 2
            m = torch.zeros(n, n, dtype=torch.float64)
            idx = torch.arange(n)
            for o in range(-r, r + 1):
                m.index_put_((idx, (idx + o).clamp(0, n - 1)), k[o + r].expand(n), accumulate=True)
        if len(_MATRICES) > 64:
            _MATRICES.clear()
        m = _MATRICES[key] = m.to(dtype=dtype, device=device)
    return m


def _fir_last(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Symmetric FIR filter along the last axis as a banded matrix product (padding ``mode``)."""
    r = (len(kernel) - 1) // 2
    n = x.shape[-1]
    s = _BAND
    chunks = -(-n // s)
    xp = F.pad(x.reshape(-1, 1, n), (r, r), mode=mode)
    if chunks * s > n:
        xp = F.pad(xp, (0, chunks * s - n))
    band = band_matrix(kernel, x.dtype, x.device)
    win = xp.reshape(xp.shape[0], -1).unfold(-1, s + 2 * r, s)
    return (win @ band).reshape(xp.shape[0], chunks * s)[:, :n].reshape(x.shape)


def band_matrix(kernel: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``(_BAND + 2 r, _BAND)``: one window of ``_BAND + 2 r`` padded samples to ``_BAND`` filtered ones (cached).
    :func:`_fir_last` filters an axis as windows starting at every multiple of ``_BAND``."""
    r = (len(kernel) - 1) // 2
    key = ("band", len(kernel), float(kernel.sum()), float(kernel[0]), dtype, str(device))
    band = _MATRICES.get(key)
    if band is None:
        band = torch.zeros(_BAND + 2 * r, _BAND, dtype=torch.float64)
        for j in range(_BAND):
            band[j:j + 2 * r + 1, j] = kernel.double().cpu()
        band = _MATRICES[key] = band.to(dtype=dtype, device=device)
    return band


def _separable(x: torch.Tensor, kind: str, sigma: float = 0.0) -> torch.Tensor:
    """Apply a separable filter (``prefilter`` or ``blur``) to the last two axes of ``(N, H, W)``."""
    h, w = x.shape[-2:]
    out = x
    for axis, n in ((-1, w), (-2, h)):
        if n <= DENSE_MAX:
            m = _axis_matrix(kind, n, sigma, x.dtype, x.device)
            out = out @ m.T if axis == -1 else m @ out
            continue
        t = out if axis == -1 else out.transpose(-1, -2)
        if kind == "prefilter":
            y = _fir_last(t, _prefilter_kernel(min(_RADIUS, n - 1), torch.float64, "cpu"), "reflect")
            y = F.pad(y.reshape(-1, 1, n), (PAD, PAD), mode="reflect").reshape(*t.shape[:-1], n + 2 * PAD)
        else:
            y = _fir_last(t, gaussian_kernel(sigma), "replicate")
        out = y if axis == -1 else y.transpose(-1, -2)
    return out.contiguous()


def bspline_prefilter(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients of images, with mirror boundaries.

    Parameters
    ----------
    image : torch.Tensor
        ``(B, C, H, W)`` floating point, ``H, W >= 3``.

    Returns
    -------
    torch.Tensor
        ``(B, C, H + 2 PAD, W + 2 PAD)`` coefficients, with ``PAD`` mirrored pixels on every side,
        such that :func:`bspline_sample` at pixel centres returns ``image`` (to about 1e-7 relative).
    """
    b, c, h, w = image.shape
    if min(h, w) < 3:
        raise ValueError(f"B-spline prefilter needs at least 3 x 3 pixels, got {h} x {w}")
    coeffs = _separable(image.reshape(b * c, h, w), "prefilter")
    return coeffs.reshape(b, c, h + 2 * PAD, w + 2 * PAD)


def _taps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions and weights of the two bilinear taps that make one cubic B-spline tap (1-D)."""
    i = torch.floor(x).detach()
    f = x - i
    f2, f3 = f * f, f * f * f
    w0 = (1 - 3 * f + 3 * f2 - f3) / 6
    w1 = (4 - 6 * f2 + 3 * f3) / 6
    w2 = (1 + 3 * f + 3 * f2 - 3 * f3) / 6
    w3 = f3 / 6
    g0 = w0 + w1
    g1 = w2 + w3
    h0 = i - 1 + w1 / g0
    h1 = i + 1 + w3 / g1
    return h0, h1, g0, g1


def axis_taps(x: torch.Tensor, size: int, planes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Normalized positions and weights of the merged bilinear taps along one axis, at padded-pixel positions
    ``x`` (``size`` = padded length; ``x`` is overwritten). The positions go into ``planes``: value taps
    (q0, q1) with weights (g0, 1 - g0) and, where ``planes`` has four entries, derivative taps (r0, r1) with
    weights (e0, -e0). Returns ``(g0,)`` or ``(g0, e0)``. No autograd (see :func:`_taps` for that).

    Written into planes, not returned, so that :func:`sample_taps` can read each tap's (x, y) pair straight from
    two planes: no interleaved grid is built (building it cost as much as the sampling).
    """
    scale = 2.0 / size  # pixel index -> normalized (align_corners=False): (2 p + 1) / size - 1
    i = torch.floor(x)
    f = x.sub_(i)
    f2 = f * f
    below = i.mul_(scale).add_(scale * 0.5 - 1 - scale)  # normalized position of pixel i - 1
    # cubic B-spline weights w0..w3 and their derivatives d0..d3 (Horner forms):
    # w1 = 2/3 - f^2 + f^3/2, g0 = w0 + w1 = 5/6 - f/2 - f^2/2 + f^3/3, w3 = f^3/6;
    # d1 = (3 f^2 - 4 f)/2, e0 = d0 + d1 = f^2 - f - 1/2, d3 = f^2/2, d2 + d3 = -e0
    g0 = (f * (1 / 3) - 0.5).mul_(f).sub_(0.5).mul_(f).add_(5 / 6)
    w1 = (f * 0.5 - 1).mul_(f2).add_(2 / 3)
    torch.add(below, w1.div_(g0), alpha=scale, out=planes[0])  # q0 = i - 1 + w1 / g0
    w3 = (f2 * f).div_(g0.neg().add_(1).mul_(6))  # w3 / (1 - g0)
    above = below.add_(2 * scale)  # pixel i + 1
    torch.add(above, w3, alpha=scale, out=planes[1])  # q1 = i + 1 + w3 / (1 - g0)
    if len(planes) < 4:
        return (g0,)
    e0 = (f - 1).mul_(f).sub_(0.5)
    torch.add(above, (f * 1.5 - 2).mul_(f).div_(e0), alpha=scale, out=planes[2]).sub_(2 * scale)  # r0 = i - 1 + d1 / e0
    torch.add(above, f2.div_(e0), alpha=-0.5 * scale, out=planes[3])  # r1 = i + 1 - d3 / e0
    return g0, e0


def sample_taps(coeffs: torch.Tensor, planes: torch.Tensor, pairs: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
    """Bilinear samples of ``coeffs`` (``(B, C, H, W)``) at the positions (x from ``planes[i]``, y from
    ``planes[j]``) of each ``(i, j)`` in ``pairs``; ``planes``: ``(P, B, h, w)`` normalized positions, contiguous.
    Each grid is a strided view of two planes (grid_sample reads a grid whose x values are contiguous along a
    row as fast as an interleaved one). Returns one ``(B, C, h, w)`` tensor per pair."""
    _, b, oh, ow = planes.shape
    n, off = b * oh * ow, planes.storage_offset()
    out = []
    for i, j in pairs:
        grid = planes.as_strided((b, oh, ow, 2), (oh * ow, ow, 1, (j - i) * n), off + i * n)
        out.append(F.grid_sample(coeffs, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return out


def _bspline_value(coeffs: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """:func:`bspline_sample` without autograd: four merged bilinear taps and three lerps."""
    b, _, hh, ww = coeffs.shape
    oh, ow = px.shape[-2:]
    planes = torch.empty(4, b, oh, ow, dtype=px.dtype, device=px.device)  # qx0, qx1, qy0, qy1
    (gx,) = axis_taps(px + PAD, ww, planes[:2])
    (gy,) = axis_taps(py + PAD, hh, planes[2:])
    t = sample_taps(coeffs, planes, ((0, 2), (1, 2), (0, 3), (1, 3)))
    gx, gy = gx.unsqueeze(1), gy.unsqueeze(1)
    return torch.lerp(torch.lerp(t[3], t[2], gx), torch.lerp(t[1], t[0], gx), gy)


def bspline_sample(coeffs: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Sample cubic B-spline coefficient images at pixel positions.

    Parameters
    ----------
    coeffs : torch.Tensor
        ``(B, C, H + 2 PAD, W + 2 PAD)`` from :func:`bspline_prefilter`.
    px, py : torch.Tensor
        ``(B, h, w)`` sample positions in pixel-index units of the image (``0..W-1``).
        Exact with mirror boundaries up to one pixel outside; further out the border is extended
        (callers mask those pixels).

    Returns
    -------
    torch.Tensor
        ``(B, C, h, w)``; differentiable with respect to ``coeffs``, ``px`` and ``py``.
    """
    if not (torch.is_grad_enabled() and (coeffs.requires_grad or px.requires_grad or py.requires_grad)):
        return _bspline_value(coeffs, px, py)
    b, _, hh, ww = coeffs.shape
    hx0, hx1, gx0, gx1 = _taps(px + PAD)
    hy0, hy1, gy0, gy1 = _taps(py + PAD)
    xs = torch.stack([hx0, hx1, hx0, hx1], 1)  # (B, 4, h, w)
    ys = torch.stack([hy0, hy0, hy1, hy1], 1)
    gx = normalized_coords(xs, ww)
    gy = normalized_coords(ys, hh)
    oh, ow = px.shape[-2:]
    grid = torch.stack([gx, gy], -1).reshape(b, 4 * oh, ow, 2)
    taps = F.grid_sample(coeffs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    taps = taps.reshape(b, -1, 4, oh, ow)
    wts = torch.stack([gx0 * gy0, gx1 * gy0, gx0 * gy1, gx1 * gy1], 1).unsqueeze(1)
    return (taps * wts).sum(2)


def upsample2(image: torch.Tensor) -> torch.Tensor:
    """Exact 2x upsampling with the cubic B-spline interpolant, ``(B, C, H, W) -> (B, C, 2H, 2W)``.

    The output grid covers the same extent edge to edge (pixel ``j`` of the output sits at
    ``(j + 0.5) / 2 - 0.5`` of the input), so normalized coordinates are unchanged. Separable, with
    two fixed 4-tap kernels per axis: costs about as much as one blur.
    """
    b, c, h, w = image.shape
    coeffs = bspline_prefilter(image)  # padded by PAD on every side
    k_even = torch.tensor(_bspline_weights(0.75), dtype=image.dtype, device=image.device)  # x = k - 0.25
    k_odd = torch.tensor(_bspline_weights(0.25), dtype=image.dtype, device=image.device)  # x = k + 0.25
    x = coeffs.reshape(b * c, 1, h + 2 * PAD, w + 2 * PAD)
    # columns: output 2k uses coefficients k-2..k+1, output 2k+1 uses k-1..k+2 (in unpadded indices)
    even = F.conv2d(x[..., PAD - 2: PAD + w + 1], k_even.view(1, 1, 1, 4))
    odd = F.conv2d(x[..., PAD - 1: PAD + w + 2], k_odd.view(1, 1, 1, 4))
    x = torch.stack([even, odd], -1).reshape(b * c, 1, h + 2 * PAD, 2 * w)
    even = F.conv2d(x[..., PAD - 2: PAD + h + 1, :], k_even.view(1, 1, 4, 1))
    odd = F.conv2d(x[..., PAD - 1: PAD + h + 2, :], k_odd.view(1, 1, 4, 1))
    return torch.stack([even, odd], -2).reshape(b, c, 2 * h, 2 * w)


def _bspline_weights(f: float) -> list[float]:
    return [(1 - f) ** 3 / 6, (4 - 6 * f**2 + 3 * f**3) / 6, (1 + 3 * f + 3 * f**2 - 3 * f**3) / 6, f**3 / 6]


def sample_positions(theta: torch.Tensor, out_shape: tuple[int, int], src_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel samples the source, in source pixel-index units.

    Parameters
    ----------
    theta : torch.Tensor
        ``(B, 2, 3)`` normalized matrices (output position -> source position).
    out_shape : (h, w)
        Output grid size. The grid spans the same normalized extent as the source.
    src_shape : (H, W)
        Source image size in pixels.

    Returns
    -------
    px, py : torch.Tensor
        ``(B, h, w)`` each.
    """
    b = theta.shape[0]
    grid = F.affine_grid(theta, [b, 1, *out_shape], align_corners=False)
    hh, ww = src_shape
    px = pixel_coords(grid[..., 0], ww)
    py = pixel_coords(grid[..., 1], hh)
    return px, py


def inside_weight(px: torch.Tensor, py: torch.Tensor, src_shape: tuple[int, int], ramp: float = 1.0) -> torch.Tensor:
    """Soft mask of sample positions inside the source: 1 inside, 0 outside, linear over ``ramp`` px.

    A hard mask would make the loss jump as pixels cross the border, which stalls line searches;
    the ramp keeps the loss continuous while excluding the padded border. ``(B, h, w)`` output.
    """
    hh, ww = src_shape
    d = torch.minimum(torch.minimum(px, (ww - 1) - px), torch.minimum(py, (hh - 1) - py))
    return (d / ramp).clamp(0.0, 1.0)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (sigma in pixels, radius 3 sigma, replicated border) of ``(B, C, H, W)``."""
    b, c, h, w = images.shape
    return _separable(images.reshape(b * c, h, w), "blur", sigma).reshape(b, c, h, w)


def downscale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Anti-aliased bilinear downscaling of ``(B, C, H, W)`` images by ``factor`` (>= 1).

    The output is ``round(H / factor) x round(W / factor)`` (at least 8 x 8) and covers the same
    extent edge to edge, so normalized coordinates mean the same thing at every level.
    """
    if factor <= 1:
        return images
    h, w = images.shape[-2:]
    size = (max(8, round(h / factor)), max(8, round(w / factor)))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
