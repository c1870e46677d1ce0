"""The output writer: dask tasks per chunk (today) against the thread-pool writer it replaced (commit 0eb3f34), side by side.

    python benchmarks/writer_throughput.py                 # 128 x 512 x 512 and 16 x 2048 x 2048, uint8
    python benchmarks/writer_throughput.py --repeats 1 --cases 128x512

Each writer runs in its own process on the same Zarr stack (so peak RSS is its own), alternating, ``--repeats``
times; printed: seconds, MB/s of output written, peak RSS (medians), and whether the outputs are voxel-identical.
The earlier writer is taken from git history (``git show 0eb3f34:sphero_lightning/storage/writing.py``), so run
this from a clone with its history. Both write with 4 threads (the default ``--output.num_workers``), the
default layout (one slice per chunk), B-spline interpolation, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "0eb3f34"


def make_stack(root: Path, n: int, size: int) -> None:
    import numpy as np
    import zarr

    from sphero_lightning.core.synthetic import em_like_image

    base = em_like_image(size, seed=4)
    arr = zarr.create_array(str(root), shape=(n, size, size), chunks=(1, size, size), dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(n):
        arr[z] = np.roll(base, tuple(rng.integers(-3, 4, 2)), (0, 1))


def one(which: str, src_root: str, out_root: str) -> None:
    """Child process: write the warped stack with one writer; print JSON (seconds, peak RSS)."""
    import numpy as np
    import torch
    import zarr

    src = zarr.open_array(src_root, mode="r")
    n, h, w = src.shape
    rng = np.random.default_rng(1)
    composed = torch.tensor([[[1.0, 0.002, 0.0], [-0.002, 1.0, 0.0]]] * (n - 1), dtype=torch.float64)
    composed[:, :, 2] += torch.from_numpy(rng.normal(0, 0.004, (n - 1, 2)))
    box = [6, h - 6, 6, w - 6]
    out = zarr.create_array(out_root, shape=(n, h - 12, w - 12), chunks=(1, h - 12, w - 12), dtype="uint8")
    if which == "old":
        code = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:sphero_lightning/storage/writing.py"],
                              capture_output=True, text=True, check=True).stdout
        code = code.replace("from ..core", "from sphero_lightning.core").replace("from ..errors", "from sphero_lightning.errors")
        namespace: dict = {"__name__": "old_writing"}
        exec(compile(code, "old_writing.py", "exec"), namespace)  # noqa: S102 - our own code from git history
        t0 = time.perf_counter()
        namespace["warp_slices"](src, out, composed, box, "bspline", num_workers=4)
    elif which == "cluster":  # a LocalCluster of 2 worker processes (2 threads each), by address; started before timing
        from distributed import LocalCluster

        from sphero_lightning.storage.writing import ArrayRef, warp_stack

        cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None)
        with cluster.get_client() as client:  # the workers import torch and the package before timing, as a warm cluster has
            client.run(__import__, "sphero_lightning.storage.writing")
        t0 = time.perf_counter()
        warp_stack(ArrayRef(src_root, ""), ArrayRef(out_root, ""), composed, box, "bspline", scheduler=cluster.scheduler_address)
        closing = time.perf_counter()
        cluster.close()
        t0 += time.perf_counter() - closing  # closing the cluster is not writing
    else:
        from sphero_lightning.storage.writing import warp_stack

        t0 = time.perf_counter()
        warp_stack(src, out, composed, box, "bspline", num_workers=4)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(json.dumps({"seconds": seconds, "rss_mb": rss, "out_mb": n * (h - 12) * (w - 12) / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["128x512", "16x2048"], help="NxSIZE stacks")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cluster", action="store_true", help="also the dask writer on a LocalCluster (2 processes x 2 threads)")
    ap.add_argument("--one", nargs=3, metavar=("WHICH", "SRC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(*a.one)
        return
    import numpy as np
    import zarr

    print(f"{'stack':<16} {'writer':<22} {'s':>7} {'MB/s':>7} {'peak RSS MB':>12}")
    for case in a.cases:
        n, size = (int(v) for v in case.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src.zarr"
            make_stack(src, n, size)
            kinds = ("old", "dask", "cluster") if a.cluster else ("old", "dask")
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for r in range(a.repeats):
                for which in kinds:
                    out = Path(tmp) / f"{which}{r}.zarr"
                    res = subprocess.run([sys.executable, __file__, "--one", which, str(src), str(out)],
                                         capture_output=True, text=True, check=True)
                    runs[which].append(json.loads(res.stdout.strip().splitlines()[-1]))
            same = np.array_equal(zarr.open_array(str(Path(tmp) / "old0.zarr"))[:], zarr.open_array(str(Path(tmp) / "dask0.zarr"))[:])
            labels = {"old": f"threads ({OLD_COMMIT})", "dask": "dask threads", "cluster": "dask LocalCluster*"}
            for which, label in labels.items():
                if which not in runs:
                    continue
                s = statistics.median(x["seconds"] for x in runs[which])
                rss = statistics.median(x["rss_mb"] for x in runs[which])
                print(f"{n} x {size}^2{'':<6} {label:<22} {s:7.2f} {runs[which][0]['out_mb'] / s:7.1f} {rss:12.0f}")
            if a.cluster:
                same = same and np.array_equal(zarr.open_array(str(Path(tmp) / "old0.zarr"))[:],
                                               zarr.open_array(str(Path(tmp) / "cluster0.zarr"))[:])
                print(f"{'':<16} * peak RSS of the client process only (the workers are processes of their own)")
            print(f"{'':<16} outputs voxel-identical: {same}")


if __name__ == "__main__":
    main()
