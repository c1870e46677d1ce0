"""``sphero ingest`` (TIFF to Zarr) and ``sphero apply`` (a registration onto labels and other arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from conftest import fit

from sphero_lightning.commands.main import main
from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import pixel_error_of_output


@pytest.fixture()
def stack(base_image):
    return make_stack(base_image, 6, (128, 160), seed=7)


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_ingest_fit_apply_labels(tmp_path, stack, capsys):
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, stack.stack)
    root = tmp_path / "s.zarr"
    code, err = _run(capsys, "ingest", str(tif), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress")
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
    code, err = _run(capsys, "apply", "--root", str(root), "--array", "labels/50-4-4",
                     "--transforms", "images/registered/50-4-4", "--no-progress")
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


def test_apply_to_the_registrations_own_source_reproduces_it(tmp_path, stack, capsys):
    from sphero_lightning.storage.stacks import write_zarr

    root = tmp_path / "s.zarr"
    write_zarr(stack.stack, root)
    fit(root)
    code, err = _run(capsys, "apply", "--root", str(root), "--array", "images/50-4-4", "--transforms",
                     "images/registered/50-4-4", "--dst", "images/again/50-4-4", "--no-progress")
    assert code == 0, err
    a = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")[:]
    b = zarr.open_array(str(root), path="images/again/50-4-4", mode="r")[:]
    assert np.array_equal(a, b)


def test_ingest_folder_in_natural_order(tmp_path, stack, capsys):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, im in enumerate(stack.stack):
        tifffile.imwrite(folder / f"s{i + 1}.tif", im)  # s1 .. s6: plain sorting would put s10 before s2 on longer stacks
    tifffile.imwrite(folder / "s10.tif", stack.stack[0])
    root = tmp_path / "f.zarr"
    code, err = _run(capsys, "ingest", str(folder), "--root", str(root), "--spacing", "30", "5", "5", "--no-progress")
    assert code == 0, err
    arr = zarr.open_array(str(root), path="images/30-5-5", mode="r")
    assert arr.shape == (7, 128, 160)
    assert np.array_equal(arr[:6], stack.stack) and np.array_equal(arr[6], stack.stack[0])


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("mixed", "every slice must have the same size"),
    ("exists", "already exists"),
])
def test_ingest_user_errors(tmp_path, stack, capsys, case, message):
    src = tmp_path / "slices"
    src.mkdir()
    for i, im in enumerate(stack.stack[:3]):
        tifffile.imwrite(src / f"s{i}.tif", im)
    root = tmp_path / "e.zarr"
    if case == "missing":
        src = tmp_path / "nope"
    elif case == "mixed":
        tifffile.imwrite(src / "s9.tif", stack.stack[0][:64])
    elif case == "exists":
        assert _run(capsys, "ingest", str(src), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress")[0] == 0
    code, err = _run(capsys, "ingest", str(src), "--root", str(root), "--spacing", "50", "4", "4", "--no-progress")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err


def test_apply_refuses_an_array_of_another_shape(tmp_path, stack, capsys):
    from sphero_lightning.storage.stacks import write_zarr

    root = tmp_path / "s.zarr"
    write_zarr(stack.stack, root)
    fit(root)
    zarr.open_group(str(root), mode="a").create_array("labels/other", shape=(6, 64, 64), dtype="uint16")
    code, err = _run(capsys, "apply", "--root", str(root), "--array", "labels/other", "--transforms", "images/registered/50-4-4")
    assert code == 2 and "same stack and size" in err
    assert "registered" not in zarr.open_group(str(root), mode="r")["labels"]


def test_exported_tmats_reproduce_the_output_with_pystackreg(tmp_path, base_image, capsys):
    """pystackreg's transform_stack with our pixel matrices gives our registered output (inside the crop), and the
    matrices (``export --tmats`` and ``composed_transforms_pixel``) are the normalized ``composed_transforms`` in pixel
    indices."""
    from pystackreg import StackReg

    from sphero_lightning.storage.stacks import write_zarr

    shape = (192, 192)
    s = make_stack(base_image, 8, shape, seed=3)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    fit(root)
    code, err = _run(capsys, "export", "--root", str(root), "--transforms", "images/registered/50-4-4",
                     "--tmats", str(tmp_path / "t.npy"), "--csv", str(tmp_path / "t.csv"))
    assert code == 0, err
    tmats = np.load(tmp_path / "t.npy")
    reg = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert tmats.shape == (8, 3, 3)
    assert np.allclose(tmats, np.asarray(reg.attrs["composed_transforms_pixel"]))
    # the pixel matrices, point by point from the frames' definitions: pixel index X <-> normalized (2 X + 1) / W - 1,
    # composed_transforms maps an output pixel's normalized position to where slice k is sampled
    assert np.array_equal(tmats[0], np.eye(3))
    ys, xs = np.mgrid[0:shape[0]:7, 0:shape[1]:5].reshape(2, -1).astype(np.float64)
    norm = np.stack([(2 * xs + 1) / shape[1] - 1, (2 * ys + 1) / shape[0] - 1, np.ones_like(xs)])
    for k, theta in enumerate(np.asarray(reg.attrs["composed_transforms"], dtype=np.float64), start=1):
        sx, sy = theta @ norm
        expect = np.stack([(shape[1] * sx + shape[1] - 1) / 2, (shape[0] * sy + shape[0] - 1) / 2])
        got = tmats[k] @ np.stack([xs, ys, np.ones_like(xs)])
        assert np.allclose(got[:2], expect, rtol=0, atol=1e-9), (k, np.abs(got[:2] - expect).max())
        assert np.allclose(got[2], 1.0)
    theirs = StackReg(StackReg.RIGID_BODY).transform_stack(s.stack.astype(np.float64), tmats=tmats)
    up, down, left, right = reg.attrs["crop_box"]
    ours = reg[:].astype(np.float64)
    diff = np.abs(theirs[:, up:down, left:right] - ours)
    # our output is rounded to uint8: rounding pystackreg's values too leaves almost no difference (measured 0.00077
    # grey levels mean, from a few values on the other side of a .5); unrounded, the difference is the rounding's own
    # (measured 0.219 = 7/8 of the 0.25 a uniform rounding error averages: slice 0 is the identity)
    rounded = np.abs(np.clip(np.rint(theirs[:, up:down, left:right]), 0, 255) - ours)
    assert rounded.mean() < 0.002, rounded.mean()
    assert diff.mean() < 0.23, diff.mean()
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].split(",") == ["slice", "dx_px", "dy_px", "rotation_deg", "scale_x", "scale_y", "shear", "status"]
    assert len(rows) == 9 and rows[1].endswith("reference")
    # the CSV's rotation is the truth's within a hundredth of a degree
    from sphero_lightning.core.frames import decompose, pixel_matrices

    truth = pixel_matrices(s.composed, shape)
    rot = [float(r.split(",")[3]) for r in rows[1:]]
    assert np.allclose(rot, [decompose(m, shape)["rotation_deg"] for m in truth], atol=0.01)
