"""training/module.py (the ``--model.*`` options) end to end on synthetic stacks with exact truth: the transformation
families, the losses, the optimizers, the start (init_translation, init_std), the loss interpolation, regularisation,
pre-smoothing, and what the module logs to TensorBoard."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch
import yaml
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, make_stack, render, truth_composed
from sphero_lightning.core.transforms import describe, homogeneous, normalized_to_pixel
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr
from tests.conftest import (
    CONFIG,
    LEVELS3,
    OUT,
    fit,
    output_attrs,
    own_logs,
    register_synthetic,
    registered,
    registration_parameters,
    stack_store,
)

SPEC_ATTRS = {"spacing", "inputs", "processing", "pairwise_transforms", "composed_transforms", "registration_log", "crop_box"}


def _check_output(out: zarr.Array, n_slices: int, shape: tuple[int, int]) -> None:
    assert SPEC_ATTRS <= set(out.attrs)
    assert out.attrs["spacing"] == [50.0, 4.0, 4.0]
    assert out.attrs["inputs"] == ["images/50-4-4"]
    steps = [p["step_name"] for p in out.attrs["processing"]]
    assert steps == ["registration", "border_crop"]
    for p in out.attrs["processing"]:
        assert {"timestamp", "parameters", "version"} <= set(p)
    assert len(out.attrs["pairwise_transforms"]) == n_slices - 1
    assert len(out.attrs["composed_transforms"]) == n_slices - 1
    log = out.attrs["registration_log"]
    assert [r["pair_index"] for r in log] == list(range(n_slices - 1))
    assert all(r["slice_indices"] == [r["pair_index"], r["pair_index"] + 1] for r in log)
    assert all({"final_loss", "num_steps_taken", "status"} <= set(r) for r in log)
    up, down, left, right = out.attrs["crop_box"]
    assert out.shape == (n_slices, down - up, right - left)
    # Every pixel of the crop box samples inside every slice.
    mats = normalized_to_pixel(torch.tensor(out.attrs["composed_transforms"], dtype=torch.float64), shape).numpy()
    ys, xs = np.mgrid[up:down, left:right]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    for m in mats:
        q = m @ pts
        assert q[0].min() >= -1e-6 and q[0].max() <= shape[1] - 1 + 1e-6
        assert q[1].min() >= -1e-6 and q[1].max() <= shape[0] - 1 + 1e-6


#: Every stopping rule far tighter than the defaults (as benchmarks/convergence.py's tight run).
TIGHT = ("--early_stopping.step_tol_px", "0.0001", "--early_stopping.coarse_step_tol_px", "0.0001",
         "--early_stopping.newton_step_tol_px", "0.0001", "--early_stopping.tol", "1e-12", "--pyramid.steps", "400")


@pytest.fixture(scope="module")
def loss_stack(base_image):
    return make_stack(base_image, 4, (128, 128), seed=11)


def _loss_run(root, loss):
    fit(root, "--model.loss", loss, *LEVELS3)
    out = registered(root)
    assert out.attrs["processing"][0]["parameters"]["loss"] == loss
    return pixel_error_of_output(root, OUT), np.array([e["final_loss"] for e in out.attrs["registration_log"]])


@pytest.fixture(scope="module")
def reference_runs(loss_stack, tmp_path_factory):
    """ncc (the default) and mse on the same stack: the accuracy to reach, the loss values not to reproduce."""
    return {loss: _loss_run(stack_store(tmp_path_factory.mktemp(loss), loss_stack), loss) for loss in ("ncc", "mse")}


def _linear_parts(root, shape):
    pw = torch.tensor(registered(root).attrs["pairwise_transforms"], dtype=torch.float64)
    return normalized_to_pixel(pw, shape).numpy()[:, :2, :2], describe(pw, shape)


def _error(attrs, truth, shape) -> np.ndarray:
    """Composed-transform error per slice (px) against the truth."""
    return composed_error(np.asarray(attrs["composed_transforms"]), truth, shape)


def _first_step_loss(root) -> float:
    """TensorBoard ``loss/step`` at the run's first training step (run with ``--trainer.log_every_n_steps 1``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event,) = (root.parent / f"logs-{root.stem}").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event.parent), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars("loss/step")[0].value


def _fit_with_progress_bar(root, logs, *extra: str) -> str:
    """``sphero fit`` in-process with the progress bar on; returns what it wrote to stderr."""
    args = ["fit", "--config", CONFIG, "--data.root", str(root), "--data.array", "images/50-4-4",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(logs), *extra]
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        main(args)
    return buf.getvalue()


def _hparams(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in hp.items()}


