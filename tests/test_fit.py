"""``sphero fit`` end to end on synthetic stacks with exact truth (issue 2's must-shows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import fit, register_synthetic

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.core.transforms import normalized_to_pixel
from sphero_lightning.storage.stacks import write_zarr

SPEC_ATTRS = {"spacing", "inputs", "processing", "pairwise_transforms", "composed_transforms", "registration_log", "crop_box"}


def _check_output(out: zarr.Array, n_slices: int, shape: tuple[int, int]) -> None:
    assert SPEC_ATTRS <= set(out.attrs)
    assert out.attrs["spacing"] == [50.0, 4.0, 4.0]
    assert out.attrs["inputs"] == ["images/50-4-4"]
    steps = [p["step_name"] for p in out.attrs["processing"]]
    assert steps == ["registration", "border_crop"]
    for p in out.attrs["processing"]:
        assert {"timestamp", "parameters", "version"} <= set(p)
    assert len(out.attrs["pairwise_transforms"]) == n_slices - 1
    assert len(out.attrs["composed_transforms"]) == n_slices - 1
    log = out.attrs["registration_log"]
    assert [r["pair_index"] for r in log] == list(range(n_slices - 1))
    assert all(r["slice_indices"] == [r["pair_index"], r["pair_index"] + 1] for r in log)
    assert all({"final_loss", "num_steps_taken", "status"} <= set(r) for r in log)
    up, down, left, right = out.attrs["crop_box"]
    assert out.shape == (n_slices, down - up, right - left)
    # Every pixel of the crop box samples inside every slice.
    mats = normalized_to_pixel(torch.tensor(out.attrs["composed_transforms"], dtype=torch.float64), shape).numpy()
    ys, xs = np.mgrid[up:down, left:right]
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    for m in mats:
        q = m @ pts
        assert q[0].min() >= -1e-6 and q[0].max() <= shape[1] - 1 + 1e-6
        assert q[1].min() >= -1e-6 and q[1].max() <= shape[0] - 1 + 1e-6


def test_rigid_square(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "rigid", n=8, shape=(256, 256))
    _check_output(out, 8, (256, 256))
    assert out.dtype == np.uint8
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_rigid_non_square_two_degrees(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "rigid", n=8, shape=(192, 288), max_rot_deg=2.0)
    _check_output(out, 8, (192, 288))
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_affine_scale_and_shear(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.transformation", "affine", n=8, shape=(256, 256),
                                  max_scale=0.02, max_shear=0.02)
    assert err <= 0.1, f"mean composed error {err:.4f} px"
    _check_output(out, 8, (256, 256))


def test_similarity_fits_isotropic_scale(tmp_path, base_image):
    # The reference pipeline's similarity silently equalled rigid; here it must recover a scale.
    s = make_stack(base_image, 4, (192, 192), max_shift=4, max_rot_deg=1, noise=2, seed=5)
    root = tmp_path / "s.zarr"
    # Scale every slice about its centre: slice k is 1 + 0.01 k larger.
    from sphero_lightning.core.synthetic import render

    tf = s.slice_transforms.copy()
    for k in range(len(tf)):
        tf[k, :, :2] *= 1 + 0.01 * k
    stack = np.clip(np.rint(render(base_image, tf, (192, 192))), 0, 255).astype(np.uint8)
    write_zarr(stack, root)
    fit(root, "--model.transformation", "similarity")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    from sphero_lightning.core.transforms import describe

    d = describe(torch.tensor(out.attrs["pairwise_transforms"], dtype=torch.float64), (192, 192))
    for k, row in enumerate(d):
        expect = (1 + 0.01 * k) / (1 + 0.01 * (k + 1))
        assert abs(row["scale_x"] - expect) < 1e-3 and abs(row["scale_y"] - expect) < 1e-3


def test_adam_and_other_losses_run(tmp_path, base_image):
    err, out = register_synthetic(tmp_path, base_image, "--model.optimizer", "adam", "--model.loss", "mse",
                                  "--pyramid.steps", "150", n=3, shape=(128, 128))
    assert err < 0.05, f"adam/mse error {err:.4f} px"  # measured 0.0224 px
    assert out.attrs["processing"][0]["parameters"]["optimizer"] == "adam"


def test_max_pairs_and_uint16(tmp_path, base_image):
    s = make_stack(base_image, 6, (128, 128), dtype="uint16", seed=2)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root, truth=s.composed)
    fit(root, "--data.max_pairs", "3", "--data.pairs_per_block", "2")
    out = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
    assert out.shape[0] == 4 and out.dtype == np.uint16
    assert out[:].max() > 255  # full value range kept
    src = zarr.open_array(str(root), path="images/50-4-4", mode="r")
    assert np.array_equal(src[:], s.stack)  # source untouched


def test_ome_metadata_and_tensorboard(tmp_path, base_image):
    _err, _out = register_synthetic(tmp_path, base_image, n=3, shape=(128, 128))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["images/registered"]
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ds = ome["multiscales"][0]["datasets"]
    assert ds[0]["path"] == "50-4-4"
    assert ds[0]["coordinateTransformations"][0] == {"type": "scale", "scale": [50.0, 4.0, 4.0]}
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


@pytest.mark.parametrize("shape,rot", [((384, 384), 1.0), ((288, 416), 2.0)])
def test_real_slice_at_spec_size(tmp_path, isbi_base, shape, rot):
    """The issue's measurement: 16 slices cut from one real ISBI slice, noise sigma 6."""
    err, out = register_synthetic(tmp_path, isbi_base, "--model.transformation", "rigid", n=16, shape=shape, max_rot_deg=rot)
    _check_output(out, 16, shape)
    assert err <= 0.05, f"mean composed error {err:.4f} px"


