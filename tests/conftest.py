"""Shared fixtures and helpers: synthetic stacks with exact truth, one small fitted stack, one store of mistakes, and
``sphero`` in-process or as a program.

The one ``sphero fit`` command line is :func:`fit_argv` (run in-process with :func:`run_fit`). A test that only reads
a result takes :func:`fitted_stack` (fitted once per session; copy it before writing into it); a test of a command-line
mistake takes :func:`mistake_store` (never written: the mistake must be refused before anything is).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, em_like_image, load_isbi_slice, make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

REPO = Path(__file__).resolve().parents[1]
#: The real data CI has beside the checkout (tests that need it skip, with this path, where it is absent).
SHARED_DATA = Path(os.environ.get("SPHERO_SHARED_DATA", REPO.parent / "shared" / "data"))
ISBI_PATH = SHARED_DATA / "isbi2012" / "train-volume.tif"
CONFIG = str(REPO / "configs" / "reg.yaml")
#: Where ``sphero fit`` writes the registration of ``images/50-4-4``.
OUT = "images/registered/50-4-4"
#: Three pyramid levels (a faster fit where the default's four are not needed).
LEVELS3 = ("--pyramid.levels", "3")
#: The plain chain (one neighbour): where a test counts pairs as slices - 1.
CHAIN = ("--solve.neighbours", "1")
#: The environment of a ``sphero`` program whose stderr must hold only its own lines.
QUIET = {"PYTHONWARNINGS": "ignore"}


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


def fit(root: Path, *extra: str, array: str = "images/50-4-4", logs: Path | None = None) -> str:
    """Run ``sphero fit`` in-process on ``root`` with the project config, TensorBoard into ``logs`` (default beside
    ``root``); what it printed on stderr."""
    return run_fit(fit_argv(root, *extra, array=array, config=True, logs=logs or root.parent / "logs"))


def own_logs(root: Path) -> Path:
    """A TensorBoard folder of ``root``'s own beside it (``logs-<name>``), for tests that fit several stores in one
    folder and read their logs."""
    return root.parent / f"logs-{root.stem}"


def fit_attrs(root: Path, *extra: str) -> tuple[dict, str]:
    """``sphero fit`` in-process with ``extra`` (TensorBoard beside ``root``): (the output's attributes, stderr)."""
    err = run_fit(fit_argv(root, *extra, logs=root.parent / "logs"))
    return output_attrs(root), err


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``sphero`` in-process (any command): (exit code, stderr)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def run_fit_on(devices: str, argv: list[str], cwd: Path) -> None:
    """``sphero fit`` with ``argv`` on ``devices`` CPU processes: one in this process, more as a program (DDP, started
    in ``cwd``)."""
    if devices == "1":
        run_fit(argv)
        return
    r = sphero(*argv, cwd=cwd, env=QUIET)
    assert r.returncode == 0, r.stderr[-3000:]


def sphero(*args: str, cwd: Path, env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """``sphero`` as a program (this interpreter's ``python -m sphero_lightning``) in ``cwd``, after ``prefix``."""
    return subprocess.run([*(prefix or []), sys.executable, "-m", "sphero_lightning", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600, check=False)


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    """A user error: exit status 2, no traceback, one ``...: error: ...`` line that holds every needle."""
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def registered(root: Path, path: str = OUT) -> zarr.Array:
    """The registered output of ``root`` (read-only)."""
    return zarr.open_array(str(root), path=path, mode="r")


def output_attrs(root: Path) -> dict:
    """The registered output's attributes."""
    return dict(registered(root).attrs)


def registration_parameters(attrs: dict) -> dict:
    """The settings of the registration (its ``processing`` entry)."""
    return next(p for p in attrs["processing"] if p["step_name"] == "registration")["parameters"]


def error_but(attrs: dict, truth: np.ndarray, shape: tuple[int, int], foreign: int) -> np.ndarray:
    """The composed error (px) of every slice of a registration but slice ``foreign`` (and slice 0, the reference)."""
    e = composed_error(np.asarray(attrs["composed_transforms"]), truth, shape)  # row k: slice k + 1
    return np.delete(e, foreign - 1)


def stack_store(tmp_path: Path, s, name: str = "s.zarr", stack: np.ndarray | None = None) -> Path:
    """Write the synthetic stack ``s`` (or ``stack`` with ``s``'s truth) as ``tmp_path / name``; its root."""
    root = tmp_path / name
    write_zarr(s.stack if stack is None else stack, root, truth=s.composed)
    return root


def register_synthetic(tmp_path: Path, base: np.ndarray, *extra: str, n: int = 8, shape=(256, 256), **kw) -> tuple[float, zarr.Array]:
    """Make a stack with known truth, register it, return (mean composed error px, output array)."""
    s = make_stack(base, n, shape, seed=kw.pop("seed", 0), **kw)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    fit(root, *extra)
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    return pixel_error_of_output(root, "images/registered/50-4-4"), out


@dataclass(frozen=True)
class Fitted:
    """A stack fitted once by ``sphero fit``: its store (source ``images/50-4-4``, output :data:`OUT`), the source
    slices, the truth (``make_stack``'s), the TensorBoard folder and what the run printed on stderr."""

    root: Path
    stack: np.ndarray
    truth: np.ndarray
    logs: Path
    err: str


@pytest.fixture(scope="session")
def fitted_stack(tmp_path_factory) -> Fitted:
    """6 slices of 128 x 128 with known misalignment, registered once per session with the defaults (rigid, the
    project's options as ``configs/reg.yaml`` has them, TensorBoard on, ``--trainer.precision 32-true`` said
    explicitly). For the tests that only read a result: never write into ``root`` (copy it, or give
    ``--data.output_root``)."""
    tmp = tmp_path_factory.mktemp("fitted")
    s = make_stack(em_like_image(256, seed=2), 6, (128, 128), seed=4)
    root = tmp / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    logs = tmp / "logs"
    err = run_fit(fit_argv(root, "--model.transformation", "rigid", "--trainer.precision", "32-true", logs=logs))
    return Fitted(root, s.stack, s.composed, logs, err)


@pytest.fixture(scope="session")
def mistake_store(tmp_path_factory, base_image) -> tuple[Path, np.ndarray]:
    """A valid stack of 3 slices of 64 x 64 (``images/50-4-4``) for the tests of mistakes on the command line: (root,
    slices). Nothing may be written into it (each test checks); a test that needs more in it copies it."""
    root = tmp_path_factory.mktemp("mistakes") / "s.zarr"
    stack = make_stack(base_image, 3, (64, 64), seed=1).stack
    write_zarr(stack, root)
    return root, stack
