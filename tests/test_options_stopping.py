"""The loss-range stopping rule (``early_stopping.tol`` / ``window``, the reference's ``stop_tol`` / ``stop_window``) and
per-level ``step_tol_px`` lists (issue 17). The step-size rules end most pairs before the loss-range rule can, so
these tests switch them off to see the loss-range rule at work."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import fit

from sphero_lightning.core.synthetic import composed_error, make_stack
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"
SHAPE = (112, 112)
NO_STEP_RULES = ("--early_stopping.step_tol_px", "0", "--early_stopping.coarse_step_tol_px", "0",
                 "--early_stopping.newton_step_tol_px", "0", "--pyramid.levels", "3", "--pyramid.steps", "60")


@pytest.fixture(scope="module")
def stack(base_image):
    return make_stack(base_image, 4, SHAPE, seed=21)


def _run(tmp_path, s, name: str, *extra: str) -> zarr.Array:
    root = tmp_path / f"{name}.zarr"
    write_zarr(s.stack, root)
    fit(root, *extra)
    return zarr.open_array(str(root), path=OUT, mode="r")


def _steps(out: zarr.Array) -> list[list[int]]:
    return [e["steps_per_level"] for e in out.attrs["registration_log"]]


def test_tol_ends_levels_sooner_when_looser(tmp_path, stack):
    """Catches ``early_stopping.tol`` being ignored: a loose tolerance must stop pairs sooner than a strict one."""
    loose = _run(tmp_path, stack, "loose", *NO_STEP_RULES, "--early_stopping.window", "3", "--early_stopping.tol", "1e-2")
    strict = _run(tmp_path, stack, "strict", *NO_STEP_RULES, "--early_stopping.window", "3", "--early_stopping.tol", "1e-12")
    n_loose, n_strict = sum(map(sum, _steps(loose))), sum(map(sum, _steps(strict)))
    print(f"tol 1e-2: {_steps(loose)}; tol 1e-12: {_steps(strict)}")
    assert n_loose < n_strict, (_steps(loose), _steps(strict))
    # loss range < 1e-2 over 3 iterates: a level ends at its first chance, i.e. after exactly `window` evaluations
    assert all(n == 3 for per_level in _steps(loose) for n in per_level), _steps(loose)
    err = composed_error(np.asarray(strict.attrs["composed_transforms"]), np.asarray(stack.composed), SHAPE)
    assert err.mean() < 0.05, err  # the strict run converges


def test_window_is_the_fewest_evaluations_per_level(tmp_path, stack):
    """Catches ``early_stopping.window`` being ignored: with only the loss-range rule, no level can end before
    ``window`` evaluations (unless its step budget ends it first)."""
    steps = {}
    for window in (4, 9):
        out = _run(tmp_path, stack, f"w{window}", *NO_STEP_RULES, "--early_stopping.window", str(window),
                   "--early_stopping.tol", "1e-2")
        steps[window] = [n for per_level in _steps(out) for n in per_level]
        assert min(steps[window]) >= window, (window, _steps(out))  # never sooner
    assert min(steps[4]) == 4, steps  # the easiest levels end at their first chance
    assert sum(steps[9]) > sum(steps[4]), steps


def test_step_tol_px_list_sets_each_level(tmp_path, stack):
    """A per-level list: huge tolerances at the coarse levels end them after one evaluation; the finest keeps its own."""
    out = _run(tmp_path, stack, "list", "--pyramid.levels", "3", "--early_stopping.step_tol_px", "[100,100,0.003]",
               "--early_stopping.newton_step_tol_px", "0")
    steps = _steps(out)
    assert all(s[0] == 1 and s[1] == 1 for s in steps), steps
    assert any(s[2] > 1 for s in steps), steps
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), np.asarray(stack.composed), SHAPE)
    assert err.mean() < 0.05, err


def test_step_tol_px_list_of_the_wrong_length_is_one_line(tmp_path, stack):
    from test_first_hour import _assert_one_line_error, _fit_args
    from test_first_hour import _run as run_cli

    root = tmp_path / "bad.zarr"
    write_zarr(stack.stack, root)
    _assert_one_line_error(*run_cli(_fit_args(root, "--pyramid.levels", "3", "--early_stopping.step_tol_px", "[0.1,0.003]")),
                           "early_stopping.step_tol_px")
