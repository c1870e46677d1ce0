"""How long a user waits for the answer to a mistake (issue 29 item 3): ``sphero fit`` in a fresh process with a wrong
store, a TIFF given as the store, a wrong array path and a bad enumerated value; wall seconds of each (median of
``--repeats``), and the exit status and line count of its answer.

    python benchmarks/error_latency.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sphero_lightning.storage.stacks import write_zarr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import tifffile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_zarr(np.zeros((3, 32, 32), np.uint8), work / "s.zarr")
        tifffile.imwrite(work / "stack.tif", np.zeros((3, 32, 32), np.uint8))
        cases = {"wrong store": "--data.root nope.zarr --data.array images/50-4-4",
                 "TIFF as store": "--data.root stack.tif --data.array x",
                 "wrong array": "--data.root s.zarr --data.array images/nope",
                 "bad enumerated value": "--data.root s.zarr --data.array images/50-4-4 --model.loss nope"}
        for name, args in cases.items():
            times, r = [], None
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", *args.split()], cwd=work,
                                   capture_output=True, text=True, check=False)
                times.append(time.perf_counter() - t0)
            print(f"{name:22s} {statistics.median(times):.3f} s (exit {r.returncode}, "
                  f"{len(r.stderr.strip().splitlines())} line): {r.stderr.strip()[:110]}")


if __name__ == "__main__":
    main()
