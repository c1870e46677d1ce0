"""Advertised ``sphero fit`` options and behaviours no test exercised (issue 17): the pyramid's factors and learning
rate, ``newton_step_tol_px``, ``init_std``, the loss interpolation, regularisation, pre-smoothing, a damaged first
slice, resuming with another block size, Ctrl-C. Each test fails when its option is ignored."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import fit_argv, run_fit

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, make_stack, render, truth_composed
from sphero_lightning.core.transforms import describe, homogeneous
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.journal import Journal
from sphero_lightning.storage.stacks import write_zarr
from sphero_lightning.training.callbacks import PyramidSchedule

OUT = "images/registered/50-4-4"
LEVELS3 = ("--pyramid.levels", "3")
#: The plain chain (one neighbour): tests of the journal's bookkeeping count its pairs (slices - 1)
CHAIN = ("--solve.neighbours", "1")


def _stack(tmp_path, s, name="s.zarr", stack=None):
    root = tmp_path / name
    write_zarr(s.stack if stack is None else stack, root, truth=s.composed)
    return root


def _args(root, *extra: str) -> list[str]:
    return fit_argv(root, *extra, config=True, logs=root.parent / f"logs-{root.stem}")


def _fit(root, *extra: str) -> str:
    """``sphero fit`` in-process; returns what it printed on stderr."""
    return run_fit(_args(root, *extra))


def _fails(root, *extra: str) -> str:
    """``sphero fit`` that must stop with a user error: exit 2, returns its stderr."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as stop:
        main(_args(root, *extra))
    assert stop.value.code == 2
    return buf.getvalue()


def _attrs(root) -> dict:
    return dict(zarr.open_array(str(root), path=OUT, mode="r").attrs)


def _error(attrs, truth, shape) -> np.ndarray:
    """Composed-transform error per slice (px) against the truth."""
    return composed_error(np.asarray(attrs["composed_transforms"]), truth, shape)


def _params(attrs) -> dict:
    return attrs["processing"][0]["parameters"]


def _hparams_yaml(root) -> dict:
    (path,) = (root.parent / f"logs-{root.stem}").rglob("hparams.yaml")
    return yaml.safe_load(path.read_text())


def _first_step_loss(root) -> float:
    """TensorBoard ``loss/step`` at the run's first training step (run with ``--trainer.log_every_n_steps 1``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event,) = (root.parent / f"logs-{root.stem}").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event.parent), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars("loss/step")[0].value


# --- 1. pyramid.factors as a list ---------------------------------------------------------------------------------

def test_pyramid_factors_list_is_used(tmp_path, base_image):
    """Catches an explicit factor list being ignored (the default factor 2 gives [4, 2, 1]): the provenance, the
    logged hyperparameters and the per-level step counts show [5, 2, 1], and the result is as accurate."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, seed=41)
    root = _stack(tmp_path, s)
    _fit(root, *LEVELS3, "--pyramid.factors", "[5,2,1]")
    attrs = _attrs(root)
    assert [lv["factor"] for lv in _params(attrs)["pyramid"]] == [5.0, 2.0, 1.0], _params(attrs)["pyramid"]
    assert _hparams_yaml(root)["pyramid"]["factors"] == [5.0, 2.0, 1.0]
    assert all(len(e["steps_per_level"]) == 3 and e["finest_factor"] == 1.0 for e in attrs["registration_log"])
    err = _error(attrs, s.composed, shape)
    print(f"factors [5,2,1]: composed error per slice {err.round(4)} px")
    assert err.max() < 0.05, err


def test_pyramid_factors_wrong_list_is_one_line_error(tmp_path, base_image):
    """What the code enforces of a factor list: one entry per level, each >= 1, coarse to fine (a list in the wrong
    order ended the fit at factor 4: 0.08-0.34 px); otherwise one line, exit 2."""
    s = make_stack(base_image, 3, (64, 64), seed=42)
    root = _stack(tmp_path, s)
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


# --- 2. pyramid.learning_rate -------------------------------------------------------------------------------------

