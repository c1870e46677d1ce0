"""sphero_lightning against pystackreg (TurboReg/StackReg), side by side, on stacks with exact truth.

Stacks are cut from one real ISBI 2012 slice (see sphero_lightning.core.synthetic: detector model, noise)
and registered by both tools in the same process:

* ours: ``sphero_lightning.commands.main.main`` with ``configs/reg.yaml`` and ``--model.transformation rigid``;
* pystackreg: ``StackReg(RIGID_BODY).register_stack(stack, reference="previous")``.

Printed per case (mean over --seeds stacks): mean error of the composed transforms (px), seconds per
pair and the ratio. Seconds per pair = (time for a 40-slice stack - time for an 8-slice stack) / 32,
so start-up is not counted; start-up (the 8-slice time minus 7 pairs at that rate) is printed apart.
Each timing is the median of --repeats runs, ours and pystackreg alternating.

    python benchmarks/compare_stackreg.py                 # all cases, 3 seeds
    python benchmarks/compare_stackreg.py --cases static --seeds 1 --no-timing
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]  # the checkout (configs/)
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero_main
from sphero_lightning.core.synthetic import composed_error, em_like_image, load_isbi_slice, make_stack
from sphero_lightning.core.transforms import pixel_to_normalized
from sphero_lightning.storage.stacks import write_zarr

CASES = {
    # name: make_stack keyword arguments (on top of 384 x 384, noise 6)
    "static": {"max_shift": 8.0, "max_rot_deg": 1.0},
    "contrast": {"max_shift": 8.0, "max_rot_deg": 1.0, "contrast": 0.10, "brightness": 0.08},
    "jumps": {"max_shift": 20.0, "max_rot_deg": 2.5},  # consecutive slices differ by up to 40 px / 5 deg
}


def run_ours(stack: np.ndarray, workdir: Path, extra: list[str]) -> tuple[np.ndarray, float]:
    root = workdir / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    args = ["fit", "--config", str(REPO / "configs" / "reg.yaml"), "--data.root", str(root), "--data.array", "images/50-4-4",
            "--model.transformation", "rigid", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(workdir / "logs"), *extra]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        sphero_main(args)
    dt = time.perf_counter() - t0
    import zarr

    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return np.asarray(out.attrs["composed_transforms"]), dt


def run_stackreg(stack: np.ndarray) -> tuple[np.ndarray, float]:
    from pystackreg import StackReg

    t0 = time.perf_counter()
    tmats = StackReg(StackReg.RIGID_BODY).register_stack(stack.astype(np.float64), reference="previous", axis=0)
    dt = time.perf_counter() - t0
    shape = stack.shape[1:]
    return pixel_to_normalized(torch.from_numpy(tmats[1:]), shape).numpy(), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--slices", type=int, default=16, help="slices of the accuracy stacks")
    ap.add_argument("--size", type=int, nargs=2, default=[384, 384])
    ap.add_argument("--no-timing", action="store_true", help="skip the 8- and 40-slice throughput runs")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per tool and stack size (median)")
    ap.add_argument("--timing-cases", nargs="+", default=["static", "demo"], choices=[*CASES, "demo"],
                    help="stacks of the throughput runs: a case above cut from the ISBI slice, or 'demo' (the same "
                         "misalignment and noise on the procedural image of 'sphero demo')")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sphero fit arguments (last)")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    base = load_isbi_slice(ISBI_PATH, 0)
    shape = tuple(a.size)
    print(f"# sphero_lightning vs pystackreg, {shape[0]}x{shape[1]}, noise 6, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case in a.cases:
            errs_o, errs_s = [], []
            for seed in range(a.seeds):
                s = make_stack(base, a.slices, shape, noise=6.0, seed=seed, **CASES[case])
                est_o, _ = run_ours(s.stack, work, a.extra)
                est_s, _ = run_stackreg(s.stack)
                errs_o.append(composed_error(est_o, s.composed, shape).mean())
                errs_s.append(composed_error(est_s, s.composed, shape).mean())
                print(f"{case:9s} seed {seed}: ours {errs_o[-1]:.4f} px   pystackreg {errs_s[-1]:.4f} px", flush=True)
            print(f"{case:9s} MEAN  : ours {np.mean(errs_o):.4f} px   pystackreg {np.mean(errs_s):.4f} px   "
                  f"difference {np.mean(errs_o) - np.mean(errs_s):+.4f} px", flush=True)
        if a.no_timing:
            return
        # Timing is noisy on a shared machine: repeat, alternate the two tools, take the median.
        run_ours(make_stack(base, 4, shape, noise=6.0, seed=99).stack, work, a.extra)  # warm-up, untimed
        for case in a.timing_cases:
            if case == "demo":
                src, params = em_like_image(max(shape) + 128, seed=0), CASES["static"]
            else:
                src, params = base, CASES[case]
            times: dict[int, tuple[list[float], list[float]]] = {8: ([], []), 40: ([], [])}
            stacks = {n: make_stack(src, n, shape, noise=6.0, seed=100, **params).stack for n in times}
            for rep in range(a.repeats):
                for n, stack in stacks.items():
                    _, t_o = run_ours(stack, work, a.extra)
                    _, t_s = run_stackreg(stack)
                    times[n][0].append(t_o)
                    times[n][1].append(t_s)
                    print(f"{case}: repeat {rep}: {n}-slice stack: ours {t_o:.2f} s   pystackreg {t_s:.2f} s", flush=True)
            med = {n: (float(np.median(o)), float(np.median(s_))) for n, (o, s_) in times.items()}
            per_o = (med[40][0] - med[8][0]) / 32
            per_s = (med[40][1] - med[8][1]) / 32
            print(f"{case}: median of {a.repeats}: 8 slices ours {med[8][0]:.2f} s pystackreg {med[8][1]:.2f} s; "
                  f"40 slices ours {med[40][0]:.2f} s pystackreg {med[40][1]:.2f} s")
            print(f"{case}: seconds per pair: ours {per_o:.4f}   pystackreg {per_s:.4f}   ratio ours/pystackreg "
                  f"{per_o / per_s:.2f}")
            print(f"{case}: start-up (8-slice time - 7 pairs): ours {med[8][0] - 7 * per_o:.2f} s   pystackreg "
                  f"{med[8][1] - 7 * per_s:.2f} s")


if __name__ == "__main__":
    main()
