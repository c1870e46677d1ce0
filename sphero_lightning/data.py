"""Input: a Zarr (v3) array of slices, streamed block by block; never the whole stack in memory."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset

from .errors import SpheroError


def _list_arrays(group: zarr.Group, prefix: str = "") -> list[str]:
    out = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            out.append(path)
        else:
            out.extend(_list_arrays(member, path + "/"))
    return out


def open_source(root: str, array: str) -> zarr.Array:
    """Open the source array read-only, with a clear error for each way it can be missing."""
    path = Path(root)
    if not path.exists():
        raise SpheroError(f"store {root!r} does not exist; check --data.root (a .zarr directory)")
    try:
        group = zarr.open_group(root, mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a zarr store"
        raise SpheroError(f"{root!r} is not a Zarr store ({type(exc).__name__}); point --data.root at a .zarr directory") from None
    try:
        arr = zarr.open_array(group.store, path=array, mode="r")
    except Exception:  # noqa: BLE001 - listed with the arrays that do exist
        arrays = _list_arrays(group)
        listing = ", ".join(arrays) if arrays else "none"
        raise SpheroError(f"array {array!r} not found in {root!r} (arrays there: {listing}); set --data.array") from None
    return arr


def open_registration(root: str, path: str) -> tuple[zarr.Array, zarr.Array]:
    """A finished ``sphero fit`` output and the array it was registered from, or a clear error."""
    reg = open_source(root, path)
    missing = [k for k in ("composed_transforms", "crop_box", "inputs") if k not in reg.attrs]
    if missing:
        raise SpheroError(f"{path!r} is not a sphero registration output (no {', '.join(missing)}); "
                          "point --transforms at e.g. images/registered/50-4-4")
    return reg, open_source(root, reg.attrs["inputs"][0])


def spacing_name(spacing: list[float]) -> str:
    """``[50, 4, 4]`` -> ``"50-4-4"`` (the naming convention of the arrays)."""
    return "-".join(f"{s:g}" for s in spacing)


def read_block(arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Slices ``start..stop-1`` as a numpy array (one read, zarr decodes chunks in parallel)."""
    return np.asarray(arr[start:stop])


