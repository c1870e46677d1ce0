"""Output: compose, crop, warp each slice once, write Zarr with provenance and OME-NGFF metadata.

The array is written under a temporary name in the destination group and renamed into place only
when every slice and every attribute is written, so an interrupted run never leaves a partial array
at the final path. Under DDP each rank warps and writes its share of the slices (distinct chunks).
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import zarr

from .. import __version__
from ..commands.export import pixel_matrices
from ..core.crop import crop_box
from ..core.interpolation import bspline_prefilter, nearest_index, warp, warp_coefficients
from ..core.transforms import homogeneous, normalized_to_pixel
from ..errors import SpheroError
from ..storage.store import create_array, is_url, move_into_place, open_group, utc_now, write_ome

if TYPE_CHECKING:
    import lightning as L

    from ..training.callbacks import RegistrationWriter
    from ..training.module import RegistrationModule


#: Run results shown next to the hyperparameters in TensorBoard's HPARAMS tab (set by :func:`log_panels`).
HPARAM_METRICS = ("hp/mean_ncc_before", "hp/mean_ncc_after", "hp/qc_outliers")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype's range; float dtypes pass through."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


def write_registration(trainer: L.Trainer, module: RegistrationModule, writer: RegistrationWriter) -> str:
    """Compose, crop, warp and write the registered stack. Returns the output array's path."""
    dm = trainer.datamodule
    n, shape = dm.n_slices - 1, dm.slice_shape
    missing = [p for p in range(dm.n_pairs) if p not in module.results]
    if missing:
        raise RuntimeError(f"{len(missing)} pairs were not registered (first: {missing[:5]}); output not written")
    fitted = [module.results[p] for p in range(dm.n_pairs)]
    composed, pairwise_m, log = chain_with_gaps(dm.n_slices, fitted, dm.damaged)
    mark_untrusted(log)
    composed = composed[1:]
    if writer.crop_borders:
        box = crop_box(normalized_to_pixel(composed, shape).numpy(), shape, writer.crop_safety_margin)
    else:
        box = [0, shape[0], 0, shape[1]]
    up, down, left, right = box
    out_shape = (n + 1, down - up, right - left)

    src = dm.source
    group_path, name = dm.output_path.rsplit("/", 1)
    tmp_name = f"tmp-{name}-partial"
    rank, world = trainer.global_rank, trainer.world_size
    out_root, fmt = dm.out_root, dm.output_format
    if rank == 0:
        group = open_group(out_root, group_path, fmt)
        chunks, shards = output_layout(src.chunks, out_shape, writer.chunks, writer.shards)
        create_array(group, tmp_name, shape=out_shape, chunks=chunks, shards=shards, dtype=src.dtype,
                     compression_level=writer.compression_level)
    _barrier()
    out = zarr.open_array(str(out_root), path=f"{group_path}/{tmp_name}", mode="r+", zarr_format=fmt)

    show = rank == 0 and getattr(trainer, "progress_bar_callback", None) is not None
    module.timings.update(warp_slices(src, out, composed, box, writer.interpolation, module.device, rank, world,
                                      progress=show, n_slices=n + 1, num_workers=writer.num_workers))
    _barrier()

    final = f"{group_path}/{name}"
    if rank == 0:
        hp = dict(module.hparams)
        pyramid = [{"factor": lv.factor, "steps": lv.steps, "learning_rate": lv.lr} for lv in module.levels]
        stamp = utc_now()
        processing = list(src.attrs.get("processing", []))
        processing.append({"step_name": "registration", "timestamp": stamp, "version": __version__,
                           "parameters": {**{k: v for k, v in hp.items() if k != "pairs_per_block"},
                                          "pyramid": pyramid, "max_pairs": dm.max_pairs,
                                          "pairs_per_block": dm.pairs_per_block,
                                          "output_interpolation": writer.interpolation,
                                          "intensity_range": list(dm.intensity) if dm.intensity else None,
                                          "trainer": trainer_record(trainer)}})
        processing.append({"step_name": "border_crop", "timestamp": stamp, "version": __version__,
                           "parameters": {"crop_box": box, "crop_borders": writer.crop_borders,
                                          "crop_safety_margin": writer.crop_safety_margin, "method": "exact"}})
        outliers = flag_outliers(log)
        if outliers:
            listing = ", ".join(f"{e['slice_indices'][0]}->{e['slice_indices'][1]} (z {e['qc_z']:.1f})" for e in outliers[:20])
            print(f"sphero: QC: {len(outliers)} pair(s) with an outlying final loss along the stack, check them: {listing}",
                  file=sys.stderr)
        poor = [e for e in log if e.get("status") == "low_correlation"]
        if poor:
            listing = ", ".join(f"{e['slice_indices'][0]}->{e['slice_indices'][1]} (NCC {e['ncc_after']:.3f})" for e in poor[:20])
            print(f"sphero: warning: {len(poor)} pair(s) barely correlate after fitting (NCC < {MIN_TRUSTED_NCC}); their "
                  f"transforms cannot be trusted (status low_correlation): {listing}", file=sys.stderr)
        log_panels(trainer, src, fitted, log)
        out.attrs.update({
            "spacing": dm.spacing,
            "inputs": [dm.array],
            "source_root": str(dm.root) if is_url(dm.root) else str(Path(dm.root).resolve()),
            "processing": processing,
            "pairwise_transforms": pairwise_m.tolist(),
            "composed_transforms": composed.tolist(),
            "composed_transforms_pixel": pixel_matrices(composed.numpy(), shape).tolist(),
            "registration_log": log,
            "crop_box": box,
        })
        move_into_place(out_root, group_path, tmp_name, name)
        journal = getattr(module, "journal", None)
        if journal is not None:
            journal.remove()  # the result is in place: nothing to resume any more
        write_ome(out_root, group_path)
        print(f"sphero: wrote {out_root}/{final} shape {out_shape} {np.dtype(src.dtype)} crop_box {box} (Zarr v{fmt})",
              file=sys.stderr)
        print(f"sphero: {timing_line(module.timings, writer.num_workers)}", file=sys.stderr)
    _barrier()
    return final


