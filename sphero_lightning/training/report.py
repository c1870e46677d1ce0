"""What a run reports besides its output: the timing line, quality control along the stack, TensorBoard panels."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import zarr

from ..core.records import PairRecord
from ..core.warping import warp
from ..report.reslice import overlay

#: Run results shown next to the hyperparameters in TensorBoard's HPARAMS tab (set by :func:`log_panels`).
HPARAM_METRICS = ("hp/mean_ncc_before", "hp/mean_ncc_after", "hp/qc_outliers")


def say(notes: list[dict[str, Any]] | None, text: str, slices: Iterable[int] = (), kind: str | None = None) -> None:
    """Print ``sphero: text`` (a line about the data or the result: a warning, what was left out or bridged) and keep
    it in ``notes`` with the slices it names (and a ``kind``, the page's anchor), for the output's ``warnings`` and the
    page's warning box. Call on rank 0."""
    print(f"sphero: {text}", file=sys.stderr)
    if notes is not None:
        notes.append({"text": text, "slices": sorted({int(z) for z in slices}), **({"kind": kind} if kind else {})})


@dataclass(frozen=True)
class RunTimes:
    """Where a run's time went (seconds, this rank's view), from each stage's own figures: the slice check, the fit
    (``read_s`` of it reading blocks in the background, ``wait_s`` waiting for one), writing with ``workers`` threads,
    the downsampled levels (``levels_s``: a share of ``write_s`` when written in the same pass, else a second pass)."""

    scan_s: float = 0.0
    fit_s: float = 0.0
    threads: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0
    write_s: float = 0.0
    workers: int = 1
    levels_s: float | None = None
    levels_same_pass: bool = False

    def line(self) -> str:
        """One line for the terminal and the page."""
        levels = "" if self.levels_s is None else f", downsampled levels {self.levels_s:.2f} s" + (
            " of it (same pass)" if self.levels_same_pass else " (second pass)")
        on = f" on {self.threads} torch thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return (f"time: checking slices {self.scan_s:.2f} s, fitting {self.fit_s:.2f} s{on} (computing "
                f"{self.fit_s - self.wait_s:.2f} s, waiting for data {self.wait_s:.2f} s; reading took {self.read_s:.2f} s "
                f"in the background), writing {self.write_s:.2f} s ({self.workers} threads){levels}")


def trainer_record(trainer: L.Trainer) -> dict[str, Any]:
    """What the run ran on, for the provenance record."""
    return {"accelerator": trainer.strategy.root_device.type, "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes, "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision)}


def log_level_end(trainer: L.Trainer | None, block: Any, losses: torch.Tensor) -> None:
    """TensorBoard ``loss/level_<k>``: mean loss of the block's pairs at the end of level k (x = block)."""
    tb = tensorboard_writer(trainer) if trainer is not None and trainer.is_global_zero else None
    if tb is None:
        return
    f = losses[block.valid]
    f = f[torch.isfinite(f)]
    if len(f):
        tb.add_scalar(f"loss/level_{block.level}", float(f.mean()), global_step=block.index)


