"""Writing a registered stack: output chunk layout, dtype handling, and warping the stack into an array as one
dask task per output chunk (or shard), each reading only the source region it needs.

Used by the fit's writer (``training/writer.py``), ``sphero apply`` and the Python API; no Lightning. The one storage
module that imports torch: each task warps its chunk with the core's torch interpolation (``core/windows.py``).

**Bit for bit.** A chunk's pixels are computed exactly as from the whole slice (``core/windows.py``), so the
output does not depend on the chunking, the scheduler, or how many workers ran it.

**Resumable.** The output is written under a temporary name beside a small ``tmp-<name>-written`` array with one
flag per task, set after the task's chunk is stored, and the fingerprint of everything that determines the output.
A run killed while writing leaves both; the same command finds them, checks the fingerprint, and writes only the
chunks not yet flagged.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from ..core.interpolation import DENSE_MAX, nearest_index, warp, warp_coefficients
from ..core.windows import bspline_window, corner_positions, sample_bounds, window_canvas
from ..errors import SpheroError
from .store import create_array
from .tasks import is_distributed, run_tasks


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



#: Output pixels warped at once (a strip of rows of a window); bounds the temporaries of each task.
_STRIP_PIXELS = 1 << 18
#: Bump when the written output of the same inputs changes (a partial output of another version is not resumed).
WRITER_VERSION = 1


@dataclass(frozen=True)
class ArrayRef:
    """Where an array lives (store root and path): what travels to dask workers instead of the array."""

    root: str
    path: str

    def open(self, mode: str = "r") -> zarr.Array:
        return zarr.open_array(self.root, path=self.path, mode=mode)


def _array(a: zarr.Array | ArrayRef, mode: str = "r") -> zarr.Array:
    return a.open(mode) if isinstance(a, ArrayRef) else a


@dataclass(frozen=True)
class WarpJob:
    """What every task of one output shares (small: references, a box, a mode)."""

    src: zarr.Array | ArrayRef
    out: zarr.Array | ArrayRef
    written: zarr.Array | ArrayRef | None
    box: tuple[int, int, int, int]
    mode: str
    device: str


def output_units(out_shape: tuple[int, int, int], unit: tuple[int, int, int], full_shape: tuple[int, int]
                 ) -> list[tuple[int, int, int, int, int, int]]:
    """The writing tasks: ``(z0, z1, y0, y1, x0, x1)`` boxes of the output, one per shard (or chunk, unsharded), so no
    two tasks ever write the same stored object. A slice of at most ``DENSE_MAX`` pixels on a side is prefiltered
    whole (its exact prefilter needs the whole axis), so there a task spans whole slices."""
    nz, ny, nx = out_shape
    dz, dy, dx = unit
    if min(full_shape) <= DENSE_MAX:
        dy, dx = ny, nx
    return [(z0, min(z0 + dz, nz), y0, min(y0 + dy, ny), x0, min(x0 + dx, nx))
            for z0 in range(0, nz, dz) for y0 in range(0, ny, dy) for x0 in range(0, nx, dx)]


def warp_window(src: zarr.Array, z: int, theta: torch.Tensor | None, box: tuple[int, int, int, int],
                window: tuple[int, int, int, int], mode: str, device: str) -> np.ndarray:
    """Output rows ``window[0]:window[1]`` and columns ``window[2]:window[3]`` (inside the crop ``box``) of slice ``z``,
    reading only the source region they sample; ``theta`` ``(1, 2, 3)`` (``None`` for the reference slice 0).
    Equal to warping the whole slice and cutting the window out, bit for bit."""
    up, _, left, _ = box
    full = tuple(src.shape[1:])
    oy0, oy1, ox0, ox1 = window
    offset, out_shape = (up + oy0, left + ox0), (oy1 - oy0, ox1 - ox0)
    if theta is None:
        return np.asarray(src[z, up + oy0:up + oy1, left + ox0:left + ox1])
    if mode == "nearest":
        iy, ix = nearest_index(theta, full, out_shape, offset, full)
        y0, x0 = int(iy.min()), int(ix.min())
        region = np.asarray(src[z, y0:int(iy.max()) + 1, x0:int(ix.max()) + 1])
        return region[(iy[0] - y0).numpy(), (ix[0] - x0).numpy()]
    work = warp_dtype(src.dtype)
    th = theta.to(device=device, dtype=work)

    def read(a: int, b: int, c: int, d: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(src[z, a:b, c:d]).astype(torch_to_numpy(work))).to(device)

    if mode == "bspline":
        coeffs = bspline_window(read, th, full, out_shape, offset)
    else:  # bicubic / bilinear sample the slice itself: a canvas of the slice's size holding the region they read
        px, py = corner_positions(th, full, out_shape, offset)
        (a, b), (c, d) = sample_bounds(py, full[0]), sample_bounds(px, full[1])
        image = window_canvas(read(a, b, c, d), full, (a, c))
    res = np.empty(out_shape, dtype=torch_to_numpy(work))
    rows = max(1, _STRIP_PIXELS // max(1, out_shape[1]))  # strips of rows: bounded temporaries
    for r0 in range(0, out_shape[0], rows):
        r1 = min(r0 + rows, out_shape[0])
        strip = {"out_shape": (r1 - r0, out_shape[1]), "offset": (offset[0] + r0, offset[1]), "full_shape": full}
        if mode == "bspline":
            res[r0:r1] = warp_coefficients(coeffs, th, full, **strip)[0, 0].cpu().numpy()
        else:
            res[r0:r1] = warp(image, th, mode=mode, **strip)[0, 0].cpu().numpy()
    return to_dtype(res, src.dtype)


def write_unit(job: WarpJob, index: int, unit: tuple[int, int, int, int, int, int], thetas: np.ndarray | None,
               shift: int = 1) -> int:
    """One task: warp the output box ``unit`` (``thetas``: its slices' matrices, row ``k`` for slice ``z0 + k``,
    slice 0 excluded where ``shift`` is 1: its transform is the identity), store it, flag it written. Returns the
    slices it held."""
    z0, z1, y0, y1, x0, x1 = unit
    src, out = _array(job.src), _array(job.out, "r+")
    block = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=src.dtype)
    with torch.inference_mode():
        for z in range(z0, z1):
            row = z - z0 - (1 if z0 == 0 and shift else 0)
            theta = None if (z == 0 and shift) else torch.from_numpy(thetas[row][None])
            block[z - z0] = warp_window(src, z, theta, job.box, (y0, y1, x0, x1), job.mode, job.device)
    out[z0:z1, y0:y1, x0:x1] = block
    if job.written is not None:
        _array(job.written, "r+")[index] = 1
    return z1 - z0


def fingerprint(**settings: Any) -> str:
    """A digest of everything that determines an output's bytes."""
    text = json.dumps({"writer_version": WRITER_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_partial(group: zarr.Group, tmp_name: str, *, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                 shards: tuple[int, int, int] | None, dtype: Any, compression_level: int, key: str,
                 n_units: int) -> int:
    """The temporary output and its ``written`` flags: those of an interrupted run with the same fingerprint ``key``
    (resumed), else new ones. Returns how many units are already written."""
    flags = f"{tmp_name}-written"
    try:
        out, written = group[tmp_name], group[flags]
        same = (written.attrs.get("fingerprint") == key and written.shape == (n_units,) and tuple(out.shape) == shape
                and tuple(out.chunks) == chunks and getattr(out, "shards", None) == shards
                and np.dtype(out.dtype) == np.dtype(dtype))
    except KeyError:
        same = False
    if same:
        return int(np.count_nonzero(written[:]))
    create_array(group, tmp_name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                       compression_level=compression_level)
    written = group.create_array(flags, shape=(n_units,), chunks=(1,), dtype="uint8", fill_value=0, overwrite=True)
    written.attrs["fingerprint"] = key
    return 0


def prepare_output(group: zarr.Group, tmp_name: str, *, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                   shards: tuple[int, int, int] | None, dtype: Any, compression_level: int, full_shape: tuple[int, int],
                   **settings: Any) -> tuple[int, int]:
    """The temporary output of a write and its flags (:func:`open_partial`), keyed by the layout and ``settings``
    (source, transforms, crop, interpolation: everything else that determines the bytes). Returns ``(tasks, tasks
    already written)``: the second is non-zero where an interrupted write of the same output is resumed."""
    n_units = len(output_units(shape, shards or chunks, full_shape))
    key = fingerprint(shape=shape, chunks=chunks, shards=shards, dtype=str(np.dtype(dtype)),
                      compression_level=compression_level, **settings)
    return n_units, open_partial(group, tmp_name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                 compression_level=compression_level, key=key, n_units=n_units)


def warp_stack(src: zarr.Array | ArrayRef, out: zarr.Array | ArrayRef, composed: torch.Tensor, box: list[int], mode: str, *,
               written: zarr.Array | ArrayRef | None = None, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, progress: bool = False, num_workers: int = 4, scheduler: str = "threads") -> dict[str, float]:
    """Warp every slice of ``src`` once into the cropped ``out``: one dask task per shard (or chunk) of ``out``.

    ``composed`` holds the transforms of slices ``1..n`` (slice 0 is the reference and is only cropped), or of every
    slice ``0..n`` (the output takes another slice's frame; a slice whose transform is the identity is only cropped).
    ``mode`` is a :func:`~sphero_lightning.core.interpolation.warp` mode; ``nearest`` keeps integer values exact
    (labels), the others round and clip to ``src``'s dtype. Tasks go round-robin to the ranks; with ``written``
    (flags from :func:`open_partial`), tasks already flagged are skipped and the others flag themselves when done.
    ``scheduler``: see :mod:`~sphero_lightning.storage.tasks` (with an address, ``src``, ``out`` and ``written``
    must be :class:`ArrayRef` s: only references and matrices travel to the workers). Returns timings (s) and counts.
    """
    if is_distributed(scheduler):
        if not all(isinstance(a, ArrayRef) for a in (src, out) + ((written,) if written is not None else ())):
            raise SpheroError("writing on a dask cluster needs arrays in a store the workers can open, not in memory")
    else:  # on this machine: open each array once, not once per task
        src, out = _array(src), _array(out, "r+")
        written = None if written is None else _array(written, "r+")
    s, o = _array(src), _array(out)
    up, down, left, right = box
    units = output_units(tuple(o.shape), tuple(int(v) for v in (getattr(o, "shards", None) or o.chunks)), tuple(s.shape[1:]))
    done = np.asarray(_array(written)[:]) if written is not None else np.zeros(len(units), np.uint8)
    theta = composed.detach().cpu().numpy()
    if len(theta) == s.shape[0]:  # every slice's: slice 0 as the others (cropped only where it is the identity)
        theta = theta[1:] if np.array_equal(theta[0], np.eye(3)[:2]) else theta
    job = WarpJob(src, out, written, (up, down, left, right), mode, str(device) if not is_distributed(scheduler) else "cpu")
    todo = [i for i in range(rank, len(units), world) if not done[i]]
    shift = 0 if len(theta) == s.shape[0] else 1  # row of slice z: z - shift (legacy: no row for slice 0)
    args = [(job, i, units[i], theta[max(0, units[i][0] - shift):units[i][1] - shift], shift) for i in todo]
    area = o.shape[1] * o.shape[2]
    weights = [(u[1] - u[0]) * (u[3] - u[2]) * (u[5] - u[4]) / area for u in (units[i] for i in todo)]
    t0 = time.perf_counter()
    run_tasks(write_unit, args, scheduler=scheduler, num_workers=num_workers, progress=progress, desc="writing",
              unit="slice", weights=[w * world for w in weights])
    return {"write_s": time.perf_counter() - t0, "units": float(len(units)), "units_written": float(len(todo)),
            "units_resumed": float(int(np.count_nonzero(done)))}
