"""Real sections: sphero_lightning against pystackreg on the 30 ISBI 2012 ssTEM sections (512 x 512).

Two stacks: the sections as they are (consecutive 50 nm sections: neighbours correlate at NCC 0.2-0.4), and the
same sections each moved by a random rigid transform (up to 8 px, 1 degree; cubic B-spline resampling, uint8).
Both tools register consecutive pairs with a rigid model, in this one process:

* ours: ``sphero fit`` (in-process), defaults + ``--model.transformation rigid``;
* pystackreg: ``StackReg(RIGID_BODY).register_stack(stack, reference="previous")``.

Printed per stack:

* seconds per pair = (time for the 30 sections - time for the first 8) / 22, start-up not counted; medians of
  ``--repeats`` runs, the two tools alternating;
* our profile: evaluations per pair and milliseconds per evaluation (per pair) at each pyramid level, and the time
  outside the evaluations;
* accuracy without a truth: the mean and worst distance (px, mean displacement over the slice) of our default
  pairwise transforms from a run converged 10x tighter (step tolerances / 10); for the misaligned stack also the
  error of both tools' composed transforms against the added misalignment composed with the tight run.

    python benchmarks/real_sections.py                     # ~5 min on 2 CPU cores
    python benchmarks/real_sections.py --repeats 1 --stacks as-is
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zarr
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error, random_transforms, render
from sphero_lightning.core.transforms import centered_to_normalized, homogeneous, pixel_to_normalized
from sphero_lightning.storage.stacks import write_zarr

#: Every stopping rule 10x tighter than the defaults.
TIGHT = ["--early_stopping.step_tol_px", "0.0003", "--early_stopping.coarse_step_tol_px", "0.005",
         "--early_stopping.newton_step_tol_px", "0.002", "--early_stopping.tol", "1e-8"]


def load_sections() -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(str(ISBI_PATH)))


def misalign(vol: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each section moved by a random rigid transform; returns the stack and the transforms (centered px, section
    pixel -> original pixel)."""
    tf = random_transforms(len(vol), np.random.default_rng(seed), 8.0, 1.0)
    out = np.stack([render(vol[k].astype(np.float64), tf[k:k + 1], vol.shape[1:], oversample=1)[0] for k in range(len(vol))])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), tf


def run_ours(stack: np.ndarray, work: Path, extra: list[str]) -> tuple[dict, float]:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    args = ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        cli = sphero(args)
    dt = time.perf_counter() - t0
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    res = {"pairwise": np.asarray(out.attrs["pairwise_transforms"]), "composed": np.asarray(out.attrs["composed_transforms"]),
           "log": out.attrs["registration_log"], "times": cli.model.times}
    return res, dt


def run_stackreg(stack: np.ndarray) -> tuple[np.ndarray, float]:
    from pystackreg import StackReg

    t0 = time.perf_counter()
    with warnings.catch_warnings():  # its guess of the time axis from 4-8 sections of similar variance
        warnings.simplefilter("ignore", UserWarning)
        tmats = StackReg(StackReg.RIGID_BODY).register_stack(stack.astype(np.float64), reference="previous", axis=0)
    dt = time.perf_counter() - t0
    return pixel_to_normalized(torch.from_numpy(tmats[1:]), stack.shape[1:]).numpy(), dt


