"""training/callbacks.py: the pyramid schedule (``--pyramid.*``), early stopping (``--early_stopping.*``; the loss-range
rule, ``tol`` / ``window``, and per-level ``step_tol_px`` lists) and the progress bar. The step-size rules end most
pairs before the loss-range rule can, so the loss-range tests switch them off to see it at work."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pytest
import yaml
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.training.callbacks import PyramidSchedule
from tests.conftest import (
    LEVELS3,
    OUT,
    assert_one_line_error,
    fit,
    fit_argv,
    output_attrs,
    own_logs,
    registered,
    registration_parameters,
    run_cli,
    stack_store,
)


def _fails(root, *extra: str) -> str:
    """``sphero fit`` that must stop with a user error: exit 2, returns its stderr."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as stop:
        main(fit_argv(root, *extra, config=True, logs=own_logs(root)))
    assert stop.value.code == 2
    return buf.getvalue()


def _error(attrs, truth, shape) -> np.ndarray:
    """Composed-transform error per slice (px) against the truth."""
    return composed_error(np.asarray(attrs["composed_transforms"]), truth, shape)


def _hparams_yaml(root) -> dict:
    (path,) = (root.parent / f"logs-{root.stem}").rglob("hparams.yaml")
    return yaml.safe_load(path.read_text())


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


def test_pyramid_factors_list_is_used(tmp_path, base_image):
    """Catches an explicit factor list being ignored (the default factor 2 gives [4, 2, 1]): the provenance, the
    logged hyperparameters and the per-level step counts show [5, 2, 1], and the result is as accurate."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, seed=41)
    root = stack_store(tmp_path, s)
    fit(root, *LEVELS3, "--pyramid.factors", "[5,2,1]", logs=own_logs(root))
    attrs = output_attrs(root)
    assert [lv["factor"] for lv in registration_parameters(attrs)["pyramid"]] == [5.0, 2.0, 1.0], registration_parameters(attrs)["pyramid"]
    assert _hparams_yaml(root)["pyramid"]["factors"] == [5.0, 2.0, 1.0]
    assert all(len(e["steps_per_level"]) == 3 and e["finest_factor"] == 1.0 for e in attrs["registration_log"])
    err = _error(attrs, s.composed, shape)
    print(f"factors [5,2,1]: composed error per slice {err.round(4)} px")
    assert err.max() < 0.05, err


def test_pyramid_factors_wrong_list_is_one_line_error(mistake_store):
    """What the code enforces of a factor list: one entry per level, each >= 1, coarse to fine (a list in the wrong
    order ended the fit at factor 4: 0.08-0.34 px); otherwise one line, exit 2."""
    root, _ = mistake_store
    for factors, expect in (("[4,1]", "pyramid factors has 2 entries but there are 3 pyramid levels"),
                            ("[4,0.5,1]", "--pyramid.factors must be >= 1, got [4, 0.5, 1]"),
                            ("[1,2,4]", "pyramid factors go from coarse to fine")):
        err = _fails(root, *LEVELS3, "--pyramid.factors", factors)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sphero fit: error: ") and expect in lines[0], err
    assert not (root / OUT).exists()


def test_pyramid_factors_not_coarse_to_fine_is_refused():
    with pytest.raises(SpheroError):
        PyramidSchedule(levels=3, factors=[1, 2, 4])


def test_pyramid_learning_rate_sets_adams_step(tmp_path, base_image):
    """Catches ``--pyramid.learning_rate`` being ignored with Adam: 1e-7 leaves every transform at its start (the
    identity, with ``init_translation none``: the step rule stops each level after one step), 0.01 converges."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, max_shift=3.0, max_rot_deg=0.5, seed=22)
    common = ("--model.optimizer", "adam", "--model.init_translation", "none", "--pyramid.levels", "2",
              "--pyramid.steps", "150")
    runs = {}
    for lr in ("1e-7", "0.01"):
        root = stack_store(tmp_path, s, f"lr{lr}.zarr")
        fit(root, *common, "--pyramid.learning_rate", lr, logs=own_logs(root))
        runs[lr] = output_attrs(root)
        assert [lv["learning_rate"] for lv in registration_parameters(runs[lr])["pyramid"]] == [float(lr)] * 2
    still = np.abs(np.asarray(runs["1e-7"]["pairwise_transforms"]) - np.eye(3)[:2]).max()
    errs = {lr: _error(a, s.composed, shape) for lr, a in runs.items()}
    steps = {lr: [e["num_steps_taken"] for e in a["registration_log"]] for lr, a in runs.items()}
    print(f"adam learning rate: largest matrix entry moved at 1e-7: {still:.2e}; errors {errs} px; steps {steps}")
    assert still < 1e-5, still
    assert errs["1e-7"].min() > 1.0, errs
    assert errs["0.01"].max() < 0.05, errs


