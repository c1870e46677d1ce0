"""GPU throughput: pairs per second at 512, 2048 and 4096 px, one pair per block and the default block, on real
sections and a synthetic stack, fitting and writing apart, and agreement with the CPU result. One script, at most ~5
minutes on one GPU.

    python benchmarks/gpu.py                 # needs a CUDA GPU (and ../shared/data, or $SPHERO_SHARED_DATA, for ISBI)
    python benchmarks/gpu.py --accelerator cpu --sizes 128 --pairs 8    # dry run of the script itself on a CPU

Printed per case, from ``sphero fit``'s own timing line (so start-up, the slice scan and writing are not counted):
pairs per second of fitting, and the same from wall time as ``(n - small) / (t_n - t_small)``; seconds per slice of
writing (warping on the GPU, compression on CPU threads) and end to end (wall time of the whole command / slices);
peak GPU memory; and the mean distance (px, over the slice) of the GPU's composed transforms from a CPU run of the same
first 9 slices. ``--compact`` adds a row per case with the fit's ``sync_free`` off (the CPU's compacted loop, which
reads the device's state at every step), to compare with the default on a GPU (sync-free: core/fit.py).
"Default block" is ``--data.pairs_per_block`` left at 32: the data module caps it at 8 Mpx of finest-level pixels per
block (32 pairs at 512 x 512, 2 at 2048 x 2048).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import zarr
from _paths import ISBI_PATH

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.training.module import RegistrationModule

LOG: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LOG.append(line)


def fit(stack: np.ndarray, work: Path, accelerator: str, block: int | None) -> tuple[np.ndarray, float, float, float]:
    """Run ``sphero fit`` in this process; returns composed transforms, wall seconds, the fit's own fitting and writing
    seconds."""
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    args = ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.accelerator", accelerator,
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    if block is not None:
        args += ["--data.pairs_per_block", str(block)]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        sphero(args)
    dt = time.perf_counter() - t0
    m, w = re.search(r"fitting ([0-9.]+) s", err.getvalue()), re.search(r"writing ([0-9.]+) s", err.getvalue())
    if m is None or w is None:
        raise RuntimeError("no timing line in sphero fit's output:\n" + err.getvalue()[-2000:])
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return np.asarray(out.attrs["composed_transforms"]), dt, float(m.group(1)), float(w.group(1))


def by_wall(pairs: int, seconds: float) -> str:
    return f"{pairs / seconds:7.2f} pairs/s" if seconds > 0.05 else "   n/a (start-up noise larger than the fit)"


def source_image(size: int) -> np.ndarray:
    """The synthetic stack's source: procedural up to 1024 px; above, upsampled 4x from a quarter-size one (the
    generator's cost grows faster than its area: a 2176 px image would take minutes of a leased GPU's time)."""
    if size <= 1024:
        return em_like_image(size, seed=0)
    small = torch.from_numpy(em_like_image(-(-size // 4), seed=0))[None, None].double()
    return torch.nn.functional.interpolate(small, scale_factor=4, mode="bicubic", align_corners=False)[0, 0, :size, :size].numpy()


def stacks(size: int, n: int) -> dict[str, np.ndarray]:
    out = {"synthetic": make_stack(source_image(size + 128), n, (size, size), seed=0).stack}
    if ISBI_PATH.exists():
        import tifffile

        vol = np.asarray(tifffile.imread(str(ISBI_PATH)))
        reps = -(-size // vol.shape[1])
        real = np.tile(vol, (1, reps, reps))[:, :size, :size]  # 2048: the real sections tiled 4 x 4
        out["real ISBI"] = real[np.arange(n) % len(real)]
    else:
        say(f"# no real sections at {ISBI_PATH}: synthetic only")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--pairs", type=int, nargs="+", default=[64, 16, 8], help="pairs per size (one per --sizes)")
    ap.add_argument("--accelerator", default="gpu", help="gpu; cpu only to dry-run this script")
    ap.add_argument("--compact", action="store_true", help="also the default block with sync_free off")
    a = ap.parse_args()
    cuda = a.accelerator == "gpu"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: nothing to measure (run this where `torch.cuda.is_available()` is true)")
    say(f"# {torch.cuda.get_device_name(0) if cuda else 'CPU dry run'}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size, pairs in zip(a.sizes, a.pairs):
            for name, stack in stacks(size, pairs + 1).items():
                try:
                    cpu, cpu_wall, cpu_fit, cpu_write = fit(stack[:9], work, "cpu", None)
                    say(f"{name:10s} {size}^2 CPU (first 8 pairs, default block): fitting {cpu_fit:.2f} s "
                        f"= {8 / cpu_fit:.2f} pairs/s, writing {cpu_write / 9:.3f} s/slice, wall {cpu_wall:.1f} s")
                except (Exception, SystemExit):  # noqa: BLE001 - one failed case must not lose the others
                    say(f"{name} {size}^2 CPU reference FAILED:\n{traceback.format_exc()}")
                    continue
                for block, compact in [(1, False), (None, False)] + ([(None, True)] if a.compact else []):
                    label = "B=1" if block == 1 else "B=default" + (" compacted" if compact else "")
                    RegistrationModule.sync_free = False if compact else None
                    try:
                        fit(stack[:3], work, a.accelerator, block)  # warm-up (CUDA context, kernels)
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        _, t_small, _, _ = fit(stack[:5], work, a.accelerator, block)
                        dev_n, t_n, f_n, w_n = fit(stack, work, a.accelerator, block)
                        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                        dev8 = dev_n[:9] if len(stack) == 9 else fit(stack[:9], work, a.accelerator, block)[0]
                        d = composed_error(dev8, cpu, stack.shape[1:])
                        say(f"{name:10s} {size}^2 {label:9s}: fitting {pairs / f_n:7.2f} pairs/s ({pairs} pairs in "
                            f"{f_n:.2f} s), by wall {by_wall(pairs - 4, t_n - t_small)}, writing {w_n / len(stack):.3f}"
                            f" s/slice, end to end {t_n / len(stack):.3f} s/slice, peak GPU "
                            f"memory {peak:.2f} GiB, vs CPU mean {d.mean():.4f} px (worst slice {d.max():.4f})")
                    except (Exception, SystemExit):  # noqa: BLE001 - one failed case must not lose the others
                        say(f"{name} {size}^2 {label} FAILED:\n{traceback.format_exc()}")
                    RegistrationModule.sync_free = None
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_bench.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
