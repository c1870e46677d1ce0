"""What a run shows: TensorBoard scalars and image panels, QC flags for outlying pairs."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import torch
import yaml
import zarr
from conftest import CONFIG, fit

from sphero_lightning.commands.main import main
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.records import flag_outliers
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr


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


def test_ncc_at_the_identity_needs_no_resampling(base_image):
    """``pair_ncc_identity`` (used for ``ncc_before``) equals ``pair_ncc`` at parameters 0."""
    img = torch.from_numpy(base_image[:192, :64].reshape(3, 64, 64).copy()).float() / 255
    for mode, tol in (("bspline", 1e-5), ("bicubic", 1e-5), ("bspline2x", 5e-3)):
        m = PairObjective(interpolation=mode, shape=(64, 64))
        imgs = m.level_stack(img.unsqueeze(1), 1.0)
        p = torch.zeros(2, m.n_params, dtype=torch.float64)
        resampled = m.pair_ncc(p, imgs[:-1], m.moving_coeffs(imgs[1:]))
        direct = m.pair_ncc_identity(p, imgs[:-1], imgs[1:])
        assert torch.allclose(resampled, direct, atol=tol), (mode, resampled, direct)
        assert direct.abs().max() < 0.9  # different slices: far from a perfect match


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


def test_outlying_pair_is_flagged(tmp_path, base_image):
    s = make_stack(base_image, 10, (128, 128), seed=2)
    st = s.stack.copy()
    other = em_like_image(512, seed=11)[100:228, 100:228]  # unrelated content: registers, but poorly
    st[6] = other
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    fit(root)
    log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
    flagged = sorted(e["pair_index"] for e in log if e.get("qc") == "outlier")
    assert flagged == [5, 6], [(e["pair_index"], e.get("qc_z")) for e in log]


def test_flag_outliers_robust_z():
    log = [{"final_loss": v, "pair_index": i} for i, v in enumerate([0.1, 0.11, 0.09, 0.1, 0.5, 0.1])]
    out = flag_outliers(log)
    assert [e["pair_index"] for e in out] == [4]
    assert all("qc_z" in e for e in log) and np.isclose(log[0]["qc_z"], 0.0)