def timing_line(t: dict[str, float], workers: int) -> str:
    """One line: where the run's time went (this rank's view)."""
    fit, wait = t.get("fit_s", 0.0), t.get("wait_s", 0.0)
    return (f"time: checking slices {t.get('scan_s', 0.0):.2f} s, fitting {fit:.2f} s (computing {fit - wait:.2f} s, "
            f"waiting for data {wait:.2f} s; reading took {t.get('read_s', 0.0):.2f} s in the background), "
            f"writing {t.get('write_s', 0.0):.2f} s ({workers} threads)")


#: A pair whose NCC after fitting is below this is marked ``low_correlation``, never ``ok``: its slices share too
#: little structure for the transform to mean anything (consecutive real ssTEM sections: 0.2-0.4; FIB-SEM: ~0.9).
MIN_TRUSTED_NCC = 0.1


def mark_untrusted(log: list[dict[str, Any]]) -> None:
    """Set ``status: low_correlation`` on fitted pairs whose NCC after fitting is below :data:`MIN_TRUSTED_NCC`
    (or not finite): a result that cannot be trusted is never marked ``ok``."""
    for e in log:
        if e.get("status") != "ok":
            continue
        ncc = e.get("ncc_after")
        if ncc is not None and not (math.isfinite(ncc) and ncc >= MIN_TRUSTED_NCC):
            e["status"] = "low_correlation"


def trainer_record(trainer: L.Trainer) -> dict[str, Any]:
    """What the run ran on, for the provenance record."""
    return {"accelerator": trainer.strategy.root_device.type, "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes, "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision)}


#: Fewest pairs for the along-the-stack QC: a median and MAD of fewer say nothing about outliers.
QC_MIN_PAIRS = 5
#: The spread below which differences in final loss are not outliers: this fraction of the median loss.
QC_MIN_SPREAD = 0.05


