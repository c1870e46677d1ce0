"""Test stacks with exact ground truth, and the error of a registration against it.

Every slice is cut from one base image with a known random affine transform, as a detector would
record it: the transformed base is sampled on a 2x finer grid and each output pixel averages its
2 x 2 sub-pixels (so no interpolation kernel of ours is baked into the truth), then Gaussian noise is
added. The ideal registration is therefore known to machine precision. Writing them into a store and reading a
registration's error back: :mod:`sphero_lightning.storage.stacks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .frames import Affine, Frame, homogeneous, pixel_centre
from .interpolation import bspline_prefilter, bspline_sample
from .transforms import mean_displacement


@dataclass
class SyntheticStack:
    """A generated stack and its truth."""

    stack: np.ndarray  # (Z, H, W)
    composed: np.ndarray  # (Z - 1, 2, 3) normalized: output (slice 0) frame -> slice k
    slice_transforms: np.ndarray  # (Z, 2, 3) centered pixels: slice k pixel -> base pixel


def em_like_image(size: int = 512, seed: int = 0) -> np.ndarray:
    """A procedural image with EM-like content (cells with dark membranes, vesicles, grain), uint8.

    For demos and tests that must run without the real data.
    """
    rng = np.random.default_rng(seed)
    n_cells = max(8, size * size // 1500)
    pts = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.full((2, size, size), np.inf, dtype=np.float32)
    shade = np.zeros((size, size), dtype=np.float32)
    tones = rng.uniform(0.45, 0.8, n_cells).astype(np.float32)
    for (py, px), tone in zip(pts, tones):
        dist = np.hypot(yy - py, xx - px)
        nearer = dist < d[0]
        shade = np.where(nearer, tone, shade)
        d[1] = np.where(nearer, d[0], np.minimum(d[1], dist))
        d[0] = np.where(nearer, dist, d[0])
    membrane = np.exp(-((d[1] - d[0]) / 2.0) ** 2)
    img = shade - 0.45 * membrane
    for _ in range(size * size // 2500):  # vesicles
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 6)
        ring = np.exp(-((np.hypot(yy - cy, xx - cx) - r) / 1.0) ** 2)
        img -= 0.25 * ring
    t = torch.from_numpy(img)[None, None]
    grain = torch.from_numpy(rng.normal(0, 0.08, (size, size)).astype(np.float32))[None, None]
    k = torch.tensor([0.25, 0.5, 0.25])
    grain = F.conv2d(F.pad(grain, (1, 1, 1, 1), mode="reflect"), (k[:, None] * k[None, :])[None, None])
    t = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="reflect"), 3, stride=1) + grain
    out = (t[0, 0].numpy() - float(t.min())) / float(t.max() - t.min())
    return np.clip(out * 220 + 20, 0, 255).astype(np.uint8)


def load_isbi_slice(path: Path | str, index: int = 0) -> np.ndarray:
    """One slice of a TIFF stack, e.g. the ISBI 2012 training volume the tests and benchmarks cut stacks from."""
    import tifffile

    return np.asarray(tifffile.imread(str(path), key=index))


def random_transforms(n: int, rng: np.random.Generator, max_shift: float, max_rot_deg: float,
                      max_scale: float = 0.0, max_shear: float = 0.0) -> np.ndarray:
    """``(n, 2, 3)`` random centered-pixel affine maps ``R(theta) @ Shear(k) @ Scale(sx, sy)`` + t.

    Each parameter is uniform in ``[-max, max]`` (scales as ``1 + u``), independently per slice.
    """
    out = np.zeros((n, 2, 3))
    for i in range(n):
        th = math.radians(rng.uniform(-max_rot_deg, max_rot_deg))
        sx, sy = 1 + rng.uniform(-max_scale, max_scale), 1 + rng.uniform(-max_scale, max_scale)
        k = rng.uniform(-max_shear, max_shear)
        c, s = math.cos(th), math.sin(th)
        lin = np.array([[c, -s], [s, c]]) @ np.array([[1, k], [0, 1]]) @ np.diag([sx, sy])
        out[i, :, :2] = lin
        out[i, :, 2] = rng.uniform(-max_shift, max_shift, 2)
    return out


def render(base: np.ndarray, transforms: np.ndarray, shape: tuple[int, int], oversample: int = 2) -> np.ndarray:
    """Detector model: each output pixel averages ``oversample x oversample`` point samples of the
    transformed continuous image (the cubic B-spline model of ``base``). Float output ``(N, H, W)``.

    Point samples of a continuous model, averaged over the pixel area, involve no resampling of a
    discrete grid, so no phase-dependent interpolation kernel ends up in the truth.
    """
    h, w = shape
    n = oversample
    coeffs = bspline_prefilter(torch.from_numpy(base.astype(np.float64))[None, None])
    sub = (np.arange(n) + 0.5) / n - 0.5  # sub-pixel offsets inside a pixel
    cx, cy = pixel_centre(shape)
    bx0, by0 = pixel_centre(base.shape)
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1) - cy
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1) - cx
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    out = []
    for t in transforms:
        bx = t[0, 0] * gx + t[0, 1] * gy + t[0, 2] + bx0
        by = t[1, 0] * gx + t[1, 1] * gy + t[1, 2] + by0
        fine = bspline_sample(coeffs, torch.from_numpy(bx)[None], torch.from_numpy(by)[None])
        out.append(F.avg_pool2d(fine, n)[0, 0].numpy())
    return np.stack(out)


def make_stack(base: np.ndarray, n_slices: int = 16, shape: tuple[int, int] = (384, 384), max_shift: float = 8.0,
               max_rot_deg: float = 1.0, max_scale: float = 0.0, max_shear: float = 0.0, noise: float = 6.0,
               contrast: float = 0.0, brightness: float = 0.0, dtype: str = "uint8", seed: int = 0) -> SyntheticStack:
    """Cut a stack from ``base`` with random per-slice transforms (relative to the base) plus noise.

    Parameters
    ----------
    base : np.ndarray
        ``(Hb, Wb)`` image, larger than ``shape`` plus the largest displacement.
    max_shift, max_rot_deg, max_scale, max_shear : float
        Per-slice misalignment bounds (pixels, degrees, relative scale, shear); consecutive slices
        differ by up to twice these.
    noise : float
        Gaussian noise sigma in grey levels of ``dtype``'s range scaled from 8 bits.
    contrast, brightness : float
        Per-slice gain ``1 + u * contrast`` and offset ``u * brightness * 255`` (``u`` uniform in
        [-1, 1]); values are clipped, so some pixels saturate.
    """
    rng = np.random.default_rng(seed)
    tf = random_transforms(n_slices, rng, max_shift, max_rot_deg, max_scale, max_shear)
    img = render(base, tf, shape)
    gain = 1 + contrast * rng.uniform(-1, 1, (n_slices, 1, 1))
    offset = brightness * 255 * rng.uniform(-1, 1, (n_slices, 1, 1))
    mean = img.mean()
    img = (img - mean) * gain + mean + offset + rng.normal(0, noise, img.shape)
    scale = 257.0 if dtype == "uint16" else 1.0
    img = img * scale
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        img = np.clip(np.rint(img), info.min, info.max)
    stack = img.astype(dtype)
    return SyntheticStack(stack=stack, composed=truth_composed(tf, shape), slice_transforms=tf)


def truth_composed(tf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The composed transforms a registration should find for slices cut with ``tf`` (centered pixels, slice ->
    base): output (slice 0) centered -> slice k centered = ``T_k^-1 T_0``, normalized, ``(n - 1, 2, 3)``."""
    hom = homogeneous(torch.from_numpy(tf))
    comp = torch.linalg.inv(hom[1:]) @ hom[0]
    return Affine(comp[:, :2], Frame.CENTRED, shape).to(Frame.NORMALIZED).matrix.numpy()