def profile(res: dict, n_pairs: int) -> str:
    t = res["times"]
    levels = sorted(t.level_s)
    per_level = np.array([e["steps_per_level"] for e in res["log"] if e.get("steps_per_level")], dtype=float)
    parts, inside = [], 0.0
    for k in levels:
        evals = per_level[:, k].mean() if len(per_level) else float("nan")
        total_evals = per_level[:, k].sum() if len(per_level) else float("nan")
        inside += t.level_s[k]
        parts.append(f"level {k}: {evals:.1f} evaluations/pair, {1000 * t.level_s[k] / max(total_evals, 1):.1f} ms per "
                     f"pair-evaluation ({t.level_steps[k]} steps, {t.level_s[k]:.2f} s)")
    fit = t.fit_s
    return "; ".join(parts) + f"; evaluations {fit and inside:.2f} s of the fit's {fit:.2f} s (outside: {fit - inside:.2f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", nargs="+", default=["as-is", "misaligned"], choices=["as-is", "misaligned"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sphero fit arguments (last)")
    a = ap.parse_args()
    if not ISBI_PATH.exists():
        sys.exit(f"needs {ISBI_PATH} (the ISBI 2012 volume in ../shared/data); not found")
    vol = load_sections()
    shape = vol.shape[1:]
    print(f"# ISBI 2012, {len(vol)} sections {shape[0]}x{shape[1]}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"rigid; extra: {' '.join(a.extra) or '-'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # warm-up, untimed: the first fit in a process imports and initialises what later ones reuse
        run_ours(vol[:4], work, a.extra)
        run_stackreg(vol[:4])
        for name in a.stacks:
            stack, tf = (vol, None) if name == "as-is" else misalign(vol)
            times = {8: ([], []), len(stack): ([], [])}
            res = None
            for rep in range(a.repeats):
                for n in times:
                    r, t_o = run_ours(stack[:n], work, a.extra)
                    _, t_s = run_stackreg(stack[:n])
                    times[n][0].append(t_o)
                    times[n][1].append(t_s)
                    if n == len(stack):
                        res = r
                    print(f"{name} repeat {rep}: {n} sections: ours {t_o:.2f} s, pystackreg {t_s:.2f} s", flush=True)
            n = len(stack)
            med = {k: (float(np.median(o)), float(np.median(s))) for k, (o, s) in times.items()}
            per_o, per_s = ((med[n][i] - med[8][i]) / (n - 8) for i in (0, 1))
            print(f"{name}: seconds per pair (median of {a.repeats}): ours {per_o:.3f}, pystackreg {per_s:.3f}, "
                  f"ratio ours/pystackreg {per_o / per_s:.2f}")
            print(f"{name}: profile: {profile(res, n - 1)}")
            tight, _ = run_ours(stack, work, [*TIGHT, *a.extra])
            d = composed_error(res["pairwise"], tight["pairwise"], shape)
            print(f"{name}: default vs 10x tighter run, pairwise: mean {d.mean():.4f} px, worst {d.max():.4f} px; "
                  f"tight run {np.mean([e['num_steps_taken'] for e in tight['log']]):.1f} evaluations/pair, default "
                  f"{np.mean([e['num_steps_taken'] for e in res['log']]):.1f}; NCC after {np.mean([e['ncc_after'] for e in res['log']]):.3f}")
            if tf is not None:
                # truth of the added misalignment on top of the sections' own (unknown) alignment: compare against
                # the tight run of the sections as they are, composed with the added transforms
                ref, _ = run_ours(vol, work, TIGHT + a.extra)
                c_ref = torch.from_numpy(np.concatenate([np.eye(3)[None, :2], ref["composed"]]))
                added = torch.from_numpy(centered_to_normalized(torch.from_numpy(tf), shape).numpy())
                # output frame -> original section k: C_k; section k frame -> original: T_k  =>  output -> misaligned k = T_k^-1 C_k,
                # relative to slice 0's frame: (T_k^-1 C_k) (T_0^-1 C_0)^-1
                h = homogeneous
                m = torch.linalg.inv(h(added)) @ h(c_ref)
                truth = (m[1:] @ torch.linalg.inv(m[0]))[:, :2].numpy()
                est_s, _ = run_stackreg(stack)
                e_o = composed_error(res["composed"], truth, shape)
                e_s = composed_error(est_s, truth, shape)
                print(f"{name}: composed vs (added misalignment x tight run on the sections as they are): ours mean "
                      f"{e_o.mean():.3f} px (worst {e_o.max():.3f}), pystackreg {e_s.mean():.3f} px (worst {e_s.max():.3f})")


if __name__ == "__main__":
    main()
