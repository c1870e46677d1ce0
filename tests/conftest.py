"""Shared fixtures: synthetic stacks with exact truth, and an in-process ``sphero fit``."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, load_isbi_slice, make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

REPO = Path(__file__).resolve().parents[1]
#: The real data CI has beside the checkout (tests that need it skip, with this path, where it is absent).
SHARED_DATA = Path(os.environ.get("SPHERO_SHARED_DATA", REPO.parent / "shared" / "data"))
ISBI_PATH = SHARED_DATA / "isbi2012" / "train-volume.tif"
CONFIG = str(REPO / "configs" / "reg.yaml")


@pytest.fixture(scope="session")
def base_image() -> np.ndarray:
    """Procedural EM-like base image (needs no data)."""
    return em_like_image(512, seed=3)


@pytest.fixture(scope="session")
def isbi_base() -> np.ndarray:
    if not ISBI_PATH.exists():
        pytest.skip(f"real data not available: {ISBI_PATH} is absent (CI has ../shared/data)")
    return load_isbi_slice(ISBI_PATH, 0)


def fit_argv(root: Path, *extra: str, array: str = "images/50-4-4", config: bool = False, logs: Path | None = None,
             levels: int | None = None) -> list[str]:
    """The one ``sphero fit`` command line of the tests: ``root``'s ``array`` on the CPU without the progress bar;
    ``configs/reg.yaml`` with ``config``; TensorBoard into ``logs``, or no logger where ``logs`` is None; ``levels``
    pyramid levels (default the option's); then ``extra``."""
    args = ["fit", *(["--config", CONFIG] if config else []), "--data.root", str(root), "--data.array", array,
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger", "false"] if logs is None else ["--trainer.logger.init_args.save_dir", str(logs)]
    args += ["--pyramid.levels", str(levels)] if levels is not None else []
    return [*args, *extra]


def run_fit(argv: list[str]) -> str:
    """``sphero fit`` in-process with ``argv`` (:func:`fit_argv`); what it printed on stderr."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        main(argv)
    return buf.getvalue()


def fit(root: Path, *extra: str, array: str = "images/50-4-4", logs: Path | None = None) -> None:
    """Run ``sphero fit`` in-process on ``root`` with the project config, TensorBoard into ``logs`` (default beside
    ``root``)."""
    run_fit(fit_argv(root, *extra, array=array, config=True, logs=logs or root.parent / "logs"))


def register_synthetic(tmp_path: Path, base: np.ndarray, *extra: str, n: int = 8, shape=(256, 256), **kw) -> tuple[float, zarr.Array]:
    """Make a stack with known truth, register it, return (mean composed error px, output array)."""
    s = make_stack(base, n, shape, seed=kw.pop("seed", 0), **kw)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    fit(root, *extra)
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return pixel_error_of_output(root, "images/registered/50-4-4"), out