def test_rigid_square(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "rigid", n=8, shape=(256, 256))
    _check_output(out, 8, (256, 256))
    assert out.dtype == np.uint8
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_rigid_non_square_two_degrees(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "rigid", n=8, shape=(192, 288), max_rot_deg=2.0)
    _check_output(out, 8, (192, 288))
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_affine_scale_and_shear(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "affine", n=8, shape=(256, 256),
                                  max_scale=0.02, max_shear=0.02)
    assert err <= 0.1, f"mean composed error {err:.4f} px"
    _check_output(out, 8, (256, 256))


def test_similarity_fits_isotropic_scale(tmp_path, base_image):
    # The reference pipeline's similarity silently equalled rigid; here it must recover a scale.
    s = make_stack(base_image, 4, (192, 192), max_shift=4, max_rot_deg=1, noise=2, seed=5)
    root = tmp_path / "s.zarr"
    # Scale every slice about its centre: slice k is 1 + 0.01 k larger.
    from sphero_lightning.core.synthetic import render

    tf = s.slice_transforms.copy()
    for k in range(len(tf)):
        tf[k, :, :2] *= 1 + 0.01 * k
    stack = np.clip(np.rint(render(base_image, tf, (192, 192))), 0, 255).astype(np.uint8)
    write_zarr(stack, root)
    fit(root, "--model.transformation", "similarity")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    from sphero_lightning.core.transforms import describe

    d = describe(torch.tensor(out.attrs["pairwise_transforms"], dtype=torch.float64), (192, 192))
    for k, row in enumerate(d):
        expect = (1 + 0.01 * k) / (1 + 0.01 * (k + 1))
        assert abs(row["scale_x"] - expect) < 1e-3 and abs(row["scale_y"] - expect) < 1e-3


def test_adam_and_other_losses_run(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.optimizer", "adam", "--model.loss", "mse",
                                  "--pyramid.steps", "150", n=3, shape=(128, 128))
    assert err < 0.05, f"adam/mse error {err:.4f} px"  # measured 0.0224 px
    assert out.attrs["processing"][0]["parameters"]["optimizer"] == "adam"


@pytest.mark.parametrize("shape,rot", [((384, 384), 1.0), ((288, 416), 2.0)])
def test_real_slice_at_spec_size(tmp_path, isbi_base, shape, rot):
    """The issue's measurement: 16 slices cut from one real ISBI slice, noise sigma 6."""
    err, out = register_synthetic(tmp_path, isbi_base, "--model.transformation", "rigid", n=16, shape=shape, max_rot_deg=rot)
    _check_output(out, 16, shape)
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_poorly_matching_slices_still_reach_the_optimum(tmp_path, base_image):
    """Slices that match poorly (heavy independent noise: NCC well below 0.9; their gradients' cross product is a
    small fraction of each slice's own) start every level from the Gauss-Newton model and stop on the looser
    Newton step rule: the default run still ends where a run with BFGS's own model converged far more tightly
    ends."""
    from sphero_lightning.core.synthetic import composed_error

    s = make_stack(base_image, 5, (128, 128), noise=70.0, seed=3)
    out = []
    for i, extra in enumerate(([], ["--model.curvature", "carried", "--early_stopping.step_tol_px", "0.0001",
                                         "--early_stopping.coarse_step_tol_px", "0.001"])):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(s.stack, root)
        fit(root, "--pyramid.levels", "3", *extra)
        a = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
        out.append(np.asarray(a.attrs["pairwise_transforms"]))
        log = a.attrs["registration_log"]
    assert max(e["ncc_after"] for e in log) < 0.9  # the case this test is about
    d = composed_error(out[0], out[1], (128, 128))
    assert d.max() < 0.02, d


def test_weakly_matching_real_sections_reach_the_tight_optimum(tmp_path):
    """ISBI sections 6, 9, 13, 16 (150-200 nm apart: NCC 0.08-0.17) used to end levels after one evaluation, on a short
    step of a Gauss-Newton model 50x too curved, and stopped 1.2-10 px from where a run with every stopping rule far
    tighter ends. Now a short step ends a level only once a step has confirmed the model: within 0.03 px."""
    from sphero_lightning.core.synthetic import composed_error
    from tests.conftest import ISBI_PATH

    if not ISBI_PATH.exists():
        pytest.skip(f"real data not available: {ISBI_PATH} is absent (CI has ../shared/data)")
    import tifffile

    stack = np.ascontiguousarray(tifffile.imread(str(ISBI_PATH))[[6, 9, 13, 16]])
    out = []
    for i, extra in enumerate(((), TIGHT)):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(stack, root)
        fit(root, "--model.transformation", "rigid", *extra)
        out.append(zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs)
    d = composed_error(np.asarray(out[0]["pairwise_transforms"]), np.asarray(out[1]["pairwise_transforms"]), stack.shape[1:])
    print(f"default vs tight: {d.round(4)} px; evaluations per level {[e['steps_per_level'] for e in out[0]['registration_log']]}")
    assert max(e["ncc_after"] for e in out[0]["registration_log"]) < 0.2  # weakly matching, the case of this test
    assert d.max() < 0.03, d


