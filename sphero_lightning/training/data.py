"""Input: a Zarr (v3) array of slices, streamed block by block (a small stack read once and held, HOLD_BYTES)."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, get_args

import lightning as L
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

from ..core.masks import StaticPatterns, combined_destripe, find_static_patterns, to_tensor
from ..core.pairs import StackPairs, block_layout
from ..core.settings import DATA, SOLVE, Destripe, StaticMode, check_bounds
from ..errors import SpheroError
from ..storage.checks import check_stack
from ..storage.slices import (
    damaged_slices,
    intensity_range,
    open_mask,
    read_block,
    read_slice,
    read_slices,
    scan_stats,
    slice_masks,
    slice_stats,
)
from ..storage.store import (
    OutputLock,
    acquire_lock,
    check_writable,
    node_exists,
    open_source,
    parse_spacing,
    spacing_name,
    store_format,
    zarr_format,
)
from ..threads import available_memory, launch_rank
from .report import say
from .scope import current_run
from .stream import BlockStream, ReadTimes

#: Most pixels of moving slices (at the finest level, <= 4 Mpx each) in one block per device: caps
#: ``pairs_per_block`` for large slices, where a bigger block gains nothing on a CPU.
BLOCK_PIXELS = 1 << 23
#: The default memory budget: a quarter of the available memory, at most this.
DEFAULT_BUDGET = 4 << 30
#: Bytes a block holds per pair: its raw slice twice (this block and the next, read ahead) plus this many bytes per
#: pixel of the finest level (level images, coefficients, evaluation buffers); see :meth:`ZarrPairDataModule.plan`.
FIT_BYTES_PER_PX = 40
#: Bytes the writer holds per source pixel in flight (raw, float copy, B-spline coefficients, filter temporaries).
WRITE_BYTES_PER_PX = 20

#: A stack of at most this many bytes (and an eighth of the memory budget) is read once, by the slice scan, and held for the
#: fit and the writer (a Zarr read of a 384^2 slice costs ~1 ms beside its decoding); others, and DDP runs, stream.
HOLD_BYTES = 32 << 20


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
        Pairs fitted together per device and step, at most: fewer for large slices, so that a block holds at most
        :data:`BLOCK_PIXELS` (8 Mpx: 32 pairs up to 512 x 512, 2 of 2048 x 2048, 1 of anything larger). Larger
        blocks amortise per-step overhead and finish their slowest pairs together (30 ISBI sections, 512 x 512,
        CPU: fitting 5.3 s at 8, 4.5 s at 32); memory grows linearly.
    spacing : list of float, optional
        ``[z, y, x]`` voxel size in nm, for arrays without a ``spacing`` attribute.
    overwrite : bool
        Replace an existing output array (given bare: true); without it an existing result is never touched.
    check_slices : bool
        Scan the slices before fitting (one read of the stack) for damaged ones: non-finite values,
        constant, or blank. A damaged slice is left out of the fit: the slices on either side are
        registered to each other and it gets a transform interpolated between theirs.
    min_contrast : float
        A slice whose standard deviation is below this fraction of the stack's median counts as blank.
    resume : bool
        Continue from the progress journal of an interrupted run with the same settings (kept inside the
        output store as ``<dst_group>/tmp-<z>-<y>-<x>-journal`` until the output is written). ``false`` starts over.
    output_root : str, optional
        The store the output (and the progress journal) goes into; default: the source's store. Use it when the
        source is read-only or on slow shared storage. A new store takes the source's Zarr format.
    memory_budget_gb : float, optional
        Memory the run may use for slices, per process (GB); default a quarter of the available memory, at most 4 GB.
        The block size and the writer's threads follow from it (the run prints what it chose for large slices).
    ignore_value : float, optional
        Leave pixels of this grey value out of the loss (e.g. 0: padding of slices shifted earlier, a black frame
        left by acquisition), where they form runs at least 5 px wide, plus a margin for the smoothing. Masks are
        in each slice's own pixels: the moving slice's mask is warped with it, so a frame fixed in the detector and
        padding that moves with the sample are both left out. The output is not changed.
    mask_array : str, optional
        An array of masks (non-zero = use, 0 = leave out of the loss), in the source store (or a Zarr array's own
        path): ``(Z, Y, X)`` like the stack (e.g. labels painted in napari, ``sphero ingest``-ed) or ``(Y, X)``, one
        mask for every slice (detector dirt). Warped with its slice like ``ignore_value``; both may be given.
    destripe : {"none", "vertical", "horizontal", "both"}
        Remove stripes fixed in the detector frame (curtaining) from the images the loss sees, never from the
        output: each column's (vertical) or row's (horizontal) mean over the slice less the slice's mean. Assumes
        the stripes add a constant along each column or row; costs ~0.001 px on stacks without stripes.
    static_patterns : {"leave_out", "keep"}
        What is found identical at the same place in every slice (8 slices spread over the stack compared before
        fitting): one grey value over the same pixels (a dark frame or band, padding, detector dirt) and stripes
        (curtaining). It does not move with the sample, so in the loss it only pulls pairs towards the identity:
        ``leave_out`` (default) leaves it out of the loss (the region masked, the stripes destriped) and says so in
        one line; ``keep`` uses it and says which option would handle it. Not looked for with a mask array.
    """

    def __init__(self, root: str, array: str, dst_group: str = DATA.dst_group, max_pairs: int | None = DATA.max_pairs,
                 pairs_per_block: int = DATA.pairs_per_block, spacing: list[float] | None = DATA.spacing,
                 overwrite: bool = DATA.overwrite, check_slices: bool = DATA.check_slices,
                 min_contrast: float = DATA.min_contrast, resume: bool = DATA.resume,
                 output_root: str | None = DATA.output_root, memory_budget_gb: float | None = DATA.memory_budget_gb,
                 neighbours: int = SOLVE.neighbours, coarse_factor: float = SOLVE.coarse_factor,
                 ignore_value: float | None = DATA.ignore_value, mask_array: str | None = DATA.mask_array,
                 destripe: Destripe = DATA.destripe, static_patterns: StaticMode = DATA.static_patterns) -> None:
        super().__init__()
        self.root, self.array, self.dst_group = root, array, dst_group.strip("/")
        self.max_pairs, self.pairs_per_block, self.spacing_override = max_pairs, pairs_per_block, spacing
        self.overwrite, self.check_slices, self.min_contrast, self.resume = overwrite, check_slices, min_contrast, resume
        self.output_root = str(output_root) if output_root is not None else None
        check_bounds("data", memory_budget_gb=memory_budget_gb, min_contrast=min_contrast, pairs_per_block=pairs_per_block,
                     max_pairs=max_pairs)
        check_bounds("solve", neighbours=neighbours)
        self.memory_budget_gb = memory_budget_gb
        self.memory_budget = int(memory_budget_gb * 2**30) if memory_budget_gb is not None else \
            min(DEFAULT_BUDGET, available_memory() // 4)
        self._arr: zarr.Array | None = None
        self.ignore_value, self.mask_array, self.destripe = ignore_value, mask_array, destripe
        if destripe not in ("none", "vertical", "horizontal", "both"):
            raise SpheroError(f"--data.destripe must be one of none, vertical, horizontal, both; got {destripe!r}")
        if static_patterns not in get_args(StaticMode):
            raise SpheroError(f"--data.static_patterns must be one of {', '.join(get_args(StaticMode))}; got {static_patterns!r}")
        # what the guard found (set at setup), and the (Y, X) uint8 mask, 0 where a static region is left out of the loss
        self.static_mode, self.static, self._static_mask = static_patterns, StaticPatterns(), None
        self._mask: zarr.Array | None = None
        self._stream: BlockStream | None = None  # this run's reader (closed at teardown)
        self._lock: OutputLock | None = None  # the output's lock, while this run holds it
        self.damaged: dict[int, str] = {}  # slice -> why it was left out (set by scan())
        self.good: list[int] = []  # slices that are registered, in order
        self.skip_blocks: set[int] = set()  # blocks finished by an earlier run (skip(), from the module on resume)
        self.scan_s = 0.0  # seconds the slice check took (set at setup)
        self.reads = ReadTimes()  # the block reader's seconds, of the last fit (the reader's own until it is closed)
        self.intensity: tuple[float, float] | None = None  # the stack's grey-value range (set at setup)
        self.held: np.ndarray | None = None  # a small stack as the scan read it, for the fit and the writer (HOLD_BYTES)
        self.validate()
        self.neighbours, self.coarse_factor = int(neighbours), float(coarse_factor)
        self.set_damaged({})

    # ------------------------------------------------------------------ input
    def validate(self) -> None:
        """Check the input before any work; raise :class:`SpheroError` with the fix."""
        arr = open_source(self.root, self.array)
        check_stack(arr.shape, arr.dtype, f"array {self.array!r}")
        if self.spacing_override is None and "spacing" not in arr.attrs:
            raise SpheroError(f"array {self.array!r} has no 'spacing' attribute; give it as --data.spacing [z,y,x] (nm)")
        self._arr = arr
        if self.mask_array is not None:
            self._mask = open_mask(self.root, self.mask_array, tuple(arr.shape))
        self.pairs_per_block = self.plan(arr.shape[1] * arr.shape[2], np.dtype(arr.dtype).itemsize)
        self._spacing = parse_spacing(self.spacing_override, "--data.spacing") if self.spacing_override is not None \
            else parse_spacing(arr.attrs["spacing"], f"the 'spacing' attribute of {self.array!r}")
        same_store = self.output_root is None or os.path.realpath(self.output_root) == os.path.realpath(self.root)
        if same_store and self.output_path.strip("/") == self.array.strip("/"):
            raise SpheroError(f"the output {self.output_path!r} would replace the source; choose another --data.dst_group")
        check_writable(self.out_root, "the source can stay read-only: write the output into another (local) store "
                                      "with --data.output_root OTHER.zarr")
        self.check_output()

    def check_output(self) -> None:
        if not self.overwrite and node_exists(self.out_root, self.output_path):
            raise SpheroError(f"output {self.output_path!r} already exists in {self.out_root!r}; "
                              "pass --data.overwrite true to replace it, or choose another --data.dst_group")

    def prepare_data(self) -> None:
        """One run per output at a time: rank 0 of a run takes the output's lock (before any work; the constructor has
        no side effects), and checks again under it that the output is still free. The lock is this run's: released
        at teardown, or by the run's scope however the run ends (:class:`~.scope.RunScope`)."""
        if launch_rank() == 0 and self._lock is None:
            self._lock = acquire_lock(self.lock_path, f"output {self.output_path!r} in {self.out_root!r}", self.out_root)
            run = current_run()
            if run is not None:
                run.on_exit(self.release)
            try:
                self.check_output()
            except SpheroError:
                self.release()
                raise

    def plan(self, pixels: int, itemsize: int) -> int:
        """The block size for slices of ``pixels`` pixels: at most ``pairs_per_block``, at most :data:`BLOCK_PIXELS`
        of finest-level pixels, and within the memory budget (one pair at least); said on stderr when the slices
        are large enough for it to matter."""
        finest = min(pixels, 1 << 22)
        per_pair = 2 * pixels * itemsize + FIT_BYTES_PER_PX * finest
        fixed = pixels * 4  # one slice as floats while it is downscaled
        by_budget = max(1, (self.memory_budget - fixed) // per_pair)
        block = int(min(self.pairs_per_block, max(1, BLOCK_PIXELS // finest), by_budget))
        if (pixels > 1 << 22 or by_budget < self.pairs_per_block) and launch_rank() == 0:
            print(f"sphero: memory budget {self.memory_budget / 2**30:.2f} GB (--data.memory_budget_gb): {block} pair(s) "
                  f"per block, ~{(fixed + block * per_pair) / 2**30:.2f} GB for fitting", file=sys.stderr)
        return block

    def writer_threads(self, pixels: int, wanted: int) -> int:
        """Writer threads that fit the memory budget, each holding ``pixels`` source pixels (a task's band,
        :func:`~sphero_lightning.storage.writing.task_pixels`): at most ``wanted``, one at least."""
        return int(max(1, min(wanted, self.memory_budget // (WRITE_BYTES_PER_PX * pixels))))

    @property
    def out_root(self) -> str:
        """The store the output and the journal go into."""
        return self.output_root if self.output_root is not None else str(self.root)

    @property
    def output_format(self) -> int:
        """Zarr format of the output: the output store's, or (a new store) the source's."""
        return store_format(self.out_root) or zarr_format(self.source)

    @property
    def lock_path(self) -> Path:
        return self.journal_path / "lock"

    def release(self) -> None:
        """Release the output's lock if this run holds it (when the run ends, however it ends)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def teardown(self, stage: str) -> None:
        if self._stream is not None:
            self.reads = self._stream.times
            self._stream.close()
            self._stream = None
        self.held = None
        self.release()

    def on_exception(self, exception: BaseException) -> None:
        """A failed or interrupted fit (Lightning calls no teardown then): the reader thread stopped, the lock released."""
        self.teardown("fit")

    @property
    def source(self) -> zarr.Array:
        if self._arr is None:
            self.validate()
        return self._arr

    @property
    def slices(self) -> zarr.Array | np.ndarray:  # where slices are read from: the held small stack, or the source
        return self.source if self.held is None else self.held

    @property
    def spacing(self) -> list[float]:  # self.source opens and checks the array first when needed
        return list(self._spacing) if self.source is not None else []

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
        """Pairs that are fitted: consecutive usable slices (a damaged slice is bridged over), and with
        ``neighbours`` > 1 each usable slice to the ones before those (:func:`~..core.pairs.pair_graph`)."""
        return len(self.pairs)

    def pair_slices(self, pair: int) -> tuple[int, int]:
        """``(fixed, moving)`` slice indices of fitted pair ``pair``."""
        return self.pairs[pair]

    @property
    def output_path(self) -> str:
        return f"{self.dst_group}/{spacing_name(self.spacing)}"

    @property
    def journal_path(self) -> Path:
        group, name = self.output_path.rsplit("/", 1)
        return Path(self.out_root) / group / f"tmp-{name}-journal"

    def fingerprint(self, model: dict[str, Any], levels: list[Any], callbacks: list[Any]) -> dict[str, Any]:
        """Everything that determines the pairs' results (the data, the model's settings, the pyramid, every callback's
        own fingerprint); a journal with another fingerprint is not reused."""
        src = self.source
        extra = {type(cb).__name__: cb.fingerprint() for cb in callbacks if hasattr(cb, "fingerprint")}
        return {"array": self.array, "shape": list(src.shape), "dtype": str(src.dtype), "n_slices": self.n_slices,
                "damaged": {str(k): v for k, v in self.damaged.items()}, "model": model,
                "intensity": list(self.intensity) if self.intensity is not None else None,
                "pyramid": [[lv.factor, lv.steps, lv.lr] for lv in levels], "masks": self.mask_settings, **extra}

    @property
    def mask_settings(self) -> dict[str, Any]:
        """What the loss leaves out and how its images are cleaned (recorded with the output)."""
        static = self.static.record(self.static_mode)
        return {"ignore_value": self.ignore_value, "mask_array": self.mask_array, "destripe": self.destripe,
                "static_patterns": self.static_mode, **({"static": static} if static else {})}

    @property
    def loss_destripe(self) -> Destripe:
        """The destriping the loss's images get: the option's, and stripes the guard found (unless kept)."""
        found = self.static.stripes if self.static_mode == "leave_out" else ()
        return combined_destripe(self.destripe, found)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """``(fixed, moving)`` slices of every pair (:class:`~..core.pairs.StackPairs`)."""
        return self.graph.pairs

    @property
    def pair_stop(self) -> list[float]:
        """Per pair, the multiple of the finest factor it is fitted down to."""
        return self.graph.stop

    def add_pairs(self, pairs: list[tuple[int, int]]) -> None:
        """Pairs to fit after the others (bridges found once those were fitted): they start a block of their own."""
        self.graph.add(pairs)

    def skip(self, blocks: set[int]) -> None:  # blocks an earlier run finished (the journal's): nothing to read
        self.skip_blocks = set(blocks)

    def n_blocks(self, world: int) -> int:
        return len(self.graph.blocks(self.pairs_per_block * world))

    def block_range(self, block: int, world: int) -> tuple[int, int]:
        """``(start, stop)``: the pair indices of ``block`` across all ranks."""
        every = self.graph.blocks(self.pairs_per_block * world)
        return every[block] if block < len(every) else (self.n_pairs, self.n_pairs)

    def rank_pairs(self, block: int, rank: int, world: int) -> range:
        """Indices of the pairs ``rank`` fits in ``block`` (possibly fewer than a full block)."""
        start, stop = self.block_range(block, world)
        first = start + rank * self.pairs_per_block
        return range(min(first, stop), min(first + self.pairs_per_block, stop))

    def read_rank_block(self, block: int, rank: int, world: int) -> dict[str, Any]:
        pairs = self.rank_pairs(block, rank, world)
        if len(pairs) == 0:  # uneven split: this rank idles in this block, in step with the others
            h, w = self.slice_shape
            none = torch.zeros(0, dtype=torch.long)
            return {"slices": torch.zeros(1, h, w, dtype=torch.uint8), "offset": torch.tensor(0.0), "scale": torch.tensor(1.0),
                    "fixed": none, "moving": none}
        low, high = self.intensity if self.intensity is not None else self.sample_intensity()
        slices, fixed, moving = block_layout(self.pairs[pairs.start: pairs.stop])
        raw = read_slices(self.slices, slices)
        masks = slice_masks(raw, slices, self.ignore_value, self._mask, self._static_mask)
        data, offset, scale = to_tensor(raw, low, high)
        out = {"slices": data, "offset": torch.tensor(offset), "scale": torch.tensor(scale),
               "fixed": torch.tensor(fixed), "moving": torch.tensor(moving), "destripe": self.loss_destripe}
        if masks is not None:
            out["masks"] = torch.from_numpy(masks)
        return out

    def sample_intensity(self, n: int = 16) -> tuple[float, float]:
        """The grey-value range from up to ``n`` evenly spread slices (when the slices are not all scanned);
        the same on every rank."""
        zs = sorted({round(float(z)) for z in np.linspace(0, self.n_slices - 1, min(n, self.n_slices))})
        stats = np.array([slice_stats(read_slice(self.source, z)) for z in zs])
        usable = [i for i, z in enumerate(zs) if z not in self.damaged]
        return intensity_range(stats, usable)

    def scan(self, rank: int = 0, world: int = 1, reduce: Any = None, progress: bool = False) -> dict[int, str]:
        """Find damaged slices (see ``check_slices``); each rank reads its share, ``reduce`` sums them."""
        n = self.n_slices
        small = world == 1 and n * math.prod(self.slice_shape) * self.source.dtype.itemsize <= min(HOLD_BYTES, self.memory_budget // 8)
        self.held = read_block(self.source, 0, n) if small else None
        stats = torch.from_numpy(scan_stats(self.slices, n, rank, world, progress and rank == 0 and n >= 64))
        st = (reduce(stats) if reduce is not None else stats).cpu().numpy()
        damaged = damaged_slices(st, self.min_contrast)
        self.intensity = intensity_range(st, [z for z in range(n) if z not in damaged])
        return damaged

    def find_static(self, n: int = 8) -> None:
        """Patterns identical across up to ``n`` spread slices, each subsampled to <= ~1 Mpx (core.masks), and the mask
        of a static region left out of the loss (``static_patterns: leave_out``); the same on every rank."""
        self.static, self._static_mask = StaticPatterns(), None
        if self._mask is not None:  # the user has said what to leave out
            return
        zs = sorted({self.good[round(float(q))] for q in np.linspace(0, len(self.good) - 1, min(n, len(self.good)))})
        h, w = self.slice_shape
        step = max(1, math.ceil(math.sqrt(h * w / (1 << 20))))  # <= ~1 Mpx each
        sample = np.stack([read_slice(self.slices, z)[::step, ::step] for z in zs])
        self.static = find_static_patterns(sample, self.ignore_value, self.destripe)
        self._static_mask = self.static.mask(step, (h, w)) if self.static_mode == "leave_out" else None

    def set_damaged(self, damaged: dict[int, str]) -> None:
        self.damaged = dict(sorted(damaged.items()))
        self.good = [z for z in range(self.n_slices) if z not in self.damaged]
        # the pairs, and the finest factor each is fitted to (pairs further apart: --solve.coarse_factor; they tell which
        # pairs have no true answer, the ones standing in are fitted again)
        self.graph = StackPairs.of(self.good, self.neighbours, self.coarse_factor)
        if len(self.good) < 2 and self.damaged:
            raise SpheroError(f"fewer than 2 usable slices: {len(self.damaged)} of {self.n_slices} are damaged "
                              f"(first: slice {next(iter(self.damaged))}, {next(iter(self.damaged.values()))}); "
                              "check the data, or --data.check_slices false to fit them anyway")

    # ------------------------------------------------------------------ Lightning
    @property
    def read_times(self) -> ReadTimes:
        """The block reader's seconds in this fit (while it runs, or after it)."""
        return self._stream.times if self._stream is not None else self.reads

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        self.reads, self.scan_s = ReadTimes(), 0.0  # this fit's, not added to an earlier fit's
        self.notes: list[dict[str, Any]] = []  # lines about the data and the result (report.say), for the page
        if self.check_slices:
            t0 = time.perf_counter()
            strategy = trainer.strategy

            def reduce(t: torch.Tensor) -> torch.Tensor:
                return t if trainer.world_size == 1 else strategy.reduce(t.to(strategy.root_device), reduce_op="sum").double().cpu()

            self.set_damaged(self.scan(trainer.global_rank, trainer.world_size, reduce,
                                       progress=getattr(trainer, "progress_bar_callback", None) is not None))
            self.scan_s = time.perf_counter() - t0
        else:
            self.intensity = self.sample_intensity()
        self.find_static()
        if self.damaged and trainer.is_global_zero:  # found by the scan (or set by a caller): said either way
            listing = "; ".join(f"slice {z}: {why}" for z, why in list(self.damaged.items())[:10])
            more = f" (and {len(self.damaged) - 10} more)" if len(self.damaged) > 10 else ""
            say(self.notes, f"{len(self.damaged)} damaged slice(s) left out and bridged over: {listing}{more}", self.damaged)
        trainer.fit_loop.max_epochs = self.n_blocks(trainer.world_size)  # one epoch per block, exactly

    def train_dataloader(self) -> DataLoader:
        if self._stream is not None:
            self._stream.close()
        elif self.trainer.is_global_zero:  # once, after every setting was checked
            for line in self.static.lines(self.static_mode):
                say(self.notes, line)
        self._stream = BlockStream(self, self.trainer)
        return DataLoader(self._stream, batch_size=None, num_workers=0)
