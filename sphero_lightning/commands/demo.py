"""``sphero demo``: generate a stack with known misalignment, register it, report the error.

Needs no network and no data: the base image is procedural (``synthetic.em_like_image``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zarr

from ..core.synthetic import composed_error, em_like_image, make_stack
from ..storage.stacks import write_zarr
from .fit_help import plain


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(prog="sphero demo", description=plain(__doc__))
    ap.add_argument("--out", default="demo", help="folder for demo.zarr and the logs (default: ./demo)")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=[384, 384], metavar=("H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("fit_args", nargs="*", help="extra 'sphero fit' arguments, after --")
    a = ap.parse_args(argv)
    from ..threads import seconds_since_start
    from .main import main as cli_main

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "demo.zarr"
    print(f"sphero demo: cutting {a.slices} slices of {a.size[0]} x {a.size[1]} px from a synthetic EM-like image "
          f"with random rigid misalignment (up to 8 px, 1 degree) and noise sigma 6")
    s = make_stack(em_like_image(max(a.size) + 128, seed=a.seed), a.slices, tuple(a.size), seed=a.seed)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    write_zarr(s.stack, root, truth=s.composed)
    t0 = time.perf_counter()
    cli_main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
              "--trainer.logger.init_args.save_dir", str(out / "logs"), *a.fit_args])
    dt = time.perf_counter() - t0
    arr = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    err = composed_error(np.asarray(arr.attrs["composed_transforms"]), s.composed, tuple(a.size))
    print(f"sphero demo: output {root}/images/registered/50-4-4, shape {arr.shape}, crop_box {arr.attrs['crop_box']}")
    total = seconds_since_start()
    whole = f"; the whole command {total:.1f} s (Python, torch and Lightning starting included)" if total else ""
    print(f"sphero demo: mean error of the composed transforms against the known truth: {err.mean():.4f} px "
          f"(worst slice {err.max():.4f} px); sphero fit took {dt:.1f} s for {a.slices - 1} pairs{whole}")
    print(f"sphero demo: TensorBoard: tensorboard --logdir {out / 'logs'}")
    return float(err.mean())
