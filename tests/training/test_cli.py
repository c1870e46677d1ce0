"""training/cli.py (``run_fit``): ``sphero fit`` as a program. It runs from any directory without a config file, refuses
the Trainer options that would change the result, runs on 2 DDP processes, stops on Ctrl-C and SIGKILL and resumes,
refuses an existing output, prints its config."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack
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
    output_attrs,
    own_logs,
    registered,
    run_cli,
    snapshot,
    sphero,
    stack_store,
)


def _error(attrs, truth, shape) -> np.ndarray:
    """Composed-transform error per slice (px) against the truth."""
    return composed_error(np.asarray(attrs["composed_transforms"]), truth, shape)


def test_ddp_two_processes_on_cpu_matches_single_process(tmp_path, base_image):
    """15 pairs on 2 ranks (uneven split): every pair once, same result as one process, one output."""
    s = make_stack(base_image, 16, (96, 96), seed=4)
    roots = []
    for name, extra in (("one", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        root = tmp_path / f"{name}.zarr"
        write_zarr(s.stack, root, truth=s.composed)
        r = sphero(*fit_argv(root, "--data.pairs_per_block", "4", *extra, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
        assert r.returncode == 0, r.stderr[-3000:]
        # what was chosen is said (issue 29: two processes on one CPU used to start silently)
        assert ("sphero: 2 processes (DDPStrategy, cpu)" in r.stderr) == (name == "ddp"), r.stderr[-2000:]
        roots.append(root)
    one, ddp = (zarr.open_array(str(r), path="images/registered/50-4-4", mode="r") for r in roots)
    # the trainer really ran two processes (a quiet fallback to one process would pass every check below)
    for arr, world in ((one, 1), (ddp, 2)):
        step = next(p for p in arr.attrs["processing"] if p["step_name"] == "registration")
        trainer = step["parameters"]["trainer"]
        assert trainer["world_size"] == world, trainer
    assert sorted(r["pair_index"] for r in ddp.attrs["registration_log"]) == list(range(15))
    # NCC before/after, all-reduced across the ranks: every pair's values, as in one process
    for key in ("ncc_before", "ncc_after"):
        a = [e[key] for e in sorted(one.attrs["registration_log"], key=lambda e: e["pair_index"])]
        b = [e[key] for e in sorted(ddp.attrs["registration_log"], key=lambda e: e["pair_index"])]
        assert np.allclose(a, b, atol=1e-4), (key, a, b)
    from sphero_lightning.core.synthetic import composed_error

    diff = composed_error(np.asarray(ddp.attrs["composed_transforms"]), np.asarray(one.attrs["composed_transforms"]), (96, 96))
    assert diff.max() < 0.01, diff
    assert list(zarr.open_group(str(roots[1]), mode="r")["images/registered"].array_keys()) == ["50-4-4"]
    assert pixel_error_of_output(roots[1], "images/registered/50-4-4") < 0.05


def test_existing_output_is_refused_unless_overwrite(fitted_stack, tmp_path):
    root = tmp_path / "s.zarr"
    shutil.copytree(fitted_stack.root, root)  # a store with an output in place
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    stamp = out.attrs["processing"][0]["timestamp"]
    before = out[:]
    r = sphero(*fit_argv(root, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode != 0 and "already exists" in r.stderr and "--data.overwrite true" in r.stderr
    assert "Traceback" not in r.stderr
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.attrs["processing"][0]["timestamp"] == stamp and np.array_equal(out[:], before)
    r = sphero(*fit_argv(root, "--data.overwrite", "true", config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_bare_switch_means_true_like_ingest_s_flags(tmp_path):
    """Issue 29: ``sphero ingest --overwrite`` is a flag, ``sphero fit --data.overwrite`` wanted a value; now a bare
    switch means true (and ``false`` still turns it off)."""
    import contextlib
    import io

    from sphero_lightning.commands.main import main

    root = tmp_path / "s.zarr"
    write_zarr(make_stack(em_like_image(192, seed=2), 3, (64, 64), seed=2).stack, root)
    base = ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--pyramid.levels", "2"]
    with contextlib.redirect_stderr(io.StringIO()):
        main(base)
        main([*base[:3], "--data.overwrite", *base[3:]])  # bare, in the middle: replaced
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main([*base, "--data.overwrite", "false"])
    assert "already exists" in err.getvalue()


def test_fit_needs_no_config_file_and_runs_from_any_directory(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), seed=5)
    root = tmp_path / "data" / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = sphero("fit", "--data.root", str(root), "--data.array", "images/50-4-4", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    assert pixel_error_of_output(root, OUT) < 0.05
    assert (elsewhere / "logs" / "sphero").is_dir()  # TensorBoard output under ./logs by default
    assert list((elsewhere / "logs").rglob("config.yaml"))  # the run's settings beside its logs
    # without a logger nothing lands in the current directory (a config.yaml of the user's stays as it is)
    (elsewhere / "config.yaml").write_text("mine\n")
    r = sphero("fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--data.overwrite", "true",
                "--trainer.logger", "false", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (elsewhere / "config.yaml").read_text() == "mine\n"


def test_gpu_accelerator_without_a_gpu_is_one_line(mistake_store):
    import torch

    if torch.cuda.is_available():  # the check is for machines without one; CI has none
        pytest.skip("this machine has a GPU")
    root, _ = mistake_store
    assert_one_line_error(*run_cli(fit_argv(root, "--trainer.accelerator", "gpu")), "no CUDA GPU", "--trainer.accelerator cpu")


@pytest.mark.parametrize("option,value", [("fast_dev_run", "true"), ("precision", "16-mixed"), ("max_steps", "5"),
                                          ("max_epochs", "1"), ("min_epochs", "2"), ("min_steps", "3"),
                                          ("max_time", "00:00:01:00"), ("limit_train_batches", "0.5"),
                                          ("overfit_batches", "1"), ("accumulate_grad_batches", "2"),
                                          ("gradient_clip_val", "1.0")])
def test_trainer_options_that_change_the_result_are_refused(mistake_store, option, value):
    root, _ = mistake_store
    before = snapshot(root)
    assert_one_line_error(*run_cli(fit_argv(root, f"--trainer.{option}", value)), f"--trainer.{option}",
                           "would change the registration")
    assert snapshot(root) == before


def test_every_refused_trainer_option_is_tested():
    from sphero_lightning.training.state import RESULT_CHANGING

    marks = test_trainer_options_that_change_the_result_are_refused.pytestmark
    tested = {opt for m in marks if m.name == "parametrize" for opt, _ in m.args[1]}
    assert tested == set(RESULT_CHANGING), set(RESULT_CHANGING) ^ tested


def test_ckpt_path_is_refused_pointing_at_the_journal(mistake_store, tmp_path):
    root, _ = mistake_store
    before = snapshot(root)
    assert_one_line_error(*run_cli(fit_argv(root, "--ckpt_path", str(tmp_path / "last.ckpt"))), "--ckpt_path", "journal")
    assert snapshot(root) == before


def test_ctrl_c_stops_with_one_line_and_the_rerun_resumes(tmp_path, base_image):
    """SIGINT while ``sphero fit`` is fitting: nothing at the final path, the journal keeps the finished pairs and the
    same command resumes from them. Documented (errors.interrupted): exit status 130 and one line on stderr."""
    shape = (96, 96)
    s = make_stack(base_image, 9, shape, seed=45)
    root = stack_store(tmp_path, s)
    extra = ("--data.pairs_per_block", "1", *LEVELS3, *CHAIN)  # 8 blocks: time to interrupt in the middle
    journal = root / "images" / "registered" / "tmp-50-4-4-journal"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "sphero_lightning", *fit_argv(root, *extra, config=True, logs=own_logs(root))], stdout=subprocess.DEVNULL,
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

    err = fit(root, *extra, logs=own_logs(root))
    assert f"resuming: {done} of 8 pairs finished earlier" in err, err
    assert _error(output_attrs(root), s.composed, shape).max() < 0.1

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
    root = stack_store(tmp_path, s)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(fit_argv(root, *LEVELS3, config=True, logs=own_logs(root)))
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
    root = stack_store(tmp_path, s)
    logs = tmp_path / "logs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(logs), *LEVELS3])
    assert exc.value.code == 130, err.getvalue()[-2000:]
    assert not list(logs.rglob("version_*")), list(logs.rglob("*"))


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
    subprocess.run([sys.executable, "-m", "sphero_lightning", *fit_argv(clean, *extra, config=True, logs=root.parent / "logs")], check=True, capture_output=True, env=env, timeout=600, cwd=tmp_path)

    journal = killed / "images" / "registered" / "tmp-50-4-4-journal"
    p = subprocess.Popen([sys.executable, "-m", "sphero_lightning", *fit_argv(killed, *extra, config=True, logs=root.parent / "logs")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
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

    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *fit_argv(killed, *extra, config=True, logs=root.parent / "logs")], check=False, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming: {done} of {total} pairs" in r.stderr
    a, b = registered(clean), registered(killed)
    diff = composed_error(np.asarray(b.attrs["composed_transforms"]), np.asarray(a.attrs["composed_transforms"]), (128, 128))
    assert diff.max() <= 1e-3
    assert np.array_equal(a[:], b[:])
    assert sorted(e["pair_index"] for e in b.attrs["registration_log"]) == list(range(20))
    # pairs from the journal carry their NCC too
    for key in ("ncc_before", "ncc_after") + (("mask_kept",) if masked else ()):
        assert [e[key] for e in b.attrs["registration_log"]] == [e[key] for e in a.attrs["registration_log"]]
    assert not journal.exists()  # removed once the output is in place


def test_print_config_prints_the_settings_and_fits_nothing(tmp_path, base_image):
    root = tmp_path / "s.zarr"
    write_zarr(make_stack(base_image, 3, (64, 64), seed=1).stack, root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.loss", "mae", "--print_config"])
    assert exc.value.code == 0
    text = out.getvalue()
    assert "loss: mae" in text and "transformation: rigid" in text and f"root: {root}" in text, text[:2000]
    assert "registered" not in zarr.open_group(str(root), mode="r")["images"]


def test_the_log_folder_check_imports_no_object_storage_library(monkeypatch):
    """Lightning's check whether the TensorBoard folder is on Azure/GCS/S3 imported s3fs (0.5 s of start-up where it
    is installed); ours answers from the modules already imported, and still recognises their file systems."""
    import types

    from fsspec.implementations.local import LocalFileSystem
    from lightning.fabric.utilities import cloud_io

    from sphero_lightning.training.cli import skip_object_storage_imports

    monkeypatch.setattr(cloud_io, "_is_object_storage", cloud_io._is_object_storage)  # restored after the test
    skip_object_storage_imports()

    def no_probe(name: str) -> bool:
        raise AssertionError(f"probed {name} by importing it")

    monkeypatch.setattr(cloud_io, "module_available", no_probe)
    monkeypatch.delitem(sys.modules, "s3fs", raising=False)
    assert cloud_io._is_object_storage(LocalFileSystem()) is False
    fake = types.ModuleType("s3fs")
    fake.S3FileSystem = type("S3FileSystem", (LocalFileSystem,), {})
    monkeypatch.setitem(sys.modules, "s3fs", fake)
    assert cloud_io._is_object_storage(fake.S3FileSystem()) is True
    assert cloud_io._is_object_storage(LocalFileSystem()) is False