def test_pyramid_learning_rate_sets_adams_step(tmp_path, base_image):
    """Catches ``--pyramid.learning_rate`` being ignored with Adam: 1e-7 leaves every transform at its start (the
    identity, with ``init_translation none``: the step rule stops each level after one step), 0.01 converges."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, max_shift=3.0, max_rot_deg=0.5, seed=22)
    common = ("--model.optimizer", "adam", "--model.init_translation", "none", "--pyramid.levels", "2",
              "--pyramid.steps", "150")
    runs = {}
    for lr in ("1e-7", "0.01"):
        root = _stack(tmp_path, s, f"lr{lr}.zarr")
        _fit(root, *common, "--pyramid.learning_rate", lr)
        runs[lr] = _attrs(root)
        assert [lv["learning_rate"] for lv in _params(runs[lr])["pyramid"]] == [float(lr)] * 2
    still = np.abs(np.asarray(runs["1e-7"]["pairwise_transforms"]) - np.eye(3)[:2]).max()
    errs = {lr: _error(a, s.composed, shape) for lr, a in runs.items()}
    steps = {lr: [e["num_steps_taken"] for e in a["registration_log"]] for lr, a in runs.items()}
    print(f"adam learning rate: largest matrix entry moved at 1e-7: {still:.2e}; errors {errs} px; steps {steps}")
    assert still < 1e-5, still
    assert errs["1e-7"].min() > 1.0, errs
    assert errs["0.01"].max() < 0.05, errs


def test_init_translation_phase_sets_the_start_and_none_does_not(tmp_path, base_image):
    """Catches ``init_translation`` being ignored either way. With a frozen solver (adam at a learning rate of 1e-7)
    every pair ends where it started: ``phase`` starts from the phase-correlation shift (about the true 12 px),
    ``none`` from the identity. (Converged, both recover such shifts: tests/test_options.py.)"""
    shape = (96, 96)
    tf = np.zeros((2, 2, 3))
    tf[:, :, :2] = np.eye(2)
    tf[1, :, 2] = [12.0, -7.0]
    rng = np.random.default_rng(1)
    stack = np.clip(np.rint(render(base_image, tf, shape) + rng.normal(0, 4, (2, *shape))), 0, 255).astype(np.uint8)
    frozen = ("--model.optimizer", "adam", "--pyramid.learning_rate", "1e-7", "--pyramid.levels", "2")
    shifts = {}
    for mode in ("phase", "none"):
        root = tmp_path / f"{mode}.zarr"
        write_zarr(stack, root)
        _fit(root, *frozen, "--model.init_translation", mode)
        shifts[mode] = np.asarray(_attrs(root)["composed_transforms_pixel"])[1][:2, 2]
    print(f"start kept by a frozen solver: {shifts}")
    assert np.abs(shifts["none"]).max() < 1e-3, shifts
    assert np.abs(np.abs(shifts["phase"]) - [12.0, 7.0]).max() < 1.0, shifts


# --- 3. early_stopping.newton_step_tol_px ---------------------------------------------------------------------------

def test_newton_step_tol_px_sets_the_finest_levels_steps(tmp_path, base_image):
    """Catches ``newton_step_tol_px`` being ignored: with a strict ``step_tol_px`` (1e-4 px), 0 (the strict rule for
    Gauss-Newton pairs too) takes more finest-level evaluations than a loose 0.5 px, and both end within 0.005 px."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, seed=23)
    runs = {}
    for tol in ("0", "0.5"):
        root = _stack(tmp_path, s, f"n{tol}.zarr")
        _fit(root, *LEVELS3, "--early_stopping.step_tol_px", "1e-4", "--early_stopping.newton_step_tol_px", tol)
        runs[tol] = _attrs(root)
        assert _hparams_yaml(root)["early_stopping"]["newton_step_tol_px"] == float(tol)
    finest = {tol: [e["steps_per_level"][-1] for e in a["registration_log"]] for tol, a in runs.items()}
    diff = composed_error(np.asarray(runs["0"]["composed_transforms"]), np.asarray(runs["0.5"]["composed_transforms"]), shape)
    print(f"newton_step_tol_px: finest-level evaluations per pair {finest}; difference {diff.round(5)} px")
    assert sum(finest["0.5"]) < sum(finest["0"]), finest
    assert diff.max() < 0.005, diff
    for a in runs.values():
        assert _error(a, s.composed, shape).max() < 0.05


# --- 4. model.init_std ----------------------------------------------------------------------------------------------

