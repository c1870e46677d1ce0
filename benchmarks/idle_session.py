"""A notebook left open: does a Python session that once called ``register_stack`` slow later ``sphero fit`` runs?

Issue 34: the session kept its core slot after the call returned, so a ``sphero fit`` started beside the idle session
counted two runs and took half the cores (30 ISBI sections: 0.13-0.15 -> 0.21-0.25 s per pair on 2 cores).

Each repeat times ``sphero fit`` (defaults, rigid) on the 30 ISBI sections twice in fresh processes: alone, and with
an idle Python session beside it that has called ``register_stack`` on 4 sections and then sleeps (it holds whatever
the call left behind). The order alternates; printed are the fitting seconds (the run's time line) and the whole
command's per repeat, and the median of the fitting times' ratios.

    python benchmarks/idle_session.py                  # 5 repeats, ~3 min on 2 CPU cores
    python benchmarks/idle_session.py --code /tmp/old  # the same through another checkout (e.g. an earlier commit)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _paths import ISBI_PATH

IDLE = r"""
import sys, time, numpy as np, tifffile
from sphero_lightning import register_stack
register_stack(np.asarray(tifffile.imread(sys.argv[1]))[:4], transformation="rigid")
print("idle", flush=True)
time.sleep(3600)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--code", help="run sphero_lightning from this checkout")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    import tifffile

    from sphero_lightning.storage.stacks import write_zarr

    env = {**os.environ, **({"PYTHONPATH": a.code} if a.code else {})}
    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "isbi.zarr"
        write_zarr(vol, root)

        def fit() -> tuple[float, float]:
            """The fit's seconds (its time line) and the whole command's."""
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", "--data.root", str(root), "--data.array",
                                "images/50-4-4", "--model.transformation", "rigid", "--data.overwrite", "true"],
                               cwd=work, check=True, capture_output=True, env=env, text=True)
            wall = time.perf_counter() - t0
            return float(re.search(r"fitting ([0-9.]+) s", r.stderr).group(1)), wall

        for r in range(a.repeats):
            t = {}
            for beside in ((False, True) if r % 2 == 0 else (True, False)):
                idle = None
                if beside:
                    idle = subprocess.Popen([sys.executable, "-c", IDLE, str(ISBI_PATH)], stdout=subprocess.PIPE, text=True,
                                            env=env, cwd=work)
                    assert idle.stdout.readline().strip() == "idle"
                try:
                    t[beside] = fit()
                finally:
                    if idle is not None:
                        idle.kill()
                        idle.wait()
            ratios.append(t[True][0] / t[False][0])
            print(f"repeat {r}: fitting alone {t[False][0]:.2f} s (command {t[False][1]:.2f} s), beside an idle session "
                  f"that called register_stack {t[True][0]:.2f} s (command {t[True][1]:.2f} s): ratio {ratios[-1]:.2f}",
                  flush=True)
    print(f"median ratio of the fitting time beside / alone over {a.repeats} repeats: {np.median(ratios):.2f} "
          f"(each {[round(x, 2) for x in ratios]})")


if __name__ == "__main__":
    main()
