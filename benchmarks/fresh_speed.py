"""Speed on real sections as users run it: ``sphero fit`` in fresh processes against pystackreg in fresh processes.

Both register the first 8 and all 30 ISBI 2012 sections (512 x 512), rigid, consecutive pairs:

* ours: the ``sphero fit`` command with its defaults (TensorBoard logger, pictures and alignment page on) and
  ``--model.transformation rigid``, on a Zarr copy of the sections;
* pystackreg: a fresh ``python`` that reads the same sections from the TIFF and runs
  ``StackReg(RIGID_BODY).register_stack(stack, reference="previous")``.

Seconds per pair = (t30 - t8) / 22 (start-up cancels); the two tools alternate, repeat after repeat, and the ratio is
the median over repeats of each repeat's ratio; the same from the median time of each size is printed too (steadier:
a fresh process's start-up varies by about a second, as much as the 22 pairs take). Nothing else should run meanwhile
(2 cores: a second process slows both several times).

    python benchmarks/fresh_speed.py                      # 5 repeats, ~3 min on 2 CPU cores
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

PYSTACKREG = r"""
import sys, warnings, numpy as np, tifffile
from pystackreg import StackReg
stack = np.asarray(tifffile.imread(sys.argv[1]))[: int(sys.argv[2])].astype(np.float64)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    StackReg(StackReg.RIGID_BODY).register_stack(stack, reference="previous", axis=0)
"""

#: The command, as the venv running this script has it (no need for its bin/ on PATH).
SPHERO = [sys.executable, "-m", "sphero_lightning"]


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sphero fit arguments (last)")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    import tifffile

    from sphero_lightning.storage.stacks import write_zarr

    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    n = len(vol)
    ours, theirs, ratios = [], [], []
    runs: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for r in range(a.repeats):
            t = {}
            for size in (8, n):
                root = work / f"r{r}-{size}.zarr"
                write_zarr(vol[:size], root)
                t[("ours", size)] = timed([*SPHERO, "fit", "--data.root", str(root), "--data.array", "images/50-4-4",
                                           "--model.transformation", "rigid", *a.extra], work)
                t[("pystackreg", size)] = timed([sys.executable, "-c", PYSTACKREG, str(ISBI_PATH), str(size)], work)
            for key, value in t.items():
                runs.setdefault(key, []).append(value)
            o = (t[("ours", n)] - t[("ours", 8)]) / (n - 8)
            s = (t[("pystackreg", n)] - t[("pystackreg", 8)]) / (n - 8)
            ours.append(o)
            theirs.append(s)
            ratios.append(o / s)
            print(f"repeat {r}: ours {t[('ours', 8)]:.2f} / {t[('ours', n)]:.2f} s, pystackreg {t[('pystackreg', 8)]:.2f} / "
                  f"{t[('pystackreg', n)]:.2f} s (8 / {n} sections): {o:.3f} against {s:.3f} s per pair, ratio {o / s:.2f}",
                  flush=True)
    print(f"seconds per pair, medians of {a.repeats}: ours {np.median(ours):.3f}, pystackreg {np.median(theirs):.3f}; "
          f"median ratio {np.median(ratios):.2f} (each {[round(x, 2) for x in ratios]})")
    # the start-up of a fresh process varies by about a second from run to run on a shared 2-core machine, as much as
    # 22 pairs take: the difference of each size's median time is steadier than the median of per-repeat ratios
    med = {k: float(np.median(v)) for k, v in runs.items()}
    o, s = ((med[(tool, n)] - med[(tool, 8)]) / (n - 8) for tool in ("ours", "pystackreg"))
    print(f"from the medians of each size's times: ours {o:.3f}, pystackreg {s:.3f} s per pair; ratio {o / s:.2f}")


if __name__ == "__main__":
    main()
