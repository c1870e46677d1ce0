"""Writing a registered stack: output chunk layout, dtype handling, and warping the stack into an array as one
dask task per row of output chunks (or shards) across the slice (:func:`unit_shape`), each reading only the source
band it needs.

Used by the fit's writer (``training/writer.py``), ``sphero apply`` and the Python API; no Lightning. The one storage
module that imports torch: each task warps its chunk with the core's torch interpolation (``core/windows.py``).

**Bit for bit.** A chunk's pixels are computed exactly as from the whole slice (``core/windows.py``), so the
output does not depend on the chunking, the scheduler, or how many workers ran it.

**Resumable.** The output is written under a temporary name beside a small ``tmp-<name>-written`` array with one
flag per task, set after the task's chunks are stored, and the fingerprint of everything that determines the output.
A run killed while writing leaves both; the same command finds them, checks the fingerprint, and writes only the
chunks not yet flagged.

**Downsampled levels in the same pass.** Where every task's box starts at a multiple of ``2^(levels-1)`` in y and x
(:func:`level_arrays`), each task also reduces its box, in memory, to levels ``1 .. levels - 1`` and stores them in
temporary level arrays (chunked so that each task's part of a level is whole chunks: no two tasks write one chunk),
created, fingerprinted and resumed with the output; ``storage/pyramid.py`` renames them into place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from ..core import kernels
from ..core.frames import Affine, Frame
from ..core.interpolation import DENSE_MAX
from ..core.settings import OUTPUT
from ..core.warping import nearest_index, warp, warp_coefficients
from ..core.windows import bspline_window, corner_positions, sample_bounds, window_canvas
from ..errors import SpheroError
from .pyramid import level_shapes, reduce2
from .slices import group_depth, read_block
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
    levels: tuple[zarr.Array | ArrayRef, ...] = ()  # levels 1.. written in the same pass (:func:`level_arrays`)
    nearest: bool = False  # levels keep each 2 x 2 block's top-left pixel (labels), not its mean
    fill: float = 0.0  # what NaN and inf pixels are interpolated as (:func:`warp_window`)
    compiled: bool = False  # B-spline windows by the compiled warp (:func:`compiled_warp`)


#: Source dtypes the compiled warp writes (those warped in float32, float16 aside: numba has no float16 arrays).
_COMPILED_DTYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "float32"))


def compiled_warp(mode: str, device: torch.device | str, n_slices: int, shape: tuple[int, int], dtype: Any) -> bool:
    """Whether a write warps by the compiled kernels (``core.kernels.warp_slice``: the recursive prefilter and the
    16 taps in one pass, on each task's own thread) instead of torch's: B-spline windows on the CPU of a stack large
    enough to be worth numba's start (:func:`~sphero_lightning.core.kernels.worth`, as the fit decides), in float32.
    Decided once per write from the stack alone: the same output bytes whichever command writes it."""
    return (mode == "bspline" and torch.device(device).type == "cpu" and np.dtype(dtype) in _COMPILED_DTYPES
            and kernels.worth(n_slices, shape[0] * shape[1]))


#: Tasks a stack of small slices is split into at least (the writing threads stay busy; see :func:`unit_shape`).
MIN_TASKS = 8


def unit_shape(out_shape: tuple[int, int, int], unit: tuple[int, int, int], full_shape: tuple[int, int]
               ) -> tuple[int, int, int]:
    """The box of one writing task: a row of the output's shards (or chunks, unsharded) ``unit`` deep and high across
    the whole width (a task reads one band of the source: each source chunk is decoded by one or two tasks instead of
    by every chunk-sized task that straddles it, and the band is prefiltered once; 8 slices of 8192^2 px in 1 MB chunks
    written 1.2x faster), or whole slices where the source's slices are at most ``DENSE_MAX`` pixels on a side
    (prefiltered whole: the exact prefilter needs the whole axis)."""
    if min(full_shape) > DENSE_MAX:
        return unit[0], unit[1], out_shape[2]
    # small slices several to a task (storage.slices.group_depth), each task reading its slices and storing its box in
    # one Zarr call: 40 slices of 384^2 px written in 0.16 s instead of 0.22 s
    return unit[0] * group_depth(out_shape[0] // unit[0], (unit[0] * full_shape[0], full_shape[1]), MIN_TASKS), \
        out_shape[1], out_shape[2]


def task_pixels(out_shape: tuple[int, int, int], unit: tuple[int, int, int], full_shape: tuple[int, int],
                composed: torch.Tensor) -> int:
    """Source pixels one writing task holds at most: its band of rows (:func:`unit_shape`), widened by how far the
    transforms ``composed`` (normalized, ``(N, 2, 3)``) tilt a row across the slice and by the prefilter's margins,
    the whole slice at most. What the memory budget divides among writing threads."""
    h, w = full_shape
    task = unit_shape(out_shape, unit, full_shape)
    eye = torch.eye(2, dtype=composed.dtype)
    tilt = float((composed[:, :, :2] - eye).abs().max()) if len(composed) else 0.0
    rows = task[1] + 2 * 96 + math.ceil(tilt * max(h, w))
    return task[0] * min(h, rows) * w


def output_units(out_shape: tuple[int, int, int], unit: tuple[int, int, int], full_shape: tuple[int, int]
                 ) -> list[tuple[int, int, int, int, int, int]]:
    """The writing tasks: ``(z0, z1, y0, y1, x0, x1)`` boxes of the output (:func:`unit_shape`), each whole shards (or
    chunks, unsharded), so no two tasks ever write the same stored object."""
    nz, ny, nx = out_shape
    dz, dy, dx = unit_shape(out_shape, unit, full_shape)
    return [(z0, min(z0 + dz, nz), y0, min(y0 + dy, ny), x0, min(x0 + dx, nx))
            for z0 in range(0, nz, dz) for y0 in range(0, ny, dy) for x0 in range(0, nx, dx)]


def warp_window(src: zarr.Array, z: int, theta: torch.Tensor | None, box: tuple[int, int, int, int],
                window: tuple[int, int, int, int], mode: str, device: str, fill: float = 0.0, compiled: bool = False
                ) -> np.ndarray:
    """Output rows ``window[0]:window[1]`` and columns ``window[2]:window[3]`` (inside the crop ``box``) of slice ``z``,
    reading only the source region they sample; ``theta`` ``(1, 2, 3)`` (``None`` for the reference slice 0).
    Equal to warping the whole slice and cutting the window out, bit for bit. NaN and inf pixels of a float slice
    stay NaN where they land (the output pixels whose nearest source pixel is one) and leave every other pixel finite:
    they are interpolated as ``fill`` (a grey of the stack's range), not spread over the slice by the prefilter."""
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

    floating = np.issubdtype(src.dtype, np.floating)
    holes = []

    def read(a: int, b: int, c: int, d: int) -> torch.Tensor:
        x = np.asarray(src[z, a:b, c:d]).astype(torch_to_numpy(work))
        if floating:
            bad = ~np.isfinite(x)
            if bad.any():
                holes.append(True)
                x = np.where(bad, np.asarray(fill, dtype=x.dtype), x)
        return torch.from_numpy(x).to(device)

    if mode == "bspline" and compiled:  # the whole slice prefiltered where its axes are (the exact prefilter's)
        whole = max(full) <= DENSE_MAX
        res = kernels.warp_slice(read(0, full[0], 0, full[1]).numpy() if whole else None, theta[0].double().numpy(),
                                 offset, out_shape, src.dtype,
                                 None if whole else bspline_window(read, th, full, out_shape, offset)[0, 0].numpy())
    else:
        res = _torch_window(read, th, full, out_shape, offset, mode, src.dtype)
    if holes:  # where the non-finite pixels land: NaN again
        iy, ix = nearest_index(theta, full, out_shape, offset, full)
        y0, x0 = int(iy.min()), int(ix.min())
        region = np.asarray(src[z, y0:int(iy.max()) + 1, x0:int(ix.max()) + 1])
        res[~np.isfinite(region[(iy[0] - y0).numpy(), (ix[0] - x0).numpy()])] = np.nan
    return res


#: Smallest chunk side (px) of a level written in the same pass; below it the levels get a second pass.
MIN_LEVEL_CHUNK = 32


def level_arrays(tmp_name: str, out_shape: tuple[int, int, int], unit: tuple[int, int, int], full_shape: tuple[int, int],
                 levels: int) -> list[tuple[str, tuple[int, int, int], tuple[int, int, int]]] | None:
    """The temporary arrays ``(name, shape, chunks)`` of levels ``1 .. levels - 1`` written in the same pass as the
    output whose temporary array is ``tmp_name`` and whose tasks write ``unit`` boxes; ``None`` where a task's box may
    start off a multiple of ``2^(levels-1)`` (a level's pixel would straddle two tasks: a second pass writes them).
    Level ``k``'s chunks are the output's chunks (whole slices where tasks are whole slices) shrunk ``2^k`` times
    (capped by the level's shape): a task, a whole row of them, writes whole chunks of its own."""
    shapes = level_shapes(out_shape, levels)
    task = unit_shape(out_shape, unit, full_shape)
    chunk = task if task[1:] == tuple(out_shape[1:]) else unit
    f = 2 ** len(shapes)
    if any(u % f and u < n for u, n in zip(task[1:], out_shape[1:])):  # a box spanning the axis starts at 0
        return None
    # chunks of a few pixels (small output chunks, many levels) cost a stored object each: a second pass keeps the
    # output's chunking there instead
    if any(c >> k < MIN_LEVEL_CHUNK and c >> k < n for k, s in enumerate(shapes, 1) for c, n in zip(chunk[1:], s[1:])):
        return None
    return [(f"{tmp_name}-level{k}", s, (1, *(max(1, min(c >> k, n)) for c, n in zip(chunk[1:], s[1:]))))
            for k, s in enumerate(shapes, 1)]


def store_levels(job: WarpJob, block: np.ndarray, z0: int, y0: int, x0: int) -> None:
    """Levels ``1 ..`` of the output box ``block`` (at ``z0, y0, x0``), each reduced from the one before in memory,
    into the job's level arrays (the box starts at a multiple of ``2^(levels-1)``: see :func:`level_arrays`)."""
    for k, level in enumerate(job.levels, 1):
        block = reduce2(block, job.nearest)
        if not block.size:  # an odd last row or column alone: nothing of it reaches this level
            return
        _array(level, "r+")[z0:z0 + block.shape[0], y0 >> k:(y0 >> k) + block.shape[1],
                            x0 >> k:(x0 >> k) + block.shape[2]] = block


def _torch_window(read: Any, th: torch.Tensor, full: tuple[int, int], out_shape: tuple[int, int],
                  offset: tuple[int, int], mode: str, dtype: Any) -> np.ndarray:
    """:func:`warp_window` 's warp by torch (``read(y0, y1, x0, x1)``: source samples as a tensor)."""
    if mode == "bspline":
        coeffs = bspline_window(read, th, full, out_shape, offset)
    else:  # bicubic / bilinear sample the slice itself: a canvas of the slice's size holding the region they read
        px, py = corner_positions(th, full, out_shape, offset)
        (a, b), (c, d) = sample_bounds(py, full[0]), sample_bounds(px, full[1])
        image = window_canvas(read(a, b, c, d), full, (a, c))
    # each strip rounded and clipped to an integer dtype's range in torch (as to_dtype: round half to even, the same
    # bytes; numpy's rint and clip of a whole 8192^2 slice took 1.1 s), written straight into the output's dtype
    res = np.empty(out_shape, dtype=dtype)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    rows = max(1, _STRIP_PIXELS // max(1, out_shape[1]))  # strips of rows: bounded temporaries
    for r0 in range(0, out_shape[0], rows):
        r1 = min(r0 + rows, out_shape[0])
        strip = {"out_shape": (r1 - r0, out_shape[1]), "offset": (offset[0] + r0, offset[1]), "full_shape": full}
        if mode == "bspline":
            values = warp_coefficients(coeffs, th, full, **strip)[0, 0]
        else:
            values = warp(image, th, mode=mode, **strip)[0, 0]
        if info is not None:
            values = values.round_().clamp_(info.min, info.max)
        res[r0:r1] = values.cpu().numpy()
    return res


class _Slices:
    """Slices ``z0 .. z1`` of a source array, read at once: what :func:`warp_window` reads of them (``[z, rows,
    cols]``, ``shape``, ``dtype``)."""

    def __init__(self, src: zarr.Array, z0: int, z1: int) -> None:
        self.data, self.z0, self.shape, self.dtype = read_block(src, z0, z1), z0, tuple(src.shape), src.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self.data[(key[0] - self.z0, *key[1:])]


def write_unit(job: WarpJob, index: int, unit: tuple[int, int, int, int, int, int], thetas: np.ndarray | None,
               shift: int = 1) -> tuple[int, float, float]:
    """One task: warp the output box ``unit`` (``thetas``: its slices' matrices, row ``k`` for slice ``z0 + k``,
    slice 0 excluded where ``shift`` is 1: its transform is the identity), store it and its levels, flag it written.
    Returns the slices it held, the seconds it took and the seconds of them spent on the levels."""
    t0 = time.perf_counter()
    z0, z1, y0, y1, x0, x1 = unit
    src, out = _array(job.src), _array(job.out, "r+")
    if z1 - z0 > 1 and min(src.shape[1:]) <= DENSE_MAX:  # several whole slices (unit_shape): read in one call
        src = _Slices(src, z0, z1)
    block = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=src.dtype)
    with torch.inference_mode():
        for z in range(z0, z1):
            row = z - z0 - (1 if z0 == 0 and shift else 0)
            theta = None if (z == 0 and shift) else torch.from_numpy(thetas[row][None])
            block[z - z0] = warp_window(src, z, theta, job.box, (y0, y1, x0, x1), job.mode, job.device, job.fill,
                                        job.compiled)
    out[z0:z1, y0:y1, x0:x1] = block
    t1 = time.perf_counter()
    store_levels(job, block, z0, y0, x0)
    t2 = time.perf_counter()
    if job.written is not None:
        _array(job.written, "r+")[index] = 1
    return z1 - z0, time.perf_counter() - t0, t2 - t1


@dataclass(frozen=True)
class WriteResult:
    """What :func:`warp_stack` did: ``write_s`` seconds; ``units`` parts of the output (rows of chunks or whole slices),
    ``units_written`` by this call, ``units_resumed`` found written by an earlier run; ``levels_s`` the share of
    ``write_s`` the downsampled levels took in the same pass (``write_s`` times their part of the tasks' summed time),
    None without levels."""

    write_s: float
    units: int
    units_written: int
    units_resumed: int
    levels_s: float | None = None


def warp_stack(src: zarr.Array | ArrayRef, out: zarr.Array | ArrayRef, composed: torch.Tensor, box: list[int], mode: str, *,
               written: zarr.Array | ArrayRef | None = None, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1, progress: bool = False, num_workers: int = OUTPUT.num_workers, scheduler: str = OUTPUT.scheduler,
               levels: Sequence[zarr.Array | ArrayRef] = (), nearest: bool = False, fill: float = 0.0) -> WriteResult:
    """Warp every slice of ``src`` once into the cropped ``out``: one dask task per row of shards (or chunks) of ``out``.

    ``composed`` holds the transforms of slices ``1..n`` (slice 0 is the reference and is only cropped), or of every
    slice ``0..n`` (the output takes another slice's frame; a slice whose transform is the identity is only cropped);
    ``n + 1`` is ``out``'s length, which may be less than ``src``'s (the first slices registered).
    ``mode`` is a :func:`~sphero_lightning.core.warping.warp` mode; ``nearest`` keeps integer values exact
    (labels), the others round and clip to ``src``'s dtype. Tasks go round-robin to the ranks; with ``written``
    (flags from :func:`open_partial`), tasks already flagged are skipped and the others flag themselves when done.
    ``scheduler``: see :mod:`~sphero_lightning.storage.tasks` (with an address, ``src``, ``out`` and ``written``
    must be :class:`ArrayRef` s: only references and matrices travel to the workers). ``levels``: the temporary
    arrays of levels ``1 ..`` (:func:`level_arrays`) each task fills from its box in the same pass (``nearest``: top-left
    pixels, for labels, instead of 2 x 2 means). ``fill``: what NaN and inf pixels are interpolated as (a grey of the
    stack's range; they stay NaN where they land). Returns the seconds and the parts written (:class:`WriteResult`).
    """
    levels = tuple(levels)
    if is_distributed(scheduler):
        refs = (src, out, *levels) + ((written,) if written is not None else ())
        if not all(isinstance(a, ArrayRef) for a in refs):
            raise SpheroError("writing on a dask cluster needs arrays in a store the workers can open, not in memory")
    else:  # on this machine: open each array once, not once per task
        src, out, levels = _array(src), _array(out, "r+"), tuple(_array(a, "r+") for a in levels)
        written = None if written is None else _array(written, "r+")
    s, o = _array(src), _array(out)
    up, down, left, right = box
    units = output_units(tuple(o.shape), tuple(int(v) for v in (getattr(o, "shards", None) or o.chunks)), tuple(s.shape[1:]))
    done = np.asarray(_array(written)[:]) if written is not None else np.zeros(len(units), np.uint8)
    theta = composed.detach().cpu().numpy()
    # the output's slices are the source's first o.shape[0] (fewer with --data.max_pairs): ``composed`` holds a row for
    # each of them, or for each but slice 0
    every = len(theta) == o.shape[0]
    if every:  # slice 0 as the others (cropped only where it is the identity)
        theta = theta[1:] if Affine(theta[0], Frame.NORMALIZED, tuple(s.shape[1:])).is_identity() else theta
    job = WarpJob(src, out, written, (up, down, left, right), mode, str(device) if not is_distributed(scheduler) else "cpu",
                  levels, nearest, float(fill),
                  not is_distributed(scheduler) and compiled_warp(mode, device, o.shape[0], tuple(s.shape[1:]), s.dtype))
    todo = [i for i in range(rank, len(units), world) if not done[i]]
    shift = 0 if every and len(theta) == o.shape[0] else 1  # row of slice z: z - shift (no row for slice 0)
    args = [(job, i, units[i], theta[max(0, units[i][0] - shift):units[i][1] - shift], shift) for i in todo]
    area = o.shape[1] * o.shape[2]
    weights = [(u[1] - u[0]) * (u[3] - u[2]) * (u[5] - u[4]) / area for u in (units[i] for i in todo)]
    t0 = time.perf_counter()
    # several tasks at once on this machine's CPU: one torch thread each (the tasks fill the cores; each task's torch
    # ops on several threads, one OpenMP team per task, oversubscribed them: 8 x 8192^2 slices 1.3x slower). The same
    # bytes: no reduction of the warp is split across threads.
    own_threads = not is_distributed(scheduler) and scheduler != "synchronous" and num_workers > 1 \
        and torch.device(device).type == "cpu"
    torch_threads = torch.get_num_threads()
    if own_threads:
        torch.set_num_threads(1)
    try:
        done_tasks = run_tasks(write_unit, args, scheduler=scheduler, num_workers=num_workers, progress=progress,
                               desc="writing", unit="slice", weights=[w * world for w in weights])
    finally:
        torch.set_num_threads(torch_threads)
    write_s = time.perf_counter() - t0
    levels_s = None
    if levels:
        task_s = sum(t for _, t, _ in done_tasks)
        levels_s = write_s * sum(t for _, _, t in done_tasks) / task_s if task_s > 0 else 0.0
    return WriteResult(write_s, len(units), len(todo), int(np.count_nonzero(done)), levels_s)
