"""What the exact-truth case benchmarks share (foreign_slices.py, static_patterns.py): their command line, a
``sphero fit`` run on a stack written to a fresh store, and pystackreg's answer on the same stack."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.transforms import pixel_to_normalized
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


def parse_cases(doc: str, cases: list[str], slices: int) -> argparse.Namespace:
    """``--cases``, ``--seeds``, ``--slices``, ``--no-stackreg``; exits with a clear line without the ISBI volume."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=cases, choices=cases)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--slices", type=int, default=slices)
    ap.add_argument("--no-stackreg", action="store_true")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    return a


def fit(stack: np.ndarray, work: Path, extra: list[str], mask: np.ndarray | None = None) -> tuple[dict, float, float]:
    """``sphero fit`` (rigid, no logger) on ``stack`` in a new store under ``work`` (``mask``: the array ``mask``
    there): the output's attributes, the fitting seconds the run printed, the wall seconds."""
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    if mask is not None:
        zarr.open_group(str(root), mode="a").create_array("mask", data=mask)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        cli = sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation",
                      "rigid", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    wall = time.perf_counter() - t0
    attrs = dict(zarr.open_array(str(root), path=OUT, mode="r").attrs)
    return attrs, float(cli.model.times.fit_s), wall


def stackreg(stack: np.ndarray) -> tuple[np.ndarray, float]:
    """pystackreg's composed transforms (rigid, ``previous``), normalized like ours, and its seconds."""
    from pystackreg import StackReg

    t0 = time.perf_counter()
    tmats = StackReg(StackReg.RIGID_BODY).register_stack(stack.astype(np.float64), reference="previous", axis=0)
    wall = time.perf_counter() - t0
    return pixel_to_normalized(torch.from_numpy(tmats[1:]), stack.shape[1:]).numpy(), wall
