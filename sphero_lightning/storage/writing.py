"""Writing a registered stack: output chunk layout, dtype handling, and warping every slice once into an array.

Used by the fit's writer (``training/writer.py``) and by ``sphero apply``; no Lightning.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr

from ..core.interpolation import bspline_prefilter, nearest_index, warp, warp_coefficients
from ..errors import SpheroError


def to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range; float dtypes pass through."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


def output_layout(src_chunks: tuple[int, ...], out_shape: tuple[int, int, int], chunks: list[int] | None = None,
                  shards: list[int] | None = None) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """Chunk and shard shapes of an output array.

    Default chunks: one slice deep, the source's chunking in y and x (capped at the output's size). ``shards``
    (zarr v3 sharding: many chunks in one file) must be whole multiples of the chunks along every axis.
    """
    if chunks is None:
        ch = (1, *(min(int(c), s) for c, s in zip(src_chunks[1:], out_shape[1:])))
    else:
        if len(chunks) != 3 or any(int(c) < 1 for c in chunks):
            raise SpheroError(f"output chunks must be three positive numbers [z, y, x], got {chunks}")
        # capped at the output's size unless sharded (shards must stay whole multiples of the chunks)
        ch = tuple(int(c) if shards is not None else min(int(c), s) for c, s in zip(chunks, out_shape))
    if shards is None:
        return ch, None
    if len(shards) != 3 or any(int(v) < 1 for v in shards):
        raise SpheroError(f"output shards must be three positive numbers [z, y, x], got {shards}")
    sh = tuple(int(v) for v in shards)
    if any(v % c for v, c in zip(sh, ch)):
        raise SpheroError(f"output shards {list(sh)} must be whole multiples of the chunks {list(ch)} along every axis")
    return ch, sh


def warp_dtype(dtype: Any) -> torch.dtype:
    """The arithmetic an output slice is warped in: float32 where it holds every value of ``dtype`` to the
    output's own precision (8/16-bit integers, float16/32), float64 for wider integers and float64 (an int64
    stack at 1e12, or float64 data around 1e9 with small variations, would lose its variation in float32)."""
    dt = np.dtype(dtype)
    wide = (np.issubdtype(dt, np.integer) and dt.itemsize >= 4) or dt == np.float64
    return torch.float64 if wide else torch.float32


def torch_to_numpy(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


#: Output pixels warped at once per writer thread (a strip of rows); bounds the writer's memory per thread.
_STRIP_PIXELS = 1 << 18


def warp_slices(src: zarr.Array, out: zarr.Array, composed: torch.Tensor, box: list[int], mode: str,
                device: torch.device | str = "cpu", rank: int = 0, world: int = 1, progress: bool = False,
                n_slices: int | None = None, num_workers: int = 4) -> dict[str, float]:
    """Warp every slice of ``src`` once into the cropped ``out``, in parallel; returns timings (s).

    ``composed`` holds the transforms of slices ``1..n`` (slice 0 is the reference and is only cropped).
    ``mode`` is a :func:`~sphero_lightning.core.interpolation.warp` mode; ``nearest`` keeps integer values exact
    (labels), the others round and clip to ``src``'s dtype.

    The unit of work is one z-range of ``out``'s shards (or chunks, unsharded) across the whole slice, so no
    two workers or ranks ever write the same chunk or shard; units go round-robin to the ranks, and within a
    rank to ``num_workers`` threads (reading, warping on ``device``, compressing and writing overlap). At most
    ``2 * num_workers`` units are in flight, so memory does not grow with the stack.
    """
    up, down, left, right = box
    shape = tuple(src.shape[1:])
    n = src.shape[0] if n_slices is None else n_slices
    work = warp_dtype(src.dtype)
    theta = composed.to(device=device, dtype=work)
    window = {"out_shape": (down - up, right - left), "offset": (up, left), "full_shape": shape}
    depth = int((getattr(out, "shards", None) or out.chunks)[0])
    units = [(z0, min(z0 + depth, n)) for z0 in range(0, n, depth)][rank::world]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="writing", unit="slice", dynamic_ncols=True, file=sys.stderr)

    def one(z: int) -> np.ndarray:
        img = np.asarray(src[z])
        if z == 0:
            return img[up:down, left:right]
        if mode == "nearest":
            iy, ix = nearest_index(composed[z - 1:z], shape, **window)
            return img[iy[0].numpy(), ix[0].numpy()]
        t = torch.from_numpy(img.astype(torch_to_numpy(work))).to(device)[None, None]
        if mode == "bspline":
            t = bspline_prefilter(t)  # once per slice; the strips below sample it
        res = np.empty((down - up, right - left), dtype=torch_to_numpy(work))
        rows = max(1, _STRIP_PIXELS // max(1, right - left))  # strips of rows: bounded temporaries per thread
        for r0 in range(0, down - up, rows):
            r1 = min(r0 + rows, down - up)
            strip = {"out_shape": (r1 - r0, right - left), "offset": (up + r0, left), "full_shape": shape}
            if mode == "bspline":
                res[r0:r1] = warp_coefficients(t, theta[z - 1:z], shape, **strip)[0, 0].cpu().numpy()
            else:
                res[r0:r1] = warp(t, theta[z - 1:z], mode=mode, **strip)[0, 0].cpu().numpy()
        return to_dtype(res, src.dtype)

    def unit(z0: int, z1: int) -> int:
        out[z0:z1] = np.stack([one(z) for z in range(z0, z1)])
        return z1 - z0

    t0 = time.perf_counter()
    workers = max(1, int(num_workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sphero-write") as pool:
        pending: list[Future] = []
        for z0, z1 in units:
            pending.append(pool.submit(unit, z0, z1))
            while len(pending) >= 2 * workers:
                done = pending.pop(0).result()
                if bar is not None:
                    bar.update(done * world)
        for f in pending:
            done = f.result()
            if bar is not None:
                bar.update(done * world)
    if bar is not None:
        bar.close()
    return {"write_s": time.perf_counter() - t0}
