"""Coordinate frames with numpy only (``sphero export`` imports no torch): normalized matrices to pixel ``tmats``
(pystackreg's convention), centred-pixel matrices (``u = x_pixel - (W - 1) / 2``: where the volume solve does its
algebra, a residual being a displacement in pixels), and a pixel matrix's decomposition into displacement, rotation,
scale and shear.

Frames: *normalized* coordinates are torch's ``affine_grid`` convention (``align_corners=False``): x and y run over
``[-1, 1]`` across the slice, pixel centres at ``(2 i + 1) / n - 1``; *pixel* coordinates are pixel indices,
``x = (W x_n + W - 1) / 2``. The torch versions for batches (``normalized_to_pixel`` and friends) are in
:mod:`~sphero_lightning.core.transforms`.

Two composed transforms (slices 1 and 2, normalized) as the pixel tmats users export (slice 0: the identity), and
what one of them does:

>>> tm = pixel_matrices([[[1, 0, 0.1], [0, 1, 0]], [[1, 0, 0.2], [0, 1, 0]]], (100, 200))
>>> tm.shape, tm[2, 0].tolist()
((3, 3, 3), [1.0, 0.0, 20.0])
>>> decompose(tm[1], (100, 200))
{'dx_px': 10.0, 'dy_px': 0.0, 'rotation_deg': 0.0, 'scale_x': 1.0, 'scale_y': 1.0, 'shear': 0.0}
>>> to_centered(np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]), (100, 200))[0].tolist()
[1.0, 0.0, 10.0]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Where a registration whose output takes another slice's frame (``--solve.reference``) keeps slice 0's transform.
FIRST_KEY = "composed_transform_slice0"


def composed_of_all(attrs: Any) -> np.ndarray:
    """``(Z, 2, 3)`` normalized transforms of every slice of a registration's output attributes: slice 0's (the
    identity, unless the output takes another slice's frame) and ``composed_transforms`` (slices 1..)."""
    rest = np.asarray(attrs["composed_transforms"], dtype=np.float64).reshape(-1, 2, 3)
    first = np.asarray(attrs.get(FIRST_KEY, np.eye(3)[:2]), dtype=np.float64).reshape(1, 2, 3)
    return np.concatenate([first, rest])


def pixel_matrices(composed: np.ndarray | list, shape: tuple[int, int], first: np.ndarray | None = None) -> np.ndarray:
    """``(Z - 1, 2, 3)`` normalized composed transforms (slices 1..) to ``(Z, 3, 3)`` pixel tmats (slice 0 = I, or
    ``first``: slice 0's normalized transform where the output takes another slice's frame).

    torch's normalized coordinates (``align_corners=False``) map to pixel indices by ``x = (W x_n + W - 1) / 2``,
    so each matrix is conjugated by that scaling (numpy only: ``sphero export`` needs no torch).
    """
    comp = np.asarray(composed, dtype=np.float64).reshape(-1, 2, 3)
    h, w = shape
    to_px = np.array([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1.0]])
    if first is not None and np.array_equal(np.asarray(first, dtype=np.float64).reshape(2, 3), np.eye(3)[:2]):
        first = None  # the output's own frame: slice 0 exactly the identity, as always
    if first is not None:
        comp = np.concatenate([np.asarray(first, dtype=np.float64).reshape(1, 2, 3), comp])
    hom = np.concatenate([comp, np.tile(np.array([[[0, 0, 1.0]]]), (len(comp), 1, 1))], 1)
    px = to_px @ hom @ np.linalg.inv(to_px)
    return px if first is not None else np.concatenate([np.eye(3)[None], px])


def decompose(m: np.ndarray, shape: tuple[int, int]) -> dict[str, float]:
    """Centre displacement, rotation, scale and shear of one ``(3, 3)`` pixel matrix.

    ``A = R(rotation) @ [[scale_x, shear * scale_y], [0, scale_y]]``; the displacement is where the slice
    centre is sampled minus the centre.
    """
    c = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2, 1.0])
    d = m @ c - c
    a = m[:2, :2]
    rot = math.atan2(a[1, 0], a[0, 0])
    r = np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])  # R^T
    u = r @ a
    return {"dx_px": float(d[0]), "dy_px": float(d[1]), "rotation_deg": math.degrees(rot),
            "scale_x": float(u[0, 0]), "scale_y": float(u[1, 1]), "shear": float(u[0, 1] / u[1, 1])}


def fill_between(known: dict[int, np.ndarray], n: int, default: np.ndarray) -> np.ndarray:
    """``(n, ...)``: ``known[z]`` where given; elsewhere interpolated entry-wise between the nearest known slices on
    either side (by slice position), or the nearest one's at either end (``default`` where none is known)."""
    order = sorted(known)
    out = np.zeros((n, *np.shape(default)))
    for z in range(n):
        if z in known:
            out[z] = known[z]
            continue
        before = [g for g in order if g < z]
        after = [g for g in order if g > z]
        if before and after:
            lo, hi = before[-1], after[0]
            t = (z - lo) / (hi - lo)
            out[z] = (1 - t) * known[lo] + t * known[hi]
        else:
            out[z] = known[before[-1]] if before else (known[after[0]] if after else default)
    return out


def to_centered(theta: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(..., 2, 3)`` normalized matrices to centered-pixel ones (``u = x_pixel - (W - 1) / 2``)."""
    h, w = shape
    d = np.array([2.0 / w, 2.0 / h])
    out = np.array(theta, dtype=np.float64, copy=True)
    out[..., :2] = out[..., :2] * d[None, :] / d[:, None]  # D^-1 L D
    out[..., 2] = out[..., 2] / d
    return out


def to_normalized(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`to_centered`."""
    h, w = shape
    d = np.array([2.0 / w, 2.0 / h])
    out = np.array(a, dtype=np.float64, copy=True)
    out[..., :2] = out[..., :2] * d[:, None] / d[None, :]
    out[..., 2] = out[..., 2] * d
    return out
