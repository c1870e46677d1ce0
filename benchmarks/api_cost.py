"""The Python API's fixed cost in a warm process (issue 27): ``register_stack`` on a 4 x 128 x 128 stack, against
``sphero fit`` run in the same process on the same stack in a temporary store (what the API did before: copy, command
line, journal, output, page). Medians of alternating repeats after one warm-up call of each.

    python benchmarks/api_cost.py
    python benchmarks/api_cost.py --repeats 11 --slices 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from sphero_lightning import register_stack
from sphero_lightning.commands.main import main as sphero
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr


def cli_in_process(stack, work: Path) -> None:
    root = work / f"s{time.monotonic_ns()}.zarr"
    write_zarr(stack, root)
    with contextlib.redirect_stderr(io.StringIO()):
        sphero(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slices", type=int, default=4)
    a = ap.parse_args()
    stack = make_stack(em_like_image(256, seed=1), a.slices, (128, 128), seed=2).stack
    times: dict[str, list[float]] = {"register_stack": [], "sphero fit in process": []}
    with tempfile.TemporaryDirectory() as tmp:
        register_stack(stack)
        cli_in_process(stack, Path(tmp))  # warm-up
        for _ in range(a.repeats):
            for name, run in (("register_stack", lambda: register_stack(stack)),
                              ("sphero fit in process", lambda: cli_in_process(stack, Path(tmp)))):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:24s} {a.slices} x 128 x 128: median {statistics.median(ts):.3f} s (min {min(ts):.3f}, "
              f"max {max(ts):.3f}, {a.repeats} repeats)")


if __name__ == "__main__":
    main()
