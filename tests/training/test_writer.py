"""training/writer.py: the ``--output.*`` options and what the writer records, end to end: the crop, interpolation,
compression, the output group, chunks, shards, threads and a dask cluster, the downsampled levels and the OME-NGFF
metadata, the settings recorded."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from sphero_lightning.commands.apply import apply_registration
from sphero_lightning.core import windows
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import CONFIG, LEVELS3, OUT, fit, fit_argv, registered, run_fit, stack_store
from tests.storage.test_writing import whole_slice_reference


def _refit(fitted, out_root, *extra: str) -> zarr.Array:
    """The shared fitted stack fitted again into ``out_root`` with ``extra``; the output there."""
    run_fit(fit_argv(fitted.root, "--data.output_root", str(out_root), *extra, logs=out_root.parent / "logs"))
    return zarr.open_array(str(out_root), path=OUT)


def _fit(root, *extra) -> str:
    return run_fit(fit_argv(root, *extra, config=True, logs=root.parent / "logs", levels=3))


@pytest.fixture(scope="module")
def stack_root(tmp_path_factory):
    s = make_stack(em_like_image(256, seed=5), 6, (96, 112), seed=2, max_shift=3.0, max_rot_deg=1.0)
    root = tmp_path_factory.mktemp("dask") / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    return root, s.stack


def _reference_levels(full: np.ndarray, n: int) -> list[np.ndarray]:
    """Each level the previous one's 2 x 2 means (odd edge dropped), rounded to nearest: the reference downsampling."""
    out = [full]
    for _ in range(1, n):
        prev = out[-1].astype(np.float64)
        h, w = prev.shape[1] // 2 * 2, prev.shape[2] // 2 * 2
        out.append(np.rint(prev[:, :h, :w].reshape(len(prev), h // 2, 2, w // 2, 2).mean((2, 4))).astype(full.dtype))
    return out


def test_crop_borders_false_keeps_the_full_slice(tmp_path, base_image):
    """Catches ``output.crop_borders false`` still cropping."""
    s = make_stack(base_image, 4, (96, 112), seed=17)
    root = stack_store(tmp_path, s)
    fit(root, "--output.crop_borders", "false", *LEVELS3)
    out = registered(root)
    assert out.shape == (4, 96, 112)
    assert out.attrs["crop_box"] == [0, 96, 0, 112]


def test_output_interpolation_bicubic_and_bilinear(tmp_path, base_image):
    """Catches ``output.interpolation`` being ignored (output equal to bspline's) or broken (far from it), and the
    provenance not recording it."""
    s = make_stack(base_image, 4, (96, 96), seed=18)
    outs = {}
    for mode in ("bspline", "bicubic", "bilinear"):
        root = stack_store(tmp_path, s, f"{mode}.zarr")
        fit(root, "--output.interpolation", mode, *LEVELS3)
        out = registered(root)
        assert out.attrs["processing"][0]["parameters"]["output_interpolation"] == mode
        outs[mode] = out[:].astype(np.float64)
    ref = outs["bspline"]
    for mode in ("bicubic", "bilinear"):
        assert outs[mode].shape == ref.shape
        d = np.abs(outs[mode] - ref)[1:, 4:-4, 4:-4]  # slice 0 is not resampled
        assert d.max() > 0, f"{mode} output equals bspline's"
        assert d.mean() < 4.0, f"{mode}: mean difference {d.mean():.2f} grey levels"


def test_crop_safety_margin_shrinks_the_box_on_every_side(fitted_stack, tmp_path):
    """Break caught: the margin ignored, or applied to one side only."""
    root = fitted_stack.root
    box = zarr.open_array(str(root), path=OUT).attrs["crop_box"]
    out = _refit(fitted_stack, tmp_path / "m.zarr", "--output.crop_safety_margin", "3")
    assert out.attrs["crop_box"] == [box[0] + 3, box[1] - 3, box[2] + 3, box[3] - 3]
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:, 3:-3, 3:-3])


def test_compression_level_reaches_the_codec_and_not_the_pixels(fitted_stack, tmp_path):
    """Break caught: compression_level not passed to the zstd codec (the output's metadata would keep the default)."""
    root = fitted_stack.root
    out = _refit(fitted_stack, tmp_path / "c.zarr", "--output.compression_level", "9")
    levels = [c.level for c in out.compressors if hasattr(c, "level")]
    assert levels == [9]
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:])