def test_newton_step_tol_px_sets_the_finest_levels_steps(tmp_path, base_image):
    """Catches ``newton_step_tol_px`` being ignored: with a strict ``step_tol_px`` (1e-4 px), 0 (the strict rule for
    Gauss-Newton pairs too) takes more finest-level evaluations than a loose 0.5 px, and both end within 0.005 px."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, seed=23)
    runs = {}
    for tol in ("0", "0.5"):
        root = stack_store(tmp_path, s, f"n{tol}.zarr")
        fit(root, *LEVELS3, "--early_stopping.step_tol_px", "1e-4", "--early_stopping.newton_step_tol_px", tol, logs=own_logs(root))
        runs[tol] = output_attrs(root)
        assert _hparams_yaml(root)["early_stopping"]["newton_step_tol_px"] == float(tol)
    finest = {tol: [e["steps_per_level"][-1] for e in a["registration_log"]] for tol, a in runs.items()}
    diff = composed_error(np.asarray(runs["0"]["composed_transforms"]), np.asarray(runs["0.5"]["composed_transforms"]), shape)
    print(f"newton_step_tol_px: finest-level evaluations per pair {finest}; difference {diff.round(5)} px")
    assert sum(finest["0.5"]) < sum(finest["0"]), finest
    assert diff.max() < 0.005, diff
    for a in runs.values():
        assert _error(a, s.composed, shape).max() < 0.05


def test_early_stopping_off_takes_more_steps_same_result(tmp_path, base_image):
    """Catches ``early_stopping.enabled false`` being ignored (same step count) or early stopping ending too soon."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, seed=14)
    runs = {}
    for flag in ("true", "false"):
        root = stack_store(tmp_path, s, f"{flag}.zarr")
        fit(root, "--early_stopping.enabled", flag, "--pyramid.steps", "40", *LEVELS3)
        runs[flag] = registered(root).attrs
    steps = {k: [e["num_steps_taken"] for e in a["registration_log"]] for k, a in runs.items()}
    assert sum(steps["false"]) > sum(steps["true"]), steps
    assert all(n == 3 * 40 for n in steps["false"]), steps  # every level's full budget
    diff = composed_error(np.asarray(runs["false"]["composed_transforms"]), np.asarray(runs["true"]["composed_transforms"]), shape)
    assert diff.max() < 0.01, diff


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


def test_step_tol_px_list_of_the_wrong_length_is_one_line(mistake_store):
    root, _ = mistake_store
    assert_one_line_error(*run_cli(fit_argv(root, "--pyramid.levels", "3", "--early_stopping.step_tol_px", "[0.1,0.003]")),
                           "early_stopping.step_tol_px")


def test_the_progress_bar_says_what_it_counts_and_a_log_file_gets_lines(monkeypatch):
    """Item 6: the bar counted 29 pairs where the summary said 15 (pairs over one slice counted without saying); and
    written into a log file it was one line of carriage returns."""
    from sphero_lightning.storage import tasks
    from sphero_lightning.training.callbacks import PairProgressBar

    bar = PairProgressBar()
    bar.consecutive, bar.over, bar.bridges = 15, 14, 0
    assert bar._desc() == "registering pairs (15 consecutive + 14 over one slice or more)"
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)  # not a terminal
    line = tasks.progress_bar(29, bar._desc(), "pair")
    assert isinstance(line, tasks.LineProgress)
    line.every_s = 0.0
    line.update(10)
    line.close()
    out = buf.getvalue()
    assert "\r" not in out and out.count("\n") == 2 and "10/29 pairs (34 %)" in out, out
