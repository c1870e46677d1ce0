"""Reading slices and judging them, numpy only: which slices are damaged (NaN, constant, blank) and the stack's
grey-value range (what the fit normalizes by)."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr


def as_numpy(part: Any) -> np.ndarray:
    """A part of a stack read into memory: a Zarr, numpy or dask selection (dask's computed in this thread, so that
    reading starts no thread pool of dask's that would outlive the run)."""
    if hasattr(part, "compute") and not isinstance(part, np.ndarray):
        return np.asarray(part.compute(scheduler="synchronous"))
    return np.asarray(part)


def read_slice(arr: Any, z: int) -> np.ndarray:
    """Slice ``z`` of a ``(Z, Y, X)`` Zarr, numpy or dask array."""
    return as_numpy(arr[z])


def read_block(arr: Any, start: int, stop: int) -> np.ndarray:
    """Slices ``start..stop-1`` as a numpy array (one read, zarr decodes chunks in parallel)."""
    return as_numpy(arr[start:stop])


def read_slices(arr: Any, indices: list[int]) -> np.ndarray:
    """Slices at ``indices`` (one contiguous read when they are consecutive)."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return read_block(arr, indices[0], indices[-1] + 1)
    return np.stack([read_slice(arr, z) for z in indices])


#: Source pixels read in one call where small slices would be read one by one (the scan, the writer's tasks): a
#: synchronous Zarr call costs ~1.5 ms on a 2-core machine, as long as the work on a slice of 384^2 px.
GROUP_PIXELS = 1 << 20


def group_depth(n: int, shape: tuple[int, int], parts: int) -> int:
    """How many consecutive slices of ``shape`` one read takes: up to :data:`GROUP_PIXELS` of them, while the ``n``
    slices still make ``parts`` reads (the threads that share them stay busy); at least 1."""
    return max(1, min(GROUP_PIXELS // max(1, shape[0] * shape[1]), n // max(1, parts)))


#: A float slice is registered while at least this share of its pixels is finite (NaN and inf left out of the loss);
#: below it the slice is left out and bridged over.
MIN_FINITE = 0.5


def slice_stats(image: np.ndarray) -> tuple[float, float, float, float]:
    """``(finite, std, min, max)`` of one slice on a 2x subsample (float64, so 64-bit integers keep their range);
    ``finite`` is the share of finite values (std, min and max are of those)."""
    sub = image[::2, ::2].astype(np.float64)
    finite = 1.0
    if np.issubdtype(image.dtype, np.floating):
        ok = np.isfinite(sub)
        if not ok.all():
            finite = float(ok.mean())
            sub = sub[ok]
            if sub.size == 0:
                return 0.0, float("nan"), float("nan"), float("nan")
    return finite, float(sub.std()), float(sub.min()), float(sub.max())


def scan_stats(arr: Any, n: int, rank: int = 0, world: int = 1, progress: bool = False) -> np.ndarray:
    """``(n, 4)`` float64: :func:`slice_stats` of this rank's share of the first ``n`` slices of ``arr`` (zeros
    elsewhere, for the ranks' to be summed): runs of consecutive slices (:func:`group_depth`), one read each,
    round-robin to the ranks, on 4 threads; ``progress``: a bar."""
    from .tasks import run_tasks

    stats = np.zeros((n, 4), dtype=np.float64)
    depth = group_depth(n, tuple(arr.shape[1:]), 8 * world)
    mine = [(z, min(z + depth, n)) for z in range(0, n, depth)][rank::world]
    found = run_tasks(lambda a, b: [slice_stats(s) for s in read_block(arr, a, b)], mine, num_workers=4, progress=progress,
                      desc="checking slices", unit="slice", weights=[(b - a) * world for a, b in mine])
    for (a, b), st in zip(mine, found):
        stats[a:b] = st
    return stats


def damaged_slices(stats: np.ndarray, min_contrast: float) -> dict[int, str]:
    """Slices that cannot be registered, with the reason: mostly non-finite (under :data:`MIN_FINITE` finite),
    constant, or blank.

    ``stats`` is ``(Z, 2+)`` from :func:`slice_stats`. A slice is blank when its standard deviation is
    below ``min_contrast`` times the median over the stack's slices.
    """
    finite, std = stats[:, 0] >= MIN_FINITE, stats[:, 1]
    ok = finite & np.isfinite(std)
    median = float(np.median(std[ok])) if ok.any() else 0.0
    out: dict[int, str] = {}
    for z in range(len(stats)):
        if not finite[z]:
            out[z] = f"non-finite values (NaN or inf) over {100 * (1 - stats[z, 0]):.0f} % of the slice"
        elif std[z] == 0:
            out[z] = "constant"
        elif std[z] < min_contrast * median:
            out[z] = f"blank (standard deviation {std[z]:.3g}, stack median {median:.3g})"
    return out


def intensity_range(stats: np.ndarray, use: list[int]) -> tuple[float, float]:
    """``(low, high)``: the grey-value range of the slices ``use`` (rows of :func:`slice_stats` output)."""
    rows = stats[use] if len(use) else stats
    lo, hi = rows[:, 2], rows[:, 3]
    lo, hi = lo[np.isfinite(lo)], hi[np.isfinite(hi)]
    if not len(lo) or not len(hi):
        return 0.0, 1.0
    return float(lo.min()), float(hi.max())


def open_mask(root: str, path: str, shape: tuple[int, ...]) -> zarr.Array:
    """The mask array ``path`` (inside the store ``root``, or a Zarr array of its own), ``(Z, Y, X)`` like the stack
    or ``(Y, X)`` (one mask for every slice), checked against the stack's ``shape``."""
    from ..errors import SpheroError
    from .store import open_source

    try:
        arr = open_source(root, path, array_option="--data.mask_array (an array in the store, or a Zarr array's own path)")
    except SpheroError as exc:
        try:
            arr = zarr.open_array(path, mode="r")
        except Exception:  # noqa: BLE001 - the first message says what was looked for
            raise exc from None
    check_mask_shape(tuple(arr.shape), tuple(shape), f"--data.mask_array {path!r}")
    return arr


def check_mask_shape(mask: tuple[int, ...], stack: tuple[int, ...], what: str) -> None:
    """A mask is ``(Z, Y, X)`` like the stack or ``(Y, X)``, one for every slice; else a one-line error naming ``what``."""
    from ..errors import SpheroError

    if tuple(mask) not in (tuple(stack), tuple(stack[1:])):
        raise SpheroError(f"{what} has shape {tuple(mask)}; it must be the stack's {tuple(stack)} or one slice's "
                          f"{tuple(stack[1:])} (non-zero = use)")


#: Runs of the ignored value narrower than this (pixels) are content, not padding (a dark membrane pixel at 0).
MIN_RUN = 5


def value_mask(slices: np.ndarray, value: float) -> np.ndarray:
    """``(N, H, W)`` uint8 mask (1 = use) leaving out pixels equal to ``value`` in runs at least :data:`MIN_RUN`
    pixels wide (padding, a blank frame), not single content pixels that happen to have that value.

    >>> s = np.full((1, 12, 12), 7); s[0, :, :6] = 0; s[0, 9, 9] = 0
    >>> value_mask(s, 0)[0, 0].tolist()
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    >>> int(value_mask(s, 0)[0, 9, 9])  # an isolated pixel at 0 is content
    1
    """
    r = MIN_RUN // 2
    eq = slices == value
    # opening (erosion, then dilation) by a square, one axis at a time; the image border counts as inside
    opened = _square(_square(eq, r, np.logical_and), r, np.logical_or)
    return (~opened).astype(np.uint8)


def _square(m: np.ndarray, r: int, op) -> np.ndarray:
    """``op`` (and: erosion, or: dilation) of boolean ``(N, H, W)`` over a ``(2r + 1)`` square, edges replicated."""
    for axis in (1, 2):
        n = m.shape[axis]
        pad = np.take(m, np.clip(np.arange(-r, n + r), 0, n - 1), axis=axis)
        out = np.take(pad, np.arange(0, n), axis=axis)
        for k in range(1, 2 * r + 1):
            out = op(out, np.take(pad, np.arange(k, n + k), axis=axis))
        m = out
    return m


def slice_masks(raw: np.ndarray, indices: list[int], ignore_value: float | None, mask: Any | None,
                static: np.ndarray | None = None) -> np.ndarray | None:
    """``(n, Y, X)`` uint8 masks (1 = use) of the slices ``raw`` read at ``indices``: pixels equal to ``ignore_value``
    in runs (:func:`value_mask`), where ``mask`` is 0, where ``static`` (``(Y, X)``, a region fixed in every slice)
    is 0, and NaN or inf pixels of float slices; None where none of these leaves anything out."""
    nonfinite = ~np.isfinite(raw) if np.issubdtype(raw.dtype, np.floating) else None
    if nonfinite is not None and not nonfinite.any():
        nonfinite = None
    if ignore_value is None and mask is None and static is None and nonfinite is None:
        return None
    out = np.ones(raw.shape, dtype=np.uint8)
    if nonfinite is not None:  # NaN or inf pixels of a slice that is registered: left out of the loss
        out &= ~nonfinite
    if static is not None:
        out &= static[None]
    if ignore_value is not None:
        out &= value_mask(raw, ignore_value)
    if mask is not None:
        m = as_numpy(mask[...]) if mask.ndim == 2 else read_slices(mask, indices)
        out &= (np.broadcast_to(m, raw.shape) != 0).astype(np.uint8)
    return out
