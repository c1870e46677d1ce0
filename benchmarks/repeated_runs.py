"""Fits run one after the other in one Python process (a notebook, a benchmark loop) against fresh processes.

Seconds per pair = (time for 30 ISBI sections - time for the first 8) / 22, so start-up is not counted:

* fresh processes: ``sphero fit`` as a command, its defaults (the TensorBoard logger and the alignment page on, as
  users run it), 8 and 30 sections alternating;
* one process, after an untimed first run: ``sphero fit`` (``commands.main.main``, the same defaults) and
  ``register_stack`` on a numpy stack, 8 and 30 sections alternating, ``--repeats`` times each;
* the threads alive in that process after every run.

Printed: every run's time, and the median seconds per pair of each way. Nothing else should run meanwhile.

    python benchmarks/repeated_runs.py                 # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _paths import ISBI_PATH

IN_PROCESS = r"""
import sys, threading, time, numpy as np, tifffile
from pathlib import Path
from sphero_lightning import register_stack
from sphero_lightning.commands.main import main
from sphero_lightning.storage.stacks import write_zarr
work, repeats = Path(sys.argv[1]), int(sys.argv[2])
vol = np.asarray(tifffile.imread(sys.argv[3]))
k = 0
def fit(n):
    global k
    k += 1
    root = work / f"s{k}.zarr"
    write_zarr(vol[:n], root)
    t0 = time.perf_counter()
    main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
          "--trainer.enable_progress_bar", "false"])
    return time.perf_counter() - t0
def api(n):
    t0 = time.perf_counter()
    register_stack(vol[:n])
    return time.perf_counter() - t0
fit(8)  # the first run of the process: imports, caches
for r in range(repeats):
    for name, run in (("fit", fit), ("api", api)):
        for n in (8, len(vol)):
            print(name, n, round(run(n), 3), threading.active_count(), flush=True)
"""

#: The command, as the venv running this script has it (no need for its bin/ on PATH).
SPHERO = [sys.executable, "-m", "sphero_lightning"]


def fresh(work: Path, n: int, vol: np.ndarray, k: int) -> float:
    from sphero_lightning.storage.stacks import write_zarr

    root = work / f"f{k}.zarr"
    write_zarr(vol[:n], root)
    t0 = time.perf_counter()
    subprocess.run([*SPHERO, "fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation",
                    "rigid", "--trainer.enable_progress_bar", "false"], cwd=work, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    import tifffile

    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    n = len(vol)
    per: dict[str, list[float]] = {"fresh": [], "fit": [], "api": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(a.repeats):
            t8, t30 = fresh(work, 8, vol, 2 * r), fresh(work, n, vol, 2 * r + 1)
            per["fresh"].append((t30 - t8) / (n - 8))
            print(f"fresh processes, repeat {r}: 8 sections {t8:.2f} s, {n} sections {t30:.2f} s", flush=True)
        out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(work), str(a.repeats), str(ISBI_PATH)],
                             cwd=work, check=True, capture_output=True, text=True).stdout
    runs: dict[tuple[str, int], list[float]] = {}
    for line in out.splitlines():
        name, size, secs, threads = line.split()
        runs.setdefault((name, int(size)), []).append(float(secs))
        print(f"one process: {name} {size} sections {float(secs):.2f} s, {threads} threads alive after it")
    for name in ("fit", "api"):
        per[name] = [(b - s) / (n - 8) for s, b in zip(runs[(name, 8)], runs[(name, n)])]
    base = float(np.median(per["fresh"]))
    for name, label in (("fresh", "sphero fit, fresh processes"), ("fit", "sphero fit, one process"),
                        ("api", "register_stack, one process")):
        med = float(np.median(per[name]))
        print(f"{label}: {med:.3f} s per pair (median of {len(per[name])}; each {[round(v, 3) for v in per[name]]}); "
              f"{med / base:.2f} x fresh processes")


if __name__ == "__main__":
    main()
