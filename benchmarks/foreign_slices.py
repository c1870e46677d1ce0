"""Foreign slices: one bad slice must not move the rest (issue 25's first must-show).

A 40-slice stack (384 x 384) is cut from one real ISBI 2012 section with known random rigid offsets (up to
8 px / 1 deg) plus noise, so every slice has an exact truth; then slices are replaced:

* ``one``: slice 20 by a different ISBI section (a misfiled or re-imaged slice);
* ``two``: slices 20 and 21 by two different sections (no pair of two neighbours jumps them);
* ``noise``: slice 20 by uniform noise;
* ``clean``: nothing replaced (what the solve costs where there is nothing to find).

Printed per case and method: the mean and worst error of every *other* slice's composed transform against the truth,
the slices the run lists as unregistered, the fitting time (printed by the run) and the wall time. Methods: the chain
(``--solve.neighbours 1``), the default (two neighbours, the cycle check and the solve) and pystackreg (``previous``).

    python benchmarks/foreign_slices.py
    python benchmarks/foreign_slices.py --cases one --seeds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error, load_isbi_slice, make_stack, write_zarr
from sphero_lightning.core.transforms import pixel_to_normalized

OUT = "images/registered/50-4-4"
CASES = {"one": [20], "two": [20, 21], "noise": [20], "clean": []}
METHODS = {"chain": ["--solve.neighbours", "1"], "default": []}


def damaged_stack(case: str, seed: int, n: int, shape: tuple[int, int]):
    s = make_stack(load_isbi_slice(ISBI_PATH, 0), n, shape, seed=seed)
    stack = s.stack.copy()
    rng = np.random.default_rng(100 + seed)
    for k, z in enumerate(CASES[case]):
        if case == "noise":
            stack[z] = rng.integers(0, 256, stack[z].shape, dtype=np.uint8)
        else:
            stack[z] = make_stack(load_isbi_slice(ISBI_PATH, 10 + 5 * k), 1, shape, seed=7 + k).stack[0]
    return s, stack


def run_ours(stack: np.ndarray, work: Path, extra: list[str]) -> tuple[np.ndarray, list[int], float, float]:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        cli = sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation",
                      "rigid", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    wall = time.perf_counter() - t0
    out = zarr.open_array(str(root), path=OUT, mode="r")
    solve = out.attrs.get("volume_solve") or {}
    return (np.asarray(out.attrs["composed_transforms"]), list(solve.get("unregistered", [])),
            float(cli.model.timings.get("fit_s", float("nan"))), wall)


def run_stackreg(stack: np.ndarray) -> tuple[np.ndarray, float]:
    from pystackreg import StackReg

    t0 = time.perf_counter()
    tmats = StackReg(StackReg.RIGID_BODY).register_stack(stack.astype(np.float64), reference="previous", axis=0)
    wall = time.perf_counter() - t0
    return pixel_to_normalized(torch.from_numpy(tmats[1:]), stack.shape[1:]).numpy(), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--no-stackreg", action="store_true")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    shape = (a.size, a.size)
    print(f"# {a.slices} slices of {a.size} x {a.size} cut from ISBI section 0, rigid; error of the other slices")
    print("| case | seed | method | mean | worst | unregistered | fitting s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            for seed in range(a.seeds):
                truth, stack = damaged_stack(case, seed, a.slices, shape)
                good = [z - 1 for z in range(1, a.slices) if z not in CASES[case]]
                for name, extra in METHODS.items():
                    comp, unreg, fit_s, wall = run_ours(stack, Path(tmp), extra)
                    e = composed_error(comp, truth.composed, shape)[good]
                    print(f"| {case} | {seed} | {name} | {e.mean():.4f} px | {e.max():.4f} px | {unreg} | "
                          f"{fit_s:.2f} | {wall:.1f} |", flush=True)
                if not a.no_stackreg:
                    comp, wall = run_stackreg(stack)
                    e = composed_error(comp, truth.composed, shape)[good]
                    print(f"| {case} | {seed} | pystackreg | {e.mean():.4f} px | {e.max():.4f} px | - | - | "
                          f"{wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
