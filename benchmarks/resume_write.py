"""An interrupted write resumes: SIGKILL ``sphero fit`` once half of its output chunks are written, run the same
command again, compare with an uninterrupted run.

    python benchmarks/resume_write.py                       # 24 x 1536 x 1536 uint8, output chunks [1, 256, 256]
    python benchmarks/resume_write.py --slices 16 --size 1024

Prints the wall time and the writer's own time of the uninterrupted run, of the killed run (up to the kill) and of
the resumed run, how many chunks the resumed run found written, and whether its output equals the uninterrupted one.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
OUT = "images/registered/50-4-4"
FLAGS = "images/registered/tmp-50-4-4-partial-written"


def written(root: Path) -> tuple[int, int | None]:
    d = root / FLAGS
    if not (d / "zarr.json").exists():
        return 0, None
    n = len(list((d / "c").iterdir())) if (d / "c").exists() else 0
    return n, zarr.open_array(str(root), path=FLAGS).shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--chunks", default="[1, 256, 256]")
    a = ap.parse_args()
    from sphero_lightning.core.synthetic import em_like_image, make_stack
    from sphero_lightning.storage.stacks import write_zarr

    with tempfile.TemporaryDirectory() as tmp:
        s = make_stack(em_like_image(a.size + 256, seed=7), a.slices, (a.size, a.size), seed=3, max_shift=3.0, max_rot_deg=0.5)
        root = Path(tmp) / "s.zarr"
        write_zarr(s.stack, root, truth=s.composed)
        cmd = [sys.executable, "-m", "sphero_lightning", "fit", "--config", str(REPO / "configs" / "reg.yaml"),
               "--data.root", str(root), "--data.array", "images/50-4-4", "--output.chunks", a.chunks,
               "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]

        def run(dst: Path) -> tuple[float, str]:
            t0 = time.perf_counter()
            p = subprocess.run([*cmd, "--data.output_root", str(dst)], capture_output=True, text=True, check=True)
            return time.perf_counter() - t0, p.stderr

        def writing(stderr: str) -> str:
            m = re.search(r"writing ([0-9.]+) s", stderr)
            return f"{float(m.group(1)):.2f} s" if m else "?"

        clean_wall, clean_err = run(Path(tmp) / "clean.zarr")
        killed = Path(tmp) / "killed.zarr"
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--data.output_root", str(killed)], stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            n, total = written(killed)
            if total and n >= total // 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        kill_wall = time.perf_counter() - t0
        if proc.returncode != -signal.SIGKILL:
            sys.exit("the run finished before half its chunks were written: use more or larger slices")
        at_kill, total = written(killed)
        resumed_wall, resumed_err = run(killed)
        line = next((ln for ln in resumed_err.splitlines() if "resuming an interrupted write" in ln), "(no resume line)")
        same = np.array_equal(zarr.open_array(str(killed), path=OUT)[:], zarr.open_array(str(Path(tmp) / "clean.zarr"), path=OUT)[:])
        print(f"stack {a.slices} x {a.size} x {a.size} uint8, output chunks {a.chunks}: {total} chunks")
        print(f"uninterrupted: {clean_wall:6.2f} s wall, writing {writing(clean_err)}")
        print(f"killed:        {kill_wall:6.2f} s wall, SIGKILL with {at_kill} of {total} chunks flagged written")
        print(f"resumed:       {resumed_wall:6.2f} s wall, writing {writing(resumed_err)}")
        print(f"  {line.strip()}")
        print(f"resumed output equals the uninterrupted one: {same}")


if __name__ == "__main__":
    main()
