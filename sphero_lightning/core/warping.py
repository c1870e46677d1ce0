"""Whole-image warps with normalized affine matrices (output position -> source position), in windows of the output
frame: the B-spline interpolant of :mod:`.interpolation`, torch's bicubic and bilinear, or the nearest pixel as an
index lookup (any dtype, values kept exactly).

A normalized shift of 2/W moves the image by one pixel; the identity returns it:

>>> img = torch.arange(30.0).reshape(1, 1, 5, 6)
>>> bool(torch.allclose(warp(img, torch.eye(3)[None, :2]), img, atol=1e-4))
True
>>> warp(img, torch.tensor([[[1.0, 0.0, 2 / 6], [0.0, 1.0, 0.0]]]))[0, 0, 2, :5].round().tolist()
[13.0, 14.0, 15.0, 16.0, 17.0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .frames import normalized_coords, pixel_coords
from .interpolation import bspline_prefilter, bspline_sample


def window_positions(theta: torch.Tensor, src_shape: tuple[int, int], out_shape: tuple[int, int] | None,
                      offset: tuple[int, int], full_shape: tuple[int, int] | None) -> torch.Tensor:
    """Normalized source positions ``(B, h, w, 2)`` sampled by each pixel of an output window."""
    full = full_shape or src_shape
    oh, ow = out_shape or full
    # Pixel centres of the window in the full frame's normalized coordinates.
    ys = normalized_coords(torch.arange(oh, dtype=theta.dtype, device=theta.device) + offset[0], full[0])
    xs = normalized_coords(torch.arange(ow, dtype=theta.dtype, device=theta.device) + offset[1], full[1])
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1)  # (h, w, 3)
    return torch.einsum("bij,hwj->bhwi", theta, pts)


def nearest_index(theta: torch.Tensor, src_shape: tuple[int, int], out_shape: tuple[int, int] | None = None,
                  offset: tuple[int, int] = (0, 0), full_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column ``(B, h, w)`` of the source pixel nearest to each output pixel (clamped to the slice).

    Nearest-neighbour resampling as an index lookup keeps any value exactly (label ids of any integer type).
    """
    hh, ww = src_shape
    src = window_positions(theta.double(), src_shape, out_shape, offset, full_shape)
    ix = torch.round(pixel_coords(src[..., 0], ww)).long().clamp(0, ww - 1)
    iy = torch.round(pixel_coords(src[..., 1], hh)).long().clamp(0, hh - 1)
    return iy, ix


def warp_coefficients(coeffs: torch.Tensor, theta: torch.Tensor, src_shape: tuple[int, int],
                      out_shape: tuple[int, int] | None = None, offset: tuple[int, int] = (0, 0),
                      full_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`warp` in ``bspline`` mode from precomputed :func:`bspline_prefilter` coefficients of ``src_shape``
    images (prefilter once, then sample any number of windows)."""
    px, py = window_pixel_positions(theta, src_shape, out_shape, offset, full_shape)
    return bspline_sample(coeffs, px, py)


def window_pixel_positions(theta: torch.Tensor, src_shape: tuple[int, int], out_shape: tuple[int, int] | None = None,
                           offset: tuple[int, int] = (0, 0), full_shape: tuple[int, int] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source positions ``(px, py)``, each ``(B, h, w)`` in pixel-index units (``theta``'s dtype), sampled by an
    output window. Each is a per-column plus a per-row term, summed in float64 and rounded once (as
    :func:`window_positions`, without its ``(B, h, w, 2)`` grid)."""
    hh, ww = src_shape
    full = full_shape or src_shape
    oh, ow = out_shape or full
    th = theta.to(torch.float64)
    ys = normalized_coords(torch.arange(oh, dtype=torch.float64, device=theta.device) + offset[0], full[0])
    xs = normalized_coords(torch.arange(ow, dtype=torch.float64, device=theta.device) + offset[1], full[1])
    out = []
    for row, size in ((th[:, 0], ww), (th[:, 1], hh)):
        # pixel = (size / 2) (a xs + b ys + c + 1) - 1/2
        col = (size / 2) * row[:, 0, None] * xs  # (B, w)
        per_row = (size / 2) * (row[:, 1, None] * ys + row[:, 2, None] + 1) - 0.5  # (B, h)
        out.append((per_row[:, :, None] + col[:, None, :]).to(theta.dtype))
    return out[0], out[1]


def warp(image: torch.Tensor, theta: torch.Tensor, out_shape: tuple[int, int] | None = None, mode: str = "bspline",
         offset: tuple[int, int] = (0, 0), full_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Warp images with normalized affine matrices.

    Parameters
    ----------
    image : torch.Tensor
        ``(B, C, H, W)`` floating point (any dtype for ``nearest``).
    theta : torch.Tensor
        ``(B, 2, 3)`` normalized matrices (output position -> source position).
    out_shape : (h, w), optional
        Size of the output window; default the full image.
    mode : {"bspline", "bicubic", "bilinear", "nearest"}
        Interpolation. ``bspline`` is the prefiltered cubic B-spline.
    offset : (row, col)
        Top-left pixel of the output window inside the full output frame (for cropped output).
    full_shape : (H, W), optional
        The full output frame the matrices refer to; default ``image``'s size.

    Returns
    -------
    torch.Tensor
        ``(B, C, h, w)``; positions outside the source take the nearest border value.
    """
    hh, ww = image.shape[-2:]
    if mode == "nearest":
        iy, ix = nearest_index(theta, (hh, ww), out_shape, offset, full_shape)
        flat = image.reshape(*image.shape[:2], hh * ww)
        idx = (iy * ww + ix).reshape(image.shape[0], 1, -1).expand(-1, image.shape[1], -1)
        return flat.gather(2, idx).reshape(*image.shape[:2], *iy.shape[-2:])
    if mode == "bspline":
        return warp_coefficients(bspline_prefilter(image), theta, (hh, ww), out_shape, offset, full_shape)
    src = window_positions(theta, (hh, ww), out_shape, offset, full_shape)
    return F.grid_sample(image, src.to(image.dtype), mode=mode, padding_mode="border", align_corners=False)
