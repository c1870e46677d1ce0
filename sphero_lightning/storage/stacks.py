"""Test stacks in a store: a generated stack written as ``sphero fit``'s input, and a finished registration's error
against the truth it carries (the stacks themselves: :mod:`sphero_lightning.core.synthetic`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from ..core.synthetic import composed_error


def write_zarr(stack: np.ndarray, root: str | Path, array: str = "images/50-4-4", spacing: tuple[float, float, float] = (50, 4, 4),
               chunks: tuple[int, ...] | None = None, truth: np.ndarray | None = None, zarr_format: int = 3) -> str:
    """Write a stack as the ``sphero fit`` input: a Zarr array (v3 by default, or v2) with ``spacing``. Returns ``root``."""
    group = zarr.open_group(str(root), mode="a", zarr_format=zarr_format)
    if zarr_format == 2:
        import numcodecs

        codec = numcodecs.Zstd(level=3)
    else:
        codec = ZstdCodec(level=3)
    arr = group.create_array(array, shape=stack.shape, dtype=stack.dtype, chunks=chunks or (1, *stack.shape[1:]),
                             compressors=codec, overwrite=True)
    arr[:] = stack
    arr.attrs["spacing"] = list(spacing)
    if truth is not None:
        arr.attrs["synthetic_truth_composed"] = np.asarray(truth).tolist()
    return str(root)


def pixel_error_of_output(root: str | Path, output: str, truth: np.ndarray | None = None) -> float:
    """Mean composed-transform error (px) of a finished registration against its truth."""
    out = zarr.open_array(str(root), path=output, mode="r")
    src_path = out.attrs["inputs"][0]
    src = zarr.open_array(str(root), path=src_path, mode="r")
    if truth is None:
        truth = np.asarray(src.attrs["synthetic_truth_composed"])
    est = np.asarray(out.attrs["composed_transforms"])
    return float(composed_error(est, truth[: len(est)], tuple(src.shape[1:])).mean())
