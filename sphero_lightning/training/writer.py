"""The post-fit hook: compose the pairwise transforms, crop exactly, warp every slice once, write Zarr with
provenance and OME-NGFF metadata.

The array is written under a temporary name in the destination group and renamed into place only
when every slice and every attribute is written, so an interrupted run never leaves a partial array
at the final path. Under DDP each rank warps and writes its share of the slices (distinct chunks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import lightning as L
import numpy as np
import torch.distributed as dist

from .._version import __version__
from ..core.records import MIN_TRUSTED_NCC, PairStatus, flag_outliers
from ..core.settings import OUTPUT, OutputInterpolation, check_bounds
from ..core.stack import VolumeResult, compose_stack
from ..errors import SpheroError
from ..report.drift import accumulation_warning
from ..storage.partial import prepare_output, resumed_line
from ..storage.pyramid import default_levels, place_levels
from ..storage.store import is_url, move_into_place, open_group, remove_node, utc_now, write_ome
from ..storage.tasks import check_scheduler, is_distributed
from ..storage.writing import ArrayRef, level_arrays, output_layout, task_pixels, warp_stack
from .module import RegistrationModule
from .report import RunTimes, fit_record, log_panels, say
from .volume import VolumeSolve


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def compose_result(dm: Any, module: RegistrationModule, volume: VolumeSolve | None,
                   crop_borders: bool = OUTPUT.crop_borders, margin: int = OUTPUT.crop_safety_margin) -> VolumeResult:
    """The fitted pairs of ``module`` over the stack of ``dm`` as a volume (:func:`~..core.stack.compose_stack`, with
    the ``--solve.*`` settings of ``volume``): what the writer writes and the Python API returns."""
    shape = dm.slice_shape
    return compose_stack(dm.n_slices, [module.results[p] for p in range(dm.n_pairs)], dm.damaged, shape,
                         neighbours=dm.neighbours, reference=volume.reference if volume is not None else 0,
                         priors=volume.priors(shape) if volume is not None else None,
                         family=module.objective.family, crop_borders=crop_borders, margin=margin)


def write_registration(trainer: L.Trainer, module: RegistrationModule, writer: RegistrationWriter,
                       placed: Callable[[str], None] = lambda where: None) -> tuple[str, RunTimes | None]:
    """Compose, crop, warp and write the registered stack. ``placed`` hears ``store/path`` the moment the output is in
    place (what an interruption from then on does not lose). Returns the output array's path and where the run's
    time went (rank 0; None on other ranks)."""
    dm = trainer.datamodule
    n, shape = dm.n_slices - 1, dm.slice_shape
    missing = [p for p in range(dm.n_pairs) if p not in module.results]
    if missing:
        raise RuntimeError(f"{len(missing)} pairs were not registered (first: {missing[:5]}); output not written")
    volume = next((cb for cb in trainer.callbacks if isinstance(cb, VolumeSolve)), None)
    vol = compose_result(dm, module, volume, writer.crop_borders, writer.crop_safety_margin)
    composed, log, solved, box = vol.composed, vol.log, vol.solved, vol.box
    up, down, left, right = box
    out_shape = (n + 1, down - up, right - left)

    src = dm.source
    group_path, name = dm.output_path.rsplit("/", 1)
    tmp_name = f"tmp-{name}-partial"
    rank, world = trainer.global_rank, trainer.world_size
    out_root, fmt = dm.out_root, dm.output_format
    chunks, shards = output_layout(src.chunks, out_shape, writer.chunks, writer.shards)
    n_levels = writer.levels if writer.levels is not None else default_levels(out_shape[1:])
    levels = level_arrays(tmp_name, out_shape, shards or chunks, shape, n_levels)  # None: a second pass writes them
    if rank == 0:
        group = open_group(out_root, group_path, fmt)
        units, resumed = prepare_output(group, tmp_name, shape=out_shape, chunks=chunks, shards=shards, dtype=src.dtype,
                                        compression_level=writer.compression_level, full_shape=shape, levels=levels,
                                        source=[str(dm.root), dm.array], composed=composed.tolist(), box=box,
                                        mode=writer.interpolation, zarr_format=fmt)
        if resumed:
            print(f"{resumed_line('write', resumed, units)} in {out_root}/{group_path}/{tmp_name}", file=sys.stderr)
    _barrier()
    out_ref = ArrayRef(str(out_root), f"{group_path}/{tmp_name}")
    written = ArrayRef(str(out_root), f"{group_path}/{tmp_name}-written")
    distributed = is_distributed(writer.scheduler)

    show = rank == 0 and getattr(trainer, "progress_bar_callback", None) is not None
    band = task_pixels(out_shape, shards or chunks, shape, composed)
    workers = writer.num_workers if distributed else dm.writer_threads(band, writer.num_workers)
    if workers < writer.num_workers and rank == 0:
        print(f"sphero: writing with {workers} thread(s) of --output.num_workers {writer.num_workers}: the memory budget "
              f"({dm.memory_budget / 2**30:.2f} GB) holds {workers} band(s) of {band // shape[1]} x {shape[1]} source "
              f"pixels in flight", file=sys.stderr)
    slices = dm.slices  # a small stack the scan read (data.HOLD_BYTES) is not read again
    wrote = warp_stack(ArrayRef(str(dm.root), dm.array) if distributed else slices, out_ref, composed, box,
                       writer.interpolation, written=written, device=module.device, rank=rank, world=world,
                       progress=show, num_workers=workers, scheduler=writer.scheduler,
                       levels=[ArrayRef(str(out_root), f"{group_path}/{n}") for n, _, _ in levels or []],
                       fill=sum(dm.intensity) / 2 if dm.intensity else 0.0)
    _barrier()
    out = out_ref.open("r+")

    final = f"{group_path}/{name}"
    if rank == 0:
        stamp = utc_now()
        processing = list(src.attrs.get("processing", []))
        processing.append({"step_name": "registration", "timestamp": stamp, "version": __version__,
                           "parameters": {**fit_record(trainer, module),
                                          "output_interpolation": writer.interpolation}})
        processing.append({"step_name": "border_crop", "timestamp": stamp, "version": __version__,
                           "parameters": {"crop_box": box, "crop_borders": writer.crop_borders,
                                          "crop_safety_margin": writer.crop_safety_margin, "method": "exact"}})
        notes = getattr(dm, "notes", None)
        notes = list(notes) if notes is not None else []
        outliers = flag_outliers(log)
        if outliers:
            listing = ", ".join(f"{e['slice_indices'][0]}->{e['slice_indices'][1]} (z {e['qc_z']:.1f})" for e in outliers[:20])
            say(notes, f"QC: {len(outliers)} pair(s) with an outlying final loss along the stack, check them: {listing}",
                {z for e in outliers for z in e["slice_indices"]})
        if solved is not None and solved["unregistered"]:
            say(notes, f"warning: {len(solved['unregistered'])} slice(s) no pair agrees with were left out and placed "
                f"between their neighbours (status unregistered: foreign, misfiled or re-imaged?): "
                f"{', '.join(str(z) for z in solved['unregistered'][:20])}", solved["unregistered"])
        if solved is not None and solved["kept_despite"]:
            listing = ", ".join(f"{i}->{j}" for i, j in solved["kept_despite"][:20])
            say(notes, f"warning: the stack would fall apart without pair(s) that disagree with the others, kept: "
                f"{listing}; the slices after them may be misplaced (try --solve.neighbours {dm.neighbours + 1})",
                {z for p in solved["kept_despite"] for z in p})
        drift = accumulation_warning(vol.composed_pixel, shape, box,
                                     {**(volume.settings() if volume is not None else {}), "crop_borders": writer.crop_borders})
        if drift:
            say(notes, f"warning: {drift}", kind="accumulation")
        poor = [e for e in log if e.get("status") == PairStatus.LOW_CORRELATION]
        if poor:
            listing = ", ".join(f"{e['slice_indices'][0]}->{e['slice_indices'][1]} (NCC {e['ncc_after']:.3f})" for e in poor[:20])
            say(notes, f"warning: {len(poor)} pair(s) barely correlate after fitting (NCC < {MIN_TRUSTED_NCC}); their "
                f"transforms cannot be trusted (status low_correlation): {listing}", {z for e in poor for z in e["slice_indices"]})
        log_panels(trainer, slices, vol.fitted, log)
        out.attrs.update({
            "spacing": dm.spacing,
            "inputs": [dm.array],
            "source_root": str(dm.root) if is_url(dm.root) else str(Path(dm.root).resolve()),
            "processing": processing,
            **vol.transforms(),
            "warnings": notes,
        })
        move_into_place(out_root, group_path, tmp_name, name)
        placed(f"{out_root}/{final}")
        remove_node(out_root, f"{group_path}/{tmp_name}-written")
        journal = getattr(module, "journal", None)
        if journal is not None:
            journal.remove()  # the result is in place: nothing to resume any more
        t0 = time.perf_counter()
        place_levels(out_root, group_path, name, n_levels, levels, num_workers=workers, progress=show,
                     compression_level=writer.compression_level)
        # a second pass has its own time; in the same pass the levels took a share of the writing time (warp_stack)
        second_pass = levels is None and n_levels > 1
        reads = dm.read_times
        times = RunTimes(scan_s=dm.scan_s, fit_s=module.times.fit_s, threads=module.times.threads, read_s=reads.read_s,
                         wait_s=reads.wait_s,
                         write_s=wrote.write_s, workers=workers,
                         levels_s=time.perf_counter() - t0 if second_pass else wrote.levels_s,
                         levels_same_pass=not second_pass)
        write_ome(out_root, group_path)
        print(f"sphero: wrote {out_root}/{final} shape {out_shape} {np.dtype(src.dtype)} crop_box {box} (Zarr v{fmt}); "
              f"a viewer opens {out_root}/{group_path} (OME-NGFF multiscales: the output{' and its levels' if n_levels > 1 else ''})",
              file=sys.stderr)
        print(f"sphero: {times.line()}", file=sys.stderr)
        try:  # the alignment page beside the logs; the output is in place whatever happens here
            from .report import report_page

            page = report_page(trainer, out_root, final, src, times.line())
            print(f"sphero: report {page}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a failed report must not fail a finished run
            print(f"sphero: warning: no alignment report ({type(exc).__name__}: {exc})", file=sys.stderr)
    _barrier()
    return final, times if rank == 0 else None


class RegistrationWriter(L.Callback):
    """After fitting: compose the transforms, crop to the largest box valid in every slice, write.

    Parameters
    ----------
    crop_borders : bool
        Crop to the largest axis-aligned box whose every pixel lies inside every warped slice.
        Computed exactly from the transforms (not guessed from intensities).
    crop_safety_margin : int
        Pixels removed on each side of that box (0 keeps the exact largest box).
    interpolation : {"bspline", "bicubic", "bilinear"}
        How slices are resampled for the output. ``bspline`` (prefiltered cubic B-spline) is the most
        faithful; ``bicubic`` is torch's Keys kernel (the reference pipeline's choice).
    compression_level : int
        zstd level of the output chunks.
    chunks : list of int, optional
        Output chunk shape ``[z, y, x]``; default one slice deep with the source's y/x chunking (a slice reads
        fast in a viewer, a z-column needs one chunk per slice). ``[64, 256, 256]`` suits 3D viewers.
    shards : list of int, optional
        zarr v3 sharding: shard shape ``[z, y, x]``, whole multiples of ``chunks``; many chunks go to one file
        (fewer files on big stacks). Default: no sharding.
    num_workers : int
        Threads that read, warp, compress and write the output in parallel (one shard or chunk each), on this
        machine; with a ``scheduler`` address, the cluster's workers decide.
    levels : int, optional
        Resolution levels written (OME-NGFF multiscales, for napari, neuroglancer, BigDataViewer): the output and
        ``levels - 1`` more, each half the previous in y and x (2 x 2 mean; z kept), beside it in the same group
        (``50-8-8``, ``50-16-16`` ...). Default by size: halved until the larger side is at most 1024 px (512 px
        slices: 1, the output alone; 8192 px: 4). 1 writes the full resolution only.
    scheduler : str
        Where the output is warped and written: ``threads`` (this machine, ``num_workers`` threads), ``synchronous``
        (one task at a time, for debugging), or a dask distributed scheduler's address (``tcp://host:8786``, e.g.
        a dask-jobqueue cluster's), whose workers open the source and output by path: both must be on storage
        they can reach. Each task writes one shard (or chunk); a write that was interrupted resumes where it stopped.
    """

    def __init__(self, crop_borders: bool = OUTPUT.crop_borders, crop_safety_margin: int = OUTPUT.crop_safety_margin,
                 interpolation: OutputInterpolation = OUTPUT.interpolation,
                 compression_level: int = OUTPUT.compression_level, chunks: list[int] | None = OUTPUT.chunks,
                 shards: list[int] | None = OUTPUT.shards, num_workers: int = OUTPUT.num_workers,
                 scheduler: str = OUTPUT.scheduler, levels: int | None = OUTPUT.levels) -> None:
        if interpolation not in get_args(OutputInterpolation):
            raise SpheroError(f"unknown output interpolation {interpolation!r}; choose one of {', '.join(get_args(OutputInterpolation))}")
        check_bounds("output", crop_safety_margin=crop_safety_margin, num_workers=num_workers, levels=levels)
        check_scheduler(scheduler, "--output.scheduler")
        self.levels = levels
        probe = (1 << 20,) * 3
        output_layout((1, 1, 1), probe, chunks, shards)  # the shapes' own validity now; with the source's chunks at setup
        self.crop_borders, self.crop_safety_margin = crop_borders, crop_safety_margin
        self.interpolation, self.compression_level = interpolation, compression_level
        self.chunks = None if chunks is None else [int(c) for c in chunks]
        self.shards = None if shards is None else [int(v) for v in shards]
        self.num_workers = int(num_workers)
        self.scheduler = str(scheduler)
        self.output_path: str | None = None
        self.written: str | None = None  # ``store/path`` of the output once it is in place (set by this run's writer)
        self.times: RunTimes | None = None  # where this run's time went (set when the output is written)

    #: Config group of these settings (``--output.*``), for the logged hyperparameters.
    config_group = "output"

    def settings(self) -> dict[str, Any]:
        return {"crop_borders": self.crop_borders, "crop_safety_margin": self.crop_safety_margin,
                "interpolation": self.interpolation, "compression_level": self.compression_level,
                "chunks": self.chunks, "shards": self.shards, "num_workers": self.num_workers,
                "scheduler": self.scheduler, "levels": self.levels}

    def setup(self, trainer: L.Trainer, pl_module: RegistrationModule, stage: str) -> None:
        # before any fitting: what the output store cannot hold
        self.written, self.times = None, None  # this fit's, not an earlier one's
        dm = trainer.datamodule
        if self.shards is not None and dm.output_format == 2:
            raise SpheroError("--output.shards needs a Zarr v3 output store, and this one is Zarr v2: drop --output.shards, "
                              "or write into a new store with --data.output_root OUT.zarr (pass a v3 store)")
        output_layout(dm.source.chunks, (dm.n_slices, *dm.slice_shape), self.chunks, self.shards)

    def on_fit_end(self, trainer: L.Trainer, pl_module: RegistrationModule) -> None:

        self.output_path, self.times = write_registration(trainer, pl_module, self, placed=self._placed)

    def _placed(self, where: str) -> None:
        self.written = where
