"""The command line: user errors, the demo, multi-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

REPO = Path(__file__).resolve().parents[1]


def _sphero(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sphero_lightning", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.fixture()
def small_store(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    return root, s


def _fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "reg.yaml"), "--data.root", str(root), "--data.array", "images/50-4-4",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--data.root", "/nonexistent/x.zarr"], "does not exist"),
    (["--data.array", "images/nope"], "arrays there: images/50-4-4"),
    (["--model.transformation", "elastic"],
     "invalid value 'elastic' for model.transformation (choose one of: translation, rigid, similarity, affine)"),
    (["--model.loss", "l7"], "invalid value 'l7' for model.loss (choose one of: ncc, mse, mae, ssim)"),
    (["--pyramid.levels", "0"], "levels must be >= 1"),
    (["--pyramid.factors", "64"], "fewer than 8 pixels"),
    (["--model.nonsense", "1"], "unknown option --model.nonsense"),
    (["--data.max_pairs", "abc"], "invalid value 'abc' for --data.max_pairs"),
    (["--data.min_contrast", "2"], "min_contrast must be in [0, 1)"),
])
def test_user_errors_are_one_line_without_traceback(small_store, tmp_path, extra, message):
    root, s = small_store
    r = _sphero(*_fit_args(root, *extra), cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert any(message in ln for ln in err_lines), r.stderr[-2000:]
    # one line: the error, and nothing else on stderr (no log lines, warnings or help text around it)
    assert len(err_lines) == 1 and err_lines[0].startswith("sphero fit: error: "), r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == err_lines, r.stderr[-2000:]
    assert len(r.stderr) < 400, r.stderr[-2000:]
    assert np.array_equal(zarr.open_array(str(root), path="images/50-4-4", mode="r")[:], s.stack)
    assert "registered" not in zarr.open_group(str(root), mode="r")["images"]


@pytest.mark.parametrize("shape,message", [((4, 64), "expected 3D"), ((1, 64, 64), "at least 2"), ((3, 8, 64), "at least 16 x 16")])
def test_bad_array_shapes(tmp_path, shape, message):
    root = tmp_path / "bad.zarr"
    write_zarr(np.zeros(shape, np.uint8), root)
    r = _sphero(*_fit_args(root), cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_float32_input_keeps_dtype_and_values(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), dtype="float32", noise=0.0, seed=3)
    stack = (s.stack / 255.0).astype(np.float32)  # float data in [0, 1]
    root = tmp_path / "f.zarr"
    write_zarr(stack, root, truth=s.composed)
    r = _sphero(*_fit_args(root), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.dtype == np.float32 and 0.0 <= float(out[:].min()) and float(out[:].max()) <= 1.05
    assert pixel_error_of_output(root, "images/registered/50-4-4") < 0.05


def test_existing_output_is_refused_unless_overwrite(small_store, tmp_path):
    root, _ = small_store
    assert _sphero(*_fit_args(root), cwd=tmp_path).returncode == 0
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    stamp = out.attrs["processing"][0]["timestamp"]
    before = out[:]
    r = _sphero(*_fit_args(root), cwd=tmp_path)
    assert r.returncode != 0 and "already exists" in r.stderr and "--data.overwrite true" in r.stderr
    assert "Traceback" not in r.stderr
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.attrs["processing"][0]["timestamp"] == stamp and np.array_equal(out[:], before)
    r = _sphero(*_fit_args(root, "--data.overwrite", "true"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_missing_spacing_is_reported_and_can_be_supplied(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    del zarr.open_array(str(root), path="images/50-4-4", mode="r+").attrs["spacing"]
    r = _sphero(*_fit_args(root), cwd=tmp_path)
    assert r.returncode != 0 and "no 'spacing' attribute" in r.stderr and "--data.spacing" in r.stderr
    r = _sphero(*_fit_args(root, "--data.spacing", "[40, 5, 5]"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert zarr.open_array(str(root), path="images/registered/40-5-5", mode="r").attrs["spacing"] == [40.0, 5.0, 5.0]


def test_demo_reports_its_error(tmp_path):
    r = _sphero("demo", "--out", str(tmp_path / "demo"), "--slices", "4", "--size", "128", "128", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if "mean error" in ln)
    err = float(line.split(": ")[-1].split(" px")[0])
    assert err < 0.05


def test_ddp_two_processes_on_cpu_matches_single_process(tmp_path, base_image):
    """15 pairs on 2 ranks (uneven split): every pair once, same result as one process, one output."""
    s = make_stack(base_image, 16, (96, 96), seed=4)
    roots = []
    for name, extra in (("one", []), ("ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        root = tmp_path / f"{name}.zarr"
        write_zarr(s.stack, root, truth=s.composed)
        r = _sphero(*_fit_args(root, "--data.pairs_per_block", "4", *extra), cwd=tmp_path)
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


def test_common_mistakes_are_answered_before_torch_and_lightning_load(tmp_path):
    """Issues 29 and 36: a wrong store, a TIFF given as the store, a wrong array, a bad enumerated value, a misspelt
    option (with the closest one), a value of the wrong type, a 2D array, a one-slice stack, a missing spacing, a mask
    array of the wrong shape or missing, an existing output, a value out of its range, a reference slice that is not
    one, a missing anchors file: one line, exit 2, with neither torch nor Lightning imported (they take seconds to
    load; benchmarks/error_latency.py)."""
    import tifffile

    write_zarr(np.zeros((3, 32, 32), np.uint8), tmp_path / "s.zarr")
    write_zarr(np.zeros((3, 32, 32), np.uint8), tmp_path / "s.zarr", array="images/registered/50-4-4")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="a")
    group.create_array("flat", data=np.zeros((32, 32), np.uint8)).attrs["spacing"] = [50, 4, 4]
    group.create_array("one", data=np.zeros((1, 32, 32), np.uint8)).attrs["spacing"] = [50, 4, 4]
    group.create_array("bare", data=np.zeros((3, 32, 32), np.uint8))
    group.create_array("mask", data=np.ones((5, 5), np.uint8))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 32, 32), np.uint8))
    ok = "--data.root s.zarr --data.array images/50-4-4 --data.overwrite"
    cases = {"--data.root nope.zarr --data.array images/50-4-4": "store 'nope.zarr' does not exist",
             "--data.root stack.tif --data.array x": "is a TIFF file, not a Zarr store; convert it first: sphero ingest",
             "--data.root s.zarr --data.array images/nope": "array 'images/nope' not found in 's.zarr' (arrays there: ",
             f"{ok} --model.transformation shear": "invalid value 'shear' for model.transformation (choose one of",
             f"{ok} --solve.neighbors 2": "unknown option --solve.neighbors; did you mean --solve.neighbours?",
             f"{ok} --data.ignore_vaule 0": "unknown option --data.ignore_vaule; did you mean --data.ignore_value?",
             f"{ok} --data.ignore_value zero": "invalid value 'zero' for --data.ignore_value (expected a number, or null)",
             f"{ok} --pyramid.levels four": "invalid value 'four' for --pyramid.levels (expected a whole number)",
             "--data.root s.zarr --data.array flat": "array 'flat' has shape (32, 32); expected 3D (Z, Y, X)",
             "--data.root s.zarr --data.array one": "array 'one' has 1 slice(s); registration needs at least 2",
             "--data.root s.zarr --data.array bare": "array 'bare' has no 'spacing' attribute; give it as --data.spacing",
             f"{ok} --data.mask_array mask": "--data.mask_array 'mask' has shape (5, 5); it must be the stack's (3, 32, 32)",
             f"{ok} --data.mask_array nope": "array 'nope' not found in 's.zarr' (arrays there: ",
             "--data.root s.zarr --data.array images/50-4-4": "output 'images/registered/50-4-4' already exists in 's.zarr'",
             f"{ok} --solve.neighbours 0": "--solve.neighbours must be >= 1, got 0",
             f"{ok} --pyramid.levels 2 --pyramid.steps [100,0]": "--pyramid.steps must be >= 1, got [100, 0]",
             f"{ok} --data.min_contrast 1.5": "--data.min_contrast must be in [0, 1), got 1.5",
             f"{ok} --solve.reference 3": "--solve.reference 3 is not a slice of this stack (3 slices: 0..2)",
             f"{ok} --solve.anchors nope.json": "--solve.anchors 'nope.json': no such file"}
    code = ("import sys\nfrom sphero_lightning.commands.main import main\ntry:\n    main(['fit', *sys.argv[1:]])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n")
    for args, expect in cases.items():
        r = subprocess.run([sys.executable, "-c", code, *args.split()], capture_output=True, text=True, cwd=tmp_path,
                           check=False, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], (args, r.stderr)
        assert r.stdout.strip() == "exit 2 False False", (args, r.stdout)
        assert "; set --data.mask_array: in --data" not in lines[0]  # issue 36 item 3: the garbled fix


def test_fit_help_answers_without_torch_or_lightning():
    """Issue 36: ``sphero fit --help`` took 4.1 s (it imported the classes); it reads them from their source now."""
    code = ("import sys, contextlib, io\nfrom sphero_lightning.commands.main import main\nbuf = io.StringIO()\n"
            "try:\n    with contextlib.redirect_stdout(buf):\n        main(['fit', '--help'])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules, 'lightning' in sys.modules, len(buf.getvalue().splitlines()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    exit_word, code_, torch_loaded, lightning_loaded, lines = r.stdout.split()
    assert (exit_word, code_, torch_loaded, lightning_loaded) == ("exit", "0", "False", "False") and int(lines) > 100


def test_the_early_checks_know_every_choice_of_the_options():
    """The early checks' table of choices (commands/precheck.py) is each option's own Literal: a value added to one
    and not the other fails here."""
    from typing import get_args

    from sphero_lightning.commands.precheck import CHOICES
    from sphero_lightning.core.settings import (
        Curvature,
        Destripe,
        InitTranslation,
        Loss,
        LossInterpolation,
        Optimizer,
        OutputInterpolation,
        StaticMode,
        Transformation,
    )

    own = {"--model.transformation": Transformation, "--model.loss": Loss, "--model.optimizer": Optimizer,
           "--model.init_translation": InitTranslation, "--model.interpolation": LossInterpolation,
           "--model.curvature": Curvature, "--output.interpolation": OutputInterpolation, "--data.destripe": Destripe,
           "--data.static_patterns": StaticMode}
    assert {k: tuple(get_args(v)) for k, v in own.items()} == CHOICES


def _fit_help(flag: str) -> str:
    import contextlib
    import io

    from sphero_lightning.commands.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["fit", flag])
    assert exc.value.code == 0
    return out.getvalue()


def test_fit_help_is_short_plain_and_advertises_nothing_refused():
    """Issue 29 item 4: ``sphero fit --help`` under 150 lines with every project option (all of --help-all's but the
    Trainer's and the linked ones), no docstring markup, and no Trainer option that fit refuses."""
    import re

    from sphero_lightning.commands.fit_help import LINKED
    from sphero_lightning.training.cli import RESULT_CHANGING

    short, full = _fit_help("--help"), _fit_help("--help-all")
    assert len(short.splitlines()) < 150, len(short.splitlines())
    assert len(full.splitlines()) > 300  # the whole LightningCLI help is still there
    option = re.compile(r"^\s+(--(?:data|model|solve|pyramid|early_stopping|output)\.[a-z_]+)\b", re.MULTILINE)
    assert set(option.findall(full)) - {f"--{k}" for k in LINKED} <= set(option.findall(short))
    assert "``" not in short and not re.search(r":(class|func|meth|data|mod):", short)
    trainer = set(re.findall(r"--trainer\.([a-z_]+)", short))
    assert trainer == {"accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "logger"}
    assert not trainer & set(RESULT_CHANGING)


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