def test_dst_group_places_the_output(fitted_stack, tmp_path):
    """Break caught: dst_group ignored (the output would land in images/registered)."""
    root = fitted_stack.root
    run_fit(fit_argv(root, "--data.output_root", str(tmp_path / "g.zarr"), "--data.dst_group", "aligned/v2"))
    out = zarr.open_array(str(tmp_path / "g.zarr"), path="aligned/v2/50-4-4")
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:])
    assert not (tmp_path / "g.zarr" / "images" / "registered").exists()


def test_sharded_tiled_parallel_output_equals_the_default(tmp_path, base_image):
    s = make_stack(base_image, 11, (160, 192), seed=5)
    roots = []
    for i, extra in enumerate(([], ["--output.chunks", "[4,64,64]", "--output.shards", "[8,128,128]",
                                    "--output.num_workers", "3"], ["--output.num_workers", "1"])):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(s.stack, root)
        err = _fit(root, *extra)
        roots.append(root)
        # the time breakdown, one line
        line = next(ln for ln in err.splitlines() if ln.startswith("sphero: time:"))
        assert "fitting" in line and "waiting for data" in line and "writing" in line, line
    outs = [zarr.open_array(str(r), path="images/registered/50-4-4", mode="r") for r in roots]
    assert outs[0].chunks[0] == 1 and outs[0].shards is None
    assert outs[1].chunks == (4, 64, 64) and outs[1].shards == (8, 128, 128)
    ref = outs[0][:]
    assert ref.std() > 0
    for o in outs[1:]:
        assert o.shape == outs[0].shape
        np.testing.assert_array_equal(o[:], ref)


@pytest.mark.parametrize("layout", [[], ["--output.chunks", "[2, 40, 48]"],
                                    ["--output.chunks", "[1, 32, 32]", "--output.shards", "[2, 64, 64]"]])
def test_fit_output_equals_the_whole_slice_computation(stack_root, tmp_path, layout, monkeypatch):
    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))  # a read outside a task's source region would show
    root, stack = stack_root
    out_root = tmp_path / "out.zarr"
    fit(root, "--data.output_root", str(out_root), *layout)
    out = zarr.open_array(str(out_root), path=OUT, mode="r")
    if layout:
        assert list(out.chunks) == [int(v) for v in layout[1].strip("[]").split(",")]
    assert not (out_root / "images" / "registered" / "tmp-50-4-4-partial-written").exists()
    ref = whole_slice_reference(stack, out.attrs["composed_transforms"], out.attrs["crop_box"])
    np.testing.assert_array_equal(out[:], ref)


def test_a_dask_cluster_by_address_writes_what_threads_write(stack_root, tmp_path):
    """A LocalCluster with 2 worker processes: sphero fit's writer and sphero apply against it by address."""
    distributed = pytest.importorskip("distributed")  # a declared dependency: present in CI
    root, _ = stack_root
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        outs = {}
        for name, extra in (("threads", []), ("cluster", ["--output.scheduler", address])):
            out_root = tmp_path / f"{name}.zarr"
            fit(root, "--data.output_root", str(out_root), "--output.chunks", "[2, 48, 56]", *extra)
            outs[name] = zarr.open_array(str(out_root), path=OUT)[:]
        np.testing.assert_array_equal(outs["threads"], outs["cluster"])
        with distributed.Client(address) as client:  # the workers did the writing: both ran tasks
            done = client.run(lambda dask_worker: dask_worker.state.transition_counter)
            assert len(done) == 2 and all(n > 0 for n in done.values()), done
        shutil.copytree(root / "images" / "50-4-4", tmp_path / "threads.zarr" / "images" / "50-4-4")
        applied = apply_registration(str(tmp_path / "threads.zarr"), "images/50-4-4", OUT, dst="images/again/x",
                                     progress=False, scheduler=address, interpolation="bilinear")
        local = apply_registration(str(tmp_path / "threads.zarr"), "images/50-4-4", OUT, dst="images/again/y",
                                   progress=False, interpolation="bilinear")
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "threads.zarr"), path=applied)[:],
                                      zarr.open_array(str(tmp_path / "threads.zarr"), path=local)[:])


