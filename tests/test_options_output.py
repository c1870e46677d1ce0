"""Output-side and command options that no other test exercised (issue 17): each test names the break it catches."""

from __future__ import annotations

import contextlib
import io
import shutil

import numpy as np
import pytest
import tifffile
import zarr
from conftest import fit

from sphero_lightning.commands.apply import apply_registration
from sphero_lightning.commands.ingest import ingest
from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One small registered stack (5 x 96 x 112), the source copied beside its output."""
    s = make_stack(em_like_image(256, seed=11), 5, (96, 112), seed=4, max_shift=3.0, max_rot_deg=1.0)
    root = tmp_path_factory.mktemp("opts") / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    fit(root)
    return root, s.stack


def test_crop_safety_margin_shrinks_the_box_on_every_side(fitted, tmp_path):
    """Break caught: the margin ignored, or applied to one side only."""
    root, _ = fitted
    box = zarr.open_array(str(root), path=OUT).attrs["crop_box"]
    fit(root, "--data.output_root", str(tmp_path / "m.zarr"), "--output.crop_safety_margin", "3")
    out = zarr.open_array(str(tmp_path / "m.zarr"), path=OUT)
    assert out.attrs["crop_box"] == [box[0] + 3, box[1] - 3, box[2] + 3, box[3] - 3]
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:, 3:-3, 3:-3])


def test_compression_level_reaches_the_codec_and_not_the_pixels(fitted, tmp_path):
    """Break caught: compression_level not passed to the zstd codec (the output's metadata would keep the default)."""
    root, _ = fitted
    fit(root, "--data.output_root", str(tmp_path / "c.zarr"), "--output.compression_level", "9")
    out = zarr.open_array(str(tmp_path / "c.zarr"), path=OUT)
    levels = [c.level for c in out.compressors if hasattr(c, "level")]
    assert levels == [9]
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:])


def test_dst_group_places_the_output(fitted, tmp_path):
    """Break caught: dst_group ignored (the output would land in images/registered)."""
    root, _ = fitted
    fit(root, "--data.output_root", str(tmp_path / "g.zarr"), "--data.dst_group", "aligned/v2")
    out = zarr.open_array(str(tmp_path / "g.zarr"), path="aligned/v2/50-4-4")
    np.testing.assert_array_equal(out[:], zarr.open_array(str(root), path=OUT)[:])
    assert not (tmp_path / "g.zarr" / "images" / "registered").exists()


def test_apply_interpolation_and_overwrite(fitted, tmp_path):
    """Breaks caught: --interpolation ignored (bilinear would equal bspline), --overwrite not needed or not honoured."""
    root, _ = fitted
    store = tmp_path / "a.zarr"
    shutil.copytree(root, store)
    spline = apply_registration(str(store), "images/50-4-4", OUT, dst="x/spline", progress=False)
    linear = apply_registration(str(store), "images/50-4-4", OUT, dst="x/linear", progress=False, interpolation="bilinear")
    a, b = zarr.open_array(str(store), path=spline)[:], zarr.open_array(str(store), path=linear)[:]
    np.testing.assert_array_equal(a, zarr.open_array(str(store), path=OUT)[:])  # auto = the registration's own
    assert not np.array_equal(a[1:], b[1:]) and np.abs(a.astype(int) - b.astype(int))[1:, 4:-4, 4:-4].mean() < 4
    with pytest.raises(SpheroError, match="--overwrite"):
        apply_registration(str(store), "images/50-4-4", OUT, dst="x/linear", progress=False)
    apply_registration(str(store), "images/50-4-4", OUT, dst="x/linear", progress=False, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(store), path=linear)[:], a)


def test_apply_num_workers_and_bad_values(fitted, tmp_path):
    """Breaks caught: a number of workers that changes the output, a bad value accepted."""
    root, _ = fitted
    store = tmp_path / "w.zarr"
    shutil.copytree(root, store)
    one = apply_registration(str(store), "images/50-4-4", OUT, dst="w/one", progress=False, num_workers=1)
    np.testing.assert_array_equal(zarr.open_array(str(store), path=one)[:], zarr.open_array(str(store), path=OUT)[:])
    with pytest.raises(SpheroError, match="num-workers"):
        apply_registration(str(store), "images/50-4-4", OUT, dst="w/two", progress=False, num_workers=0)
    with pytest.raises(SpheroError, match="tcp://"):
        apply_registration(str(store), "images/50-4-4", OUT, dst="w/two", progress=False, scheduler="nowhere")


def test_ingest_chunks_and_overwrite(tmp_path):
    """Breaks caught: --chunks ignored, an existing array replaced without --overwrite."""
    stack = np.stack([em_like_image(64, seed=k)[:60, :50] for k in range(3)])
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    path = ingest(tmp_path / "s.tif", tmp_path / "i.zarr", [50, 4, 4], chunks=(32, 16), progress=False)
    arr = zarr.open_array(str(tmp_path / "i.zarr"), path=path)
    assert tuple(arr.chunks) == (1, 32, 16)
    np.testing.assert_array_equal(arr[:], stack)
    with pytest.raises(SpheroError, match="--overwrite"):
        ingest(tmp_path / "s.tif", tmp_path / "i.zarr", [50, 4, 4], progress=False)
    tifffile.imwrite(tmp_path / "t.tif", stack[::-1], photometric="minisblack")
    ingest(tmp_path / "t.tif", tmp_path / "i.zarr", [50, 4, 4], overwrite=True, progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "i.zarr"), path=path)[:], stack[::-1])


def test_report_source_options_point_at_another_source(fitted, tmp_path):
    """Break caught: --source-root/--source-array ignored (the page would show the registration's own source)."""
    root, stack = fitted
    copy = tmp_path / "copy.zarr"
    write_zarr(255 - stack, copy)  # another "before": the source inverted
    pages = {}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, extra in (("own", []), ("copy", ["--source-root", str(copy), "--source-array", "images/50-4-4"])):
            pages[name] = tmp_path / f"{name}.html"
            main(["report", "--root", str(root), "--array", OUT, "--out", str(pages[name]), *extra])
        with pytest.raises(SystemExit):  # a source array that is not there: one line, exit 2
            main(["report", "--root", str(root), "--array", OUT, "--source-root", str(copy), "--source-array", "nope",
                  "--out", str(tmp_path / "x.html")])
    own, other = pages["own"].read_text(), pages["copy"].read_text()
    assert len(own) > 10_000 and len(other) > 10_000 and own != other


def test_demo_seed_changes_the_stack(tmp_path):
    """Break caught: --seed ignored (every demo the same stack)."""
    stacks = []
    for seed in (1, 2):
        out = tmp_path / f"d{seed}"
        with contextlib.redirect_stderr(io.StringIO()):
            main(["demo", "--out", str(out), "--slices", "3", "--size", "96", "96", "--seed", str(seed)])
        stacks.append(zarr.open_array(str(out / "demo.zarr"), path="images/50-4-4")[:])
    assert stacks[0].shape == stacks[1].shape and not np.array_equal(stacks[0], stacks[1])
