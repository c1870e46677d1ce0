"""The largest axis-aligned box valid in every slice, computed exactly from the transforms.

An output pixel is valid for slice k when the position it samples in slice k lies inside that slice
(pixel centres ``0..W-1``, ``0..H-1``). For an affine transform that is four linear inequalities;
on one output row each becomes a bound on the column, so the valid pixels of a row form one interval
(the intersection of convex regions is convex). The largest box is then the best run of rows by
(rows x width of the intersection of their intervals), searched exhaustively: O(H^2) vectorised,
well under a second at 8k rows.

Slices shifted by 10 and 20 px to the right (pixel tmats: output pixel -> source pixel) leave the columns a
slice 200 px wide covers in all three:

>>> tm = np.stack([np.eye(3), [[1, 0, 10], [0, 1, 0], [0, 0, 1]], [[1, 0, 20], [0, 1, 0], [0, 0, 1]]])
>>> crop_box(tm, (100, 200))  # [up, down, left, right]
[0, 100, 0, 180]
"""

from __future__ import annotations

import numpy as np

_TOL = 1e-6  # pixels: positions this close to the border count as inside (float round-off)


def valid_row_intervals(pixel_mats: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per output row, the first and last column valid in every slice.

    Parameters
    ----------
    pixel_mats : np.ndarray
        ``(N, 3, 3)`` pixel-index matrices (output pixel -> position in slice k).
    shape : (H, W)

    Returns
    -------
    lo, hi : np.ndarray
        ``(H,)`` int; row ``y`` is valid for columns ``lo[y]..hi[y]`` (empty where ``lo > hi``).
    """
    h, w = shape
    ys = np.arange(h, dtype=np.float64)
    lo = np.zeros(h)
    hi = np.full(h, w - 1.0)
    for m in np.asarray(pixel_mats, dtype=np.float64):
        for row, limit in ((m[0], w - 1.0), (m[1], h - 1.0)):
            a, b, c = row
            base = b * ys + c  # position = a * x + base must lie in [0, limit]
            if abs(a) < 1e-12:
                inside = (base >= -_TOL) & (base <= limit + _TOL)
                lo = np.where(inside, lo, np.inf)
                continue
            x1, x2 = (-base) / a, (limit - base) / a
            lo = np.maximum(lo, np.minimum(x1, x2))
            hi = np.minimum(hi, np.maximum(x1, x2))
    lo_i = np.ceil(lo - _TOL)
    hi_i = np.floor(hi + _TOL)
    lo_i = np.where(np.isfinite(lo_i), lo_i, w).astype(np.int64)
    hi_i = np.where(np.isfinite(hi_i), hi_i, -1).astype(np.int64)
    return lo_i, hi_i


def largest_box(lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int] | None:
    """Largest-area box ``(up, down, left, right)`` (end-exclusive) inside per-row intervals.

    Returns ``None`` when no pixel is valid.
    """
    h = len(lo)
    best, box = 0, None
    for y0 in range(h):
        if lo[y0] > hi[y0]:
            continue
        left = np.maximum.accumulate(lo[y0:])
        right = np.minimum.accumulate(hi[y0:])
        width = right - left + 1
        # A run stops at the first row that empties it.
        stop = np.argmax(width <= 0) if (width <= 0).any() else len(width)
        if stop == 0:
            continue
        area = width[:stop] * np.arange(1, stop + 1)
        k = int(np.argmax(area))
        if area[k] > best:
            best = int(area[k])
            box = (y0, y0 + k + 1, int(left[k]), int(right[k]) + 1)
    return box


def crop_box(pixel_mats: np.ndarray, shape: tuple[int, int], margin: int = 0) -> list[int]:
    """``[up, down, left, right]`` (rows ``up:down``, columns ``left:right``) valid in every slice.

    Raises ``ValueError`` when the slices do not overlap at all (or nothing is left after ``margin``).
    """
    box = largest_box(*valid_row_intervals(pixel_mats, shape))
    if box is None:
        raise ValueError("the registered slices have no pixel in common; the registration failed")
    up, down, left, right = box
    up, down, left, right = up + margin, down - margin, left + margin, right - margin
    if down <= up or right <= left:
        raise ValueError(f"crop_safety_margin {margin} leaves nothing of the {box} box; lower it")
    return [up, down, left, right]
