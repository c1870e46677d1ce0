"""The README's figures that no other benchmark reproduces, each re-measured by one section of this script.

Stacks are cut from one real ISBI 2012 slice as in compare_stackreg.py (384 x 384, noise sigma 6, each slice moved
by up to 8 px / 1 degree: the "static" case), registered with ``sphero fit --model.transformation rigid``.

    python benchmarks/readme_figures.py                       # every section
    python benchmarks/readme_figures.py --sections smoothing  # one

Sections:

* ``smoothing``: mean composed error (px) with the default pre-smoothing (sigma 0.7) and without (``--model.smoothing
  0``), over --seeds stacks of 16 slices;
* ``stop-tol``: the same with the reference pipeline's ``--early_stopping.tol 1e-5`` instead of our 1e-7, and the
  mean distance between the two runs' transforms;
* ``roundtrip``: pystackreg's ``transform_stack`` with our exported pixel matrices against our own output, mean
  absolute difference in grey levels inside the crop (40 slices);
* ``ddp``: wall time of ``sphero fit`` on a 16-slice stack in one process and as 2 CPU DDP processes, and the
  distance between their transforms (timings: run on a quiet machine);
* ``blocks``: fitting time (the run's own timing line) of the 30 real ISBI sections at ``--data.pairs_per_block``
  8 and 32, medians of --repeats alternating runs (timings: run on a quiet machine);
* ``startup``: wall time of ``sphero --help``, of ``python -c "import lightning.pytorch"`` and of ``sphero fit`` on a
  4-slice 128 x 128 stack, medians of 5 alternating runs (issue 12: fit <= the import + 1.5 s, help <= 1.5 s);
* ``concurrent``: two ``sphero fit`` runs of the 30 ISBI sections one after the other, then both started at once
  (issue 12: at once within 1.2x).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from _paths import ISBI_PATH
from compare_stackreg import CASES, run_ours

from sphero_lightning.commands.main import main as sphero_main
from sphero_lightning.core.synthetic import composed_error, load_isbi_slice, make_stack
from sphero_lightning.storage.stacks import write_zarr

SHAPE = (384, 384)


def static_stack(base: np.ndarray, n: int, seed: int):
    return make_stack(base, n, SHAPE, noise=6.0, seed=seed, **CASES["static"])


def errors(base: np.ndarray, work: Path, seeds: int, extra: list[str]) -> float:
    errs = []
    for seed in range(seeds):
        s = static_stack(base, 16, seed)
        est, _ = run_ours(s.stack, work, extra)
        errs.append(composed_error(est, s.composed, SHAPE).mean())
    return float(np.mean(errs))


def smoothing(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    with_, without = errors(base, work, a.seeds, []), errors(base, work, a.seeds, ["--model.smoothing", "0"])
    print(f"smoothing: mean composed error {with_:.4f} px with sigma 0.7 (default), {without:.4f} px without "
          f"(static case, {a.seeds} stacks of 16 x 384 x 384)", flush=True)


def stop_tol(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    errs, dists = {"1e-7": [], "1e-5": []}, []
    for seed in range(a.seeds):
        s = static_stack(base, 16, seed)
        ours, _ = run_ours(s.stack, work, [])
        ref, _ = run_ours(s.stack, work, ["--early_stopping.tol", "1e-5"])
        errs["1e-7"].append(composed_error(ours, s.composed, SHAPE).mean())
        errs["1e-5"].append(composed_error(ref, s.composed, SHAPE).mean())
        dists.append(composed_error(ref, ours, SHAPE).mean())
    print(f"stop-tol: mean composed error {np.mean(errs['1e-7']):.4f} px at tol 1e-7 (default), "
          f"{np.mean(errs['1e-5']):.4f} px at the reference's 1e-5; the two runs {np.mean(dists):.4f} px apart", flush=True)


def roundtrip(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    from pystackreg import StackReg

    s = static_stack(base, 40, 0)
    root = work / "roundtrip.zarr"
    write_zarr(s.stack, root)
    with contextlib.redirect_stderr(io.StringIO()):
        sphero_main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
                     "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
        sphero_main(["export", "--root", str(root), "--transforms", "images/registered/50-4-4", "--tmats",
                     str(work / "t.npy")])
    reg = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    theirs = StackReg(StackReg.RIGID_BODY).transform_stack(s.stack.astype(np.float64), tmats=np.load(work / "t.npy"))
    up, down, left, right = reg.attrs["crop_box"]
    ours = reg[:].astype(np.float64)
    diff = np.abs(theirs[:, up:down, left:right] - ours)
    rounded = np.abs(np.clip(np.rint(theirs[:, up:down, left:right]), 0, 255) - ours)
    print(f"roundtrip: pystackreg transform_stack with our tmats vs our output: {diff.mean():.3f} grey levels mean "
          f"absolute difference inside the crop (40 x 384 x 384 uint8; 99th percentile {np.percentile(diff, 99):.2f}); "
          f"{rounded.mean():.4f} once pystackreg's float output is rounded to uint8 as ours is", flush=True)


def cli(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *args], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return time.perf_counter() - t0, r.stderr


def ddp(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    s = static_stack(base, 16, 0)
    got = {}
    for name, extra in (("one process", []), ("2 DDP processes", ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                                                  "--trainer.strategy", "ddp"])):
        root = work / f"ddp{len(got)}.zarr"
        write_zarr(s.stack, root)
        dt, _ = cli(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.enable_progress_bar",
                     "false", "--trainer.logger", "false", *extra])
        out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
        record = next(p for p in out.attrs["processing"] if p.get("step_name") == "registration")
        got[name] = (dt, np.asarray(out.attrs["composed_transforms"]), record["parameters"]["trainer"]["world_size"])
    (t1, c1, _), (t2, c2, w2) = got.values()
    print(f"ddp: 16 x 384 x 384, wall {t1:.1f} s in one process, {t2:.1f} s as 2 CPU DDP processes (world size {w2}); "
          f"transforms {composed_error(c2, c1, SHAPE).mean():.5f} px apart", flush=True)


def blocks(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    import tifffile

    root = work / "isbi.zarr"
    write_zarr(np.asarray(tifffile.imread(str(ISBI_PATH))), root)
    times: dict[int, list[float]] = {8: [], 32: []}
    for _ in range(a.repeats):
        for b, runs in times.items():
            _, err = cli(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--data.pairs_per_block",
                          str(b), "--data.overwrite", "true", "--data.resume", "false", "--trainer.enable_progress_bar",
                          "false", "--trainer.logger", "false"])
            runs.append(float(re.search(r"fitting ([0-9.]+) s", err).group(1)))
    print("blocks: the 30 ISBI sections, fitting " + ", ".join(
        f"{statistics.median(v):.2f} s at B={b} (runs {', '.join(f'{x:.2f}' for x in v)})" for b, v in times.items()),
        flush=True)


def startup(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    root = work / "small.zarr"
    write_zarr(make_stack(base, 4, (128, 128), seed=0).stack, root)
    exe = Path(sys.executable).with_name("sphero")
    cmds = {"sphero --help": [str(exe), "--help"],
            "import lightning.pytorch": [sys.executable, "-c", "import lightning.pytorch"],
            "sphero fit (4 x 128 x 128)": [str(exe), "fit", "--data.root", str(root), "--data.array", "images/50-4-4",
                                           "--data.overwrite", "true", "--trainer.enable_progress_bar", "false",
                                           "--trainer.logger", "false"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(5):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=work)
            times[name].append(time.perf_counter() - t0)
    print("startup: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in times.items()) + " (medians of 5)",
          flush=True)


def concurrent(base: np.ndarray, work: Path, a: argparse.Namespace) -> None:
    import tifffile

    vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
    roots = [work / f"c{k}.zarr" for k in range(2)]
    for r in roots:
        write_zarr(vol, r)
    exe = str(Path(sys.executable).with_name("sphero"))

    def cmd(r: Path) -> list[str]:
        return [exe, "fit", "--data.root", str(r), "--data.array", "images/50-4-4", "--data.overwrite", "true",
                "--data.resume", "false", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]

    t0 = time.perf_counter()
    for r in roots:
        subprocess.run(cmd(r), check=True, capture_output=True)
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd(r), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in roots]
    if any(p.wait() for p in procs):
        raise SystemExit("a concurrent run failed")
    at_once = time.perf_counter() - t0
    print(f"concurrent: two sphero fit runs of the 30 ISBI sections one after the other {one_by_one:.1f} s, started at "
          f"once {at_once:.1f} s ({at_once / one_by_one:.2f}x)", flush=True)


SECTIONS = {"smoothing": smoothing, "stop-tol": stop_tol, "roundtrip": roundtrip, "ddp": ddp, "blocks": blocks, "startup": startup,
            "concurrent": concurrent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs the ISBI 2012 volume at {ISBI_PATH} (../shared/data, or set SPHERO_SHARED_DATA)")
    base = load_isbi_slice(ISBI_PATH, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.sections:
            SECTIONS[name](base, Path(tmp), a)


if __name__ == "__main__":
    main()