def read_slices(arr: zarr.Array, indices: list[int]) -> np.ndarray:
    """Slices at ``indices`` (one contiguous read when they are consecutive)."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return read_block(arr, indices[0], indices[-1] + 1)
    return np.stack([np.asarray(arr[z]) for z in indices])


def slice_stats(image: np.ndarray) -> tuple[float, float]:
    """``(finite, std)`` of one slice: ``finite`` is 1.0 when every value is finite; ``std`` on a 2x subsample."""
    finite = 1.0
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        finite = 0.0
    sub = image[::2, ::2].astype(np.float64)
    return finite, float(np.nanstd(sub)) if finite == 0.0 else float(sub.std())


def damaged_slices(stats: np.ndarray, min_contrast: float) -> dict[int, str]:
    """Slices that cannot be registered, with the reason: non-finite values, constant, or blank.

    ``stats`` is ``(Z, 2)`` from :func:`slice_stats`. A slice is blank when its standard deviation is
    below ``min_contrast`` times the median over the stack's slices.
    """
    finite, std = stats[:, 0] > 0.5, stats[:, 1]
    ok = finite & np.isfinite(std)
    median = float(np.median(std[ok])) if ok.any() else 0.0
    out: dict[int, str] = {}
    for z in range(len(stats)):
        if not finite[z]:
            out[z] = "non-finite values (NaN or inf)"
        elif std[z] == 0:
            out[z] = "constant"
        elif std[z] < min_contrast * median:
            out[z] = f"blank (standard deviation {std[z]:.3g}, stack median {median:.3g})"
    return out


def to_tensor(block: np.ndarray) -> tuple[torch.Tensor, float]:
    """A compact tensor for transfer (uint8 stays uint8) and the scale that maps it to ``[0, 1]``."""
    if block.dtype == np.uint8:
        return torch.from_numpy(block), 255.0
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        return torch.from_numpy(block.astype(np.float32)), float(info.max)
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)), 1.0


class BlockStream(IterableDataset):
    """Per epoch: this rank's slices of the epoch's block once, then step tokens until the epoch ends.

    The next block is read in a background thread while the current one is fitted.
    """

    def __init__(self, dm: ZarrPairDataModule, trainer: L.Trainer) -> None:
        super().__init__()
        self.dm, self.trainer = dm, trainer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sphero-prefetch")
        self.pending: dict[int, Future] = {}

    def _read(self, block: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        item = self.dm.read_rank_block(block, self.trainer.global_rank, self.trainer.world_size)
        self.dm.timings["read_s"] = self.dm.timings.get("read_s", 0.0) + time.perf_counter() - t0
        return item

    def _fetch(self, block: int) -> Future:
        if block in self.dm.skip_blocks:  # finished in an earlier run: nothing to read
            f: Future = Future()
            f.set_result({"skip": True})
            return f
        if block not in self.pending:
            self.pending[block] = self.pool.submit(self._read, block)
        return self.pending[block]

    def __iter__(self) -> Iterator[Any]:
        epoch = self.trainer.current_epoch
        t0 = time.perf_counter()
        item = self._fetch(epoch).result()
        self.dm.timings["wait_s"] = self.dm.timings.get("wait_s", 0.0) + time.perf_counter() - t0
        self.pending.pop(epoch, None)
        if epoch + 1 < self.dm.n_blocks(self.trainer.world_size):
            self._fetch(epoch + 1)
        yield item
        token = 0
        while True:
            token += 1
            yield token


class ZarrPairDataModule(L.LightningDataModule):
    """Consecutive slice pairs of a Zarr array, in blocks.

    Parameters
    ----------
    root : str
        The Zarr store (a ``.zarr`` directory).
    array : str
        Path of the ``(Z, Y, X)`` array inside the store, e.g. ``images/50-4-4``.
    dst_group : str
        Group the output is written to, as ``<dst_group>/<z>-<y>-<x>``.
    max_pairs : int, optional
        Register only the first ``max_pairs`` pairs (``max_pairs + 1`` slices).
    pairs_per_block : int
        Pairs fitted together per device and step. Larger blocks amortise per-step overhead (most on a
        GPU); memory grows linearly.
    spacing : list of float, optional
        ``[z, y, x]`` voxel size in nm, for arrays without a ``spacing`` attribute.
    overwrite : bool
        Replace an existing output array. Without it an existing result is never touched.
    check_slices : bool
        Scan the slices before fitting (one read of the stack) for damaged ones: non-finite values,
        constant, or blank. A damaged slice is left out of the fit: the slices on either side are
        registered to each other and it gets a transform interpolated between theirs.
    min_contrast : float
        A slice whose standard deviation is below this fraction of the stack's median counts as blank.
    resume : bool
        Continue from the progress journal of an interrupted run with the same settings (kept inside the
        store as ``<dst_group>/tmp-<z>-<y>-<x>-journal`` until the output is written). ``false`` starts over.
    """

    def __init__(self, root: str, array: str, dst_group: str = "images/registered", max_pairs: int | None = None,
                 pairs_per_block: int = 8, spacing: list[float] | None = None, overwrite: bool = False,
                 check_slices: bool = True, min_contrast: float = 0.05, resume: bool = True) -> None:
        super().__init__()
        self.root, self.array, self.dst_group = root, array, dst_group.strip("/")
        self.max_pairs, self.pairs_per_block, self.spacing_override = max_pairs, pairs_per_block, spacing
        self.overwrite, self.check_slices, self.min_contrast, self.resume = overwrite, check_slices, min_contrast, resume
        if not 0 <= min_contrast < 1:
            raise SpheroError(f"--data.min_contrast must be in [0, 1), got {min_contrast}")
        if pairs_per_block < 1:
            raise SpheroError(f"--data.pairs_per_block must be >= 1, got {pairs_per_block}")
        if max_pairs is not None and max_pairs < 1:
            raise SpheroError(f"--data.max_pairs must be >= 1 (or null for all pairs), got {max_pairs}")
        self._arr: zarr.Array | None = None
        self.damaged: dict[int, str] = {}  # slice -> why it was left out (set by scan())
        self.good: list[int] = []  # slices that are registered, in order
        self.skip_blocks: set[int] = set()  # blocks finished by an earlier run (set by the module on resume)
        self.timings: dict[str, float] = {}  # where the time went (s): scan_s, read_s, wait_s (+ the module's)
        self.validate()
        self.good = list(range(self.n_slices))

    # ------------------------------------------------------------------ input
    def validate(self) -> None:
        """Check the input before any work; raise :class:`SpheroError` with the fix."""
        arr = open_source(self.root, self.array)
        if arr.ndim != 3:
            raise SpheroError(f"array {self.array!r} has shape {arr.shape}; expected 3D (Z, Y, X)")
        if arr.shape[0] < 2:
            raise SpheroError(f"array {self.array!r} has {arr.shape[0]} slice(s); registration needs at least 2")
        if min(arr.shape[1:]) < 16:
            raise SpheroError(f"slices of {self.array!r} are {arr.shape[1]} x {arr.shape[2]} px; need at least 16 x 16")
        dt = np.dtype(arr.dtype)
        if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
            raise SpheroError(f"array {self.array!r} has dtype {dt}; expected an integer or float type")
        if self.spacing_override is None and "spacing" not in arr.attrs:
            raise SpheroError(f"array {self.array!r} has no 'spacing' attribute; give it as --data.spacing [z,y,x] (nm)")
        self._arr = arr
        sp = self.spacing
        if len(sp) != 3 or any(not (s > 0) for s in sp):
            raise SpheroError(f"spacing {sp} is invalid; need three positive numbers [z, y, x] in nm")
        if self.output_path.strip("/") == self.array.strip("/"):
            raise SpheroError(f"the output {self.output_path!r} would replace the source; choose another --data.dst_group")
        if not self.overwrite and (Path(self.root) / self.output_path / "zarr.json").exists():
            raise SpheroError(f"output {self.output_path!r} already exists in {self.root!r}; "
                              "pass --data.overwrite true to replace it, or choose another --data.dst_group")

    @property
    def source(self) -> zarr.Array:
        if self._arr is None:
            self.validate()
        return self._arr

    @property
    def spacing(self) -> list[float]:
        if self.spacing_override is not None:
            return [float(s) for s in self.spacing_override]
        return [float(s) for s in self._arr.attrs["spacing"]]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.source.shape[1:])

    @property
    def n_slices(self) -> int:
        """Slices in the registration (and in the output): all, or ``max_pairs + 1``."""
        z = int(self.source.shape[0])
        return min(z, self.max_pairs + 1) if self.max_pairs is not None else z

    @property
    def n_pairs(self) -> int:
        """Pairs that are fitted: consecutive usable slices (a damaged slice is bridged over)."""
        return max(0, len(self.good) - 1)

    def pair_slices(self, pair: int) -> tuple[int, int]:
        """``(fixed, moving)`` slice indices of fitted pair ``pair``."""
        return self.good[pair], self.good[pair + 1]

    @property
    def output_path(self) -> str:
        return f"{self.dst_group}/{spacing_name(self.spacing)}"

    @property
    def journal_path(self) -> Path:
        group, name = self.output_path.rsplit("/", 1)
        return Path(self.root) / group / f"tmp-{name}-journal"

    def n_blocks(self, world: int) -> int:
        return math.ceil(self.n_pairs / (self.pairs_per_block * world))

    def rank_pairs(self, block: int, rank: int, world: int) -> range:
        """Indices of the pairs ``rank`` fits in ``block`` (possibly fewer than a full block)."""
        start = (block * world + rank) * self.pairs_per_block
        return range(min(start, self.n_pairs), min(start + self.pairs_per_block, self.n_pairs))

    def read_rank_block(self, block: int, rank: int, world: int) -> dict[str, Any]:
        pairs = self.rank_pairs(block, rank, world)
        if len(pairs) == 0:  # uneven split: this rank idles in this block, in step with the others
            h, w = self.slice_shape
            return {"slices": torch.zeros(1, h, w, dtype=torch.uint8), "scale": torch.tensor(1.0)}
        data, scale = to_tensor(read_slices(self.source, self.good[pairs.start: pairs.stop + 1]))
        return {"slices": data, "scale": torch.tensor(scale)}

    def scan(self, rank: int = 0, world: int = 1, reduce: Any = None, progress: bool = False) -> dict[int, str]:
        """Find damaged slices (see ``check_slices``); each rank reads its share, ``reduce`` sums them."""
        n = self.n_slices
        stats = torch.zeros(n, 2, dtype=torch.float64)
        mine = list(range(rank, n, world))
        bar = None
        if progress and rank == 0 and n >= 64:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="checking slices", unit="slice", dynamic_ncols=True, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="sphero-scan") as pool:
            for z, st in zip(mine, pool.map(lambda z: slice_stats(np.asarray(self.source[z])), mine)):
                stats[z] = torch.tensor(st, dtype=torch.float64)
                if bar is not None:
                    bar.update(world)
        if bar is not None:
            bar.close()
        if reduce is not None:
            stats = reduce(stats)
        return damaged_slices(stats.cpu().numpy(), self.min_contrast)

    def set_damaged(self, damaged: dict[int, str]) -> None:
        self.damaged = dict(sorted(damaged.items()))
        self.good = [z for z in range(self.n_slices) if z not in self.damaged]
        if len(self.good) < 2:
            raise SpheroError(f"fewer than 2 usable slices: {len(self.damaged)} of {self.n_slices} are damaged "
                              f"(first: slice {next(iter(self.damaged))}, {next(iter(self.damaged.values()))}); "
                              "check the data, or --data.check_slices false to fit them anyway")

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if self.check_slices:
            t0 = time.perf_counter()
            strategy = trainer.strategy

            def reduce(t: torch.Tensor) -> torch.Tensor:
                if trainer.world_size == 1:
                    return t
                return strategy.reduce(t.to(strategy.root_device), reduce_op="sum").double().cpu()

            self.set_damaged(self.scan(trainer.global_rank, trainer.world_size, reduce,
                                       progress=getattr(trainer, "progress_bar_callback", None) is not None))
            self.timings["scan_s"] = time.perf_counter() - t0
            if self.damaged and trainer.is_global_zero:
                listing = "; ".join(f"slice {z}: {why}" for z, why in list(self.damaged.items())[:10])
                more = f" (and {len(self.damaged) - 10} more)" if len(self.damaged) > 10 else ""
                print(f"sphero: {len(self.damaged)} damaged slice(s) left out and bridged over: {listing}{more}", file=sys.stderr)
        # One epoch per block; the whole fit is exactly that many epochs.
        trainer.fit_loop.max_epochs = self.n_blocks(trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(BlockStream(self, self.trainer), batch_size=None, num_workers=0)
