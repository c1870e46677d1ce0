"""commands/export.py: ``sphero export`` writes the transforms in pixel units (pystackreg tmats) and a CSV."""

from __future__ import annotations

import numpy as np
import zarr

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import OUT, assert_one_line_error, fit, run_cli, sphero


def test_exported_tmats_reproduce_the_output_with_pystackreg(tmp_path, base_image):
    """pystackreg's transform_stack with our pixel matrices gives our registered output (inside the crop), and the
    matrices (``export --tmats`` and ``composed_transforms_pixel``) are the normalized ``composed_transforms`` in pixel
    indices."""
    from pystackreg import StackReg


    shape = (192, 192)
    s = make_stack(base_image, 8, shape, seed=3)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    fit(root)
    code, err = run_cli(["export", "--root", str(root), "--transforms", "images/registered/50-4-4",
                         "--tmats", str(tmp_path / "t.npy"), "--csv", str(tmp_path / "t.csv")])
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


def test_export_into_a_missing_folder_is_one_line(tmp_path, fitted_stack):
    r = sphero("export", "--root", str(fitted_stack.root), "--transforms", OUT, "--tmats", str(tmp_path / "nope" / "t.npy"), cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_the_csv_names_the_reference_slice_the_run_used(tmp_path, base_image):
    s = make_stack(base_image, 5, (96, 96), seed=5)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    fit(root, "--solve.reference", "2")
    code, err = run_cli(["export", "--root", str(root), "--transforms", OUT, "--csv", str(tmp_path / "t.csv")])
    assert code == 0, err
    rows = [r.split(",") for r in (tmp_path / "t.csv").read_text().splitlines()[1:]]
    assert [r[-1] for r in rows] == ["", "ok", "reference", "ok", "ok"]  # slice 0 was once called the reference
    assert float(rows[2][1]) == 0.0 and float(rows[2][2]) == 0.0 and abs(float(rows[0][1])) + abs(float(rows[0][2])) > 0.1
