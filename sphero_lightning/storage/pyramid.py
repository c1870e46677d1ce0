"""Downsampled levels of a written output, listed as OME-NGFF multiscales: what napari, neuroglancer and
BigDataViewer need to open a large volume at all.

Level ``k`` is level ``k - 1`` averaged over 2 x 2 pixels in y and x (z unchanged: sections are thicker than pixels
are wide), an odd last row or column dropped, integers rounded to nearest (numpy's ``rint``); its spacing doubles in
y and x and its translation places each pixel's centre where its 2^k x 2^k block of the full-resolution output lies.

Written in the same pass as the output where they can be (``storage/writing.py``: each writing task downsamples the
box it has just warped, in memory, into temporary level arrays that :func:`place_levels` renames into place beside
the output); else (a unit's start not a multiple of ``2^(levels-1)``) in a second pass, :func:`write_levels`, each
level from the one before, one task per slice on the writer's threads. Both give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..core.frames import pixel_centre
from ..core.settings import OUTPUT
from .store import create_array, move_into_place, open_group, spacing_name
from .tasks import run_tasks

#: The automatic number of levels stops once the largest side is at most this many pixels.
SMALLEST_SIDE = 1024


def default_levels(shape: tuple[int, int]) -> int:
    """Levels in all (the full resolution included) for slices of ``shape``: halve until the larger side is at most
    :data:`SMALLEST_SIDE` pixels (512 x 512: 1; 8192 x 8192: 4).

    >>> default_levels((512, 512)), default_levels((8192, 8192)), default_levels((1500, 900))
    (1, 4, 2)
    """
    return 1 + max(0, math.ceil(math.log2(max(shape) / SMALLEST_SIDE)))


def downsample2(image: np.ndarray) -> np.ndarray:
    """``(..., Y, X)`` averaged over 2 x 2 blocks in the last two axes, in ``image``'s dtype (integers rounded to
    nearest). Integers of up to 16 bits are summed in float32, where the sum of four is exact (so the result is that
    of float64, bit for bit, in less time); wider integers and floats in float64, slice by slice.

    >>> downsample2(np.array([[0, 1, 5], [2, 3, 5], [9, 9, 9]], np.uint8)).tolist()
    [[2]]
    """
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    dt = np.dtype(image.dtype)
    if np.issubdtype(dt, np.integer) and dt.itemsize <= 2:
        a = image[..., :h, :w]
        total = a[..., 0::2, 0::2].astype(np.float32)
        total += a[..., 1::2, 0::2]
        total += a[..., 0::2, 1::2]
        total += a[..., 1::2, 1::2]
        total *= 0.25
        return np.rint(total, out=total).astype(dt)  # a mean of in-range values rounds in range: nothing to clip
    if image.ndim > 2:
        return np.stack([downsample2(p) for p in image]).reshape(*image.shape[:-2], h // 2, w // 2)
    mean = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(dt)


def reduce2(image: np.ndarray, nearest: bool) -> np.ndarray:
    """One level down in the last two axes: :func:`downsample2`, or (``nearest``, label images) the top-left pixel
    of each 2 x 2 block."""
    if nearest:
        return image[..., 0:image.shape[-2] // 2 * 2:2, 0:image.shape[-1] // 2 * 2:2]
    return downsample2(image)


def level_shapes(shape: tuple[int, int, int], levels: int) -> list[tuple[int, int, int]]:
    """Shapes of levels ``1 .. levels - 1`` of an output of ``shape`` (y and x halved, rounded down, each time),
    up to the last with at least one pixel on a side."""
    out = []
    for k in range(1, levels):
        s = (shape[0], shape[1] >> k, shape[2] >> k)
        if min(s[1:]) < 1:
            break
        out.append(s)
    return out


def level_meta(name: str, spacing: list[float], crop_box: list[int], k: int, nearest: bool, below: str
               ) -> tuple[str, dict]:
    """The name and attributes of level ``k`` of the array ``name`` (``below``: the name of level ``k - 1``)."""
    f = 2 ** k
    up, _, left, _ = crop_box
    sp = [spacing[0], spacing[1] * f, spacing[2] * f]
    level = spacing_name(sp) if name == spacing_name(spacing) else f"{name}-{f}x"
    # the centre of level-k pixel 0 lies at full-resolution pixel (f - 1) / 2 of the cropped output (the mean of its
    # block), or at pixel 0 (nearest: the block's top-left pixel)
    c = 0.0 if nearest else pixel_centre((f, f))[0]
    return level, {"spacing": sp, "multiscale_level": k, "downsampled_from": below,
                   "translation_nm": [0.0, (up + c) * spacing[1], (left + c) * spacing[2]]}


def place_levels(root: str | Path, group_path: str, name: str, levels: int,
                 tmp_levels: list[tuple[str, Any, Any]] | None, *, nearest: bool = False, **second_pass: Any) -> list[str]:
    """Levels ``1 .. levels - 1`` beside the array ``group_path/name`` (in place already); returns their names.
    ``tmp_levels``: the temporary arrays the writing tasks filled in the same pass (``(name, shape, chunks)``, as
    :func:`~sphero_lightning.storage.writing.level_arrays` plans them), renamed into place here with their attributes;
    ``None``: written now from the array in a second pass (:func:`write_levels`, which takes ``second_pass``:
    ``num_workers``, ``progress``, ``compression_level``)."""
    if tmp_levels is None:
        return write_levels(root, group_path, name, levels, nearest=nearest, **second_pass) if levels > 1 else []
    group = open_group(root, group_path)
    attrs = group[name].attrs
    spacing = [float(s) for s in attrs["spacing"]]
    names = [name]
    for k, (tmp, _, _) in enumerate(tmp_levels, 1):
        level, meta = level_meta(name, spacing, attrs.get("crop_box", [0, 0, 0, 0]), k, nearest, names[-1])
        group[tmp].attrs.update(meta)
        move_into_place(root, group_path, tmp, level)
        names.append(level)
    return names[1:]


def write_levels(root: str | Path, group_path: str, name: str, levels: int, *, num_workers: int = OUTPUT.num_workers,
                 progress: bool = False, compression_level: int = OUTPUT.compression_level, nearest: bool = False) -> list[str]:
    """Write levels ``1 .. levels - 1`` of the array ``group_path/name`` beside it; returns their names. Named by
    their spacing where the array is (``50-4-4`` -> ``50-8-8``, ``50-16-16``), else ``<name>-2x``, ``<name>-4x``.
    ``nearest`` (label images): each level keeps every other pixel (the top-left of each 2 x 2 block) instead of the
    mean, so labels stay labels."""
    group = open_group(root, group_path)
    prev = group[name]
    spacing = [float(s) for s in prev.attrs["spacing"]]
    crop = prev.attrs.get("crop_box", [0, 0, 0, 0])
    names = []
    for k, shape in enumerate(level_shapes(tuple(prev.shape), levels), 1):
        level, meta = level_meta(name, spacing, crop, k, nearest, prev.basename)
        out = create_array(group, level, shape=shape, chunks=(1, *(min(c, s) for c, s in zip(prev.chunks[1:], shape[1:]))),
                           dtype=prev.dtype, compression_level=compression_level)

        def one(z: int, src: zarr.Array = prev, dst: zarr.Array = out) -> None:
            dst[z] = reduce2(np.asarray(src[z]), nearest)

        run_tasks(one, [(z,) for z in range(shape[0])], num_workers=num_workers, progress=progress,
                  desc=f"level {k} ({shape[1]} x {shape[2]})", unit="slice")
        out.attrs.update(meta)
        names.append(level)
        prev = out
    return names
