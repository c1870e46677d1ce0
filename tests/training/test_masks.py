"""What the loss leaves out and what does not move with the sample (issues 26 and 35), end to end through ``sphero fit``:
``--data.ignore_value``, ``--data.mask_array``, ``--data.destripe``, ``--data.static_patterns``, on procedural stacks
with known truth (no real data needed). The masks' numerics are in tests/core/test_masks.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from sphero_lightning.api import register_stack
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack, render
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import OUT, error_but, fit_argv, fit_attrs, run_fit, run_fit_on
from tests.core.test_masks import SHAPE, clean_stack, disk, with_pattern


def _args(root, *extra):
    return fit_argv(root, *extra, levels=3)


def _fit(root, *extra) -> tuple[np.ndarray, dict, str]:
    err = run_fit(_args(root, *extra))
    attrs = dict(zarr.open_array(str(root), path=OUT, mode="r").attrs)
    return np.asarray(attrs["composed_transforms"]), attrs, err


@pytest.fixture(scope="module")
def clean():
    return clean_stack()


def test_ignore_value_leaves_a_dark_frame_out(tmp_path, clean):
    """Issue 26 must-show 1: a static dark frame pulls pairs towards the identity; --data.ignore_value 0 leaves it
    out. Since issue 35 the defaults leave it out too (said in one line, recorded); ``--data.static_patterns keep``
    uses it, warns and names the option; the page lists the mask and how much it left."""
    st = with_pattern(clean, "frame")
    errs = {}
    for tag, extra in (("kept", ("--data.static_patterns", "keep")), ("default", ()),
                       ("masked", ("--data.ignore_value", "0"))):
        root = tmp_path / f"{tag}.zarr"
        write_zarr(st, root)
        comp, attrs, err = _fit(root, *extra)
        errs[tag] = composed_error(comp, clean.composed, SHAPE).mean()
        masks = attrs["processing"][-2]["parameters"]["masks"]
        if tag == "kept":
            assert "sphero: warning:" in err and "--data.ignore_value 0" in err
            assert masks["static"]["left_out"] is False
        elif tag == "default":
            lines = [ln for ln in err.splitlines() if "left out of the loss" in ln]
            assert len(lines) == 1 and "the value 0" in lines[0] and "--data.static_patterns keep" in lines[0], err
            assert "warning" not in err
            assert masks["static"] == {"left_out": True, "found": masks["static"]["found"], "value": 0,
                                       "fraction": masks["static"]["fraction"]}
            assert all(0.5 < e["mask_kept"] < 0.9 for e in attrs["registration_log"])
        else:
            assert "warning" not in err and "left out of the loss" not in err  # the option already says it
            page = next(ln.split("report ", 1)[1] for ln in err.splitlines() if ln.startswith("sphero: report "))
            html = Path(page).read_text(encoding="utf-8")
            assert "ignore_value 0" in html and "slice area the loss used" in html, html[:3000]
            log = attrs["registration_log"]
            assert all(0.5 < e["mask_kept"] < 0.9 for e in log), [e["mask_kept"] for e in log]
    assert errs["masked"] < 0.03 and errs["default"] < 0.03 and errs["kept"] > 5 * errs["masked"], errs


def test_ignore_value_follows_padding_that_moves_with_the_sample(tmp_path):
    """Slices shifted earlier with zero padding: the black border moves with the content (a sample-frame mask)."""
    base = em_like_image(384, seed=6)
    s = make_stack(base, 8, SHAPE, seed=12)
    box = np.zeros(base.shape)
    h0, w0 = (base.shape[0] - SHAPE[0]) // 2 + 14, (base.shape[1] - SHAPE[1]) // 2 + 14
    box[h0:h0 + SHAPE[0] - 28, w0:w0 + SHAPE[1] - 28] = 1
    st = s.stack.copy()
    st[render(box, s.slice_transforms, SHAPE) < 0.5] = 0
    root = tmp_path / "p.zarr"
    write_zarr(st, root)
    comp, _, _ = _fit(root, "--data.ignore_value", "0")
    assert composed_error(comp, s.composed, SHAPE).mean() < 0.03


def test_mask_array_leaves_detector_dirt_out(tmp_path, clean):
    """Issue 26 must-show 2: a bright disk fixed in the detector; a (Y, X) mask array without it, and the same as a
    (Z, Y, X) array, put every slice in place; without the mask (its static region kept) the disk pulls."""
    st = with_pattern(clean, "disk")
    errs = {}
    for tag in ("plain", "2d", "3d"):
        root = tmp_path / f"{tag}.zarr"
        write_zarr(st, root)
        extra = ("--data.static_patterns", "keep")
        if tag != "plain":
            m = (~disk()).astype(np.uint8)
            zarr.open_group(str(root), mode="a").create_array("mask", data=m if tag == "2d" else np.repeat(m[None], 8, 0))
            extra = ("--data.mask_array", "mask")
        comp, _, _ = _fit(root, *extra)
        errs[tag] = composed_error(comp, clean.composed, SHAPE).mean()
    assert errs["2d"] < 0.03 and abs(errs["2d"] - errs["3d"]) < 1e-6 and errs["plain"] > 3 * errs["2d"], errs


def test_bad_mask_array_is_a_one_line_error(tmp_path, mistake_store):
    root = tmp_path / "b.zarr"
    shutil.copytree(mistake_store[0], root)
    zarr.open_group(str(root), mode="a").create_array("mask", data=np.ones((5, 5), np.uint8))
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *_args(root, "--data.mask_array", "mask")],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--data.mask_array 'mask' has shape (5, 5)" in r.stderr


def test_destripe_removes_curtaining(tmp_path, clean):
    st = with_pattern(clean, "stripes")
    errs = {}
    for tag, extra in (("plain", ("--data.static_patterns", "keep")), ("default", ()),
                       ("destriped", ("--data.destripe", "vertical"))):
        root = tmp_path / f"{tag}.zarr"
        write_zarr(st, root)
        comp, attrs, err = _fit(root, *extra)
        errs[tag] = composed_error(comp, clean.composed, SHAPE).mean()
        masks = next(p for p in attrs["processing"] if p["step_name"] == "registration")["parameters"]["masks"]
        if tag == "default":  # the guard found the stripes and destriped the loss's images itself
            assert masks["static"]["stripes"] == ["vertical"] and masks["static"]["left_out"], masks
            assert "vertical stripes" in err and "left out of the loss" in err
    assert errs["destriped"] < 0.03 and errs["default"] < 0.03 and errs["plain"] > 5 * errs["destriped"], errs
    assert masks == {"ignore_value": None, "mask_array": None, "destripe": "vertical", "static_patterns": "leave_out"}


def test_masks_with_the_finest_level_capped_and_in_the_api(tmp_path, clean):
    """Issue 26 must-show 3: big slices fit their finest level below full resolution (here forced with
    --pyramid.finest_max_pixels), the masks downscaled with them; the Python API takes a mask and gives the CLI's
    transforms."""
    st = with_pattern(clean, "disk")
    m = (~disk()).astype(np.uint8)
    root = tmp_path / "cap.zarr"
    write_zarr(st, root)
    zarr.open_group(str(root), mode="a").create_array("mask", data=m)
    comp, attrs, _ = _fit(root, "--data.mask_array", "mask", "--pyramid.finest_max_pixels", str(80 * 80))
    assert attrs["registration_log"][0]["finest_factor"] == 2.0
    assert composed_error(comp, clean.composed, SHAPE).mean() < 0.1
    root2 = tmp_path / "cli.zarr"
    write_zarr(st, root2)
    zarr.open_group(str(root2), mode="a").create_array("mask", data=m)
    cli, _, _ = _fit(root2, "--data.mask_array", "mask", "--model.transformation", "rigid")
    reg = register_stack(st, mask=m, options={"pyramid.levels": 3})
    assert composed_error(reg.composed, cli, SHAPE).max() < 1e-6


def test_two_ddp_processes_give_the_same_masked_fit(tmp_path, clean):
    """Issue 26 must-show 3: masks travel with each rank's block; 1 and 2 CPU DDP processes agree."""
    st = with_pattern(clean, "frame")
    outs = []
    for devices in ("1", "2"):
        root = tmp_path / f"d{devices}.zarr"
        write_zarr(st, root)
        extra = ("--data.ignore_value", "0", "--trainer.devices", devices, "--data.pairs_per_block", "2")
        extra += ("--trainer.strategy", "ddp") if devices == "2" else ()
        run_fit_on(devices, _args(root, *extra), tmp_path)
        outs.append(np.asarray(zarr.open_array(str(root), path=OUT, mode="r").attrs["composed_transforms"]))
    assert composed_error(outs[0], outs[1], SHAPE).max() < 1e-6
    assert composed_error(outs[0], clean.composed, SHAPE).mean() < 0.03


