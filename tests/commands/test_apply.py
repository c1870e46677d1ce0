"""commands/apply.py: ``sphero apply`` puts a registration onto labels and other arrays of the same stack."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
import zarr

from sphero_lightning.commands.apply import apply_registration
from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.errors import SpheroError
from sphero_lightning.storage.stacks import pixel_error_of_output, write_zarr
from tests.conftest import OUT, fit, run_cli


@pytest.fixture()
def stack(base_image):
    return make_stack(base_image, 6, (128, 160), seed=7)


def test_ingest_fit_apply_labels(tmp_path, stack):
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, stack.stack)
    root = tmp_path / "s.zarr"
    code, err = run_cli(["ingest", str(tif), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress"])
    assert code == 0, err
    src = zarr.open_array(str(root), path="images/50-4-4", mode="r")
    assert np.array_equal(src[:], stack.stack) and src.attrs["spacing"] == [50.0, 4.0, 4.0]
    assert src.attrs["processing"][0]["step_name"] == "ingest"

    labels = (stack.stack // 64).astype(np.uint32) * 1000 + 7  # ids 7, 1007, 2007, 3007
    lab = zarr.open_group(str(root), mode="a").create_array("labels/50-4-4", shape=labels.shape, dtype=labels.dtype,
                                                             chunks=(1, *labels.shape[1:]))
    lab[:] = labels
    lab.attrs["spacing"] = [50, 4, 4]

    fit(root)
    assert pixel_error_of_output(root, "images/registered/50-4-4", stack.composed) < 0.05
    code, err = run_cli(["apply", "--root", str(root), "--array", "labels/50-4-4",
                         "--transforms", "images/registered/50-4-4", "--no-progress"])
    assert code == 0, err
    reg = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    out = zarr.open_array(str(root), path="labels/registered/50-4-4", mode="r")
    assert out.shape == reg.shape and out.dtype == np.uint32
    assert out.metadata.dimension_names == src.metadata.dimension_names == ("z", "y", "x")  # OME-NGFF 0.5 needs them
    assert set(np.unique(out[:])) <= set(np.unique(labels))  # no new label values
    assert out.attrs["inputs"] == ["labels/50-4-4", "images/registered/50-4-4"]
    assert out.attrs["processing"][-1]["parameters"]["interpolation"] == "nearest"
    # each registered label slice lines up with the registered image: label = image // 64 mostly
    agree = np.mean((reg[:] // 64).astype(np.uint32) * 1000 + 7 == out[:])
    assert agree > 0.9, agree


def test_apply_to_the_registrations_own_source_reproduces_it(tmp_path, fitted_stack):
    root = tmp_path / "s.zarr"
    shutil.copytree(fitted_stack.root, root)
    code, err = run_cli(["apply", "--root", str(root), "--array", "images/50-4-4", "--transforms",
                         "images/registered/50-4-4", "--dst", "images/again/50-4-4", "--no-progress"])
    assert code == 0, err
    a = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")[:]
    b = zarr.open_array(str(root), path="images/again/50-4-4", mode="r")[:]
    assert np.array_equal(a, b)


def test_apply_refuses_an_array_of_another_shape(tmp_path, fitted_stack):
    root = tmp_path / "s.zarr"
    shutil.copytree(fitted_stack.root, root)
    zarr.open_group(str(root), mode="a").create_array("labels/other", shape=(6, 64, 64), dtype="uint16")
    code, err = run_cli(["apply", "--root", str(root), "--array", "labels/other", "--transforms", "images/registered/50-4-4"])
    assert code == 2 and "same stack and size" in err
    assert "registered" not in zarr.open_group(str(root), mode="r")["labels"]


def test_apply_interpolation_and_overwrite(fitted_stack, tmp_path):
    """Breaks caught: --interpolation ignored (bilinear would equal bspline), --overwrite not needed or not honoured."""
    root = fitted_stack.root
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


def test_apply_num_workers_and_bad_values(fitted_stack, tmp_path):
    """Breaks caught: a number of workers that changes the output, a bad value accepted."""
    root = fitted_stack.root
    store = tmp_path / "w.zarr"
    shutil.copytree(root, store)
    one = apply_registration(str(store), "images/50-4-4", OUT, dst="w/one", progress=False, num_workers=1)
    np.testing.assert_array_equal(zarr.open_array(str(store), path=one)[:], zarr.open_array(str(store), path=OUT)[:])
    with pytest.raises(SpheroError, match="num-workers"):
        apply_registration(str(store), "images/50-4-4", OUT, dst="w/two", progress=False, num_workers=0)
    with pytest.raises(SpheroError, match="tcp://"):
        apply_registration(str(store), "images/50-4-4", OUT, dst="w/two", progress=False, scheduler="nowhere")


def test_apply_equals_the_fit_output(fitted_stack, tmp_path):
    out_root = tmp_path / "o.zarr"
    shutil.copytree(fitted_stack.root, out_root)
    dst = apply_registration(str(out_root), "images/50-4-4", OUT, dst="images/applied/x", progress=False, num_workers=3)
    np.testing.assert_array_equal(zarr.open_array(str(out_root), path=dst)[:], zarr.open_array(str(out_root), path=OUT)[:])


def test_a_registration_of_the_first_slices_writes_and_applies_them_with_their_own_transforms(tmp_path, stack, monkeypatch):
    """--data.max_pairs registers the first slices of a longer stack; with --solve.reference every slice has a
    transform. Streamed (not held), the writer and apply once took slice z - 1's transform for slice z there."""
    from sphero_lightning.training import data

    monkeypatch.setattr(data, "HOLD_BYTES", 0)  # the streamed path of a large stack
    whole, first = tmp_path / "whole.zarr", tmp_path / "first.zarr"
    write_zarr(stack.stack, whole)
    write_zarr(stack.stack[:4].copy(), first)
    fit(whole, "--data.max_pairs", "3", "--solve.reference", "2")
    fit(first, "--solve.reference", "2")
    a = zarr.open_array(str(whole), path=OUT, mode="r")[:]
    np.testing.assert_array_equal(a, zarr.open_array(str(first), path=OUT, mode="r")[:])
    dst = apply_registration(str(whole), "images/50-4-4", OUT, dst="images/applied/x", progress=False)
    np.testing.assert_array_equal(zarr.open_array(str(whole), path=dst, mode="r")[:], a)
