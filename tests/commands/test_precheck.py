"""commands/precheck.py: mistakes on the command line are answered in one line, before torch and Lightning load, with
what to give instead."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import QUIET, assert_one_line_error, fit_argv, run_cli, sphero


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
def test_user_errors_are_one_line_without_traceback(mistake_store, tmp_path, extra, message):
    root, stack = mistake_store
    r = sphero(*fit_argv(root, *extra, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert any(message in ln for ln in err_lines), r.stderr[-2000:]
    # one line: the error, and nothing else on stderr (no log lines, warnings or help text around it)
    assert len(err_lines) == 1 and err_lines[0].startswith("sphero fit: error: "), r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == err_lines, r.stderr[-2000:]
    assert len(r.stderr) < 400, r.stderr[-2000:]
    assert np.array_equal(zarr.open_array(str(root), path="images/50-4-4", mode="r")[:], stack)
    assert "registered" not in zarr.open_group(str(root), mode="r")["images"]


@pytest.mark.parametrize("shape,message", [((4, 64), "expected 3D"), ((1, 64, 64), "at least 2"), ((3, 8, 64), "at least 16 x 16")])
def test_bad_array_shapes(tmp_path, shape, message):
    root = tmp_path / "bad.zarr"
    write_zarr(np.zeros(shape, np.uint8), root)
    r = sphero(*fit_argv(root, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_missing_spacing_is_reported_and_can_be_supplied(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    del zarr.open_array(str(root), path="images/50-4-4", mode="r+").attrs["spacing"]
    r = sphero(*fit_argv(root, config=True, logs=tmp_path / "logs"), cwd=tmp_path, env=QUIET)
    assert r.returncode != 0 and "no 'spacing' attribute" in r.stderr and "--data.spacing" in r.stderr
    code, err = run_cli(fit_argv(root, "--data.spacing", "[40, 5, 5]", config=True, logs=tmp_path / "logs"))
    assert code == 0, err[-2000:]
    assert zarr.open_array(str(root), path="images/registered/40-5-5", mode="r").attrs["spacing"] == [40.0, 5.0, 5.0]


def test_common_mistakes_are_answered_before_torch_and_lightning_load(tmp_path):
    """Issues 29 and 36: a wrong store, a TIFF given as the store, a wrong array, a bad enumerated value, a misspelt
    option (with the closest one), a value of the wrong type, a 2D array, a one-slice stack, a missing spacing, a mask
    array of the wrong shape or missing, an existing output, a value out of its range, a reference slice that is not
    one, a missing anchors file or one that names other slices or holds no matrices: one line, exit 2, with neither torch nor Lightning imported (they take seconds to
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
    (tmp_path / "far.json").write_text('{"5": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}')
    (tmp_path / "short.json").write_text('{"1": [1, 0]}')
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
             f"{ok} --data.max_pairs 1 --solve.reference 2": "--solve.reference 2 is not a slice of this stack (2 slices: 0..1)",
             f"{ok} --solve.anchors nope.json": "--solve.anchors 'nope.json': no such file",
             f"{ok} --solve.anchors far.json": "--solve.anchors names slice(s) [5] outside this stack (3 slices: 0..2)",
             f"{ok} --solve.anchors short.json": "expected a JSON object of slice -> 3 x 3 pixel matrix"}
    code = ("import sys\nfrom sphero_lightning.commands.main import main\ntry:\n    main(['fit', *sys.argv[1:]])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n")
    for args, expect in cases.items():
        r = subprocess.run([sys.executable, "-c", code, *args.split()], capture_output=True, text=True, cwd=tmp_path,
                           check=False, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], (args, r.stderr)
        assert r.stdout.strip() == "exit 2 False False", (args, r.stdout)
        assert "; set --data.mask_array: in --data" not in lines[0]  # issue 36 item 3: the garbled fix


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


def test_string_spacing_attribute_is_one_line(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    zarr.open_array(str(root), path="images/50-4-4", mode="r+").attrs["spacing"] = "50,4,4"
    assert_one_line_error(*run_cli(fit_argv(root)), "'spacing' attribute", "--data.spacing")