def flag_outliers(log: list[dict[str, Any]], threshold: float = 3.5) -> list[dict[str, Any]]:
    """Mark pairs whose final loss is an outlier along the stack (robust z-score above ``threshold``).

    ``z = 0.6745 (loss - median) / max(MAD, QC_MIN_SPREAD * median)`` over the registered pairs; only high
    losses (poor matches) count. The floor keeps near-identical pairs (all losses within a few percent, as on
    a short or very regular stack) from being flagged for differences that mean nothing. Sets ``qc`` (``"ok"``,
    ``"outlier"``, or ``"not_assessed"`` with fewer than :data:`QC_MIN_PAIRS` pairs) and ``qc_z`` on every
    registered entry; returns the outliers.
    """
    entries = [e for e in log if e.get("final_loss") is not None and math.isfinite(e["final_loss"])]
    if len(entries) < QC_MIN_PAIRS:
        for e in entries:
            e["qc"], e["qc_z"] = "not_assessed", None
        return []
    losses = np.array([e["final_loss"] for e in entries])
    med = float(np.median(losses))
    mad = float(np.median(np.abs(losses - med)))
    scale = max(mad, QC_MIN_SPREAD * abs(med), 1e-12)
    out = []
    for e, x in zip(entries, losses):
        z = 0.6745 * (x - med) / scale
        e["qc_z"] = round(float(z), 3)
        e["qc"] = "outlier" if z > threshold else "ok"
        if z > threshold:
            out.append(e)
    return out


