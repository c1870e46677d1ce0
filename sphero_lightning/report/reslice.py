"""Orthogonal reslices of a stack before and after registration, how straight they are, and the pictures of them.

A reslice cuts across the slices: the XZ reslice at row ``y`` holds row ``y`` of every slice, the YZ reslice at
column ``x`` column ``x`` of every slice. Each is read as one row (or column) band per slice, never the volume.
A misaligned stack shows jagged, torn structure in a reslice; an aligned one continuous structure. How jagged is
measured by :func:`row_steps`: the mean absolute difference between neighbouring rows (consecutive slices) of the
reslice, in units of the stack's intensity range.

numpy, zarr and Pillow only (no torch, no Lightning, no matplotlib): ``sphero report`` stays light.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zarr

#: The largest reslice picture: width in pixels (x or y, never enlarged) and height (slices stretched to the
#: spacing's aspect ratio; stretched less, and said so, where that would be taller).
MAX_WIDTH, MAX_HEIGHT = 640, 1200

#: The largest side of a pair overlay picture.
OVERLAY_SIDE = 320


#: Values of the source reslices kept to choose the page's intensity window: every row while they fit, else every
#: k-th row (the percentiles of a strided sample), so the window costs the same memory for any stack.
WINDOW_SAMPLE = 1 << 20
#: Rows of a reslice kept for its picture: beyond this, means of consecutive slices (the picture is at most
#: :data:`MAX_HEIGHT` rows, so this loses nothing it shows).
MAX_ROWS = 2 * MAX_HEIGHT
#: Bytes of slices read at once (per array) where both arrays store whole slices in one chunk.
BLOCK_BYTES = 16 << 20


@dataclass
class Reslice:
    """One orthogonal reslice, before (source) and after (registered output), in the output's frame.

    ``axis`` is ``"xz"`` (a row of every slice, at output row ``position``) or ``"yz"`` (a column, at output column
    ``position``); ``source_position`` is the same row or column of the uncropped source (the crop box's offset
    added). ``size`` is the reslice's ``(Z, W)`` (slices, pixels across the crop box). ``before`` and ``after`` are
    float32 over the same field of view, at most :data:`MAX_WIDTH` wide (area means across) and :data:`MAX_ROWS`
    tall (means of consecutive slices): the full reslice where it is that small, else what its picture needs, so
    the page's memory does not grow with the stack. ``steps`` are per step ``z -> z + 1`` the mean absolute difference
    between the two full rows (grey values; NaN where neither has a finite pixel), before and after;
    ``sample`` the source values the page's intensity window is taken from (every row, or every k-th of a large one).
    """

    axis: str
    position: int
    source_position: int
    before: np.ndarray
    after: np.ndarray
    size: tuple[int, int] = (0, 0)
    steps: tuple[np.ndarray, np.ndarray] | None = None
    sample: np.ndarray | None = None


def read_reslice(out: zarr.Array, src: zarr.Array, crop_box: list[int], axis: str, position: int) -> Reslice:
    """The ``axis`` (``"xz"`` or ``"yz"``) reslice at output row or column ``position``, before and after
    (:func:`read_reslices` of one band)."""
    return read_reslices(out, src, crop_box, [(axis, position)])[0]


class _Reduced:
    """One band of a reslice as its rows arrive: the raw steps between full rows, the rows reduced for the picture
    (area means across to ``width`` columns, means of ``group`` consecutive rows), a strided sample of raw values."""

    def __init__(self, full_width: int, n_rows: int, sample_every: int) -> None:
        self.width = max(1, round(full_width * min(1.0, MAX_WIDTH / full_width)))
        self.group = max(1, math.ceil(n_rows / MAX_ROWS))
        self.every, self.z = sample_every, 0
        self.across = None if self.width == full_width else _area_matrix(full_width, self.width)
        self.prev: np.ndarray | None = None
        self.steps: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.sample: list[np.ndarray] = []

    def add(self, rows: np.ndarray) -> None:
        """``(n, W)`` the next ``n`` rows (slices); ``n`` a multiple of ``group`` except at the end."""
        full = rows.astype(np.float64)
        stacked = full if self.prev is None else np.concatenate([self.prev[None], full])
        diff = np.abs(np.diff(stacked, axis=0))
        finite = np.isfinite(diff)
        with np.errstate(invalid="ignore"):
            step = np.where(finite, diff, 0.0).sum(1) / finite.sum(1)
        self.steps.append(np.where(finite.any(1), step, np.nan))
        self.prev = full[-1].copy()
        z = self.z + np.arange(len(rows))
        self.sample.append(rows[z % self.every == 0].astype(np.float32).ravel())
        self.z += len(rows)
        small = rows.astype(np.float32)
        if self.across is not None:
            nan = np.isnan(small)
            small = np.nan_to_num(small, nan=0.0) @ self.across
            if nan.any():
                small[(nan.astype(np.float32) @ self.across) > 0] = np.nan
        if self.group > 1:
            n = len(small) // self.group * self.group
            parts = [small[:n].reshape(-1, self.group, small.shape[1]).mean(1)]
            if n < len(small):
                parts.append(small[n:].mean(0, keepdims=True))
            small = np.concatenate(parts)
        self.rows.append(small.astype(np.float32))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate(self.rows), np.concatenate(self.steps) if self.steps else np.zeros(0),
                np.concatenate(self.sample))


def _area_matrix(n: int, m: int) -> np.ndarray:
    """``(n, m)``: ``n`` samples to ``m`` area means (each output covers ``n / m`` inputs, partial ones weighted)."""
    edges = np.arange(m + 1) * (n / m)
    lo, hi = np.arange(n)[:, None], np.arange(n)[:, None] + 1.0
    overlap = np.clip(np.minimum(hi, edges[None, 1:]) - np.maximum(lo, edges[None, :-1]), 0, None)
    return (overlap / (n / m)).astype(np.float32)


def read_reslices(out: zarr.Array, src: zarr.Array, crop_box: list[int], wanted: list[tuple[str, int]],
                  block_bytes: int = BLOCK_BYTES) -> list[Reslice]:
    """The reslices at every ``(axis, position)`` of ``wanted`` (:class:`Reslice`: output row ``y`` is source row
    ``y + up``, output column ``x`` source column ``x + left``; ``crop_box`` is ``[up, down, left, right]``, and the
    source band is cut to it, so both cover the same field of view). Read in blocks of slices, each reduced as it
    arrives: where both arrays store whole slices in one chunk, each block of at most ``block_bytes`` per array is
    read once and every band cut from it (a band read apart decompressed every slice once per band); otherwise band
    by band. Memory: a block and the reduced reslices, whatever the number of slices."""
    up, down, left, right = (int(v) for v in crop_box)
    nz = int(out.shape[0])
    for axis, _ in wanted:
        if axis not in ("xz", "yz"):
            raise ValueError(f"axis must be 'xz' or 'yz', got {axis!r}")
    whole = all(tuple(a.chunks[1:]) == tuple(a.shape[1:]) for a in (out, src))
    widths = [(right - left) if axis == "xz" else (down - up) for axis, _ in wanted]
    every = [max(1, math.ceil(nz * w / WINDOW_SAMPLE)) for w in widths]
    acc = [(_Reduced(w, nz, k), _Reduced(w, nz, k)) for w, k in zip(widths, every, strict=True)]
    group = max(a[0].group for a in acc) if acc else 1
    per_slice = int(np.prod(src.shape[1:])) * src.dtype.itemsize if whole else max(widths, default=1) * src.dtype.itemsize
    step = max(group, max(1, block_bytes // max(1, per_slice)) // group * group)
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        if whole:
            s_blk, o_blk = np.asarray(src[z0:z1]), np.asarray(out[z0:z1])
        for (axis, p), (bef, aft) in zip(wanted, acc, strict=True):
            if axis == "xz":
                b = s_blk[:, p + up, left:right] if whole else src[z0:z1, p + up, left:right]
                a = o_blk[:, p, :] if whole else out[z0:z1, p, :]
            else:
                b = s_blk[:, up:down, p + left] if whole else src[z0:z1, up:down, p + left]
                a = o_blk[:, :, p] if whole else out[z0:z1, :, p]
            bef.add(np.asarray(b))
            aft.add(np.asarray(a))
    result = []
    for (axis, p), w, (bef, aft) in zip(wanted, widths, acc, strict=True):
        (b_img, b_steps, sample), (a_img, a_steps, _) = bef.result(), aft.result()
        result.append(Reslice(axis, int(p), int(p + (up if axis == "xz" else left)), b_img, a_img, (nz, w),
                              (b_steps, a_steps), sample))
    return result


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentile of the finite values (a range of at least 1e-6)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return lo, max(hi, lo + 1e-6)


def row_steps(image: np.ndarray, window: tuple[float, float], skip: Iterable[int] = ()) -> np.ndarray:
    """Per step ``z -> z + 1`` of a ``(Z, W)`` reslice: the mean absolute difference between the two rows, divided
    by the width of ``window`` (the intensity range). NaN for a step that touches a slice in ``skip`` (damaged
    slices, whose content says nothing about the alignment)."""
    diff = np.abs(np.diff(image.astype(np.float64), axis=0))
    raw = np.array([np.nanmean(d) if np.isfinite(d).any() else np.nan for d in diff]) if len(diff) else np.zeros(0)
    return scaled_steps(raw, window, skip)


def scaled_steps(raw: np.ndarray, window: tuple[float, float], skip: Iterable[int] = ()) -> np.ndarray:
    """Steps in grey values (:attr:`Reslice.steps`) as :func:`row_steps` gives them: over the window's width, NaN
    next to a slice in ``skip``."""
    lo, hi = window
    steps = np.asarray(raw, dtype=np.float64) / (hi - lo)
    for z in skip:
        for s in (z - 1, z):
            if 0 <= s < len(steps):
                steps[s] = np.nan
    return steps


def straightness(steps: np.ndarray) -> float:
    """The mean of :func:`row_steps` over the steps that count (NaN when none does): smaller is straighter."""
    valid = steps[np.isfinite(steps)]
    return float(valid.mean()) if valid.size else float("nan")


def to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Grey values in ``window`` to 0..255 (clipped; NaN and inf black)."""
    lo, hi = window
    scaled = np.nan_to_num((image.astype(np.float64) - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def reslice_picture(image: np.ndarray, window: tuple[float, float], z_over_xy: float,
                    max_width: int = MAX_WIDTH, max_height: int = MAX_HEIGHT,
                    size: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """A ``(Z, W)`` reslice as a uint8 picture with the spacing's aspect ratio, fitted to ``max_width`` x
    ``max_height``.

    The width is reduced (area average) to at most ``max_width``, never enlarged; each slice then becomes
    ``z_over_xy`` (z spacing over the in-plane spacing) times as many rows as a pixel of that width is wide, so
    one picture pixel covers as much distance across as down. Where that would be taller than ``max_height`` the
    slices are stretched less. ``size``: the full reslice's ``(Z, W)`` where ``image`` is already reduced
    (:class:`Reslice`). Returns the picture and the displayed aspect as a fraction of the true one (1.0: true aspect).
    """
    from PIL import Image

    z, w = size if size is not None else image.shape
    scale = min(1.0, max_width / w)
    width = max(1, round(w * scale))
    true_height = z * z_over_xy * width / w
    height = max(1, min(max_height, round(true_height)))
    pic = Image.fromarray(to_uint8(image, window))
    rows, cols = image.shape
    if width != cols:
        pic = pic.resize((width, rows), Image.Resampling.BOX)
    if height != rows:
        pic = pic.resize((width, height), Image.Resampling.NEAREST if height > rows else Image.Resampling.BOX)
    return np.asarray(pic), (height / true_height if true_height > 0 else 1.0)


def overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Fixed in magenta, moving in green: aligned structures turn grey, misaligned ones coloured. ``(H, W, 3)``
    floats in [0, 1], each image stretched between its own 1st and 99th percentile."""
    def norm(x: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(x, [1, 99])
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)

    f, m = norm(fixed), norm(moving)
    return np.stack([f, m, f], -1)


def pair_overlays(out: zarr.Array, src: zarr.Array, crop_box: list[int], a: int, b: int,
                  side: int = OVERLAY_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Before/after overlays (uint8 RGB, at most ``side`` px on a side) of slices ``a`` (fixed) and ``b`` (moving):
    before from the source inside the crop box, after from the registered output. Reads four slices."""
    up, down, left, right = (int(v) for v in crop_box)
    step = max(1, math.ceil(max(down - up, right - left) / side))
    pictures = []
    for arr, rows, cols in ((src, slice(up, down, step), slice(left, right, step)), (out, slice(None, None, step),
                                                                                       slice(None, None, step))):
        fixed = np.nan_to_num(np.asarray(arr[a, rows, cols], dtype=np.float32))
        moving = np.nan_to_num(np.asarray(arr[b, rows, cols], dtype=np.float32))
        pictures.append(np.rint(overlay(fixed, moving) * 255).astype(np.uint8))
    return pictures[0], pictures[1]


def png_uri(image: np.ndarray) -> str:
    """A uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` picture as a ``data:image/png;base64`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