def test_init_std_perturbs_the_start_reproducibly(tmp_path, base_image):
    """Catches ``init_std`` being ignored (same first-step loss as 0), noise that is not seeded (two runs with the same
    seed differ), or noise that changes the result (> 0.01 px)."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, seed=24)
    runs = {}
    for key, std, seed in (("none", "0", "0"), ("a", "0.02", "0"), ("b", "0.02", "0")):
        root = _stack(tmp_path, s, f"{key}.zarr")
        _fit(root, *LEVELS3, "--model.init_std", std, "--seed_everything", seed, "--trainer.log_every_n_steps", "1")
        runs[key] = (_attrs(root), _first_step_loss(root))
        assert _params(runs[key][0])["init_std"] == float(std)
    first = {k: v[1] for k, v in runs.items()}
    comp = {k: np.asarray(v[0]["composed_transforms"]) for k, v in runs.items()}
    diff = {k: composed_error(c, comp["none"], shape).max() for k, c in comp.items()}
    print(f"init_std: first-step mean loss {first}; largest difference from init_std 0: {diff} px")
    assert first["a"] != first["none"], first
    assert first["a"] == first["b"] and np.array_equal(comp["a"], comp["b"])  # seed_everything: reproducible
    assert max(diff.values()) < 0.01, diff


# --- 5. model.interpolation -----------------------------------------------------------------------------------------

def test_loss_interpolation_modes_differ_and_keep_their_accuracy(tmp_path, base_image):
    """Catches an interpolation mode that silently uses another (bit-identical transforms, or bicubic as accurate as
    bspline) or a broken one (error above ~2x what each gives here). A low-noise stack, where the interpolation's own
    error shows: measured 2026-11 (96 px, noise 1) bspline 0.0068, bspline2x 0.013, bicubic 0.043 px."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, noise=1.0, seed=26)
    bound = {"bspline": 0.015, "bspline2x": 0.03, "bicubic": 0.09}
    comp, err = {}, {}
    for mode in bound:
        root = _stack(tmp_path, s, f"{mode}.zarr")
        _fit(root, *LEVELS3, "--model.interpolation", mode)
        attrs = _attrs(root)
        assert _params(attrs)["loss_interpolation"] == mode
        comp[mode] = np.asarray(attrs["composed_transforms"])
        err[mode] = float(_error(attrs, s.composed, shape).mean())
    print(f"loss interpolation: mean composed error {err} px")
    for mode, limit in bound.items():
        assert err[mode] < limit, err
    modes = list(bound)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert not np.array_equal(comp[a], comp[b]), f"{a} and {b} give identical transforms"
    assert err["bicubic"] > 1.5 * err["bspline"], err


# --- 6. model.regularization ----------------------------------------------------------------------------------------