def tensorboard_writer(trainer: L.Trainer) -> Any:
    """The run's TensorBoard ``SummaryWriter``, or None without a TensorBoard logger (call on rank 0 only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return None if logger is None else logger.experiment


def log_panels(trainer: L.Trainer, src: zarr.Array, fitted: list[dict[str, Any]], log: list[dict[str, Any]], n_panels: int = 3) -> None:
    """TensorBoard: per pair (x = pair index) the final loss, QC score and NCC before/after; overlays of a few
    pairs; the run's summary values of the HPARAMS tab (:data:`HPARAM_METRICS`)."""
    tb = tensorboard_writer(trainer)
    if tb is None:
        return
    for e in log:
        if e.get("final_loss") is not None:
            tb.add_scalar("pair/final_loss", e["final_loss"], global_step=e["pair_index"])
            if e.get("qc_z") is not None:
                tb.add_scalar("pair/qc_z", e["qc_z"], global_step=e["pair_index"])
        for key in ("ncc_before", "ncc_after"):
            if e.get(key) is not None:  # absent for pairs next to a damaged slice (and from journals of older versions)
                tb.add_scalar(f"pair/{key}", e[key], global_step=e["pair_index"])
    summary = {}
    for key in ("ncc_before", "ncc_after"):
        values = [e[key] for e in log if e.get(key) is not None]
        summary[f"hp/mean_{key}"] = float(np.mean(values)) if values else float("nan")
    summary["hp/qc_outliers"] = float(sum(e.get("qc") == "outlier" for e in log))
    for tag in HPARAM_METRICS:
        tb.add_scalar(tag, summary[tag], global_step=1)
    picks = sorted({0, len(fitted) // 2, len(fitted) - 1}) if fitted else []
    shape = tuple(src.shape[1:])
    for i in picks[:n_panels]:
        r = fitted[i]
        a, b = r["slice_indices"]
        fixed = np.asarray(src[a]).astype(np.float32)
        moving = np.asarray(src[b]).astype(np.float32)
        theta = torch.tensor([r["matrix"]], dtype=torch.float32)
        registered = warp(torch.from_numpy(moving)[None, None], theta, mode="bilinear", full_shape=shape)[0, 0].numpy()
        step = max(1, max(shape) // 512)  # panels of at most ~512 px
        for tag, mov in (("before", moving), ("after", registered)):
            tb.add_image(f"pairs/{a}-{b}_{tag}", _overlay(fixed[::step, ::step], mov[::step, ::step]), dataformats="HWC")


def _overlay(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Fixed in magenta, moving in green: aligned structures turn grey, misaligned ones coloured."""
    def norm(x: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(x, [1, 99])
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)

    f, m = norm(fixed), norm(moving)
    return np.stack([f, m, f], -1)


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


def chain_with_gaps(n_slices: int, fitted: list[dict[str, Any]], damaged: dict[int, str]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Transforms to slice 0 of every slice, pairwise transforms of consecutive slices, the log.

    ``fitted`` are the registered pairs in order, consecutive slices except across damaged ones; each
    ``matrix`` maps slice ``slice_indices[0]``'s frame to positions in slice ``slice_indices[1]``
    (the convention of :func:`~sphero_lightning.core.transforms.compose`). A damaged slice gets the
    transform interpolated (per matrix entry, by slice position) between its nearest registered
    neighbours, or the nearest one's at either end of the stack. The pairwise transform of a pair
    next to a damaged slice follows from the composed ones, so the chain stays consistent.

    Returns
    -------
    composed : ``(n_slices, 2, 3)`` float64, entry 0 the identity (or what slice 0 inherits).
    pairwise : ``(n_slices - 1, 2, 3)``; entry ``i`` is the transform of pair ``(i, i + 1)``.
    log : one entry per consecutive pair ``(i, i + 1)``, with ``status``.
    """
    eye = torch.eye(3, dtype=torch.float64)[:2]
    known: dict[int, torch.Tensor] = {}
    good = [r["slice_indices"][0] for r in fitted] + ([fitted[-1]["slice_indices"][1]] if fitted else [])
    if not good:
        good = [min(set(range(n_slices)) - set(damaged))]
    known[good[0]] = eye
    acc = torch.eye(3, dtype=torch.float64)
    for r in fitted:
        a = homogeneous(torch.tensor(r["matrix"], dtype=torch.float64)[None])[0]
        acc = a @ acc
        known[r["slice_indices"][1]] = acc[:2].clone()
    composed = torch.zeros(n_slices, 2, 3, dtype=torch.float64)
    for z in range(n_slices):
        if z in known:
            composed[z] = known[z]
            continue
        before = [g for g in good if g < z]
        after = [g for g in good if g > z]
        if before and after:
            lo, hi = before[-1], after[0]
            t = (z - lo) / (hi - lo)
            composed[z] = (1 - t) * known[lo] + t * known[hi]
        else:
            composed[z] = known[before[-1] if before else after[0]]
    by_pair = {tuple(r["slice_indices"]): r for r in fitted}
    hom = homogeneous(composed)
    pairwise = torch.zeros(max(0, n_slices - 1), 2, 3, dtype=torch.float64)
    log: list[dict[str, Any]] = []
    for i in range(n_slices - 1):
        r = by_pair.get((i, i + 1))
        if r is not None:
            pairwise[i] = torch.tensor(r["matrix"], dtype=torch.float64)
            log.append({k: v for k, v in r.items() if k != "matrix"} | {"pair_index": i})
            continue
        # C_(i+1) = A_i @ C_i  ->  A_i = C_(i+1) @ C_i^-1
        pairwise[i] = (hom[i + 1] @ torch.linalg.inv(hom[i]))[:2]
        bad = [z for z in (i, i + 1) if z in damaged]
        bridge = next((r for r in fitted if r["slice_indices"][0] <= i and r["slice_indices"][1] >= i + 1), None)
        entry: dict[str, Any] = {"pair_index": i, "slice_indices": [i, i + 1], "status": "damaged_slice",
                                 "damaged_slices": {str(z): damaged[z] for z in bad}, "final_loss": None,
                                 "num_steps_taken": 0, "steps_per_level": [], "ncc_before": None, "ncc_after": None}
        if bridge is not None:
            entry["bridged_by"] = {k: v for k, v in bridge.items() if k not in ("matrix", "pair_index")}
        log.append(entry)
    return composed, pairwise, log