def tensorboard_writer(trainer: L.Trainer) -> Any:
    """The run's TensorBoard ``SummaryWriter``, or None without a TensorBoard logger (call on rank 0 only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return None if logger is None else logger.experiment


def log_panels(trainer: L.Trainer, src: zarr.Array, fitted: list[PairRecord], log: list[PairRecord], n_panels: int = 3) -> None:
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
        fixed = np.nan_to_num(np.asarray(src[a]).astype(np.float32))  # a NaN patch shows as 0, not as a broken picture
        moving = np.nan_to_num(np.asarray(src[b]).astype(np.float32))
        theta = torch.tensor([r["matrix"]], dtype=torch.float32)
        registered = warp(torch.from_numpy(moving)[None, None], theta, mode="bilinear", full_shape=shape)[0, 0].numpy()
        step = max(1, max(shape) // 512)  # panels of at most ~512 px
        for tag, mov in (("before", moving), ("after", registered)):
            tb.add_image(f"pairs/{a}-{b}_{tag}", overlay(fixed[::step, ::step], mov[::step, ::step]), dataformats="HWC")


def report_page(trainer: L.Trainer, out_root: str | Path, output_path: str, src: zarr.Array, timing: str) -> Path:
    """The run's alignment page (:func:`~sphero_lightning.report.visual.build_report`) beside its logs: the
    logger's ``log_dir`` (TensorBoard: ``logs/sphero/version_N``), else ``logs/`` beside the output store. Its middle
    reslices also go to TensorBoard (``reslices/xz_before`` ...). Call on rank 0 once the output is in place.
    Returns the page's path."""
    from ..report.visual import build_report

    out = zarr.open_array(str(out_root), path=output_path, mode="r")
    attrs = out.attrs
    source = f"{attrs.get('source_root', out_root)}/{attrs.get('inputs', ['?'])[0]}"
    page = build_report(out, src, output_name=f"{out_root}/{output_path}", source_name=source, timing=timing)
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    folder = Path(log_dir) if log_dir else Path(out_root).resolve().parent / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"alignment-{output_path.strip('/').replace('/', '-')}.html"
    path.write_text(page.html, encoding="utf-8")
    tb = tensorboard_writer(trainer)
    if tb is not None:
        for tag, picture in page.pictures.items():
            tb.add_image(f"reslices/{tag}", picture, dataformats="HW")
    return path


def fit_record(trainer: L.Trainer, module: Any) -> dict[str, Any]:
    """What the fit ran with, as the output's provenance (``processing[registration].parameters``) and the Python API's
    ``settings`` record it: the model's settings (:meth:`~.module.RegistrationModule.record`), the pyramid's levels,
    the blocks, the grey-value range, the masks, the ``--solve.*`` and ``--early_stopping.*`` settings, the machine."""
    dm = trainer.datamodule
    by_group = {getattr(cb, "config_group", None): cb for cb in trainer.callbacks}
    solve, early = by_group.get("solve"), by_group.get("early_stopping")
    return {**module.record(), "pyramid": [lv.record() for lv in module.levels], "max_pairs": dm.max_pairs,
            "pairs_per_block": dm.pairs_per_block, "intensity_range": list(dm.intensity) if dm.intensity else None,
            "masks": dm.mask_settings, "solve": solve.settings() if solve is not None else {"neighbours": dm.neighbours},
            **({"early_stopping": early.settings()} if early is not None else {}), "trainer": trainer_record(trainer)}


def run_settings(trainer: L.Trainer, module: Any) -> dict[str, Any]:
    """The settings of this run, by config group, for TensorBoard's HPARAMS tab and ``hparams.yaml``."""
    dm = trainer.datamodule
    src = dm.source
    groups: dict[str, Any] = {
        "model": {k: v for k, v in module.hparams.items() if k != "pairs_per_block" and not k.startswith("_")},
        "pyramid": {"levels": len(module.levels), "factors": [lv.factor for lv in module.levels],
                    "steps": [lv.steps for lv in module.levels], "learning_rate": [lv.lr for lv in module.levels]},
        "data": {"root": str(dm.root), "array": dm.array, "output": dm.output_path, "shape": list(src.shape),
                 "dtype": str(src.dtype), "spacing": dm.spacing, "n_slices": dm.n_slices, "n_pairs": dm.n_pairs,
                 "max_pairs": dm.max_pairs, "pairs_per_block": dm.pairs_per_block, "check_slices": dm.check_slices,
                 "min_contrast": dm.min_contrast, "resume": dm.resume,
                 "damaged_slices": ", ".join(map(str, sorted(dm.damaged))) or "none"},
        "trainer": {"accelerator": module.device.type, "world_size": module.world},
    }
    for cb in trainer.callbacks:
        group = getattr(cb, "config_group", None)
        if group and hasattr(cb, "settings"):
            groups[group] = cb.settings()
    return groups


def log_run_settings(trainer: L.Trainer, module: Any) -> None:
    """Log :func:`run_settings` to every logger (TensorBoard's HPARAMS tab gets the run's result metrics, filled in
    by :func:`log_panels` at the end)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if trainer.is_global_zero and getattr(trainer, "enable_autolog_hparams", True):
        hp = run_settings(trainer, module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(hp, metrics={k: float("nan") for k in HPARAM_METRICS})
            else:
                logger.log_hyperparams(hp)
