"""Advertised ``sphero fit`` options that had no guard (issue 17): each test fails on a deliberate break of its option."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import CONFIG, fit

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, make_stack, render, truth_composed
from sphero_lightning.core.transforms import describe, normalized_to_pixel
from sphero_lightning.storage.journal import Journal
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

OUT = "images/registered/50-4-4"
FAST = ("--pyramid.levels", "3")
#: The plain chain (one neighbour): where a test counts pairs as slices - 1
CHAIN = ("--solve.neighbours", "1")


def _out(root) -> zarr.Array:
    return zarr.open_array(str(root), path=OUT, mode="r")


def _stack(tmp_path, s, name="s.zarr"):
    root = tmp_path / name
    write_zarr(s.stack, root, truth=s.composed)
    return root


def _fit_stderr(root, *extra: str) -> str:
    """``sphero fit`` in-process, returning what it printed on stderr."""
    buf = io.StringIO()
    args = ["fit", "--config", CONFIG, "--data.root", str(root), "--data.array", "images/50-4-4",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(root.parent / "logs"), *extra]
    with contextlib.redirect_stderr(buf):
        main(args)
    return buf.getvalue()


# --- 1. losses -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loss_stack(base_image):
    return make_stack(base_image, 4, (128, 128), seed=11)


def _loss_run(root, loss):
    fit(root, "--model.loss", loss, *FAST)
    out = _out(root)
    assert out.attrs["processing"][0]["parameters"]["loss"] == loss
    return pixel_error_of_output(root, OUT), np.array([e["final_loss"] for e in out.attrs["registration_log"]])


@pytest.fixture(scope="module")
def reference_runs(loss_stack, tmp_path_factory):
    """ncc (the default) and mse on the same stack: the accuracy to reach, the loss values not to reproduce."""
    return {loss: _loss_run(_stack(tmp_path_factory.mktemp(loss), loss_stack), loss) for loss in ("ncc", "mse")}


@pytest.mark.parametrize("loss", ["mae", "ssim"])
def test_other_losses_reach_the_ncc_accuracy(tmp_path, loss_stack, reference_runs, loss):
    """Catches a loss that silently computes another one (its final losses equal ncc's or mse's) or a wrong one (its
    error more than 2x ncc's)."""
    err, final = _loss_run(_stack(tmp_path, loss_stack), loss)
    ncc_error = reference_runs["ncc"][0]
    assert err < max(2 * ncc_error, 0.05), f"{loss} error {err:.4f} px vs ncc {ncc_error:.4f} px"
    for other, (_, other_final) in reference_runs.items():
        assert not np.allclose(final, other_final, rtol=1e-3), f"{loss}'s final losses equal {other}'s: {final}"


# --- 2./3. transformation families -----------------------------------------------------------------------------

def test_translation_family_has_identity_linear_part(tmp_path, base_image):
    """Catches the translation family letting rotation (or scale) through: the linear part is exactly the identity."""
    s = make_stack(base_image, 4, (128, 128), max_rot_deg=0.0, seed=12)
    root = _stack(tmp_path, s)
    fit(root, "--model.transformation", "translation", *FAST)
    pw = np.asarray(_out(root).attrs["pairwise_transforms"])
    assert np.array_equal(pw[:, :, :2], np.broadcast_to(np.eye(2), pw[:, :, :2].shape)), pw[:, :, :2]
    err = pixel_error_of_output(root, OUT)
    assert err < 0.05, f"translation error {err:.4f} px"


def _linear_parts(root, shape):
    pw = torch.tensor(_out(root).attrs["pairwise_transforms"], dtype=torch.float64)
    return normalized_to_pixel(pw, shape).numpy()[:, :2, :2], describe(pw, shape)


@pytest.mark.parametrize("extra", [("rigid",), ("similarity",), ("affine", "--model.shear", "false"),
                                   ("affine", "--model.scaling", "false")], ids=lambda e: "-".join(e))
def test_restricted_families_stay_in_their_family(tmp_path, base_image, extra):
    """Catches a family (or affine's scaling/shear switch) that lets scale or shear through on a stack that has both."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, max_scale=0.02, max_shear=0.02, seed=13)
    root = _stack(tmp_path, s)
    fit(root, "--model.transformation", *extra, *FAST)
    lin, desc = _linear_parts(root, shape)
    if extra[0] == "rigid":  # a rotation: orthonormal, det +1
        for m in lin:
            assert np.allclose(m.T @ m, np.eye(2), atol=1e-6), m
            assert abs(np.linalg.det(m) - 1) < 1e-6
    elif extra[0] == "similarity":  # s R: no shear, equal scales, and a scale is fitted
        for m in lin:
            assert abs(m[0, 0] - m[1, 1]) < 1e-6 and abs(m[0, 1] + m[1, 0]) < 1e-6, m
        assert any(abs(d["scale_x"] - 1) > 1e-4 for d in desc)
    elif "--model.shear" in extra:
        assert all(abs(d["shear"]) < 1e-6 for d in desc), desc
        assert any(abs(d["scale_x"] - d["scale_y"]) > 1e-4 for d in desc)  # per-axis scale still free
    else:  # scaling off, shear on
        assert all(abs(d["scale_x"] - 1) < 1e-6 and abs(d["scale_y"] - 1) < 1e-6 for d in desc), desc
        assert any(abs(d["shear"]) > 1e-4 for d in desc)  # shear still free


# --- 4. init_translation -----------------------------------------------------------------------------------------

def test_init_translation_phase_captures_a_24px_shift(tmp_path, base_image):
    """Catches the default init losing a 24 px shift (must be within 0.1 px); ``none`` must run and report. Measured
    2026-11-26: ``none`` also recovers it (0.02 px, even with one pyramid level or a 48 px shift), so this cannot tell
    whether phase correlation ran."""
    shape = (128, 128)
    tf = np.zeros((3, 2, 3))
    tf[:, :, :2] = np.eye(2)
    tf[1, :, 2] = [24.0, -5.0]
    tf[2, :, 2] = [1.0, 3.0]
    rng = np.random.default_rng(0)
    stack = np.clip(np.rint(render(base_image, tf, shape) + rng.normal(0, 6, (3, *shape))), 0, 255).astype(np.uint8)
    truth = truth_composed(tf, shape)
    errs = {}
    for mode in ("phase", "none"):
        root = tmp_path / f"{mode}.zarr"
        write_zarr(stack, root, truth=truth)
        fit(root, "--model.init_translation", mode, *FAST)
        est = np.asarray(_out(root).attrs["composed_transforms"])
        errs[mode] = composed_error(est, truth, shape)
        assert len(_out(root).attrs["registration_log"]) == 2
    assert errs["phase"].max() < 0.1, errs
    print(f"init_translation none: composed error per slice {errs['none']} px")
    assert np.all(np.isfinite(errs["none"]))


# --- 5. early stopping ---------------------------------------------------------------------------------------------

def test_early_stopping_off_takes_more_steps_same_result(tmp_path, base_image):
    """Catches ``early_stopping.enabled false`` being ignored (same step count) or early stopping ending too soon."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, seed=14)
    runs = {}
    for flag in ("true", "false"):
        root = _stack(tmp_path, s, f"{flag}.zarr")
        fit(root, "--early_stopping.enabled", flag, "--pyramid.steps", "40", *FAST)
        runs[flag] = _out(root).attrs
    steps = {k: [e["num_steps_taken"] for e in a["registration_log"]] for k, a in runs.items()}
    assert sum(steps["false"]) > sum(steps["true"]), steps
    assert all(n == 3 * 40 for n in steps["false"]), steps  # every level's full budget
    diff = composed_error(np.asarray(runs["false"]["composed_transforms"]), np.asarray(runs["true"]["composed_transforms"]), shape)
    assert diff.max() < 0.01, diff


# --- 6. resume false -------------------------------------------------------------------------------------------------

def test_resume_false_ignores_a_matching_journal(tmp_path, base_image, monkeypatch):
    """Catches ``data.resume false`` still resuming: a matching journal is left, and every pair is fitted again."""
    s = make_stack(base_image, 4, (96, 96), seed=15)
    root = _stack(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:  # an interrupted run: its journal stays behind
        m.setattr(Journal, "remove", lambda self: None)
        fit(root, *FAST, *CHAIN)
    assert Journal.count_saved(journal) == 3
    # Mark the journal's pairs, so that a pair taken from it is recognisable in the output.
    for part in journal.glob("pairs-*.json"):
        doc = json.loads(part.read_text())
        part.write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    backup = tmp_path / "journal-copy"
    shutil.copytree(journal, backup)

    shutil.rmtree(root / OUT)
    err = _fit_stderr(root, "--data.resume", "false", *FAST, *CHAIN)
    assert "resuming" not in err, err
    log = _out(root).attrs["registration_log"]
    assert all(e["final_loss"] != 12345.0 and e["num_steps_taken"] > 0 for e in log), log

    # control: the same journal with the default resume is used (so the marker above can tell)
    shutil.rmtree(root / OUT)
    shutil.rmtree(journal, ignore_errors=True)
    shutil.copytree(backup, journal)
    err = _fit_stderr(root, *FAST, *CHAIN)
    assert "resuming: 3 of 3 pairs" in err, err
    assert all(e["final_loss"] == 12345.0 for e in _out(root).attrs["registration_log"])


# --- 7. check_slices false ------------------------------------------------------------------------------------------

def test_check_slices_false_fits_a_blank_slice_like_any_other(tmp_path, base_image):
    """Catches ``data.check_slices false`` still scanning (a damaged status) or the default no longer bridging."""
    s = make_stack(base_image, 5, (96, 96), seed=16)
    st = s.stack.copy()
    st[2] = 100
    statuses = {}
    for flag in ("true", "false"):
        root = tmp_path / f"{flag}.zarr"
        write_zarr(st, root)
        fit(root, "--data.check_slices", flag, *FAST)
        statuses[flag] = [e["status"] for e in _out(root).attrs["registration_log"]]
        assert len(statuses[flag]) == 4
    assert statuses["true"][1] == statuses["true"][2] == "damaged_slice", statuses
    assert "damaged_slice" not in statuses["false"], statuses


# --- 8. crop_borders false ------------------------------------------------------------------------------------------

def test_crop_borders_false_keeps_the_full_slice(tmp_path, base_image):
    """Catches ``output.crop_borders false`` still cropping."""
    s = make_stack(base_image, 4, (96, 112), seed=17)
    root = _stack(tmp_path, s)
    fit(root, "--output.crop_borders", "false", *FAST)
    out = _out(root)
    assert out.shape == (4, 96, 112)
    assert out.attrs["crop_box"] == [0, 96, 0, 112]


# --- 9. output interpolation ----------------------------------------------------------------------------------------

def test_output_interpolation_bicubic_and_bilinear(tmp_path, base_image):
    """Catches ``output.interpolation`` being ignored (output equal to bspline's) or broken (far from it), and the
    provenance not recording it."""
    s = make_stack(base_image, 4, (96, 96), seed=18)
    outs = {}
    for mode in ("bspline", "bicubic", "bilinear"):
        root = _stack(tmp_path, s, f"{mode}.zarr")
        fit(root, "--output.interpolation", mode, *FAST)
        out = _out(root)
        assert out.attrs["processing"][0]["parameters"]["output_interpolation"] == mode
        outs[mode] = out[:].astype(np.float64)
    ref = outs["bspline"]
    for mode in ("bicubic", "bilinear"):
        assert outs[mode].shape == ref.shape
        d = np.abs(outs[mode] - ref)[1:, 4:-4, 4:-4]  # slice 0 is not resampled
        assert d.max() > 0, f"{mode} output equals bspline's"
        assert d.mean() < 4.0, f"{mode}: mean difference {d.mean():.2f} grey levels"
