"""Damaged slices, resume after SIGKILL, interrupted writes (issue 5)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import fit

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, make_stack
from sphero_lightning.core.transforms import chain_with_gaps, compose, homogeneous
from sphero_lightning.storage.journal import Journal
from sphero_lightning.storage.slices import damaged_slices, slice_stats
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

REPO = Path(__file__).resolve().parents[1]
OUT = "images/registered/50-4-4"


def _registered(root: Path) -> zarr.Array:
    return zarr.open_array(str(root), path=OUT, mode="r")


def test_slice_scan_finds_blank_constant_and_nan(base_image):
    s = make_stack(base_image, 6, (64, 64), seed=0, dtype="float32")
    st = s.stack.copy()
    st[1] = 0
    st[2] = np.nan
    st[2, 5:10, 5:10] = 7.0  # a few finite pixels: still mostly NaN
    st[3] = st[3].mean() + np.random.default_rng(0).normal(0, 0.5, st[3].shape)  # faint noise, no content
    st[4, 4, 4] = np.nan  # one NaN pixel: registered (left out of the loss), not damaged
    stats = np.array([slice_stats(im) for im in st])
    bad = damaged_slices(stats, 0.05)
    assert sorted(bad) == [1, 2, 3]
    assert bad[1] == "constant" and "non-finite values (NaN or inf) over 100 % of the slice" == bad[2] and bad[3].startswith("blank")
    assert 0.99 < stats[4, 0] < 1.0


def test_chain_with_gaps_interpolates_and_stays_consistent():
    rng = np.random.default_rng(0)
    mats = [np.array([[1, 0.01 * rng.normal(), 0.02 * rng.normal()], [0.01 * rng.normal(), 1, 0.02 * rng.normal()]])
            for _ in range(3)]
    # slices 0..5; slices 2 and 3 damaged: fitted pairs (0,1), (1,4), (4,5)
    fitted = [{"slice_indices": [a, b], "matrix": m.tolist(), "final_loss": 0.1, "status": "ok"}
              for (a, b), m in zip([(0, 1), (1, 4), (4, 5)], mats)]
    composed, pairwise, log = chain_with_gaps(6, fitted, {2: "constant", 3: "constant"})
    c = compose(torch.tensor(np.stack(mats)))  # C_1, C_4, C_5
    assert torch.allclose(composed[0], torch.eye(3, dtype=torch.float64)[:2])
    assert torch.allclose(composed[1], c[0]) and torch.allclose(composed[4], c[1]) and torch.allclose(composed[5], c[2])
    assert torch.allclose(composed[2], (2 * c[0] + c[1]) / 3)  # a third of the way from slice 1 to slice 4
    # the pairwise transforms chain to the composed ones
    assert torch.allclose(compose(pairwise), composed[1:], atol=1e-12)
    assert [e["status"] for e in log] == ["ok", "damaged_slice", "damaged_slice", "damaged_slice", "ok"]
    assert log[2]["bridged_by"]["slice_indices"] == [1, 4]
    assert all(e["slice_indices"] == [i, i + 1] for i, e in enumerate(log))
    assert torch.allclose(homogeneous(pairwise[0:1])[0, :2], torch.tensor(mats[0]))


def test_uint16_stack_with_blank_slice_is_bridged(tmp_path, base_image):
    s = make_stack(base_image, 10, (192, 192), seed=2, dtype="uint16")
    st = s.stack.copy()
    st[5] = 0
    root = tmp_path / "s.zarr"
    write_zarr(st, root, truth=s.composed)
    fit(root)
    out = _registered(root)
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
    out = _registered(root)
    log = out.attrs["registration_log"]
    assert [e["pair_index"] for e in log if e["status"] == "damaged_slice"] == [1, 2]
    assert "non-finite" in log[1]["damaged_slices"]["2"]
    err = composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (128, 128))
    assert err[[0, 2, 3, 4]].max() <= 0.1, err  # slices 1, 3, 4, 5


def _sphero_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sphero_lightning", "fit", "--config", str(REPO / "configs" / "reg.yaml"),
            "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root.parent / "logs"), *extra]


def test_too_few_usable_slices_is_a_user_error(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=0)
    st = s.stack.copy()
    st[1:] = 7
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(_sphero_cmd(root), capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert any("fewer than 2 usable slices" in ln for ln in r.stderr.splitlines()), r.stderr[-2000:]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_sigkill_then_rerun_resumes_and_matches_a_clean_run(tmp_path, base_image, masked):
    """Kill a run with SIGKILL after some blocks; the same command again finishes the rest, same result. With the
    default two neighbours (issue 25): 20 consecutive pairs and 19 at distance 2, all in the journal. ``masked``
    (issue 26): a static dark frame left out with --data.ignore_value 0; the resumed pairs keep their mask_kept."""
    s = make_stack(base_image, 21, (128, 128), seed=5)
    extra = ("--data.pairs_per_block", "1")  # 39 blocks: many chances to be killed in the middle
    stack = s.stack.copy()
    if masked:
        stack[:, :16] = 0
        extra += ("--data.ignore_value", "0")
    total = 20 + 19
    clean, killed = tmp_path / "clean.zarr", tmp_path / "killed.zarr"
    for root in (clean, killed):
        write_zarr(stack, root, truth=s.composed)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(_sphero_cmd(clean, *extra), check=True, capture_output=True, env=env, timeout=600, cwd=tmp_path)

    journal = killed / "images" / "registered" / "tmp-50-4-4-journal"
    p = subprocess.Popen(_sphero_cmd(killed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    done, deadline = 0, time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if journal.exists():
            done = Journal.count_saved(journal)
            if done >= 8:
                os.kill(p.pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    p.wait()
    assert p.returncode == -signal.SIGKILL, f"the run ended on its own (return code {p.returncode}) before it could be killed"
    assert 8 <= done < total
    assert not (killed / "images" / "registered" / "50-4-4").exists()  # nothing at the final path

    r = subprocess.run(_sphero_cmd(killed, *extra), check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {done} of {total} pairs" in r.stderr
    a, b = _registered(clean), _registered(killed)
    diff = composed_error(np.asarray(b.attrs["composed_transforms"]), np.asarray(a.attrs["composed_transforms"]), (128, 128))
    assert diff.max() <= 1e-3
    assert np.array_equal(a[:], b[:])
    assert sorted(e["pair_index"] for e in b.attrs["registration_log"]) == list(range(20))
    # pairs from the journal carry their NCC too
    for key in ("ncc_before", "ncc_after") + (("mask_kept",) if masked else ()):
        assert [e[key] for e in b.attrs["registration_log"]] == [e[key] for e in a.attrs["registration_log"]]
    assert not journal.exists()  # removed once the output is in place


def test_journal_with_other_settings_is_not_reused(tmp_path, capsys):
    j = Journal(tmp_path / "j", {"model": {"loss": "ncc"}, "shape": (4, 8, 8)})
    j.save({0: {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "final_loss": float("inf")}})
    assert list(Journal(tmp_path / "j", {"model": {"loss": "ncc"}, "shape": [4, 8, 8]}).load()) == [0]
    # a valid zarr group, so zarr tools listing the store do not trip over it
    assert "sphero_journal" in zarr.open_group(str(tmp_path / "j"), mode="r").attrs
    other = Journal(tmp_path / "j", {"model": {"loss": "mse"}, "shape": [4, 8, 8]})
    assert other.load() == {}
    other.save({1: {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "final_loss": 0.5}})  # a run starting over
    assert capsys.readouterr().err.count("other settings") == 1  # said once, not again by the first save
    assert list(Journal(tmp_path / "j", {"model": {"loss": "mse"}, "shape": [4, 8, 8]}).load()) == [1]
    (tmp_path / "j" / "zarr.json").write_text("{ torn")
    assert Journal(tmp_path / "j", {}).load() == {}


def test_journal_saves_only_new_pairs_and_starts_over_for_other_settings(tmp_path):
    fp = {"model": {"loss": "ncc"}}
    j = Journal(tmp_path / "j", fp)
    results = {0: {"final_loss": 0.1}, 1: {"final_loss": 0.2}}
    j.save(results)
    j.save(results)  # nothing new: no new file
    results[2] = {"final_loss": 0.3}
    j.save(results)
    parts = sorted(p.name for p in (tmp_path / "j").glob("pairs-*.json"))
    assert parts == ["pairs-00000000-00000001.json", "pairs-00000002-00000002.json"]
    assert json.loads((tmp_path / "j" / parts[1]).read_text()) == {"2": {"final_loss": 0.3}}
    assert Journal.count_saved(tmp_path / "j") == 3
    again = Journal(tmp_path / "j", fp)
    assert again.load() == results
    again.save({**results, 3: {"final_loss": 0.4}})
    assert Journal.count_saved(tmp_path / "j") == 4
    # other settings: the old pairs are dropped when the new run saves
    other = Journal(tmp_path / "j", {"model": {"loss": "mse"}})
    assert other.load() == {}
    other.save({0: {"final_loss": 9.0}})
    assert Journal(tmp_path / "j", {"model": {"loss": "mse"}}).load() == {0: {"final_loss": 9.0}}


def test_leftover_partial_output_is_replaced(tmp_path, base_image):
    """A temporary array left by a run killed while writing does not stop or corrupt the next run."""
    s = make_stack(base_image, 4, (96, 96), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    g = zarr.open_group(str(root), mode="a").require_group("images/registered")
    junk = g.create_array("tmp-50-4-4-partial", shape=(2, 5, 5), dtype="uint8", fill_value=0)
    junk[:] = 99
    fit(root)
    assert _registered(root).shape[0] == 4
    assert pixel_error_of_output(root, OUT) < 0.05
    assert list(zarr.open_group(str(root), mode="r")["images/registered"].array_keys()) == ["50-4-4"]



@pytest.mark.parametrize("neighbours", ["1", "2"])
def test_a_default_run_says_which_slices_it_bridged_and_keeps_them_in_the_family(tmp_path, base_image, neighbours):
    """Issue 29 item 2: the damaged-slice line prints with the default slice check (it printed only with
    --data.check_slices false), and a bridged slice's interpolated transform stays in the fitted family (rigid: a
    rotation, no scale, no shear; it had scale 0.9995)."""
    from sphero_lightning.core.transforms import normalized_to_pixel

    s = make_stack(base_image, 8, (128, 128), seed=3, max_rot_deg=3.0)
    st = s.stack.copy()
    st[4] = 0
    root = tmp_path / "s.zarr"
    write_zarr(st, root)
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation", "rigid",
              "--solve.neighbours", neighbours, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    err = buf.getvalue()
    assert "1 damaged slice(s) left out and bridged over: slice 4: constant" in err, err
    comp = torch.tensor(np.asarray(_registered(root).attrs["composed_transforms"]), dtype=torch.float64)
    lin = normalized_to_pixel(comp, (128, 128))[:, :2, :2]
    gram = lin @ lin.transpose(1, 2)
    assert (gram - torch.eye(2)).abs().max() < 1e-9, gram[3]  # slice 4 (row 3) too: a pure rotation
