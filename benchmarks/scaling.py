"""Time and peak memory of ``sphero fit`` against stack depth (Z) and slice size (Y x X), CPU or GPU.

Each configuration runs the ``sphero`` command (``--repeats`` times, each in its own process) (default config, rigid) on a synthetic stack
(procedural EM-like texture, random rigid misalignment, noise), and prints: wall time of the whole command,
seconds per pair, peak RSS of that process, and the run's own breakdown (the ``sphero: time:`` line): checking
slices, fitting (computing vs waiting for the next block), reading (in the background thread), writing.
``hidden`` = fitting / computing: 1.00 means reading never stalled the fit.

    python benchmarks/scaling.py                                  # Z = 32, 128 at 512 x 512, 3 runs each
    python benchmarks/scaling.py --depths 8 32 --sizes 1024 2048 --repeats 1   # slice size
    python benchmarks/scaling.py --extra --trainer.accelerator gpu
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the checkout (configs/)
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr

_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "sys.stderr.write(r.stderr); "
         "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
_TIME = re.compile(r"checking slices ([\d.]+) s, fitting ([\d.]+) s(?: on \d+ torch threads?)? \(computing ([\d.]+) s, waiting for data ([\d.]+) s; "
                   r"reading took ([\d.]+) s in the background\), writing ([\d.]+) s")


def synthetic_stack(z: int, size: int) -> np.ndarray:
    """``(z, size, size)`` uint8: rigidly misaligned noisy slices (exact truth not needed here). Up to 512 px the
    detector-model stacks of the accuracy benchmarks; larger ones tile a 512 px texture (fast to make) and shift
    each slice by whole pixels (translation only; the fit's cost per pair hardly depends on the motion)."""
    if size <= 512:
        return make_stack(em_like_image(size + size // 2, seed=7), z, (size, size), max_shift=8.0, max_rot_deg=1.0,
                          seed=z).stack
    rng = np.random.default_rng(z)
    tile = em_like_image(512, seed=7).astype(np.float32)
    reps = -(-(size + 64) // 512)
    big = np.tile(tile, (reps, reps))
    out = np.empty((z, size, size), dtype=np.uint8)
    for k in range(z):
        dy, dx = rng.integers(0, 32, size=2)
        sl = big[dy:dy + size, dx:dx + size] + rng.normal(0, 6, (size, size)).astype(np.float32)
        out[k] = np.clip(sl, 0, 255).astype(np.uint8)
    return out


def run(root: Path, logs: Path, extra: list[str]) -> dict[str, float]:
    sphero = str(Path(sys.executable).with_name("sphero"))
    cmd = [sphero, "fit", "--config", str(REPO / "configs" / "reg.yaml"), "--data.root", str(root),
           "--data.array", "images/50-4-4", "--model.transformation", "rigid", "--trainer.enable_progress_bar", "false",
           "--data.overwrite", "true",
           "--trainer.logger.init_args.save_dir", str(logs), *extra]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAP, *cmd], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rc, rss_kb = r.stdout.split()
    if int(rc) != 0:
        sys.exit(f"sphero failed ({rc}):\n{r.stderr[-2000:]}")
    m = _TIME.search(r.stderr)
    if m is None:
        sys.exit(f"no timing line in the output:\n{r.stderr[-2000:]}")
    scan, fit, compute, wait, read, write = (float(v) for v in m.groups())
    return {"wall": wall, "rss_mb": int(rss_kb) / 1024, "scan": scan, "fit": fit, "compute": compute, "wait": wait,
            "read": read, "write": write}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration: medians of times, largest peak RSS")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sphero fit arguments (last)")
    a = ap.parse_args()
    print(f"# sphero fit scaling ({' '.join(a.extra) or 'default config'}); each run in its own process; "
          f"medians of {a.repeats} runs, largest peak RSS")
    print(f"{'Z':>5} {'Y x X':>11} {'wall s':>7} {'s/pair':>7} {'peak RSS MB':>11} {'check s':>7} {'fit s':>7} "
          f"{'compute s':>9} {'wait s':>6} {'read s':>6} {'write s':>7} {'hidden':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            for z in a.depths:
                root = Path(tmp) / f"z{z}-{size}.zarr"
                write_zarr(synthetic_stack(z, size), root)
                runs = [run(root, Path(tmp) / "logs", a.extra) for _ in range(a.repeats)]
                r = {k: float(np.median([x[k] for x in runs])) for k in runs[0]}
                r["rss_mb"] = max(x["rss_mb"] for x in runs)
                rows.append((z, size, r))
                print(f"{z:5d} {f'{size} x {size}':>11} {r['wall']:7.1f} {r['fit'] / (z - 1):7.3f} {r['rss_mb']:11.0f} "
                      f"{r['scan']:7.2f} {r['fit']:7.2f} {r['compute']:9.2f} {r['wait']:6.2f} {r['read']:6.2f} "
                      f"{r['write']:7.2f} {r['fit'] / max(r['compute'], 1e-9):6.2f}", flush=True)
                shutil.rmtree(root)
    for size in a.sizes:
        same = [(z, r) for z, sz, r in rows if sz == size]
        if len(same) >= 2:
            (z0, r0), (z1, r1) = same[0], same[-1]
            print(f"{size} x {size}: Z {z0} -> {z1} ({z1 / z0:.0f}x slices): wall x{r1['wall'] / r0['wall']:.2f}, "
                  f"fit x{r1['fit'] / r0['fit']:.2f}, peak RSS x{r1['rss_mb'] / r0['rss_mb']:.2f} "
                  f"({r0['rss_mb']:.0f} -> {r1['rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