@pytest.mark.parametrize("loss", ["mae", "ssim"])
def test_other_losses_reach_the_ncc_accuracy(tmp_path, loss_stack, reference_runs, loss):
    """Catches a loss that silently computes another one (its final losses equal ncc's or mse's) or a wrong one (its
    error more than 2x ncc's)."""
    err, final = _loss_run(stack_store(tmp_path, loss_stack), loss)
    ncc_error = reference_runs["ncc"][0]
    assert err < max(2 * ncc_error, 0.05), f"{loss} error {err:.4f} px vs ncc {ncc_error:.4f} px"
    for other, (_, other_final) in reference_runs.items():
        assert not np.allclose(final, other_final, rtol=1e-3), f"{loss}'s final losses equal {other}'s: {final}"


def test_translation_family_has_identity_linear_part(tmp_path, base_image):
    """Catches the translation family letting rotation (or scale) through: the linear part is exactly the identity."""
    s = make_stack(base_image, 4, (128, 128), max_rot_deg=0.0, seed=12)
    root = stack_store(tmp_path, s)
    fit(root, "--model.transformation", "translation", *LEVELS3)
    pw = np.asarray(registered(root).attrs["pairwise_transforms"])
    assert np.array_equal(pw[:, :, :2], np.broadcast_to(np.eye(2), pw[:, :, :2].shape)), pw[:, :, :2]
    err = pixel_error_of_output(root, OUT)
    assert err < 0.05, f"translation error {err:.4f} px"


@pytest.mark.parametrize("extra", [("rigid",), ("similarity",), ("affine", "--model.shear", "false"),
                                   ("affine", "--model.scaling", "false")], ids=lambda e: "-".join(e))
def test_restricted_families_stay_in_their_family(tmp_path, base_image, extra):
    """Catches a family (or affine's scaling/shear switch) that lets scale or shear through on a stack that has both."""
    shape = (128, 128)
    s = make_stack(base_image, 4, shape, max_scale=0.02, max_shear=0.02, seed=13)
    root = stack_store(tmp_path, s)
    fit(root, "--model.transformation", *extra, *LEVELS3)
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
        fit(root, "--model.init_translation", mode, *LEVELS3)
        est = np.asarray(registered(root).attrs["composed_transforms"])
        errs[mode] = composed_error(est, truth, shape)
        assert len(registered(root).attrs["registration_log"]) == 2
    assert errs["phase"].max() < 0.1, errs
    print(f"init_translation none: composed error per slice {errs['none']} px")
    assert np.all(np.isfinite(errs["none"]))


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
        fit(root, *frozen, "--model.init_translation", mode, logs=own_logs(root))
        shifts[mode] = np.asarray(output_attrs(root)["composed_transforms_pixel"])[1][:2, 2]
    print(f"start kept by a frozen solver: {shifts}")
    assert np.abs(shifts["none"]).max() < 1e-3, shifts
    assert np.abs(np.abs(shifts["phase"]) - [12.0, 7.0]).max() < 1.0, shifts


