"""A user's first hour (issue 11): every input they bring, from any directory, checked before fitting, right or refused.

One test (or more) per class of fault, through the ``sphero`` command where the user meets it.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.main import main
from sphero_lightning.core.records import flag_outliers
from sphero_lightning.core.synthetic import composed_error, make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr

OUT = "images/registered/50-4-4"


def _sphero(*args: str, cwd: Path, env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "sphero_lightning", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600, check=False)


def _fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--trainer.enable_progress_bar", "false", *extra]


def _run(argv: list[str]) -> tuple[int, str]:
    """``sphero`` in-process: (exit code, stderr)."""
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def _assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, stderr[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def stack(base_image):
    return make_stack(base_image, 5, (128, 128), dtype="float64", seed=11)


# ---------------------------------------------------------------------------- 1. dtypes and value ranges
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
    assert _run(_fit_args(ref, "--trainer.logger", "false"))[0] == 0
    data = DTYPES[name](stack.stack)
    root = tmp_path / "x.zarr"
    write_zarr(data, root, truth=stack.composed)
    code, err = _run(_fit_args(root, "--trainer.logger", "false"))
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
    _assert_one_line_error(*_run(_fit_args(root)), "fewer than 2 usable slices", "constant")
    # slices that share nothing: fitted, but never marked ok
    rng = np.random.default_rng(0)
    root = tmp_path / "n.zarr"
    write_zarr(rng.normal(1000, 50, (4, 96, 96)).astype(np.int32), root)
    code, err = _run(_fit_args(root, "--trainer.logger", "false"))
    assert code == 0, err
    log = zarr.open_array(str(root), path=OUT, mode="r").attrs["registration_log"]
    assert all(e["status"] == "low_correlation" for e in log), log
    assert "cannot be trusted" in err


# ---------------------------------------------------------------------------- 2. Zarr v2 and v3
def test_zarr_v2_source_registers_end_to_end(tmp_path, base_image):
    s = make_stack(base_image, 5, (128, 128), seed=2)
    root = tmp_path / "v2.zarr"
    write_zarr(s.stack, root, truth=s.composed, zarr_format=2)
    labels = np.repeat((np.arange(128 * 128) // 700).reshape(1, 128, 128), 5, 0).astype(np.uint32)
    write_zarr(labels, root, array="labels/50-4-4", zarr_format=2)
    # what v2 cannot hold is refused before any fitting
    code, err = _run(_fit_args(root, "--output.chunks", "[1, 128, 128]", "--output.shards", "[2, 128, 128]",
                                   "--trainer.logger", "false"))
    _assert_one_line_error(code, err, "Zarr v3", "--output.shards")
    assert not (root / "images" / "registered").exists()
    assert _run(_fit_args(root, "--trainer.logger", "false"))[0] == 0
    out = zarr.open_array(str(root), path=OUT, mode="r")
    assert out.metadata.zarr_format == 2 and (root / OUT / ".zarray").exists()
    assert pixel_error_of_output(root, OUT) < 0.03
    ms = zarr.open_group(str(root), mode="r")["images/registered"].attrs["multiscales"]
    assert ms[0]["version"] == "0.4" and ms[0]["datasets"][0]["path"] == "50-4-4"
    assert _run(["apply", "--root", str(root), "--array", "labels/50-4-4", "--transforms", OUT, "--no-progress"])[0] == 0
    lab = zarr.open_array(str(root), path="labels/registered/50-4-4", mode="r")
    assert lab.metadata.zarr_format == 2 and lab.shape == out.shape and set(np.unique(lab[:])) <= set(np.unique(labels))
    assert _run(["export", "--root", str(root), "--transforms", OUT, "--tmats", str(tmp_path / "t.npy")])[0] == 0
    assert np.load(tmp_path / "t.npy").shape == (5, 3, 3)


def test_zipped_store_is_read_and_the_output_goes_to_a_directory_store(tmp_path, base_image):
    from zarr.storage import ZipStore

    s = make_stack(base_image, 4, (96, 96), seed=3)
    zipped = tmp_path / "s.zip"
    store = ZipStore(str(zipped), mode="w")
    arr = zarr.open_group(store, mode="w").create_array("images/50-4-4", shape=s.stack.shape, dtype=s.stack.dtype,
                                                        chunks=(1, 96, 96), attributes={"spacing": [50, 4, 4]})
    arr[:] = s.stack  # (a zip member is written once: metadata first, with its attributes)
    store.close()
    _assert_one_line_error(*_run(_fit_args(zipped)), "is a file", "--data.output_root")
    code, err = _run(_fit_args(zipped, "--data.output_root", str(tmp_path / "out.zarr"), "--trainer.logger", "false"))
    assert code == 0, err
    out = zarr.open_array(str(tmp_path / "out.zarr"), path=OUT, mode="r")
    assert float(composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (96, 96)).mean()) < 0.05


def test_ingest_reads_a_folder_of_png_slices(tmp_path, base_image):
    from PIL import Image

    s = make_stack(base_image, 3, (64, 80), seed=1)
    for name, stack, mode in (("grey8", s.stack, "L"), ("grey16", s.stack.astype(np.uint16) * 257, "I;16")):
        folder = tmp_path / name
        folder.mkdir()
        for i, sl in enumerate(stack):
            im = Image.fromarray(sl) if mode == "L" else Image.frombytes("I;16", sl.shape[::-1], sl.astype("<u2").tobytes())
            if name == "grey8" and i == 1:
                im = im.convert("LA")  # grey with an alpha channel (as the EPFL FIB-SEM PNGs)
            im.save(folder / f"s{i * 5}.png")
        root = tmp_path / f"{name}.zarr"
        assert _run(["ingest", str(folder), "--root", str(root), "--spacing", "5", "5", "5", "--no-progress"])[0] == 0
        arr = zarr.open_array(str(root), path="images/5-5-5", mode="r")
        assert arr.dtype == stack.dtype and np.array_equal(arr[:], stack)
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.stack([s.stack[0], s.stack[0] // 2, s.stack[0]], -1)
    for i in range(2):
        Image.fromarray(rgb).save(colour / f"c{i}.png")
    _assert_one_line_error(*_run(["ingest", str(colour), "--root", str(tmp_path / "c.zarr"), "--spacing", "5", "5", "5",
                                  "--no-progress"]), "colour image")


def test_ingest_writes_ome_metadata_viewers_find(tmp_path, base_image):
    import tifffile

    s = make_stack(base_image, 3, (64, 64), seed=1)
    tifffile.imwrite(tmp_path / "s.tif", s.stack, photometric="minisblack")
    for fmt, key in ((3, "ome"), (2, "multiscales")):
        root = tmp_path / f"s{fmt}.zarr"
        assert _run(["ingest", str(tmp_path / "s.tif"), "--root", str(root), "--spacing", "50", "4", "4",
                     "--zarr-format", str(fmt), "--no-progress"])[0] == 0
        g = zarr.open_group(str(root), mode="r")
        assert g.metadata.zarr_format == fmt
        meta = g["images"].attrs[key]
        ms = meta["multiscales"][0] if fmt == 3 else meta[0]
        assert ms["datasets"][0]["path"] == "50-4-4"
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [50.0, 4.0, 4.0]
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(tmp_path / "s3.zarr" / "images")))())
    assert any(isinstance(spec, Multiscales) for spec in nodes[0].specs)


# ---------------------------------------------------------------------------- 3. from any directory
def test_fit_needs_no_config_file_and_runs_from_any_directory(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), seed=5)
    root = tmp_path / "data" / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _sphero("fit", "--data.root", str(root), "--data.array", "images/50-4-4", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    assert pixel_error_of_output(root, OUT) < 0.05
    assert (elsewhere / "logs" / "sphero").is_dir()  # TensorBoard output under ./logs by default
    assert list((elsewhere / "logs").rglob("config.yaml"))  # the run's settings beside its logs
    # without a logger nothing lands in the current directory (a config.yaml of the user's stays as it is)
    (elsewhere / "config.yaml").write_text("mine\n")
    r = _sphero("fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--data.overwrite", "true",
                "--trainer.logger", "false", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (elsewhere / "config.yaml").read_text() == "mine\n"


# ---------------------------------------------------------------------------- 4. the command line
def test_top_level_help_lists_our_commands_without_importing_torch():
    code = ("import sys; from sphero_lightning.commands.main import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    for cmd in ("fit", "ingest", "apply", "export", "demo"):
        assert f"  {cmd} " in r.stdout
    assert "validate" not in r.stdout and "predict" not in r.stdout


def test_version_and_removed_subcommands(capsys):
    main(["--version"])
    from sphero_lightning import __version__

    assert capsys.readouterr().out.strip() == f"sphero {__version__}"
    for cmd in ("validate", "test", "predict", "nonsense"):
        _assert_one_line_error(*_run([cmd]), "commands: fit, ingest, apply, export, report, demo")


def test_fit_help_shows_the_project_options_first(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    first = {opt: next(i for i, ln in enumerate(lines) if ln.strip().startswith(opt))
             for opt in ("--data.root", "--model.transformation", "--output.interpolation", "--trainer.accelerator")}
    assert first["--data.root"] < 40 and first["--trainer.accelerator"] > first["--output.interpolation"]
    assert "--optimizer" not in text and "--lr_scheduler" not in text


# ---------------------------------------------------------------------------- 5. faults found late
def test_read_only_store_is_found_before_fitting_and_output_root_writes_elsewhere(tmp_path, base_image):
    s = make_stack(base_image, 4, (96, 96), seed=6)
    src = tmp_path / "ro.zarr"
    write_zarr(s.stack, src, truth=s.composed)
    before = _snapshot(src)
    out_store = tmp_path / "out.zarr"
    if os.geteuid() == 0:
        # root writes through permission bits: mount the store read-only in a private mount namespace
        prefix = ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{src}" "{src}" && exec "$0" "$@"']
    else:
        os.chmod(src, 0o555)
        for d in src.rglob("*"):
            if d.is_dir():
                os.chmod(d, 0o555)
        prefix = []
    r = _sphero(*_fit_args(src), cwd=tmp_path, prefix=prefix)
    assert r.returncode == 2, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errs) == 1 and "--data.output_root" in errs[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "registering" not in r.stderr  # found before fitting
    r = _sphero(*_fit_args(src, "--data.output_root", str(out_store)), cwd=tmp_path, prefix=prefix)
    assert r.returncode == 0, r.stderr[-2000:]
    if os.geteuid() != 0:
        for d in [src, *src.rglob("*")]:
            if d.is_dir():
                os.chmod(d, 0o755)
    assert _snapshot(src) == before  # the source untouched
    out = zarr.open_array(str(out_store), path=OUT, mode="r")
    assert out.attrs["source_root"] == str(src.resolve())
    assert float(composed_error(np.asarray(out.attrs["composed_transforms"]), s.composed, (96, 96)).mean()) < 0.05
    # the output store's registration still finds its source (export reads the source's slice shape)
    assert _run(["export", "--root", str(out_store), "--transforms", OUT, "--csv", str(tmp_path / "t.csv")])[0] == 0


def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, base_image):
    import torch

    if torch.cuda.is_available():  # the check is for machines without one; CI has none
        pytest.skip("this machine has a GPU")
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    _assert_one_line_error(*_run(_fit_args(root, "--trainer.accelerator", "gpu")), "no CUDA GPU", "--trainer.accelerator cpu")


def test_two_runs_on_one_output_do_not_race(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    lock = root / "images" / "registered" / "tmp-50-4-4-journal" / "lock"
    lock.parent.mkdir(parents=True)
    # another process holds the output (what a running `sphero fit` does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h', 'started': 't'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _sphero(*_fit_args(root), cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"being written by another sphero run (pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = _sphero(*_fit_args(root), cwd=tmp_path)  # the lock dies with its holder
    assert r.returncode == 0, r.stderr[-2000:]
    assert not lock.exists()


# ---------------------------------------------------------------------------- 6. trainer options that change the result
@pytest.mark.parametrize("option,value", [("fast_dev_run", "true"), ("precision", "16-mixed"), ("max_steps", "5"),
                                          ("max_epochs", "1"), ("min_epochs", "2"), ("min_steps", "3"),
                                          ("max_time", "00:00:01:00"), ("limit_train_batches", "0.5"),
                                          ("overfit_batches", "1"), ("accumulate_grad_batches", "2"),
                                          ("gradient_clip_val", "1.0")])
def test_trainer_options_that_change_the_result_are_refused(tmp_path, base_image, option, value):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    before = _snapshot(root)
    _assert_one_line_error(*_run(_fit_args(root, f"--trainer.{option}", value)), f"--trainer.{option}",
                           "would change the registration")
    assert _snapshot(root) == before


def test_every_refused_trainer_option_is_tested():
    from sphero_lightning.training.cli import RESULT_CHANGING

    marks = test_trainer_options_that_change_the_result_are_refused.pytestmark
    tested = {opt for m in marks if m.name == "parametrize" for opt, _ in m.args[1]}
    assert tested == set(RESULT_CHANGING), set(RESULT_CHANGING) ^ tested


def test_ckpt_path_is_refused_pointing_at_the_journal(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    before = _snapshot(root)
    _assert_one_line_error(*_run(_fit_args(root, "--ckpt_path", str(tmp_path / "last.ckpt"))), "--ckpt_path", "journal")
    assert _snapshot(root) == before


def test_the_trainer_settings_used_are_recorded(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    assert _run(_fit_args(root, "--trainer.precision", "32-true", "--trainer.logger", "false"))[0] == 0
    reg = next(p for p in zarr.open_array(str(root), path=OUT, mode="r").attrs["processing"] if p["step_name"] == "registration")
    t = reg["parameters"]["trainer"]
    assert t["accelerator"] == "cpu" and t["world_size"] == 1 and t["precision"] == "32-true"
    # the loss's and the output's interpolation under distinct names
    assert reg["parameters"]["loss_interpolation"] == "bspline" and reg["parameters"]["output_interpolation"] == "bspline"
    assert "interpolation" not in reg["parameters"]  # one name per setting


# ---------------------------------------------------------------------------- 7. tracebacks left
def test_string_spacing_attribute_is_one_line(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    zarr.open_array(str(root), path="images/50-4-4", mode="r+").attrs["spacing"] = "50,4,4"
    r = _sphero(*_fit_args(root), cwd=tmp_path)
    _assert_one_line_error(r.returncode, r.stderr, "'spacing' attribute", "--data.spacing")


def test_export_into_a_missing_folder_is_one_line(tmp_path, base_image):
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    assert _run(_fit_args(root, "--trainer.logger", "false"))[0] == 0
    r = _sphero("export", "--root", str(root), "--transforms", OUT, "--tmats", str(tmp_path / "nope" / "t.npy"), cwd=tmp_path)
    _assert_one_line_error(r.returncode, r.stderr, "does not exist")
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------- 8. noise
def test_a_demo_run_prints_only_what_the_user_needs(tmp_path):
    r = _sphero("demo", "--out", str(tmp_path / "demo"), "--slices", "4", "--size", "96", "96", cwd=tmp_path,
                env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in (r.stdout + r.stderr).replace("\r", "\n").splitlines() if ln.strip()]
    progress = ("registering", "writing", "checking slices")
    other = [ln for ln in lines if not ln.startswith("sphero") and not ln.startswith(progress)]
    assert not other, other
    text = "\n".join(lines).lower()
    for noise in ("warning", "tip", "gpu available", "tpu available", "configure_optimizers", "max_epochs", "deprecat", "seed set"):
        assert noise not in text, noise
    assert any("mean error" in ln for ln in lines) and any("sphero: wrote" in ln for ln in lines)


# ---------------------------------------------------------------------------- 10. QC on short stacks
def test_qc_does_not_flag_outliers_on_short_or_uniform_stacks():
    short = [{"final_loss": v} for v in (0.10, 0.1001, 0.5)]
    assert flag_outliers(short) == [] and all(e["qc"] == "not_assessed" for e in short)
    uniform = [{"final_loss": 0.1 + 1e-5 * i} for i in range(8)]  # tiny spread: MAD ~ 2e-5
    assert flag_outliers(uniform) == [] and all(e["qc"] == "ok" for e in uniform)
    real = [{"final_loss": v} for v in (0.10, 0.11, 0.09, 0.10, 0.12, 0.10, 0.45, 0.11)]
    assert [e["final_loss"] for e in flag_outliers(real)] == [0.45]


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
