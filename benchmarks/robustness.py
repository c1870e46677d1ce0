"""Damaged slices and resume after SIGKILL, measured on stacks cut from a real ISBI 2012 slice.

Runs ``sphero fit`` as a subprocess (as a user would) and prints:

* damaged: a uint16 stack (values above 255) with one blank (all-zero) slice in the middle: mean and worst
  error of the other slices against the truth, which pairs are marked, output dtype, peak RSS;
* kill: a 40-slice run killed with SIGKILL once its journal holds ~60 % of the pairs, then the same command
  again: time of the second run against a clean run, difference of the results, peak RSS.

    python benchmarks/robustness.py                 # both, 3 seeds
    python benchmarks/robustness.py --cases kill --seeds 1
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]  # the checkout (configs/)
from _paths import ISBI_PATH

from sphero_lightning.core.synthetic import composed_error, load_isbi_slice, make_stack
from sphero_lightning.storage.journal import Journal
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


def fit_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "sphero_lightning", "fit", "--config", str(REPO / "configs" / "reg.yaml"),
            "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(root.parent / "logs")]


def run(root: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(fit_cmd(root), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"sphero fit failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r


def peak_rss_mb() -> float:
    """Largest resident set of any child process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def damaged(base: np.ndarray, seed: int, work: Path, bad: int = 8) -> None:
    s = make_stack(base, 16, (384, 384), seed=seed, dtype="uint16")
    st = s.stack.copy()
    st[bad] = 0
    root = work / f"damaged{seed}.zarr"
    write_zarr(st, root)
    dt, _ = run(root)
    out = zarr.open_array(str(root), path=OUT, mode="r")
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (384, 384))  # slices 1..15
    others = [z - 1 for z in range(1, 16) if z != bad]
    marked = [e["pair_index"] for e in out.attrs["registration_log"] if e["status"] != "ok"]
    source_same = np.array_equal(zarr.open_array(str(root), path="images/50-4-4", mode="r")[:], st)
    print(f"damaged seed {seed}: other slices mean {err[others].mean():.4f} px, worst {err[others].max():.4f} px; "
          f"marked pairs {marked}; output {out.dtype} max {int(out[:].max())}; source unchanged {source_same}; "
          f"{dt:.1f} s; peak RSS so far {peak_rss_mb():.0f} MB", flush=True)


def kill(base: np.ndarray, seed: int, work: Path, n: int = 40, at: float = 0.6) -> None:
    s = make_stack(base, n, (384, 384), seed=seed)
    clean, killed = work / f"clean{seed}.zarr", work / f"killed{seed}.zarr"
    for root in (clean, killed):
        write_zarr(s.stack, root)
    t_clean, _ = run(clean)
    journal = killed / "images" / "registered" / "tmp-50-4-4-journal"
    p = subprocess.Popen(fit_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    while p.poll() is None:
        if journal.exists():
            done = Journal.count_saved(journal)
            if done >= at * (n - 1):
                os.kill(p.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    p.wait()
    if p.returncode != -signal.SIGKILL:
        sys.exit(f"the run ended (code {p.returncode}) before it could be killed")
    partial = (killed / "images" / "registered" / "50-4-4").exists()
    t_resume, r = run(killed)
    a = zarr.open_array(str(clean), path=OUT, mode="r")
    b = zarr.open_array(str(killed), path=OUT, mode="r")
    diff = composed_error(np.asarray(b.attrs["composed_transforms"]), np.asarray(a.attrs["composed_transforms"]), (384, 384))
    print(f"kill seed {seed}: clean {t_clean:.2f} s; killed after {done}/{n - 1} pairs (final array present: {partial}); "
          f"second run {t_resume:.2f} s = {t_resume / t_clean:.0%} of clean (resumed: {'resuming:' in r.stderr}); max difference {diff.max():.2e} px; "
          f"outputs identical {np.array_equal(a[:], b[:])}; error vs truth {composed_error(np.asarray(b.attrs['composed_transforms']), s.composed, (384, 384)).mean():.4f} px; "
          f"peak RSS so far {peak_rss_mb():.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["damaged", "kill"], choices=["damaged", "kill"])
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    base = load_isbi_slice(ISBI_PATH, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for case in a.cases:
            for seed in range(a.seeds):
                (damaged if case == "damaged" else kill)(base, seed, Path(tmp))


if __name__ == "__main__":
    main()
