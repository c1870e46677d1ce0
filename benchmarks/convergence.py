"""Convergence on real pairs: the default stopping rules against a run with every rule far tighter.

Real pairs have no ground truth, but each has an optimum of its own loss: a run with every stopping rule far
tighter (step tolerances 1e-4 px, loss tolerance 1e-12, 400 steps per level) finds it. The distance (mean
displacement over the slice, px) between the default's pairwise transform and the tight run's is how far short of
its optimum the default stopped. Pairs (every one listed with how it was made):

* ISBI 2012 (30 ssTEM sections, 512 x 512) at distance d = 1, 2, 3: pairs (i, i + d) for every i, i.e. the stacks
  ``vol[r::d]`` for r < d (29 + 28 + 27 pairs); pairs at distance 2-3 correlate at NCC 0.1-0.2;
* the same sections flipped left-right (``fliplr``), rotated by 90 degrees (``rot90``), and cropped to rows 40:440,
  columns 90:490 (``crop``): 84 pairs each;
* the two EPFL FIB-SEM runs of 4 slices (768 x 1024) at d = 1, 2, 3 (6 pairs each).

The tight runs are cached in ``--cache`` (JSON, keyed by the stack, the settings and the source of the fit: any change
of the code recomputes them); ``--refresh`` recomputes them anyway. ``--candidate tighter`` compares a run 10x tighter
still with the tight one: how well the tight run itself defines each pair's optimum.

    python benchmarks/convergence.py                       # ~25 min on 2 CPU cores the first time, ~3 min cached
    python benchmarks/convergence.py --sets isbi --distances 2 --list
    python benchmarks/convergence.py --candidate tighter   # ~40 min
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _paths import ISBI_PATH, SHARED_DATA

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error
from sphero_lightning.storage.stacks import write_zarr

#: Every stopping rule far tighter than the defaults (the issue's "tight run").
TIGHT = ["--early_stopping.step_tol_px", "0.0001", "--early_stopping.coarse_step_tol_px", "0.0001",
         "--early_stopping.newton_step_tol_px", "0.0001", "--early_stopping.tol", "1e-12", "--pyramid.steps", "400"]
#: Ten times tighter still: how well the tight run itself defines a pair's optimum (``--candidate tighter``).
TIGHTER = ["--early_stopping.step_tol_px", "0.00001", "--early_stopping.coarse_step_tol_px", "0.00001",
           "--early_stopping.newton_step_tol_px", "0.00001", "--early_stopping.tol", "1e-14", "--pyramid.steps", "1000"]


def isbi_variants() -> dict[str, np.ndarray]:
    import tifffile

    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    return {"isbi": vol, "isbi-fliplr": np.ascontiguousarray(vol[:, :, ::-1]),
            "isbi-rot90": np.ascontiguousarray(np.rot90(vol, 1, axes=(1, 2))),
            "isbi-crop": np.ascontiguousarray(vol[:, 40:440, 90:490])}


def fibsem_runs() -> dict[str, np.ndarray]:
    from PIL import Image

    root = SHARED_DATA / "epfl-fibsem"
    out = {}
    for name, first in (("fibsem-a", 0), ("fibsem-b", 161)):
        sl = []
        for k in range(first, first + 4):
            a = np.asarray(Image.open(root / f"training{k:04d}.png"))
            sl.append(a[..., 0] if a.ndim == 3 else a)
        out[name] = np.stack(sl)
    return out


def fit_code() -> bytes:
    """The source of everything a pair's result depends on: a cached tight run is reused only while it is unchanged."""
    import sphero_lightning

    pkg = Path(sphero_lightning.__file__).parent
    files = sorted(pkg.glob("core/*.py")) + [pkg / "training" / f for f in ("module.py", "callbacks.py", "state.py", "data.py")]
    return hashlib.sha1(b"".join(f.read_bytes() for f in files)).digest()


