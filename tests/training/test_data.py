"""training/data.py (the ``--data.*`` options) end to end: every dtype and store the data module reads, what it checks
(damaged, blank and NaN slices, the contrast threshold), the blocks it makes (size, memory budget, max_pairs), and
resuming from the journal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from sphero_lightning import register_stack
from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack, truth_composed
from sphero_lightning.storage.journal import Journal
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr
from tests.conftest import (
    CHAIN,
    LEVELS3,
    OUT,
    QUIET,
    assert_one_line_error,
    fit,
    fit_argv,
    fit_attrs,
    output_attrs,
    own_logs,
    registered,
    registration_parameters,
    run_cli,
    sphero,
    stack_store,
)


@pytest.fixture()
def stack(base_image):
    return make_stack(base_image, 5, (128, 128), dtype="float64", seed=11)


DTYPES = {
    "int32 (12-bit minus 500)": lambda b: np.rint(b * 16 - 500).astype(np.int32),
    "int64 at 1e12": lambda b: np.rint(b * 1000).astype(np.int64) + 10**12,
    "uint16 (8-bit content)": lambda b: np.clip(np.rint(b), 0, 255).astype(np.uint16),
    "int8": lambda b: np.clip(np.rint(b - 128), -128, 127).astype(np.int8),
    "float32 x 1e-3": lambda b: (b * 1e-3).astype(np.float32),
    "float64 at 1e9": lambda b: b + 1e9,
}


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_and_range_registers_like_uint8(tmp_path, stack, name):
    ref = tmp_path / "u8.zarr"
    write_zarr(np.clip(np.rint(stack.stack), 0, 255).astype(np.uint8), ref, truth=stack.composed)
    assert run_cli(fit_argv(ref))[0] == 0
    data = DTYPES[name](stack.stack)
    root = tmp_path / "x.zarr"
    write_zarr(data, root, truth=stack.composed)
    code, err = run_cli(fit_argv(root))
    assert code == 0, err
    out = zarr.open_array(str(root), path=OUT, mode="r")
    assert out.dtype == data.dtype
    e_ref, e = pixel_error_of_output(ref, OUT), pixel_error_of_output(root, OUT)
    assert e < 0.03 and e < 1.5 * e_ref + 0.005, (name, e, e_ref)
    log = out.attrs["registration_log"]
    assert all(x["status"] == "ok" and x["ncc_after"] > 0.5 for x in log), log
    # values keep their range: the output's inside pixels lie within the source's range (plus a little overshoot)
    lo, hi = float(data.min()), float(data.max())
    o = np.asarray(out[:], dtype=np.float64)
    span = hi - lo
    assert lo - 0.2 * span <= o.min() and o.max() <= hi + 0.2 * span and o.std() > 0.05 * span


def test_constant_stack_is_refused_and_noise_is_never_ok(tmp_path):
    root = tmp_path / "c.zarr"
    write_zarr(np.full((4, 64, 64), 7, np.uint16), root)
    assert_one_line_error(*run_cli(fit_argv(root)), "fewer than 2 usable slices", "constant")
    # slices that share nothing: fitted, but never marked ok
    rng = np.random.default_rng(0)
    root = tmp_path / "n.zarr"
    write_zarr(rng.normal(1000, 50, (4, 96, 96)).astype(np.int32), root)
    code, err = run_cli(fit_argv(root))
    assert code == 0, err
    log = zarr.open_array(str(root), path=OUT, mode="r").attrs["registration_log"]
    assert all(e["status"] == "low_correlation" for e in log), log
    assert "cannot be trusted" in err


def test_blocks_of_large_slices_hold_at_most_block_pixels(tmp_path):
    """pairs_per_block is an upper bound: a block of large slices holds at most data.BLOCK_PIXELS pixels."""
    import zarr

    from sphero_lightning.training.data import BLOCK_PIXELS, ZarrPairDataModule

    root = tmp_path / "big.zarr"
    g = zarr.open_group(str(root), mode="w")
    for name, side in (("small", 256), ("mid", 2048), ("large", 4096)):
        a = g.create_array(name, shape=(3, side, side), dtype="uint8", chunks=(1, 256, 256))  # nothing written
        a.attrs["spacing"] = [50, 4, 4]
    got = {name: ZarrPairDataModule(str(root), name, dst_group=f"out_{name}").pairs_per_block
           for name in ("small", "mid", "large")}
    # the finest level of a 4096 px slice is 2048 x 2048 (pyramid.finest_max_pixels): the same block as 2048 px
    assert got == {"small": 32, "mid": BLOCK_PIXELS // 2048**2, "large": BLOCK_PIXELS // 2048**2}, got
    assert ZarrPairDataModule(str(root), "small", dst_group="o", pairs_per_block=5).pairs_per_block == 5
    # a small memory budget: one pair per block, one writer thread
    tight = ZarrPairDataModule(str(root), "mid", dst_group="t", memory_budget_gb=0.1)
    assert tight.pairs_per_block == 1 and tight.writer_threads(2048 * 2048, 4) == 1


def test_float32_input_keeps_dtype_and_values(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), dtype="float32", noise=0.0, seed=3)
    stack = (s.stack / 255.0).astype(np.float32)  # float data in [0, 1]
    root = tmp_path / "f.zarr"
    write_zarr(stack, root, truth=s.composed)
    r = sphero(*fit_argv(root, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode == 0, r.stderr[-2000:]
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.dtype == np.float32 and 0.0 <= float(out[:].min()) and float(out[:].max()) <= 1.05
    assert pixel_error_of_output(root, "images/registered/50-4-4") < 0.05


def test_max_pairs_and_uint16(tmp_path, base_image, monkeypatch):
    from sphero_lightning.training import data

    monkeypatch.setattr(data, "HOLD_BYTES", 0)  # streamed, as a large stack: the scan reads the source itself
    s = make_stack(base_image, 6, (128, 128), dtype="uint16", seed=2)
    s.stack[5] = 7  # a blank slice after the registered ones: not read, not reported
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    err = fit(root, "--data.max_pairs", "3", "--data.pairs_per_block", "2")
    assert "damaged" not in err, err
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.shape[0] == 4 and out.dtype == np.uint16
    assert out[:].max() > 255  # full value range kept
    src = zarr.open_array(str(root), path="images/50-4-4", mode="r")
    assert np.array_equal(src[:], s.stack)  # source untouched


def test_a_small_budget_and_a_capped_finest_level_give_the_unconstrained_result(capsys, tmp_path):
    s = make_stack(em_like_image(640, seed=2), 5, (512, 512), seed=4)
    free = register_stack(s.stack)
    capsys.readouterr()
    tight = register_stack(s.stack, options={"pyramid.finest_max_pixels": 65536, "data.memory_budget_gb": 0.01})
    err = capsys.readouterr().err
    # what the run chose, in its own words
    assert "1 pair(s) per block" in err, err
    assert "finest pyramid level is at 1/2 resolution (256 x 256 px" in err, err
    # the writer (sphero fit; the API writes nothing): 0.01 GB holds two 512 x 512 slices at 20 bytes a pixel
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--pyramid.finest_max_pixels", "65536",
              "--data.memory_budget_gb", "0.01"])
    assert "writing with 2 thread(s)" in buf.getvalue(), buf.getvalue()
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert composed_error(np.asarray(out.attrs["pairwise_transforms"]), tight.pairwise, (512, 512)).max() < 1e-6
    assert tight.settings["pairs_per_block"] == 1 and free.settings["pairs_per_block"] == 32
    d = composed_error(tight.pairwise, free.pairwise, (512, 512))
    assert d.mean() < 0.005 and d.max() < 0.01, d  # measured: 0.0048 mean, 0.0066 worst
    truth = composed_error(tight.composed, s.composed, (512, 512))
    assert truth.mean() < 0.01, truth
    assert np.array_equal(tight.crop_box, free.crop_box) or abs(np.subtract(tight.crop_box, free.crop_box)).max() <= 1


def test_resume_false_ignores_a_matching_journal(tmp_path, base_image, monkeypatch):
    """Catches ``data.resume false`` still resuming: a matching journal is left, and every pair is fitted again."""
    s = make_stack(base_image, 4, (96, 96), seed=15)
    root = stack_store(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:  # an interrupted run: its journal stays behind
        m.setattr(Journal, "remove", lambda self: None)
        fit(root, *LEVELS3, *CHAIN)
    assert Journal.count_saved(journal) == 3
    # Mark the journal's pairs, so that a pair taken from it is recognisable in the output.
    for part in journal.glob("pairs-*.json"):
        doc = json.loads(part.read_text())
        part.write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    backup = tmp_path / "journal-copy"
    shutil.copytree(journal, backup)

    shutil.rmtree(root / OUT)
    err = fit(root, "--data.resume", "false", *LEVELS3, *CHAIN)
    assert "resuming" not in err, err
    log = registered(root).attrs["registration_log"]
    assert all(e["final_loss"] != 12345.0 and e["num_steps_taken"] > 0 for e in log), log

    # control: the same journal with the default resume is used (so the marker above can tell)
    shutil.rmtree(root / OUT)
    shutil.rmtree(journal, ignore_errors=True)
    shutil.copytree(backup, journal)
    err = fit(root, *LEVELS3, *CHAIN)
    assert "resuming: 3 of 3 pairs" in err, err
    assert all(e["final_loss"] == 12345.0 for e in registered(root).attrs["registration_log"])


def test_check_slices_false_fits_a_blank_slice_like_any_other(tmp_path, base_image):
    """Catches ``data.check_slices false`` still scanning (a damaged status) or the default no longer bridging."""
    s = make_stack(base_image, 5, (96, 96), seed=16)
    st = s.stack.copy()
    st[2] = 100
    statuses = {}
    for flag in ("true", "false"):
        root = tmp_path / f"{flag}.zarr"
        write_zarr(st, root)
        fit(root, "--data.check_slices", flag, *LEVELS3)
        statuses[flag] = [e["status"] for e in registered(root).attrs["registration_log"]]
        assert len(statuses[flag]) == 4
    assert statuses["true"][1] == statuses["true"][2] == "damaged_slice", statuses
    assert "damaged_slice" not in statuses["false"], statuses


def test_min_contrast_sets_what_counts_as_blank(tmp_path, base_image):
    """A slice of faint contrast (about 3 % of the others' standard deviation): blank, and bridged over, at the
    default threshold of 5 %; an ordinary slice at a threshold of 1 %."""
    s = make_stack(base_image, 5, (96, 96), seed=2)
    stack = s.stack.astype(np.float64)
    stack[2] = stack[2].mean() + (stack[2] - stack[2].mean()) * 0.03
    stack = np.clip(np.rint(stack), 0, 255).astype(np.uint8)
    statuses = {}
    for threshold in ("0.05", "0.01"):
        root = tmp_path / f"t{threshold}.zarr"
        write_zarr(stack, root)
        with contextlib.redirect_stderr(io.StringIO()):
            main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--data.min_contrast", threshold,
                  "--pyramid.levels", "3", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
        log = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs["registration_log"]
        statuses[threshold] = [e["status"] for e in log]
    assert statuses["0.05"][1] == statuses["0.05"][2] == "damaged_slice", statuses
    assert "damaged_slice" not in statuses["0.01"], statuses


def test_damaged_first_slice_is_bridged(tmp_path, base_image):
    """Catches a constant slice 0 breaking the run or the chain: pair 0 is ``damaged_slice``, slice 1 becomes the
    reference (identity), and the later slices are accurate against the truth relative to slice 1."""
    shape = (96, 96)
    s = make_stack(base_image, 5, shape, seed=43)
    st = s.stack.copy()
    st[0] = 90
    root = stack_store(tmp_path, s, stack=st)
    fit(root, *LEVELS3, logs=own_logs(root))
    attrs = output_attrs(root)
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


def test_resume_with_another_block_size_reuses_finished_pairs(tmp_path, base_image, monkeypatch):
    """The journal's fingerprint leaves out the block size (README): a run stopped after 2 blocks of 2 pairs and
    continued with blocks of 4 skips the finished block, fits only the rest, and equals the uninterrupted run.
    Catches the block size entering the fingerprint (nothing reused) or finished pairs being fitted again."""
    shape = (96, 96)
    s = make_stack(base_image, 8, shape, seed=44)
    root = stack_store(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:  # the journal stays behind, as after an interruption
        m.setattr(Journal, "remove", lambda self: None)
        fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2", logs=own_logs(root))
    clean = output_attrs(root)
    parts = sorted(p.name for p in journal.glob("pairs-*.json"))
    assert parts == [f"pairs-{a:08d}-{b:08d}.json" for a, b in ((0, 1), (2, 3), (4, 5), (6, 6))], parts
    for name in parts[2:]:  # interrupted after the second block
        (journal / name).unlink()
    for name in parts[:2]:  # mark the finished pairs, so a pair taken from the journal is recognisable
        doc = json.loads((journal / name).read_text())
        (journal / name).write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    shutil.rmtree(root / OUT)

    err = fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "4", logs=own_logs(root))
    assert "resuming: 4 of 7 pairs finished earlier" in err and "1 of 2 blocks of 4 skipped" in err, err
    attrs = output_attrs(root)
    log = attrs["registration_log"]
    assert [e["final_loss"] == 12345.0 for e in log] == [True] * 4 + [False] * 3, [e["final_loss"] for e in log]
    assert all(e["num_steps_taken"] > 0 and e["status"] == "ok" for e in log)
    assert registration_parameters(attrs)["pairs_per_block"] == 4
    diff = composed_error(np.asarray(attrs["composed_transforms"]), np.asarray(clean["composed_transforms"]), shape)
    assert diff.max() < 1e-4, diff
    assert not journal.exists()


def test_resume_on_two_ddp_processes_after_one(tmp_path, base_image, monkeypatch):
    """The fingerprint leaves out the number of devices too (README): a one-process run stopped after 2 blocks of 2
    pairs and continued as 2 CPU DDP processes reuses the 4 finished pairs and equals the uninterrupted run."""
    shape = (96, 96)
    s = make_stack(base_image, 8, shape, seed=46)
    root = stack_store(tmp_path, s)
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    with monkeypatch.context() as m:
        m.setattr(Journal, "remove", lambda self: None)
        fit(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2", logs=own_logs(root))
    clean = output_attrs(root)
    parts = sorted(p.name for p in journal.glob("pairs-*.json"))
    for name in parts[2:]:
        (journal / name).unlink()
    for name in parts[:2]:
        doc = json.loads((journal / name).read_text())
        (journal / name).write_text(json.dumps({k: {**v, "final_loss": 12345.0} for k, v in doc.items()}))
    shutil.rmtree(root / OUT)

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *fit_argv(root, *LEVELS3, *CHAIN, "--data.pairs_per_block", "2",
                        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", config=True, logs=own_logs(root))],
                       capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming: 4 of 7 pairs finished earlier" in r.stderr, r.stderr[-3000:]
    attrs = output_attrs(root)
    assert registration_parameters(attrs)["trainer"]["world_size"] == 2
    log = sorted(attrs["registration_log"], key=lambda e: e["pair_index"])
    assert [e["final_loss"] == 12345.0 for e in log] == [True] * 4 + [False] * 3, [e["final_loss"] for e in log]
    diff = composed_error(np.asarray(attrs["composed_transforms"]), np.asarray(clean["composed_transforms"]), shape)
    assert diff.max() < 1e-4, diff


def test_uint16_stack_with_blank_slice_is_bridged(tmp_path, base_image):
    s = make_stack(base_image, 10, (192, 192), seed=2, dtype="uint16")
    st = s.stack.copy()
    st[5] = 0
    root = tmp_path / "s.zarr"
    write_zarr(st, root, truth=s.composed)
    fit(root)
    out = registered(root)
    assert out.dtype == np.uint16 and int(out[:].max()) > 255
    assert np.array_equal(zarr.open_array(str(root), path="images/50-4-4", mode="r")[:], st)  # source untouched
    log = out.attrs["registration_log"]
    assert [e["pair_index"] for e in log] == list(range(9))
    assert [e["pair_index"] for e in log if e["status"] != "ok"] == [4, 5]
    assert log[4]["damaged_slices"] == {"5": "constant"}
    assert log[4]["bridged_by"]["slice_indices"] == [4, 6] and log[4]["bridged_by"]["status"] == "ok"
    assert log[4]["ncc_after"] is None and log[4]["bridged_by"]["ncc_after"] > 0.9  # no NCC for a pair with a blank slice
    assert all(e["ncc_after"] > 0.9 for e in log if e["status"] == "ok")
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (192, 192))  # slices 1..9
    others = [z - 1 for z in range(1, 10) if z != 5]
    assert err[others].max() <= 0.1, err


def test_mostly_nan_slice_in_float_stack_is_bridged(tmp_path, base_image):
    s = make_stack(base_image, 6, (128, 128), seed=3, dtype="float32")
    st = s.stack.copy()
    st[2, :80] = np.nan  # 62 % of the slice
    root = tmp_path / "s.zarr"
    write_zarr(st, root, truth=s.composed)
    fit(root)
    out = registered(root)
    log = out.attrs["registration_log"]
    assert [e["pair_index"] for e in log if e["status"] == "damaged_slice"] == [1, 2]
    assert "non-finite" in log[1]["damaged_slices"]["2"]
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (128, 128))
    assert err[[0, 2, 3, 4]].max() <= 0.1, err  # slices 1, 3, 4, 5


def test_too_few_usable_slices_is_a_user_error(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=0)
    st = s.stack.copy()
    st[1:] = 7
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *fit_argv(root, config=True, logs=root.parent / "logs")], capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert any("fewer than 2 usable slices" in ln for ln in r.stderr.splitlines()), r.stderr[-2000:]


def test_a_nan_patch_is_left_out_of_the_loss_and_kept_where_it_lands(tmp_path):
    """A float slice with a NaN patch was left out and bridged (3.2 px off with jitter) and its output slice came back
    all NaN. Now it is registered with the patch left out of the loss, its output is NaN only where the patch lands,
    and a slice that is all NaN is still bridged over."""
    shape = (256, 256)
    s = make_stack(em_like_image(384, seed=5).astype(np.float64), 10, shape, max_shift=6, max_rot_deg=1.5, seed=4,
                   dtype="float32")
    stack = s.stack.copy()
    stack[5, 100:120, 20:220] = np.nan  # 6 % of the slice
    stack[8] = np.nan
    root = tmp_path / "s.zarr"
    write_zarr(stack, root)
    attrs, _ = fit_attrs(root, "--model.transformation", "rigid")
    log = attrs["registration_log"]
    assert [e["status"] for e in log if 5 in e["slice_indices"]] == ["ok", "ok"]
    assert [e["status"] for e in log if 8 in e["slice_indices"]] == ["damaged_slice", "damaged_slice"]
    e = composed_error(np.asarray(attrs["composed_transforms"]), s.composed, shape)
    assert e[4] < 0.05, e  # slice 5
    assert np.delete(e, 7).max() < 0.05, e  # every slice but the bridged 8
    out = np.asarray(zarr.open_array(str(root), path=OUT, mode="r")[:])
    nan5 = ~np.isfinite(out[5])
    # NaN where the 20 x 200 patch lands (inside the crop), finite everywhere else
    assert 0.5 * 20 * 200 < nan5.sum() <= 1.1 * 20 * 200, nan5.sum()
    rows, cols = np.nonzero(nan5)
    assert rows.max() - rows.min() <= 20 + 6 and cols.max() - cols.min() <= 200 + 6  # one compact patch (rotated <= 3 deg)
    assert np.isfinite(np.delete(out, [5, 8], axis=0)).all()
    assert not np.isfinite(out[8]).any()  # all NaN in, all NaN out


def test_a_small_stack_is_read_once_and_gives_the_streamed_output(tmp_path, base_image, monkeypatch):
    """A stack under data.HOLD_BYTES is read by the scan in one call and held for the fit and the writer (no other
    read of the source); with the limit at 0 it streams block by block; the outputs and transforms are the same."""
    from sphero_lightning.training import data

    s = make_stack(base_image, 9, (96, 96), dtype="uint16", seed=4)
    outputs = {}
    for hold in (data.HOLD_BYTES, 0):
        monkeypatch.setattr(data, "HOLD_BYTES", hold)
        root = tmp_path / f"h{hold}.zarr"
        write_zarr(s.stack, root, truth=s.composed)
        reads = []
        original = zarr.Array.__getitem__

        def counting(self, key, reads=reads, original=original):
            if self.shape == s.stack.shape and self.path.endswith("images/50-4-4"):
                reads.append(key)
            return original(self, key)

        monkeypatch.setattr(zarr.Array, "__getitem__", counting)
        fit(root, "--data.pairs_per_block", "4")
        monkeypatch.setattr(zarr.Array, "__getitem__", original)
        if hold:  # the scan's one read first; then only the page's (its reslices and its pairs' windows)
            assert reads[0] == slice(0, 9, None) and all(isinstance(k, (slice, tuple)) for k in reads), reads
            held = len(reads)
        else:  # runs of slices read by the scan, the fit and the writer, besides the page's reads
            assert reads[0] != slice(0, 9, None) and len(reads) > held + 6, reads
        outputs[hold] = (registered(root), output_attrs(root)["composed_transforms"])
    (a, ta), (b, tb) = outputs.values()
    np.testing.assert_array_equal(a, b)
    assert ta == tb