def test_init_std_perturbs_the_start_reproducibly(tmp_path, base_image):
    """Catches ``init_std`` being ignored (same first-step loss as 0), noise that is not seeded (two runs with the same
    seed differ), or noise that changes the result (> 0.01 px)."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, seed=24)
    runs = {}
    for key, std, seed in (("none", "0", "0"), ("a", "0.02", "0"), ("b", "0.02", "0")):
        root = stack_store(tmp_path, s, f"{key}.zarr")
        fit(root, *LEVELS3, "--model.init_std", std, "--seed_everything", seed, "--trainer.log_every_n_steps", "1", logs=own_logs(root))
        runs[key] = (output_attrs(root), _first_step_loss(root))
        assert registration_parameters(runs[key][0])["init_std"] == float(std)
    first = {k: v[1] for k, v in runs.items()}
    comp = {k: np.asarray(v[0]["composed_transforms"]) for k, v in runs.items()}
    diff = {k: composed_error(c, comp["none"], shape).max() for k, c in comp.items()}
    print(f"init_std: first-step mean loss {first}; largest difference from init_std 0: {diff} px")
    assert first["a"] != first["none"], first
    assert first["a"] == first["b"] and np.array_equal(comp["a"], comp["b"])  # seed_everything: reproducible
    assert max(diff.values()) < 0.01, diff


def test_loss_interpolation_modes_differ_and_keep_their_accuracy(tmp_path, base_image):
    """Catches an interpolation mode that silently uses another (bit-identical transforms, or bicubic as accurate as
    bspline) or a broken one (error above ~2x what each gives here). A low-noise stack, where the interpolation's own
    error shows: measured 2026-11 (96 px, noise 1) bspline 0.0068, bspline2x 0.013, bicubic 0.043 px."""
    shape = (96, 96)
    s = make_stack(base_image, 4, shape, noise=1.0, seed=26)
    bound = {"bspline": 0.015, "bspline2x": 0.03, "bicubic": 0.09}
    comp, err = {}, {}
    for mode in bound:
        root = stack_store(tmp_path, s, f"{mode}.zarr")
        fit(root, *LEVELS3, "--model.interpolation", mode, logs=own_logs(root))
        attrs = output_attrs(root)
        assert registration_parameters(attrs)["loss_interpolation"] == mode
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
        root = stack_store(tmp_path, s, f"r{weight}.zarr")
        fit(root, *LEVELS3, "--model.transformation", "affine", "--model.regularization", weight, logs=own_logs(root))
        attrs = output_attrs(root)
        assert registration_parameters(attrs)["regularization"] == float(weight)
        fitted[weight] = describe(torch.tensor(attrs["pairwise_transforms"], dtype=torch.float64), shape)
        err[weight] = _error(attrs, s.composed, shape)
    print(f"regularization: errors {err} px; truth {[{k: round(d[k], 4) for k in keys} for d in truth]}; "
          f"fitted {({w: [{k: round(d[k], 4) for k in keys} for d in f] for w, f in fitted.items()})}")
    for d, t in zip(fitted["0"], truth):
        assert all(abs(d[k] - t[k]) < 0.003 for k in keys), (d, t)
    for d in fitted["1000"]:
        assert abs(d["scale_x"] - 1) < 0.002 and abs(d["scale_y"] - 1) < 0.002 and abs(d["shear"]) < 0.002, d
    assert err["0"].max() < 0.05 and err["1000"].mean() > 0.3, err


def test_smoothing_removes_the_noise_bias(tmp_path, base_image):
    """Catches ``smoothing`` being ignored (0 and the default give the same transforms) and the README's claim failing:
    without pre-smoothing the error on a noisy stack is larger. Measured 2026-11 on four 96-128 px stacks (noise 6
    and 12): 2.9x to 8x larger without it; asserted with margin: 2x."""
    shape = (96, 96)
    s = make_stack(base_image, 6, shape, noise=6.0, seed=29)
    comp, err = {}, {}
    for sigma in ("0", "0.7"):
        root = stack_store(tmp_path, s, f"sm{sigma}.zarr")
        fit(root, *LEVELS3, "--model.smoothing", sigma, logs=own_logs(root))
        attrs = output_attrs(root)
        assert registration_parameters(attrs)["smoothing"] == float(sigma)
        comp[sigma] = np.asarray(attrs["composed_transforms"])
        err[sigma] = _error(attrs, s.composed, shape)
    print(f"smoothing: composed error per slice, sigma 0: {err['0'].round(4)}, 0.7: {err['0.7'].round(4)} px")
    assert not np.array_equal(comp["0"], comp["0.7"])
    assert err["0"].mean() > 2 * err["0.7"].mean(), err
    assert err["0.7"].mean() < 0.03, err


def test_tensorboard_loss_levels_ncc_panels_hparams_and_progress(tmp_path, base_image, monkeypatch):
    monkeypatch.setenv("SPHERO_PROGRESS", "bar")  # tqdm's bar, as on a terminal (stderr is captured here)
    """One small run (5 misaligned pairs in 3 blocks, 3 pyramid levels): what TensorBoard, the log and the bar show."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sphero_lightning.training.callbacks import PairProgressBar

    monkeypatch.setattr(PairProgressBar, "mininterval", 0.0)  # the run is faster than tqdm's default redraw interval

    s = make_stack(base_image, 6, (128, 128), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    logs = tmp_path / "logs"
    err = _fit_with_progress_bar(root, logs, "--trainer.log_every_n_steps", "3", "--pyramid.levels", "3",
                                 "--pyramid.steps", "[100,100,50]", "--data.pairs_per_block", "2",
                                 "--solve.neighbours", "1")  # the plain chain: 5 pairs, 3 blocks
    events = list(logs.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    expect = {"loss/step", "loss/block_final", "pair/final_loss", "pair/qc_z", "pair/ncc_before", "pair/ncc_after",
              "loss/level_0", "loss/level_1", "loss/level_2"}
    assert expect <= set(tags["scalars"]), tags["scalars"]
    assert "loss/level_3" not in tags["scalars"]
    # loss/step: every 3rd training step (Lightning's logging step), not only with log_every_n_steps 1
    steps = [e.step for e in acc.Scalars("loss/step")]
    assert len(steps) >= 2 and all((st + 1) % 3 == 0 for st in steps), steps
    # per level: the block's mean loss at the end of the level, one point per block
    for k in range(3):
        assert [e.step for e in acc.Scalars(f"loss/level_{k}")] == [0, 1, 2]
    assert any(t.endswith("_after") for t in tags["images"]) and any(t.endswith("_before") for t in tags["images"])

    # NCC before/after per pair: registration improves every misaligned pair, and the log holds the same values
    before = {e.step: e.value for e in acc.Scalars("pair/ncc_before")}
    after = {e.step: e.value for e in acc.Scalars("pair/ncc_after")}
    assert sorted(before) == sorted(after) == list(range(5))
    log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
    for e in log:
        p = e["pair_index"]
        assert -1 <= e["ncc_before"] <= 1 and -1 <= e["ncc_after"] <= 1
        assert e["ncc_after"] > 0.95 and e["ncc_after"] > e["ncc_before"] + 0.1, e
        assert np.isclose(before[p], e["ncc_before"], atol=1e-6) and np.isclose(after[p], e["ncc_after"], atol=1e-6)
    mean_after = acc.Scalars("hp/mean_ncc_after")[-1].value
    assert np.isclose(mean_after, np.mean([e["ncc_after"] for e in log]), atol=1e-6)

    # hyperparameters: model, the run's pyramid and early stopping, data and output settings
    hp = _hparams(acc)
    assert hp["model/transformation"] == "rigid" and hp["model/loss"] == "ncc"
    assert hp["pyramid/levels"] == 3 and hp["pyramid/steps"] == "[100, 100, 50]" and hp["pyramid/factors"] == "[4.0, 2.0, 1.0]"
    assert hp["early_stopping/window"] == 15 and hp["early_stopping/tol"] == 1e-7
    assert hp["data/array"] == "images/50-4-4" and hp["data/n_pairs"] == 5 and hp["data/pairs_per_block"] == 2
    assert hp["output/interpolation"] == "bspline" and hp["solve/neighbours"] == 1
    saved = yaml.safe_load((events[0].parent / "hparams.yaml").read_text())
    assert saved["pyramid"]["steps"] == [100, 100, 50] and saved["early_stopping"]["step_tol_px"] == 0.003
    assert saved["early_stopping"]["newton_step_tol_px"] == 0.02

    # progress bar: pairs done of the total, a rate and a time left after the first block
    bar = [seg for seg in err.replace("\n", "\r").split("\r") if seg.startswith("registering:")]
    assert any(re.search(r" 2/5 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(pair/s|s/pair)", seg) for seg in bar), bar
    assert re.search(r" 5/5 \[\d\d:\d\d<00:00, +[\d.]+(pair/s|s/pair)", bar[-1]), bar[-1]


def test_ncc_after_from_the_solver_matches_a_fresh_evaluation(tmp_path, base_image):
    """With the ncc loss, ``ncc_after`` comes from the solver's last evaluation (no resampling); a loss keyword
    (the default eps, given explicitly) forces the resampled computation: both agree."""
    s = make_stack(base_image, 5, (96, 96), seed=4)
    afters = []
    for extra in ([], ["--model.loss_kwargs", '{"eps": 1e-8}']):
        root = tmp_path / f"s{len(afters)}.zarr"
        write_zarr(s.stack, root)
        fit(root, "--pyramid.levels", "2", *extra)
        log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
        afters.append([e["ncc_after"] for e in log])
    assert np.allclose(afters[0], afters[1], atol=1e-5), afters
    assert min(afters[0]) > 0.9


def test_the_record_says_which_family_was_fitted(fitted_stack):
    """Item 4: a rigid fit recorded ``scaling: true, shear: true`` (the switches) and Lightning's ``_instantiator``."""
    root = fitted_stack.root
    params = zarr.open_array(str(root), path=OUT, mode="r").attrs["processing"][-2]["parameters"]
    assert params["transformation"] == "rigid" and params["scaling"] is False and params["shear"] is False
    assert not any(k.startswith("_") for k in params), sorted(params)