def _field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A band-limited random field (``(size, size)`` float64, unit standard deviation): Gaussian noise low-passed at
    about ``scale`` pixels (periodic)."""
    f = np.fft.rfft2(rng.normal(size=(size, size)))
    ky, kx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    f *= np.exp(-0.5 * (ky ** 2 + kx ** 2) * (2 * np.pi * scale / 2.5) ** 2)
    out = np.fft.irfft2(f, s=(size, size))
    return out / out.std()


def continuous_volume(n_slices: int, size: int = 256, jitter: float = 3.0, jitter_deg: float = 0.3, period: float = 8.0,
                      noise: float = 6.0, seed: int = 0) -> SyntheticStack:
    """A volume whose content changes continuously along z, each slice displaced by independent jitter: the
    consecutive slices of a block-face stack with stage jitter, with exact truth (no drift: the true composed
    transforms undo the jitter alone).

    The content is a band-limited random field smoothly interpolated between independent keyframes ``period`` slices
    apart, drawn as cells with dark membranes (where the field crosses zero) and grain; each slice is rendered by the
    detector model of :func:`render` (no oversampling) at its own random shift (``jitter`` px) and rotation
    (``jitter_deg``), plus noise. Cheap: ~10 ms a slice at 256 px, so thousands of slices are quick to make.

    >>> v = continuous_volume(4, 64, seed=1)
    >>> v.stack.shape, v.stack.dtype.name, v.composed.shape
    ((4, 64, 64), 'uint8', (3, 2, 3))
    """
    rng = np.random.default_rng(seed)
    m = size + 2 * math.ceil(jitter + size * math.radians(jitter_deg) + 8)
    tf = np.zeros((n_slices, 2, 3))
    ang = np.deg2rad(rng.uniform(-jitter_deg, jitter_deg, n_slices))
    tf[:, 0, 0] = tf[:, 1, 1] = np.cos(ang)
    tf[:, 0, 1], tf[:, 1, 0] = -np.sin(ang), np.sin(ang)
    tf[:, :, 2] = rng.uniform(-jitter, jitter, (n_slices, 2))
    keys: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def key(k: int) -> tuple[np.ndarray, np.ndarray]:  # membranes' field and the cells' shading
        if k not in keys:
            keys.pop(k - 2, None)
            keys[k] = (_field(rng, m, 10.0), _field(rng, m, 24.0))
        return keys[k]

    out = np.empty((n_slices, size, size), np.uint8)
    for z in range(n_slices):
        k, t = divmod(z / period, 1.0)
        w = t * t * (3 - 2 * t)  # smooth in z: no kinks at the keyframes
        (a0, s0), (a1, s1) = key(int(k)), key(int(k) + 1)
        a, shade = (1 - w) * a0 + w * a1, (1 - w) * s0 + w * s1
        sec = 140 + 25 * shade - 90 * np.exp(-(a / 0.25) ** 2)
        img = render(sec, tf[z:z + 1], (size, size), oversample=1)[0] + rng.normal(0, noise, (size, size))
        out[z] = np.clip(np.rint(img), 0, 255)
    return SyntheticStack(stack=out, composed=truth_composed(tf, (size, size)), slice_transforms=tf)


def composed_error(estimated: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean displacement in pixels between estimated and true composed transforms, per slice.

    ``(N, 2, 3)`` normalized inputs; the mean is over every pixel centre of the slice.
    """
    est = torch.as_tensor(np.asarray(estimated), dtype=torch.float64)
    tru = torch.as_tensor(np.asarray(truth), dtype=torch.float64)
    return mean_displacement(est, tru, shape).numpy()


__all__ = ["SyntheticStack", "composed_error", "continuous_volume", "em_like_image", "load_isbi_slice", "make_stack", "render"]