def test_poorly_matching_slices_still_reach_the_optimum(tmp_path, base_image):
    """Slices that match poorly (heavy independent noise: NCC well below 0.9; their gradients' cross product is a
    small fraction of each slice's own) start every level from the Gauss-Newton model and stop on the looser
    Newton step rule: the default run still ends where a run with BFGS's own model converged far more tightly
    ends."""
    from sphero_lightning.core.synthetic import composed_error

    s = make_stack(base_image, 5, (128, 128), noise=70.0, seed=3)
    out = []
    for i, extra in enumerate(([], ["--model.curvature", "carried", "--early_stopping.step_tol_px", "0.0001",
                                         "--early_stopping.coarse_step_tol_px", "0.001"])):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(s.stack, root)
        fit(root, "--pyramid.levels", "3", *extra)
        a = zarr.open_array(str(root), path="images/registered/50-4-4", mode="r")
        out.append(np.asarray(a.attrs["pairwise_transforms"]))
        log = a.attrs["registration_log"]
    assert max(e["ncc_after"] for e in log) < 0.9  # the case this test is about
    d = composed_error(out[0], out[1], (128, 128))
    assert d.max() < 0.02, d


#: Every stopping rule far tighter than the defaults (as benchmarks/convergence.py's tight run).
TIGHT = ("--early_stopping.step_tol_px", "0.0001", "--early_stopping.coarse_step_tol_px", "0.0001",
         "--early_stopping.newton_step_tol_px", "0.0001", "--early_stopping.tol", "1e-12", "--pyramid.steps", "400")


def test_weakly_matching_real_sections_reach_the_tight_optimum(tmp_path):
    """ISBI sections 6, 9, 13, 16 (150-200 nm apart: NCC 0.08-0.17) used to end levels after one evaluation, on a short
    step of a Gauss-Newton model 50x too curved, and stopped 1.2-10 px from where a run with every stopping rule far
    tighter ends. Now a short step ends a level only once a step has confirmed the model: within 0.03 px."""
    from conftest import ISBI_PATH

    from sphero_lightning.core.synthetic import composed_error

    if not ISBI_PATH.exists():
        pytest.skip(f"real data not available: {ISBI_PATH} is absent (CI has ../shared/data)")
    import tifffile

    stack = np.ascontiguousarray(tifffile.imread(str(ISBI_PATH))[[6, 9, 13, 16]])
    out = []
    for i, extra in enumerate(((), TIGHT)):
        root = tmp_path / f"s{i}.zarr"
        write_zarr(stack, root)
        fit(root, "--model.transformation", "rigid", *extra)
        out.append(zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs)
    d = composed_error(np.asarray(out[0]["pairwise_transforms"]), np.asarray(out[1]["pairwise_transforms"]), stack.shape[1:])
    print(f"default vs tight: {d.round(4)} px; evaluations per level {[e['steps_per_level'] for e in out[0]['registration_log']]}")
    assert max(e["ncc_after"] for e in out[0]["registration_log"]) < 0.2  # weakly matching, the case of this test
    assert d.max() < 0.03, d
