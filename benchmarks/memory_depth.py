"""Peak memory against the depth of the stack (issue 34): a run's memory is bounded by the block and the slice.

Every run is a fresh process with the defaults users run (two neighbours; ``sphero fit`` with its logger, progress
bar and page), its peak resident memory read from the kernel as it exits (VmHWM: its own, not its parent's). Cases:

* ``continuous``: a volume whose content changes continuously along z with jitter (256 x 256; 100 and 1000 slices),
  ``sphero fit`` on the store and ``register_stack`` on the Zarr array (opened in the process, read where it is);
* ``jitter512``: 512 x 512 slices cut from one procedural image with jitter, rigid (32 and 128 slices), clean and
  with a foreign slice (another image) every 30 slices.

Printed: peak RSS per depth and the growth from the shallow stack to the deep one.

    python benchmarks/memory_depth.py                       # both cases (~10 min on 2 CPU cores)
    python benchmarks/memory_depth.py --cases jitter512
    python benchmarks/memory_depth.py --code /tmp/old       # the same stacks through another checkout's code
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sphero_lightning.core.synthetic import continuous_volume, em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr

ARRAY = "images/50-4-4"


#: ``--code DIR``: the runs import sphero_lightning from this checkout (to measure another commit with the same stacks)
CODE: str | None = None


#: Prepended to every run: its peak RSS (the kernel's high-water mark of this process's memory since it started the
#: interpreter, VmHWM; wait4's ru_maxrss would also count the parent's memory at the fork) printed when it exits.
HWM = ("import atexit\natexit.register(lambda: print('VmHWM', [ln.split()[1] for ln in open('/proc/self/status') "
       "if ln.startswith('VmHWM')][0], flush=True))\n")


def peak_mb(code: str, cwd: Path) -> float:
    """Peak RSS (MB) of a fresh Python process running ``code``."""
    env = {**os.environ, **({"PYTHONPATH": CODE} if CODE else {})}
    r = subprocess.run([sys.executable, "-c", HWM + code], cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        sys.exit(f"run failed:\n{r.stderr[-2000:]}")
    return int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("VmHWM"))) / 1024


def fit_code(root: Path, extra: list[str]) -> str:
    return ("from sphero_lightning.commands.main import main\n"
            f"main(['fit', '--data.root', {str(root)!r}, '--data.array', {ARRAY!r}, *{extra!r}])")


def api_code(root: Path, options: dict) -> str:
    return ("import zarr\nfrom sphero_lightning import register_stack\n"
            f"register_stack(zarr.open_array({str(root)!r}, path={ARRAY!r}, mode='r'), options={options!r})")


def row(name: str, depths: list[int], peaks: list[float]) -> None:
    print(f"| {name} | " + " | ".join(f"{p:.0f}" for p in peaks) + f" | {peaks[-1] - peaks[0]:+.0f} MB "
          f"({100 * (peaks[-1] / peaks[0] - 1):+.1f} %) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["continuous", "jitter512"], choices=["continuous", "jitter512"])
    ap.add_argument("--continuous-depths", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--jitter-depths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--code", help="run sphero_lightning from this checkout (e.g. a worktree of an earlier commit)")
    a = ap.parse_args()
    global CODE
    CODE = a.code
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "continuous" in a.cases:
            d = a.continuous_depths
            print(f"# continuous volume, 256 x 256, jitter 3 px / 0.3 deg; peak RSS (MB) at {' / '.join(map(str, d))} slices")
            print("| run | " + " | ".join(f"{n} slices" for n in d) + " | growth |")
            print("|---|" + "---|" * len(d) + "---|")
            roots = []
            for n in d:
                root = work / f"c{n}.zarr"
                write_zarr(continuous_volume(n, 256, seed=0).stack, root)
                roots.append(root)
            row("sphero fit (defaults)", d, [peak_mb(fit_code(r, []), work) for r in roots])
            row("register_stack on the Zarr array", d, [peak_mb(api_code(r, {}), work) for r in roots])
        if "jitter512" in a.cases:
            d = a.jitter_depths
            print(f"\n# 512 x 512 cut from one image with jitter, rigid; peak RSS (MB) at {' / '.join(map(str, d))} slices")
            print("| stack | " + " | ".join(f"{n} slices" for n in d) + " | growth |")
            print("|---|" + "---|" * len(d) + "---|")
            base, other = em_like_image(640, seed=3).astype(np.float64), em_like_image(640, seed=11).astype(np.float64)
            for foreign in (False, True):
                roots = []
                for n in d:
                    stack = make_stack(base, n, (512, 512), max_shift=6, seed=1).stack
                    if foreign:  # another image's slice every 30 slices
                        for z in range(15, n, 30):
                            stack[z] = make_stack(other, 1, (512, 512), seed=z).stack[0]
                    root = work / f"j{n}{'f' if foreign else ''}.zarr"
                    write_zarr(stack, root)
                    roots.append(root)
                name = "a foreign slice every 30" if foreign else "clean"
                row(f"{name}: sphero fit --model.transformation rigid", d,
                    [peak_mb(fit_code(r, ["--model.transformation", "rigid"]), work) for r in roots])


if __name__ == "__main__":
    main()
