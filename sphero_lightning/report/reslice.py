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


@dataclass
class Reslice:
    """One orthogonal reslice, before (source) and after (registered output), in the output's frame.

    ``axis`` is ``"xz"`` (a row of every slice, at output row ``position``) or ``"yz"`` (a column, at output column
    ``position``); ``source_position`` is the same row or column of the uncropped source (the crop box's offset
    added). ``before`` and ``after`` are ``(Z, W)`` float32 over the same field of view (the crop box).
    """

    axis: str
    position: int
    source_position: int
    before: np.ndarray
    after: np.ndarray


def read_reslice(out: zarr.Array, src: zarr.Array, crop_box: list[int], axis: str, position: int) -> Reslice:
    """The ``axis`` (``"xz"`` or ``"yz"``) reslice at output row or column ``position``, before and after.

    Output row ``y`` is source row ``y + up`` and output column ``x`` source column ``x + left`` (``crop_box`` is
    ``[up, down, left, right]``); the source band is cut to the crop box, so both cover the same field of view.
    Reads one row or column band per slice of each array.
    """
    up, down, left, right = (int(v) for v in crop_box)
    nz = int(out.shape[0])
    if axis == "xz":
        source_position = position + up
        before, after = src[:nz, source_position, left:right], out[:, position, :]
    elif axis == "yz":
        source_position = position + left
        before, after = src[:nz, up:down, source_position], out[:, :, position]
    else:
        raise ValueError(f"axis must be 'xz' or 'yz', got {axis!r}")
    return Reslice(axis, int(position), int(source_position), np.asarray(before, dtype=np.float32),
                   np.asarray(after, dtype=np.float32))


def read_reslices(out: zarr.Array, src: zarr.Array, crop_box: list[int], wanted: list[tuple[str, int]],
                  block_bytes: int = 64 << 20) -> list[Reslice]:
    """:func:`read_reslice` of every ``(axis, position)`` in ``wanted``. Where both arrays store whole slices in one
    chunk, each array is read once, in blocks of slices of at most ``block_bytes``, and every band is cut from those
    (each band read apart decompressed every slice once per band); otherwise band by band."""
    whole = all(tuple(a.chunks[1:]) == tuple(a.shape[1:]) for a in (out, src))
    if not whole or not wanted:
        return [read_reslice(out, src, crop_box, axis, p) for axis, p in wanted]
    up, down, left, right = (int(v) for v in crop_box)
    nz = int(out.shape[0])
    before = {k: [] for k in range(len(wanted))}
    after = {k: [] for k in range(len(wanted))}
    step = max(1, block_bytes // max(1, int(np.prod(src.shape[1:])) * src.dtype.itemsize))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        s_blk, o_blk = np.asarray(src[z0:z1]), np.asarray(out[z0:z1])
        for k, (axis, p) in enumerate(wanted):
            if axis == "xz":
                before[k].append(s_blk[:, p + up, left:right])
                after[k].append(o_blk[:, p, :])
            elif axis == "yz":
                before[k].append(s_blk[:, up:down, p + left])
                after[k].append(o_blk[:, :, p])
            else:
                raise ValueError(f"axis must be 'xz' or 'yz', got {axis!r}")
    return [Reslice(axis, int(p), int(p + (up if axis == "xz" else left)),
                    np.concatenate(before[k]).astype(np.float32), np.concatenate(after[k]).astype(np.float32))
            for k, (axis, p) in enumerate(wanted)]


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
    lo, hi = window
    diff = np.abs(np.diff(image.astype(np.float64), axis=0)) / (hi - lo)
    steps = np.array([np.nanmean(d) if np.isfinite(d).any() else np.nan for d in diff]) if len(diff) else np.zeros(0)
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
                    max_width: int = MAX_WIDTH, max_height: int = MAX_HEIGHT) -> tuple[np.ndarray, float]:
    """A ``(Z, W)`` reslice as a uint8 picture with the spacing's aspect ratio, fitted to ``max_width`` x
    ``max_height``.

    The width is reduced (area average) to at most ``max_width``, never enlarged; each slice then becomes
    ``z_over_xy`` (z spacing over the in-plane spacing) times as many rows as a pixel of that width is wide, so
    one picture pixel covers as much distance across as down. Where that would be taller than ``max_height`` the
    slices are stretched less. Returns the picture and the displayed aspect as a fraction of the true one (1.0:
    true aspect).
    """
    from PIL import Image

    z, w = image.shape
    scale = min(1.0, max_width / w)
    width = max(1, round(w * scale))
    true_height = z * z_over_xy * width / w
    height = max(1, min(max_height, round(true_height)))
    pic = Image.fromarray(to_uint8(image, window))
    if width != w:
        pic = pic.resize((width, z), Image.Resampling.BOX)
    if height != z:
        pic = pic.resize((width, height), Image.Resampling.NEAREST if height > z else Image.Resampling.BOX)
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
