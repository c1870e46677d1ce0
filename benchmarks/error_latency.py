"""How long a user waits for the answer to a mistake (issues 29 and 36): ``sphero fit`` in a fresh process with a wrong
store, a TIFF given as the store, a wrong array path, a bad enumerated value, a misspelt option, a value of the wrong
type, a 2D array, a one-slice stack, a missing spacing, a mask of the wrong shape, an existing output, and its
``--help`` / ``--help-all``; wall seconds of each (median of ``--repeats``), and the exit status and line count of its
answer.

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
        import zarr

        write_zarr(np.zeros((3, 32, 32), np.uint8), work / "s.zarr")
        write_zarr(np.zeros((3, 32, 32), np.uint8), work / "s.zarr", array="images/registered/50-4-4")
        group = zarr.open_group(str(work / "s.zarr"), mode="a")
        group.create_array("flat", data=np.zeros((32, 32), np.uint8)).attrs["spacing"] = [50, 4, 4]
        group.create_array("one", data=np.zeros((1, 32, 32), np.uint8)).attrs["spacing"] = [50, 4, 4]
        group.create_array("bare", data=np.zeros((3, 32, 32), np.uint8))
        group.create_array("mask", data=np.ones((5, 5), np.uint8))
        tifffile.imwrite(work / "stack.tif", np.zeros((3, 32, 32), np.uint8))
        ok = "--data.root s.zarr --data.array images/50-4-4 --data.overwrite"
        cases = {"wrong store": "--data.root nope.zarr --data.array images/50-4-4",
                 "TIFF as store": "--data.root stack.tif --data.array x",
                 "wrong array": "--data.root s.zarr --data.array images/nope",
                 "bad enumerated value": f"{ok} --model.loss nope",
                 "misspelt option": f"{ok} --solve.neighbors 2",
                 "bad value type": f"{ok} --data.ignore_value zero",
                 "2D array": "--data.root s.zarr --data.array flat",
                 "one slice": "--data.root s.zarr --data.array one",
                 "no spacing": "--data.root s.zarr --data.array bare",
                 "mask of the wrong shape": f"{ok} --data.mask_array mask",
                 "output exists": "--data.root s.zarr --data.array images/50-4-4",
                 "--help": "--help",
                 "--help-all": "--help-all"}
        for name, args in cases.items():
            times, r = [], None
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", *args.split()], cwd=work,
                                   capture_output=True, text=True, check=False)
                times.append(time.perf_counter() - t0)
            out = r.stderr.strip() or r.stdout.strip()
            print(f"{name:24s} {statistics.median(times):.3f} s (exit {r.returncode}, "
                  f"{len(out.splitlines())} line(s)): {out.splitlines()[0][:110] if out else ''}")


if __name__ == "__main__":
    main()