def test_a_journal_of_other_masks_is_not_reused(tmp_path, clean):
    """Resume (issue 26 must-show 3): the journal's fingerprint holds the mask settings, so pairs fitted with other
    masks (or none) are fitted again, not taken over."""
    from sphero_lightning.training.data import ZarrPairDataModule

    root = tmp_path / "j.zarr"
    write_zarr(clean.stack, root)
    prints = []
    for kw in ({}, {"ignore_value": 0}, {"destripe": "vertical"}):
        dm = ZarrPairDataModule(str(root), "images/50-4-4", **kw)
        try:
            prints.append(dm.fingerprint({}, [], []))
        finally:
            dm.release()
    assert prints[1]["masks"]["ignore_value"] == 0 and prints[2]["masks"]["destripe"] == "vertical"
    assert prints[0] != prints[1] and prints[0] != prints[2] and prints[1] != prints[2]


def test_a_band_fixed_in_every_slice_is_left_out_by_default(tmp_path):
    """A dark band fixed in every slice made a foreign slice's pairs match (NCC 0.53) and pulled every slice towards
    the identity: with the defaults it is now left out of the loss (one line), the foreign slice is listed and the
    other slices are within 0.05 px of the truth; ``--data.static_patterns keep`` shows what it cost."""
    shape = (256, 256)
    s = make_stack(em_like_image(384, seed=5).astype(np.float64), 14, shape, max_shift=6, max_rot_deg=1.5, seed=2)
    stack = s.stack.copy()
    stack[7] = make_stack(em_like_image(384, seed=9).astype(np.float64), 1, shape, seed=3).stack[0]
    stack[:, :20] = 0
    results = {}
    for tag, extra in (("default", ()), ("kept", ("--data.static_patterns", "keep"))):
        root = tmp_path / f"{tag}.zarr"
        write_zarr(stack, root)
        attrs, err = fit_attrs(root, "--model.transformation", "rigid", *extra)
        results[tag] = (attrs["volume_solve"]["unregistered"], error_but(attrs, s.composed, shape, 7))
        if tag == "default":
            assert sum("left out of the loss" in ln for ln in err.splitlines()) == 1, err
            assert any(w["text"].startswith("left out of the loss") for w in attrs["warnings"])
    unregistered, others = results["default"]
    assert unregistered == [7] and others.max() < 0.05, results["default"]
    assert results["kept"][1].mean() > 5 * others.mean(), results  # the band pulls when it is kept
