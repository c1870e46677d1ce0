"""commands/demo.py: ``sphero demo`` registers a stack with known misalignment and prints only what the user needs."""

from __future__ import annotations

import contextlib
import io
import subprocess

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from tests.conftest import sphero


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """``sphero demo`` (4 slices of 128 x 128) as a program, Python's warnings shown, run once for the tests that read
    what it printed."""
    tmp = tmp_path_factory.mktemp("demo")
    return sphero("demo", "--out", str(tmp / "demo"), "--slices", "4", "--size", "128", "128", cwd=tmp,
                  env={"PYTHONWARNINGS": "default"})


def test_demo_reports_its_error(demo_run):
    r = demo_run
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if "mean error" in ln)
    err = float(line.split(": ")[-1].split(" px")[0])
    assert err < 0.05


def test_a_demo_run_prints_only_what_the_user_needs(demo_run):
    r = demo_run
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in (r.stdout + r.stderr).replace("\r", "\n").splitlines() if ln.strip()]
    progress = ("registering", "writing", "checking slices")
    other = [ln for ln in lines if not ln.startswith("sphero") and not ln.startswith(progress)]
    assert not other, other
    text = "\n".join(lines).lower()
    for noise in ("warning", "tip", "gpu available", "tpu available", "configure_optimizers", "max_epochs", "deprecat", "seed set"):
        assert noise not in text, noise
    assert any("mean error" in ln for ln in lines) and any("sphero: wrote" in ln for ln in lines)


def test_demo_seed_changes_the_stack(tmp_path):
    """Break caught: --seed ignored (every demo the same stack)."""
    stacks = []
    for seed in (1, 2):
        out = tmp_path / f"d{seed}"
        with contextlib.redirect_stderr(io.StringIO()):
            main(["demo", "--out", str(out), "--slices", "3", "--size", "96", "96", "--seed", str(seed)])
        stacks.append(zarr.open_array(str(out / "demo.zarr"), path="images/50-4-4")[:])
    assert stacks[0].shape == stacks[1].shape and not np.array_equal(stacks[0], stacks[1])