def test_regularization_weight_holds_scale_and_shear(tmp_path, base_image):
    """Catches ``regularization`` being ignored: on an affine stack with real scale (up to 5 %) and shear, weight 0
    fits them (within 0.003 of the truth), weight 1000 keeps them at the identity (within 0.002) and so misaligns."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, max_scale=0.03, max_shear=0.02, seed=28)
    c = homogeneous(torch.from_numpy(np.concatenate([np.eye(3)[None, :2], s.composed])))
    truth = describe((c[1:] @ torch.linalg.inv(c[:-1]))[:, :2], shape)  # pairwise: slice k -> k + 1
    keys = ("scale_x", "scale_y", "shear")
    assert max(abs(d["scale_x"] - 1) for d in truth) > 0.03  # the stack has scale to fit
    fitted, err = {}, {}
    for weight in ("0", "1000"):
        root = _stack(tmp_path, s, f"r{weight}.zarr")
        _fit(root, *LEVELS3, "--model.transformation", "affine", "--model.regularization", weight)
        attrs = _attrs(root)
        assert _params(attrs)["regularization"] == float(weight)
        fitted[weight] = describe(torch.tensor(attrs["pairwise_transforms"], dtype=torch.float64), shape)
        err[weight] = _error(attrs, s.composed, shape)
    print(f"regularization: errors {err} px; truth {[{k: round(d[k], 4) for k in keys} for d in truth]}; "
          f"fitted {({w: [{k: round(d[k], 4) for k in keys} for d in f] for w, f in fitted.items()})}")
    for d, t in zip(fitted["0"], truth):
        assert all(abs(d[k] - t[k]) < 0.003 for k in keys), (d, t)
    for d in fitted["1000"]:
        assert abs(d["scale_x"] - 1) < 0.002 and abs(d["scale_y"] - 1) < 0.002 and abs(d["shear"]) < 0.002, d
    assert err["0"].max() < 0.05 and err["1000"].mean() > 0.3, err


# --- 7. model.smoothing ---------------------------------------------------------------------------------------------

def test_smoothing_removes_the_noise_bias(tmp_path, base_image):
    """Catches ``smoothing`` being ignored (0 and the default give the same transforms) and the README's claim failing:
    without pre-smoothing the error on a noisy stack is larger. Measured 2026-11 on four 96-128 px stacks (noise 6
    and 12): 2.9x to 8x larger without it; asserted with margin: 2x."""
    shape = (96, 96)
    s = make_stack(base_image, 6, shape, noise=6.0, seed=29)
    comp, err = {}, {}
    for sigma in ("0", "0.7"):
        root = _stack(tmp_path, s, f"sm{sigma}.zarr")
        _fit(root, *LEVELS3, "--model.smoothing", sigma)
        attrs = _attrs(root)
        assert _params(attrs)["smoothing"] == float(sigma)
        comp[sigma] = np.asarray(attrs["composed_transforms"])
        err[sigma] = _error(attrs, s.composed, shape)
    print(f"smoothing: composed error per slice, sigma 0: {err['0'].round(4)}, 0.7: {err['0.7'].round(4)} px")
    assert not np.array_equal(comp["0"], comp["0.7"])
    assert err["0"].mean() > 2 * err["0.7"].mean(), err
    assert err["0.7"].mean() < 0.03, err


# --- 8. a damaged first slice ---------------------------------------------------------------------------------------

def test_damaged_first_slice_is_bridged(tmp_path, base_image):
    """Catches a constant slice 0 breaking the run or the chain: pair 0 is ``damaged_slice``, slice 1 becomes the
    reference (identity), and the later slices are accurate against the truth relative to slice 1."""
    shape = (96, 96)
    s = make_stack(base_image, 5, shape, seed=43)
    st = s.stack.copy()
    st[0] = 90
    root = _stack(tmp_path, s, stack=st)
    _fit(root, *LEVELS3)
    attrs = _attrs(root)
    log = attrs["registration_log"]
    assert [e["status"] for e in log] == ["damaged_slice", "ok", "ok", "ok"], log
    assert log[0]["damaged_slices"] == {"0": "constant"} and "bridged_by" not in log[0]
    assert all(e["ncc_after"] > 0.9 for e in log[1:])
    comp = np.asarray(attrs["composed_transforms"])  # slices 1..4
    assert np.allclose(comp[0], np.eye(3)[:2], atol=1e-12)
    err = composed_error(comp[1:], truth_composed(s.slice_transforms[1:], shape), shape)  # slices 2..4 against slice 1
    print(f"damaged slice 0: error of slices 2..4 relative to slice 1: {err.round(4)} px")
    assert err.max() < 0.05, err
    assert zarr.open_array(str(root), path=OUT, mode="r").shape[0] == 5


# --- 9. resume with another block size --------------------------------------------------------------------------------

def test_resume_with_another_block_size_reuses_finished_pairs(tmp_path, base_image, monkeypatch):
    """The journal's fingerprint leaves out the block size (README): a run stopped after 2 blocks of 2 pairs and
    continued with blocks of 4 skips the finished block, fits only the rest, and equals the uninterrupted run.
    Catches the block size entering the fingerprint (nothing reused) or finished pairs being fitted again."""
    shape = (96, 96)
    s = make_stack(base_image, 8, shape, seed=44)
    root = _stack(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:  # the journal stays behind, as after an interruption
        m.setattr(Journal, "remove", lambda self: None)
        _fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2")
    clean = _attrs(root)
    parts = sorted(p.name for p in journal.glob("pairs-*.json"))
    assert parts == [f"pairs-{a:08d}-{b:08d}.json" for a, b in ((0, 1), (2, 3), (4, 5), (6, 6))], parts
    for name in parts[2:]:  # interrupted after the second block
        (journal / name).unlink()
    for name in parts[:2]:  # mark the finished pairs, so a pair taken from the journal is recognisable
        doc = json.loads((journal / name).read_text())
        (journal / name).write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    shutil.rmtree(root / OUT)

    err = _fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "4")
    assert "resuming: 4 of 7 pairs finished earlier" in err and "1 of 2 blocks of 4 skipped" in err, err
    attrs = _attrs(root)
    log = attrs["registration_log"]
    assert [e["final_loss"] == 12345.0 for e in log] == [True] * 4 + [False] * 3, [e["final_loss"] for e in log]
    assert all(e["num_steps_taken"] > 0 and e["status"] == "ok" for e in log)
    assert _params(attrs)["pairs_per_block"] == 4
    diff = composed_error(np.asarray(attrs["composed_transforms"]), np.asarray(clean["composed_transforms"]), shape)
    assert diff.max() < 1e-4, diff
    assert not journal.exists()


def test_resume_on_two_ddp_processes_after_one(tmp_path, base_image, monkeypatch):
    """The fingerprint leaves out the number of devices too (README): a one-process run stopped after 2 blocks of 2
    pairs and continued as 2 CPU DDP processes reuses the 4 finished pairs and equals the uninterrupted run."""
    shape = (96, 96)
    s = make_stack(base_image, 8, shape, seed=46)
    root = _stack(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:
        m.setattr(Journal, "remove", lambda self: None)
        _fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2")
    clean = _attrs(root)
    parts = sorted(p.name for p in journal.glob("pairs-*.json"))
    for name in parts[2:]:
        (journal / name).unlink()
    for name in parts[:2]:
        doc = json.loads((journal / name).read_text())
        (journal / name).write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    shutil.rmtree(root / OUT)

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *_args(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2",
                        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming: 4 of 7 pairs finished earlier" in r.stderr, r.stderr[-3000:]
    attrs = _attrs(root)
    assert _params(attrs)["trainer"]["world_size"] == 2
    log = sorted(attrs["registration_log"], key=lambda e: e["pair_index"])
    assert [e["final_loss"] == 12345.0 for e in log] == [True] * 4 + [False] * 3, [e["final_loss"] for e in log]
    diff = composed_error(np.asarray(attrs["composed_transforms"]), np.asarray(clean["composed_transforms"]), shape)
    assert diff.max() < 1e-4, diff


# --- 10. Ctrl-C -------------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_with_one_line_and_the_rerun_resumes(tmp_path, base_image):
    """SIGINT while ``sphero fit`` is fitting: nothing at the final path, the journal keeps the finished pairs and the
    same command resumes from them. Documented (errors.interrupted): exit status 130 and one line on stderr."""
    shape = (96, 96)
    s = make_stack(base_image, 9, shape, seed=45)
    root = _stack(tmp_path, s)
    extra = ("--data.pairs_per_block", "1", *LEVELS3, *CHAIN)  # 8 blocks: time to interrupt in the middle
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "sphero_lightning", *_args(root, *extra)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline, sent = time.monotonic() + 300, False
    while p.poll() is None and time.monotonic() < deadline:
        if journal.exists() and Journal.count_saved(journal) >= 2:
            p.send_signal(signal.SIGINT)
            sent = True
            break
        time.sleep(0.005)
    _, stderr = p.communicate(timeout=300)
    assert sent, f"the run ended on its own (return code {p.returncode}) before it could be interrupted"
    assert not (root / OUT).exists()
    done = Journal.count_saved(journal)
    assert 2 <= done < 8, done

    err = _fit(root, *extra)
    assert f"resuming: {done} of 8 pairs finished earlier" in err, err
    assert _error(_attrs(root), s.composed, shape).max() < 0.1

    lines = stderr.strip().splitlines()
    assert p.returncode == 130, (p.returncode, stderr)
    assert len(lines) == 1 and lines[0].startswith("sphero fit: interrupted;"), stderr



def test_ctrl_c_after_the_output_is_written_says_so(tmp_path, base_image, monkeypatch):
    """Ctrl-C while the alignment page is built (the output already in place): exit 130 and one line that names the
    written output, not "no output was written"."""
    from sphero_lightning.training import report

    def interrupted_page(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; sphero's handler turns it into KeyboardInterrupt
        time.sleep(1)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(report, "report_page", interrupted_page)
    s = make_stack(base_image, 3, (64, 64), seed=47)
    root = _stack(tmp_path, s)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(_args(root, *LEVELS3))
    assert exc.value.code == 130, err.getvalue()[-2000:]
    lines = [ln for ln in err.getvalue().splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and f"the output {root}/{OUT} was written before" in lines[0], err.getvalue()[-2000:]
    assert (root / OUT).exists()


def test_ctrl_c_before_any_pair_is_fitted_leaves_no_empty_log_folder(tmp_path, base_image, monkeypatch):
    """Issue 29: Ctrl-C during the first block left logs/sphero/version_N with a config and an empty TensorBoard run;
    now the folder goes with it (exit 130, one line)."""
    from sphero_lightning.core import fit as core_fit

    def interrupted_step(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first block is being fitted
        time.sleep(1)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(core_fit.BlockFit, "step", interrupted_step)
    s = make_stack(base_image, 3, (64, 64), seed=48)
    root = _stack(tmp_path, s)
    logs = tmp_path / "logs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(logs), *LEVELS3])
    assert exc.value.code == 130, err.getvalue()[-2000:]
    assert not list(logs.rglob("version_*")), list(logs.rglob("*"))
