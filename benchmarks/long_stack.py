"""Drift along z against an exact truth: a procedural 3D volume, each slice displaced by a known slow drift plus jitter.

The volume (not one image moved): cells of a 3D Voronoi tessellation with dark membranes where two cells meet,
vesicle-like grain, noise; every z-slice differs from the next as consecutive sections do. Two contents:

* ``isotropic``: cells of about the same size in x, y and z;
* ``fibres``: the same plus oblique parallel fibres (dark tubes at 30 degrees to z), which pull a registration of
  consecutive slices along their direction (the classic source of shear along z).

Slice ``k`` is the volume's z-section displaced by ``T_k`` = a slow drift (``--drifts`` px per slice, a linear trend;
0: none) plus independent jitter (``--jitter`` px, ``--jitter-deg``). The truth of every composed transform (undoing
both) is known exactly. The drift priors assume the truth has no slow component: they help where that holds (no
drift; the chain's own drift from the content is what they remove) and remove the true drift where it does not.
Printed per content and method: error of the composed transforms against the truth at the last slice and the mean
over slices (px), and fitting seconds per slice. Methods: the chain (``--solve.neighbours 1``), the default (two
neighbours, the solve), and the drift priors on top (``--solve.detrend 1``, ``--solve.highpass W``).

    python benchmarks/long_stack.py                          # 500 slices of 256 x 256, ~15 min on 2 CPU cores
    python benchmarks/long_stack.py --slices 150 --size 384  # the figures quoted in the issue's numbers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


def volume_slice(z: float, size: int, seeds: np.ndarray, fibres: np.ndarray | None, rng: np.random.Generator,
                 cell: float) -> np.ndarray:
    """The procedural volume's section at height ``z`` (pixel units), ``size`` x ``size`` plus a margin of 24 px.

    Membranes: where the distances to the nearest and second-nearest seed differ by less than ~1.5 px (the bisector
    of two cells). ``fibres``: ``(F, 2)`` positions at z = 0 of tubes along (sin 30, 0, cos 30)."""
    m = size + 48
    near = seeds[np.abs(seeds[:, 2] - z) < 2.5 * cell]
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float32)
    d1 = np.full((m, m), np.inf, np.float32)
    d2 = np.full((m, m), np.inf, np.float32)
    for sx, sy, sz in near:
        d = np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2 + np.float32((z - sz) ** 2))
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    gap = d2 - d1
    img = 150 + 40 * np.exp(-d1 / cell)  # cell interiors, brighter towards their centre
    img -= 110 * np.exp(-(gap / 1.5) ** 2)  # membranes
    if fibres is not None:  # tubes of radius ~3 px along (sin 30, 0, cos 30): oblique ellipses in every section
        t, c = np.tan(np.deg2rad(30.0)), np.cos(np.deg2rad(30.0))
        for fx, fy in fibres:
            cx = fx + z * t
            img -= 100 * np.exp(-(((xx - cx) * c) ** 2 + (yy - fy) ** 2) / (2 * 4.0 ** 2))
    grain = rng.normal(0, 1, (m, m)).astype(np.float32)
    img += 6 * grain
    return img


def make_volume(n: int, size: int, content: str, drift: float, jitter: float, jitter_deg: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(n, size, size)`` uint8 slices and their ``(n - 1, 2, 3)`` normalized composed truth (slices 1.. to 0)."""
    from sphero_lightning.core.synthetic import render, truth_composed

    rng = np.random.default_rng(seed)
    cell = 18.0
    m = size + 48
    count = int(m * m * (n + 6 * cell) / (cell ** 3) * 0.6)
    seeds = np.stack([rng.uniform(0, m, count), rng.uniform(0, m, count), rng.uniform(-3 * cell, n + 3 * cell, count)], 1)
    nf = int(m * (m + n) / 900)  # about one fibre per 30 x 30 px of the slice
    fibres = np.stack([rng.uniform(-n * 0.6, m, nf), rng.uniform(0, m, nf)], 1) if content == "fibres" else None
    # slice k sampled at its own transform: centered px, output pixel -> section pixel
    tf = np.zeros((n, 2, 3))
    angles = np.deg2rad(rng.uniform(-jitter_deg, jitter_deg, n))
    tf[:, 0, 0] = tf[:, 1, 1] = np.cos(angles)
    tf[:, 0, 1], tf[:, 1, 0] = -np.sin(angles), np.sin(angles)
    tf[:, :, 2] = np.arange(n)[:, None] * np.array([drift, -0.5 * drift]) + rng.uniform(-jitter, jitter, (n, 2))
    out = np.empty((n, size, size), np.uint8)
    for k in range(n):
        sec = volume_slice(float(k), size, seeds, fibres, rng, cell)
        img = render(sec.astype(np.float64), tf[k:k + 1], (size, size), oversample=1)[0]
        out[k] = np.clip(np.rint(img), 0, 255)
    return out, truth_composed(tf, (size, size))


def run(stack: np.ndarray, work: Path, extra: list[str]) -> tuple[np.ndarray, float, dict]:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    with contextlib.redirect_stderr(io.StringIO()):
        cli = sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.logger", "false",
                      "--trainer.enable_progress_bar", "false", *extra])
    attrs = zarr.open_array(str(root), path=OUT, mode="r").attrs
    return np.asarray(attrs["composed_transforms"]), cli.model.times.fit_s, dict(attrs.get("volume_solve") or {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--contents", nargs="+", default=["isotropic", "fibres"], choices=["isotropic", "fibres"])
    ap.add_argument("--drifts", type=float, nargs="+", default=[0.0, 0.05],
                    help="true drift, px per slice (x; y: half of it, the other way): 0 = jitter only")
    ap.add_argument("--jitter", type=float, default=3.0)
    ap.add_argument("--jitter-deg", type=float, default=0.3)
    ap.add_argument("--highpass", type=float, default=25.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    methods = {"chain (neighbours 1)": ["--solve.neighbours", "1"], "solve (default: 2 neighbours)": [],
               "solve + detrend 1": ["--solve.detrend", "1"], f"solve + highpass {a.highpass:g}": ["--solve.highpass", str(a.highpass)]}
    print(f"# {a.slices} slices of {a.size} x {a.size}, jitter {a.jitter} px / {a.jitter_deg} deg")
    print("| content | true drift (px/slice) | method | error at the last slice | mean error | fitting s/slice | unregistered |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for content in a.contents:
            for drift in a.drifts:
                t0 = time.perf_counter()
                stack, truth = make_volume(a.slices, a.size, content, drift, a.jitter, a.jitter_deg, a.seed)
                made = time.perf_counter() - t0
                for name, extra in methods.items():
                    est, fit_s, record = run(stack, work, extra)
                    e = composed_error(est, truth, (a.size, a.size))
                    print(f"| {content} | {drift:g} | {name} | {e[-1]:.3f} px | {e.mean():.3f} px | {fit_s / a.slices:.4f} | "
                          f"{len(record.get('unregistered', []))} |", flush=True)
                print(f"(made the volume in {made:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
