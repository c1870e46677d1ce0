"""Downsampled levels of a written output, listed as OME-NGFF multiscales: what napari, neuroglancer and
BigDataViewer need to open a large volume at all.

Level ``k`` is level ``k - 1`` averaged over 2 x 2 pixels in y and x (z unchanged: sections are thicker than pixels
are wide), an odd last row or column dropped, integers rounded to nearest (numpy's ``rint``); its spacing doubles in
y and x and its translation places each pixel's centre where its 2^k x 2^k block of the full-resolution output lies.
Each level is written from the one before (a quarter of its pixels), one task per slice on the writer's threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

from .store import create_array, open_group, spacing_name
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
    """``(Y, X)`` averaged over 2 x 2 blocks, in ``image``'s dtype (integers rounded to nearest).

    >>> downsample2(np.array([[0, 1, 5], [2, 3, 5], [9, 9, 9]], np.uint8)).tolist()
    [[2]]
    """
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    mean = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(image.dtype)


def write_levels(root: str | Path, group_path: str, name: str, levels: int, *, num_workers: int = 4,
                 progress: bool = False, compression_level: int = 3, nearest: bool = False) -> list[str]:
    """Write levels ``1 .. levels - 1`` of the array ``group_path/name`` beside it; returns their names. Named by
    their spacing where the array is (``50-4-4`` -> ``50-8-8``, ``50-16-16``), else ``<name>-2x``, ``<name>-4x``.
    ``nearest`` (label images): each level keeps every other pixel (the top-left of each 2 x 2 block) instead of the
    mean, so labels stay labels."""
    group = open_group(root, group_path)
    prev = group[name]
    spacing = [float(s) for s in prev.attrs["spacing"]]
    up, _, left, _ = prev.attrs.get("crop_box", [0, 0, 0, 0])
    names = []
    for k in range(1, levels):
        f = 2 ** k
        shape = (prev.shape[0], prev.shape[1] // 2, prev.shape[2] // 2)
        if min(shape[1:]) < 1:
            break
        sp = [spacing[0], spacing[1] * f, spacing[2] * f]
        level = spacing_name(sp) if name == spacing_name(spacing) else f"{name}-{f}x"
        out = create_array(group, level, shape=shape, chunks=(1, *(min(c, s) for c, s in zip(prev.chunks[1:], shape[1:]))),
                           dtype=prev.dtype, compression_level=compression_level)

        def one(z: int, src: zarr.Array = prev, dst: zarr.Array = out, size: tuple[int, ...] = shape) -> None:
            img = np.asarray(src[z])
            dst[z] = img[0:2 * size[1]:2, 0:2 * size[2]:2] if nearest else downsample2(img)

        run_tasks(one, [(z,) for z in range(shape[0])], num_workers=num_workers, progress=progress,
                  desc=f"level {k} ({shape[1]} x {shape[2]})", unit="slice")
        # the centre of level-k pixel 0 lies at full-resolution pixel (f - 1) / 2 of the cropped output (the mean of its
        # block), or at pixel 0 (nearest: the block's top-left pixel)
        c = 0.0 if nearest else (f - 1) / 2
        out.attrs.update({"spacing": sp, "multiscale_level": k, "downsampled_from": prev.basename,
                          "translation_nm": [0.0, (up + c) * spacing[1], (left + c) * spacing[2]]})
        names.append(level)
        prev = out
    return names