def fit(stack: np.ndarray, work: Path, extra: list[str]) -> dict:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    args = ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]
    with contextlib.redirect_stderr(io.StringIO()):
        cli = sphero(args)
    import zarr

    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return {"pairwise": out.attrs["pairwise_transforms"], "log": out.attrs["registration_log"],
            "fit_s": cli.model.times.fit_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["isbi", "isbi-fliplr", "isbi-rot90", "isbi-crop", "fibsem-a", "fibsem-b"])
    ap.add_argument("--distances", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sphero-convergence-tight.json"))
    ap.add_argument("--refresh", action="store_true", help="recompute the tight runs")
    ap.add_argument("--list", action="store_true", help="print every pair's figures")
    ap.add_argument("--candidate", default="", metavar="ARGS",
                    help="sphero fit arguments for the default run only, in one string (e.g. other stopping rules); "
                         "'tighter': a run 10x tighter than the tight one (how reproducible the reference is)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sphero fit arguments for both runs (last)")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    stacks = {**isbi_variants(), **fibsem_runs()}
    cache_path = Path(a.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() and not a.refresh else {}
    code = fit_code()
    rows = []
    t_default = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.sets:
            vol = stacks[name]
            for d in a.distances:
                for r in range(d):
                    sub = np.ascontiguousarray(vol[r::d])
                    if len(sub) < 2:
                        continue
                    key = hashlib.sha1(sub.tobytes() + " ".join(a.extra).encode() + code).hexdigest()[:16] + f"-{name}-d{d}-r{r}"
                    if key not in cache:
                        cache[key] = fit(sub, work, [*TIGHT, *a.extra])
                        cache_path.write_text(json.dumps(cache))
                    tight = cache[key]
                    t0 = time.perf_counter()
                    cand = TIGHTER if a.candidate == "tighter" else shlex.split(a.candidate)
                    dflt = fit(sub, work, [*cand, *a.extra])
                    t_default += time.perf_counter() - t0
                    err = composed_error(np.asarray(dflt["pairwise"]), np.asarray(tight["pairwise"]), sub.shape[1:])
                    for k, e in enumerate(err):
                        ld, lt = dflt["log"][k], tight["log"][k]
                        rows.append((name, d, r + k * d, r + (k + 1) * d, float(e), ld["ncc_after"], lt["ncc_after"],
                                     ld["steps_per_level"], lt["steps_per_level"]))
                    print(f"{name} d={d} r={r}: {len(err)} pairs, mean {err.mean():.4f} px, worst {err.max():.4f} px", flush=True)
    if a.list:
        for row in rows:
            print("  {} d={} ({:>2}, {:>2}): {:.4f} px  NCC {:.4f} / tight {:.4f}  steps {} / {}".format(*row))
    err = np.array([row[4] for row in rows])
    print(f"\n{len(rows)} real pairs: default vs tight, mean {err.mean():.4f} px, worst {err.max():.4f} px; "
          f"pairs > 0.03 px: {int((err > 0.03).sum())}; > 0.01 px: {int((err > 0.01).sum())}")
    for d in a.distances:
        e = np.array([row[4] for row in rows if row[1] == d])
        if len(e):
            print(f"  distance {d}: {len(e)} pairs, mean {e.mean():.4f} px, worst {e.max():.4f} px")
    for name in a.sets:
        e = np.array([row[4] for row in rows if row[0] == name])
        if len(e):
            print(f"  {name}: {len(e)} pairs, mean {e.mean():.4f} px, worst {e.max():.4f} px")
    worst = max(rows, key=lambda row: row[4])
    print("  worst: {} d={} ({}, {}): {:.4f} px, NCC {:.4f} / tight {:.4f}, steps {} / {}".format(*worst))
    evals = np.array([sum(row[7]) for row in rows])
    print(f"  default evaluations per pair: mean {evals.mean():.2f}; per level "
          f"{np.mean([row[7] for row in rows], 0).round(2).tolist()}; default fits {t_default:.1f} s in all")


if __name__ == "__main__":
    main()
