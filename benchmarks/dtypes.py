"""Every integer width and float range registers as well as uint8 does (issue 11, must-show 1).

The demo's stack (procedural EM-like image, 16 slices of 384 x 384, rigid misalignment up to 8 px / 1 degree,
noise sigma 6, exact truth) is rendered once in float64 and converted to each type, with offsets and scales that
put the values where real data of that type lies (12-bit data in int32 minus 500, int64 at 1e12, floats around
1e-3, 1e6 and 1e9, ...). Each is registered with `sphero fit` (defaults, in-process) in a Zarr v3 and, for a few,
a Zarr v2 store; printed: mean error of the composed transforms against the truth, worst slice, mean NCC after,
status of the pairs, the output's dtype and format. A constant stack must be refused.

    python benchmarks/dtypes.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import zarr

from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr

CASES = {
    "uint8": lambda b: np.clip(np.rint(b), 0, 255).astype(np.uint8),
    "int8": lambda b: np.clip(np.rint(b - 128), -128, 127).astype(np.int8),
    "int16": lambda b: np.rint(b * 100 - 12000).astype(np.int16),
    "int32 (12-bit data - 500)": lambda b: np.rint(b * 16 - 500).astype(np.int32),
    "int64 (offset 1e12)": lambda b: (np.rint(b * 1000).astype(np.int64) + 10**12),
    "uint16": lambda b: np.clip(np.rint(b * 257), 0, 65535).astype(np.uint16),
    "uint32 (offset 3e9)": lambda b: (np.rint(b * 1000).astype(np.uint32) + np.uint32(3_000_000_000)),
    "float16": lambda b: b.astype(np.float16),
    "float32 x 1e-3": lambda b: (b * 1e-3).astype(np.float32),
    "float32 x 1e6": lambda b: (b * 1e6).astype(np.float32),
    "float64": lambda b: b.astype(np.float64),
    "float64 (offset 1e9)": lambda b: b.astype(np.float64) + 1e9,
}
V2_CASES = ("uint8", "int32 (12-bit data - 500)", "float64 (offset 1e9)")


def run(stack: np.ndarray, truth: np.ndarray, root: Path, fmt: int) -> dict:
    write_zarr(stack, root, truth=truth, zarr_format=fmt)
    err_buf = io.StringIO()
    with contextlib.redirect_stderr(err_buf):
        sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false"])
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), truth, stack.shape[1:])
    log = out.attrs["registration_log"]
    return {"err": float(err.mean()), "worst": float(err.max()), "ncc": float(np.mean([e["ncc_after"] for e in log])),
            "status": sorted({e["status"] for e in log}), "dtype": str(out.dtype), "format": out.metadata.zarr_format}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = make_stack(em_like_image(a.size + 128, seed=a.seed), a.slices, (a.size, a.size), dtype="float64", seed=a.seed)
    base = s.stack.astype(np.float64)
    print(f"{a.slices} x {a.size} x {a.size}, seed {a.seed}; error of the composed transforms against the truth")
    print("| dtype | store | mean error (px) | worst slice (px) | mean NCC after | pair status | output |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, conv) in enumerate(CASES.items()):
            for fmt in ((3, 2) if name in V2_CASES else (3,)):
                r = run(conv(base), s.composed, Path(tmp) / f"c{i}-v{fmt}.zarr", fmt)
                print(f"| {name} | v{fmt} | {r['err']:.4f} | {r['worst']:.4f} | {r['ncc']:.3f} | {', '.join(r['status'])} "
                      f"| {r['dtype']}, v{r['format']} |", flush=True)
        const = np.full((4, 96, 96), 7, np.uint16)
        root = Path(tmp) / "const.zarr"
        write_zarr(const, root)
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            try:
                sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.logger", "false"])
                outcome = "ACCEPTED (wrong)"
            except SystemExit as exc:
                outcome = f"refused, exit {exc.code}: {buf.getvalue().strip().splitlines()[-1]}"
        print(f"constant uint16 stack: {outcome}")


if __name__ == "__main__":
    main()
