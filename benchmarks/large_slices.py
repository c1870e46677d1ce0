"""Large slices (block-face, 4k-16k px): peak memory and seconds per pair of ``sphero fit`` against pystackreg, and
the error against the exact truth.

The stack is cut from a mosaic of the real ISBI 2012 sections (random tiles, flips and rotations; the procedural
image of ``sphero demo`` without the data) with a random rigid misalignment per slice (up to 8 px, 1 degree), by
the detector model of ``core/synthetic.py`` (2 x 2 point samples per pixel of the B-spline model), rendered in
strips, plus noise sigma 6, uint8. Each tool runs in its own process, so its peak resident memory is its own:

* ours: ``sphero fit`` with the defaults (``--model.transformation rigid``), or ``--full-resolution`` (the finest
  level at full resolution and no memory budget: the reference for the accuracy cost of the budgeted default);
* pystackreg: ``StackReg(RIGID_BODY).register_stack`` on the first ``--pystackreg-pairs + 1`` slices.

    python benchmarks/large_slices.py --size 4096 --slices 4
    python benchmarks/large_slices.py --size 8192 --slices 8 --pystackreg-pairs 1
    python benchmarks/large_slices.py --size 16384 --slices 4 --pystackreg-pairs 0
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _paths import ISBI_PATH

RUNNER = r"""
import resource, sys, time, json
import numpy as np, zarr
from pystackreg import StackReg
root, n = sys.argv[1], int(sys.argv[2])
arr = zarr.open_array(root, path="images/50-4-4", mode="r")
stack = np.asarray(arr[:n]).astype(np.float64)
t0 = time.perf_counter()
tm = StackReg(StackReg.RIGID_BODY).register_stack(stack, reference="previous", axis=0)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def mosaic(size: int, rng: np.random.Generator) -> np.ndarray:
    if ISBI_PATH.exists():
        import tifffile

        tiles = np.asarray(tifffile.imread(str(ISBI_PATH)))
    else:
        from sphero_lightning.core.synthetic import em_like_image

        tiles = np.stack([em_like_image(512, seed=k) for k in range(8)])
    t = tiles.shape[1]
    n = -(-size // t)
    rows = []
    for _ in range(n):
        row = []
        for _ in range(n):
            tile = tiles[rng.integers(len(tiles))]
            tile = np.rot90(tile, rng.integers(4))
            row.append(tile[::-1] if rng.integers(2) else tile)
        rows.append(np.concatenate(row, 1))
    return np.concatenate(rows, 0)[:size, :size]


def make_large_stack(root: Path, size: int, n: int, seed: int = 0) -> np.ndarray:
    """Write the stack; return the truth (composed normalized transforms of slices 1..n-1)."""
    import torch
    import torch.nn.functional as F

    from sphero_lightning.core.interpolation import bspline_prefilter, bspline_sample
    from sphero_lightning.core.synthetic import random_transforms, truth_composed
    from sphero_lightning.storage.stacks import write_zarr

    rng = np.random.default_rng(seed)
    base = mosaic(size + 256, rng).astype(np.float32)
    hb, wb = base.shape
    coeffs = bspline_prefilter(torch.from_numpy(base)[None, None])
    del base
    tf = random_transforms(n, rng, 8.0, 1.0)
    write_zarr(np.zeros((n, size, size), np.uint8), root, chunks=(1, 1024, 1024))
    import zarr

    arr = zarr.open_array(str(root), path="images/50-4-4", mode="r+")
    sub = np.array([-0.25, 0.25])
    xs = (np.arange(size)[:, None] + sub).reshape(-1) - (size - 1) / 2
    strip = 256
    for k, t in enumerate(tf):
        out = np.empty((size, size), np.uint8)
        for r0 in range(0, size, strip):
            ys = (np.arange(r0, min(r0 + strip, size))[:, None] + sub).reshape(-1) - (size - 1) / 2
            gy, gx = np.meshgrid(ys, xs, indexing="ij")
            bx = t[0, 0] * gx + t[0, 1] * gy + t[0, 2] + (wb - 1) / 2
            by = t[1, 0] * gx + t[1, 1] * gy + t[1, 2] + (hb - 1) / 2
            with torch.no_grad():
                fine = bspline_sample(coeffs, torch.from_numpy(bx).float()[None], torch.from_numpy(by).float()[None])
            img = F.avg_pool2d(fine, 2)[0, 0].double().numpy() + rng.normal(0, 6.0, (fine.shape[-2] // 2, size))
            out[r0:r0 + strip] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        arr[k] = out
        print(f"  rendered slice {k + 1}/{n}", file=sys.stderr, flush=True)
    return truth_composed(tf, (size, size))


def run_ours(root: Path, extra: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "sphero_lightning", "fit", "--data.root", str(root),
           "--data.array", "images/50-4-4", "--model.transformation", "rigid", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--data.overwrite", "true", *extra]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    wall, kb = re.search(r"TIME ([\d.]+) (\d+)", r.stderr).groups()
    fit = re.search(r"fitting ([\d.]+) s", r.stderr)
    write = re.search(r"writing ([\d.]+) s", r.stderr)
    levels = re.search(r"downsampled levels ([\d.]+) s( of it)?", r.stderr)  # "of it": a share of writing (same pass)
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("sphero:") and "time:" not in ln]
    return {"wall_s": float(wall), "peak_gb": int(kb) / 2**20, "fit_s": float(fit.group(1)), "write_s": float(write.group(1)),
            "levels_s": float(levels.group(1)) if levels else 0.0, "levels_within": bool(levels and levels.group(2)),
            "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--pystackreg-pairs", type=int, default=1)
    ap.add_argument("--full-resolution", action="store_true", help="also run with the finest level at full resolution")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", default=None, help="a folder to keep the rendered stack in and reuse it from (rendering "
                    "8 slices of 8192 px takes minutes)")
    a = ap.parse_args()
    import zarr

    from sphero_lightning.core.synthetic import composed_error

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp) / "large.zarr"
        kept = Path(a.keep) / f"large-{a.size}-{a.slices}" if a.keep else None
        t0 = time.perf_counter()
        if kept is not None and (kept / "truth.npy").exists():
            shutil.copytree(kept / "large.zarr", root)
            truth = np.load(kept / "truth.npy")
            print(f"# {a.slices} slices of {a.size} x {a.size} uint8 (kept in {kept})", flush=True)
        else:
            truth = make_large_stack(root, a.size, a.slices)
            print(f"# {a.slices} slices of {a.size} x {a.size} uint8 (generated in {time.perf_counter() - t0:.0f} s)", flush=True)
            if kept is not None:
                kept.mkdir(parents=True, exist_ok=True)
                shutil.copytree(root, kept / "large.zarr", dirs_exist_ok=True)
                np.save(kept / "truth.npy", truth)
        runs = {"default": []}
        if a.full_resolution:
            runs["full resolution"] = ["--pyramid.finest_max_pixels", str(a.size * a.size), "--data.memory_budget_gb", "64"]
        results = {}
        for name, extra in runs.items():
            r = run_ours(root, extra)
            out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
            r["composed"] = np.asarray(out.attrs["composed_transforms"])
            r["pairwise"] = np.asarray(out.attrs["pairwise_transforms"])
            err = composed_error(r["composed"], truth, (a.size, a.size))
            pairs = a.slices - 1
            print(f"ours ({name}): {r['wall_s']:.1f} s wall for {pairs} pairs (fitting {r['fit_s']:.1f} s, writing "
                  f"{r['write_s']:.1f} s, {'of which ' if r['levels_within'] else ''}downsampled levels {r['levels_s']:.1f} s): {r['fit_s'] / pairs:.2f} s per pair fitting, {(r['fit_s'] + r['write_s']) / pairs:.2f} "
                  f"s per pair fitting + writing; peak RSS {r['peak_gb']:.2f} GB; error vs truth mean {err.mean():.4f} px, "
                  f"worst {err.max():.4f} px", flush=True)
            for note in r["notes"]:
                print(f"    {note}")
            results[name] = r
        if "full resolution" in results:
            d = composed_error(results["default"]["pairwise"], results["full resolution"]["pairwise"], (a.size, a.size))
            print(f"default vs full resolution, pairwise: mean {d.mean():.4f} px, worst {d.max():.4f} px")
        if a.pystackreg_pairs > 0:
            cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-c", RUNNER, str(root), str(a.pystackreg_pairs + 1)]
            r = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if r.returncode:
                print("pystackreg failed:", r.stderr[-500:])
            else:
                res = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"pystackreg: {res['seconds']:.1f} s for {a.pystackreg_pairs} pair(s): "
                      f"{res['seconds'] / a.pystackreg_pairs:.2f} s per pair (register_stack only, no transform or write); "
                      f"peak RSS {res['peak_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
