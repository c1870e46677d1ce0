"""GPU throughput: pairs per second at 512 x 512 and 2048 x 2048, one pair per block and the default block, on real
sections and a synthetic stack, and agreement with the CPU result. One script, at most ~4 minutes on one GPU.

    python benchmarks/gpu.py                 # needs a CUDA GPU (and ../shared/data for the real sections)

Printed per case: pairs per second of the fit (after a warm-up run; start-up not counted: (t_n - t_small) /
(n - small) pairs), peak GPU memory, and the mean distance (px) of the GPU's composed transforms from a CPU run of
the same stack (first 8 slices).
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
import zarr
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack, write_zarr


def fit(stack: np.ndarray, work: Path, accelerator: str, block: int) -> tuple[np.ndarray, float]:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.accelerator", accelerator,
                "--trainer.devices", "1", "--data.pairs_per_block", str(block), "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false"])
    dt = time.perf_counter() - t0
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return np.asarray(out.attrs["composed_transforms"]), dt


def stacks(size: int, n: int) -> dict[str, np.ndarray]:
    out = {"synthetic": make_stack(em_like_image(size + 128, seed=0), n, (size, size), seed=0).stack}
    if ISBI_PATH.exists():
        import tifffile

        vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
        reps = -(-size // vol.shape[1])
        real = np.tile(vol, (1, reps, reps))[:, :size, :size]
        out["real ISBI"] = real[np.arange(n) % len(real)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--pairs", type=int, nargs=2, default=[64, 16], help="pairs at 512 and at 2048")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: nothing to measure (run this where `torch.cuda.is_available()` is true)")
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size, pairs in zip(a.sizes, a.pairs):
            for name, stack in stacks(size, pairs + 1).items():
                cpu, _ = fit(stack[:9], work, "cpu", 8)
                for block in (1, 8):
                    fit(stack[:3], work, "gpu", block)  # warm-up (CUDA context, kernels)
                    torch.cuda.reset_peak_memory_stats()
                    _, t_small = fit(stack[:5], work, "gpu", block)
                    _, t_n = fit(stack, work, "gpu", block)
                    rate = (pairs - 4) / max(t_n - t_small, 1e-9)
                    gpu8, _ = fit(stack[:9], work, "gpu", block)
                    d = composed_error(gpu8, cpu, stack.shape[1:]).mean()
                    print(f"{name:10s} {size}^2 B={block}: {rate:7.1f} pairs/s, peak GPU memory "
                          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, GPU vs CPU {d:.4f} px", flush=True)


if __name__ == "__main__":
    main()
