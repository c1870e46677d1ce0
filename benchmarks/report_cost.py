"""What the alignment report costs: ``sphero report`` on a 128 x 512 x 512 stack beside the ``sphero fit`` that made it.

A synthetic stack with known misalignment (``core.synthetic``: EM-like content, up to 8 px / 1 degree per slice,
noise 6, uint8) is fitted once with ``sphero fit`` (rigid, defaults; the fit writes its own page at the end), then
``sphero report`` builds the page again on its own. Each runs in its own process under ``/usr/bin/time``, so the
seconds (wall, start-up included) and peak resident memory are that command's own. Also printed: the straightness of
the middle XZ/YZ reslices before and after, and the page's size.

``--isbi`` adds the 30 real ISBI 2012 sections (512 x 512): as they are (already aligned by their authors) and each
moved by a random rigid transform (as ``benchmarks/real_sections.py``), fitted rigid, with their straightness.

    python benchmarks/report_cost.py                  # ~2 min on 2 CPU cores
    python benchmarks/report_cost.py --slices 32 --isbi
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr
from _paths import ISBI_PATH

from sphero_lightning.core.synthetic import em_like_image, make_stack, random_transforms, render
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


def timed(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``sphero ARGS`` in its own process: (wall seconds, peak RSS in MB, stderr)."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "sphero_lightning", *args]
    r = subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    wall, kb = re.search(r"TIME ([\d.]+) (\d+)", r.stderr).groups()
    return float(wall), int(kb) / 1024, r.stderr


def fit_args(root: Path, logs: Path) -> list[str]:
    return ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs)]


def straightness_of(err: str) -> str:
    return re.search(r"straightness before -> after: (.*)\)", err).group(1)


def cost(tmp: Path, slices: int, size: int) -> None:
    print(f"making {slices} x {size} x {size} (synthetic, rigid misalignment up to 8 px / 1 degree)", flush=True)
    s = make_stack(em_like_image(size + 128, seed=0), slices, (size, size), seed=0)
    root = tmp / "stack.zarr"
    write_zarr(s.stack, root)
    fit_s, fit_mb, err = timed(fit_args(root, tmp / "logs"), tmp)
    timing = next(ln for ln in err.splitlines() if ln.startswith("sphero: time: "))
    page = next(ln for ln in err.splitlines() if ln.startswith("sphero: report ")).removeprefix("sphero: report ")
    print(f"sphero fit:    {fit_s:6.2f} s, peak RSS {fit_mb:6.0f} MB (its page at the end included: {page})")
    print(f"               {timing.removeprefix('sphero: ')}")
    out_page = tmp / "page.html"
    rep_s, rep_mb, err = timed(["report", "--root", str(root), "--array", OUT, "--out", str(out_page)], tmp)
    print(f"sphero report: {rep_s:6.2f} s, peak RSS {rep_mb:6.0f} MB, page {out_page.stat().st_size / 2**20:.2f} MB "
          f"({rep_s / fit_s:.1%} of the fit's time, {rep_mb / fit_mb:.1%} of its memory)")
    print(f"               straightness before -> after: {straightness_of(err)}")


def isbi(tmp: Path) -> None:
    import tifffile

    if not ISBI_PATH.exists():
        sys.exit(f"--isbi: {ISBI_PATH} is absent (set SPHERO_SHARED_DATA)")
    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    tf = random_transforms(len(vol), np.random.default_rng(0), 8.0, 1.0)
    moved = np.stack([render(vol[k].astype(np.float64), tf[k:k + 1], vol.shape[1:], oversample=1)[0] for k in range(len(vol))])
    stacks = (("as they are", vol), ("each moved (8 px, 1 deg)", np.clip(np.rint(moved), 0, 255).astype(np.uint8)))
    for k, (name, stack) in enumerate(stacks):
        root = tmp / f"isbi-{k}.zarr"
        write_zarr(stack, root)
        fit_s, _, _ = timed(fit_args(root, tmp / "logs"), tmp)
        rep_s, rep_mb, err = timed(["report", "--root", str(root), "--array", OUT, "--out", str(tmp / "isbi.html")], tmp)
        ncc = [e.get("ncc_after") for e in zarr.open_array(str(root), path=OUT, mode="r").attrs["registration_log"]]
        print(f"ISBI 30 x 512 x 512, {name}: straightness {straightness_of(err)}; mean NCC after "
              f"{np.mean([v for v in ncc if v is not None]):.3f}; fit {fit_s:.1f} s, report {rep_s:.2f} s, {rep_mb:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=128)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--isbi", action="store_true", help="also the 30 real ISBI sections, as they are and moved")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sphero-report-cost-") as tmp:
        cost(Path(tmp), a.slices, a.size)
        if a.isbi:
            isbi(Path(tmp))


if __name__ == "__main__":
    main()