def test_a_bad_scheduler_is_one_line(stack_root, tmp_path):
    root, _ = stack_root
    proc = subprocess.run([sys.executable, "-m", "sphero_lightning", "fit", "--config", CONFIG, "--data.root", str(root),
                           "--data.array", "images/50-4-4", "--data.output_root", str(tmp_path / "x.zarr"),
                           "--output.scheduler", "localhost:1"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "tcp://" in proc.stderr, proc.stderr


def test_output_levels_are_a_multiscale_pyramid_every_reader_opens(tmp_path, base_image):
    """Issue 28 must-show 3: --output.levels 3 writes the output and two halvings beside it, equal to the reference
    downsampling; ome-zarr-py's Reader (what napari's OME-Zarr plugin uses) and the specification's models open every
    level, finest first, each pixel placed where its block of the full resolution lies; sphero apply does the same."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    s = make_stack(base_image, 5, (100, 90), seed=3)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    labels = (s.stack > 128).astype(np.uint8)
    zarr.open_group(str(root), mode="a").create_array("labels/50-4-4", data=labels).attrs["spacing"] = [50, 4, 4]
    fit(root, "--pyramid.levels", "3", "--output.levels", "3")
    group = zarr.open_group(str(root), mode="r")["images/registered"]
    full = group["50-4-4"][:]
    names = ["50-4-4", "50-8-8", "50-16-16"]
    for name, ref in zip(names, _reference_levels(full, 3)):
        assert np.array_equal(group[name][:], ref), name
    node = next(iter(Reader(parse_url(str(root / "images" / "registered")))()))
    assert len(node.data) == 3 and [tuple(d.shape) for d in node.data] == [group[n].shape for n in names]
    up, _, left, _ = group["50-4-4"].attrs["crop_box"]
    for k, (tf, data) in enumerate(zip(node.metadata["coordinateTransformations"], node.data)):
        assert np.array_equal(np.asarray(data), group[names[k]][:])
        scale = next(t["scale"] for t in tf if t["type"] == "scale")
        shift = next((t["translation"] for t in tf if t["type"] == "translation"), [0.0, 0.0, 0.0])
        assert scale == [50.0, 4.0 * 2 ** k, 4.0 * 2 ** k]
        c = (2 ** k - 1) / 2  # the centre of the block a level-k pixel averages
        assert shift == [0.0, (up + c) * 4.0, (left + c) * 4.0]
    assert [d.path for d in Image.from_zarr(group).ome_attributes.multiscales[0].datasets] == names

    from sphero_lightning.commands.apply import main as apply_main

    with contextlib.redirect_stderr(io.StringIO()):
        apply_main(["--root", str(root), "--array", "labels/50-4-4", "--transforms", "images/registered/50-4-4",
                    "--levels", "2", "--no-progress"])
    lab = zarr.open_group(str(root), mode="r")["labels/registered"]
    assert np.array_equal(lab["50-8-8"][:], lab["50-4-4"][:, ::2, ::2][:, :lab["50-8-8"].shape[1], :lab["50-8-8"].shape[2]])
    assert set(np.unique(lab["50-8-8"][:])) <= {0, 1}  # labels stay labels (every other pixel, not a mean)


def test_default_levels_follow_the_slice_size(tmp_path, base_image):
    """No --output.levels: small outputs stay one array (nothing beside it); 1 writes one array whatever the size."""
    s = make_stack(base_image, 3, (64, 64), seed=1)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    fit(root, "--pyramid.levels", "2")
    assert [n for n, _ in zarr.open_group(str(root), mode="r")["images/registered"].arrays()] == ["50-4-4"]


def test_ome_metadata_and_tensorboard(fitted_stack):
    group = zarr.open_group(str(fitted_stack.root), mode="r")["images/registered"]
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ds = ome["multiscales"][0]["datasets"]
    assert ds[0]["path"] == "50-4-4"
    assert ds[0]["coordinateTransformations"][0] == {"type": "scale", "scale": [50.0, 4.0, 4.0]}
    events = list(fitted_stack.logs.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


def test_the_trainer_settings_used_are_recorded(fitted_stack):
    """The shared stack was fitted with ``--trainer.precision 32-true`` (accepted, and recorded)."""
    reg = next(p for p in zarr.open_array(str(fitted_stack.root), path=OUT, mode="r").attrs["processing"]
               if p["step_name"] == "registration")
    t = reg["parameters"]["trainer"]
    assert t["accelerator"] == "cpu" and t["world_size"] == 1 and t["precision"] == "32-true"
    # the loss's and the output's interpolation under distinct names
    assert reg["parameters"]["loss_interpolation"] == "bspline" and reg["parameters"]["output_interpolation"] == "bspline"
    assert "interpolation" not in reg["parameters"]  # one name per setting
