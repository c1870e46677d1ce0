"""What the loss leaves out and what does not move with the sample (issue 26): value masks, mask arrays, destriping,
the static-pattern guard; the objective's masked loss and gradient, and the options end to end on procedural stacks
with known truth (no real data needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import fit_argv, run_fit

from sphero_lightning.api import register_stack
from sphero_lightning.core.masks import destripe, level_mask, static_patterns
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.synthetic import composed_error, em_like_image, make_stack, render
from sphero_lightning.storage.slices import value_mask
from sphero_lightning.storage.stacks import write_zarr

OUT = "images/registered/50-4-4"
SHAPE = (160, 160)
FRAME = (24, 16)  # rows at the top, columns at the left, at 0 in every slice
DISK = ((60, 100), 22)  # centre (y, x), radius


def _args(root, *extra):
    return fit_argv(root, *extra, levels=3)


def _fit(root, *extra) -> tuple[np.ndarray, dict, str]:
    err = run_fit(_args(root, *extra))
    attrs = dict(zarr.open_array(str(root), path=OUT, mode="r").attrs)
    return np.asarray(attrs["composed_transforms"]), attrs, err


@pytest.fixture(scope="module")
def clean():
    return make_stack(em_like_image(384, seed=5), 8, SHAPE, seed=11)


def _disk() -> np.ndarray:
    (cy, cx), r = DISK
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _case(s, case: str) -> np.ndarray:
    st = s.stack.astype(np.float64)
    if case == "frame":
        st[:, :FRAME[0]] = 0
        st[:, :, :FRAME[1]] = 0
    elif case == "stripes":
        st += np.random.default_rng(3).normal(0, 40, SHAPE[1])[None, None, :]
    elif case == "disk":
        st[:, _disk()] = 250
    return np.clip(np.rint(st), 0, 255).astype(np.uint8)


def _objective_inputs(seed: int = 0):
    img = torch.from_numpy(em_like_image(96, seed=seed)[:64, :64].astype(np.float32) / 255)[None, None]
    fixed = torch.cat([img, img.roll(2, -1)])
    moving = torch.cat([img.roll(1, -2), img.roll(-1, -1)])
    m = torch.ones(2, 1, 64, 64)
    m[:, :, :20] = 0  # the top 20 rows of every slice left out
    return fixed, moving, level_mask(m, 1, 0.7)


@pytest.mark.parametrize("loss", ["ncc", "mse"])
def test_masked_pixels_do_not_count(loss):
    """Catches a mask ignored (or applied to one slice only) by either evaluation path: changing pixels deep inside
    the masked rows of both slices changes neither loss nor gradient with the masks, and both without them."""
    fixed, moving, m = _objective_inputs()
    obj = PairObjective("rigid", loss=loss, shape=(64, 64))
    p = torch.tensor([[0.01, -0.02, 0.005], [-0.01, 0.0, 0.0]], dtype=torch.float64)
    f2, m2 = fixed.clone(), moving.clone()
    f2[:, :, :8] = 1.0
    m2[:, :, :8] = 0.0
    got = {}
    for key, masks in (("masked", (m, m)), ("plain", None)):
        for tag, (f, mv) in (("a", (fixed, moving)), ("b", (f2, m2))):
            loss_v, grad, _ = obj.evaluate(p, f, obj.moving_coeffs(mv), masks=masks)
            got[key, tag] = loss_v, grad
    assert torch.allclose(got["masked", "a"][0], got["masked", "b"][0], atol=1e-6)
    assert torch.allclose(got["masked", "a"][1], got["masked", "b"][1], atol=1e-5)
    assert (got["plain", "a"][0] - got["plain", "b"][0]).abs().max() > 1e-3


def test_masked_gradient_is_the_losss_gradient():
    """The default objective's analytic gradient with masks (the sampled moving mask's boundary included) equals
    central differences of its loss and the autograd path's gradient."""
    fixed, moving, m = _objective_inputs(seed=1)
    obj = PairObjective("affine", shape=(64, 64))
    mm = level_mask(m.flip(-1).flip(-2).clone(), 1, 0.0)
    masks = (m, mm)
    coeffs = obj.moving_coeffs(moving)
    p = torch.randn(2, obj.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.02
    _, grad, _ = obj.evaluate(p, fixed, coeffs, masks=masks)
    pa = p.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(obj.pair_losses(pa, fixed, coeffs, masks=masks).sum(), pa)
    assert torch.allclose(grad, ga, atol=1e-4, rtol=1e-4)
    eps = 1e-4
    for k in range(obj.n_params):
        e = torch.zeros_like(p)
        e[:, k] = eps
        fd = (obj.evaluate(p + e, fixed, coeffs, masks=masks)[0] - obj.evaluate(p - e, fixed, coeffs, masks=masks)[0]) / (2 * eps)
        # 1 %: the sampled mask is piecewise linear, a difference can straddle a kink of many boundary pixels at once
        assert torch.allclose(fd, grad[:, k], atol=1e-2 * grad.abs().max().item()), (k, fd, grad[:, k])


def test_value_mask_keeps_isolated_pixels_and_level_mask_erodes():
    s = np.full((1, 32, 32), 9, dtype=np.uint8)
    s[0, :, :10] = 0
    s[0, 20, 20] = 0  # a dark content pixel, not padding
    m = torch.from_numpy(value_mask(s, 0))
    assert m[0, :, :10].sum() == 0 and m[0, 20, 20] == 1 and m[0, :, 10:].all()
    lv = level_mask(m[:, None].float(), 1, 0.7)  # eroded by 3 * 0.7 -> 3, + MARGIN 2 = 5 px
    assert lv[0, 0, :, :15].sum() == 0 and lv[0, 0, :, 15:].all()
    assert level_mask(m[:, None].float(), 2, 0.7).shape == (1, 1, 16, 16)


def test_destripe_removes_column_offsets_and_keeps_the_rest():
    img = torch.from_numpy(em_like_image(64, seed=2)[:48, :48].astype(np.float32))[None, None]
    stripes = torch.from_numpy(np.random.default_rng(0).normal(0, 30, 48).astype(np.float32)).view(1, 1, 1, 48)
    a, b = destripe(img, "vertical"), destripe(img + stripes, "vertical")
    assert torch.allclose(a - a.mean(), b - b.mean(), atol=1e-3)  # the stripes are gone exactly (their mean stays)
    assert destripe(img, "none") is img
    assert (a - img).abs().mean() < img.std()  # the image itself survives (its own column means go)


def test_static_patterns_are_found_and_named(clean):
    assert static_patterns(clean.stack, None, "none") == []
    frame = static_patterns(_case(clean, "frame"), None, "none")
    assert len(frame) == 1 and "--data.ignore_value 0" in frame[0]
    stripes = static_patterns(_case(clean, "stripes"), None, "none")
    assert len(stripes) == 1 and "--data.destripe vertical" in stripes[0]
    assert static_patterns(_case(clean, "stripes"), None, "vertical") == []  # already handled: nothing said


def test_ignore_value_leaves_a_dark_frame_out(tmp_path, clean):
    """Issue 26 must-show 1: a static dark frame pulls pairs towards the identity; --data.ignore_value 0 leaves it
    out. Since issue 35 the defaults leave it out too (said in one line, recorded); ``--data.static_patterns keep``
    uses it, warns and names the option; the page lists the mask and how much it left."""
    st = _case(clean, "frame")
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
    st = _case(clean, "disk")
    errs = {}
    for tag in ("plain", "2d", "3d"):
        root = tmp_path / f"{tag}.zarr"
        write_zarr(st, root)
        extra = ("--data.static_patterns", "keep")
        if tag != "plain":
            m = (~_disk()).astype(np.uint8)
            zarr.open_group(str(root), mode="a").create_array("mask", data=m if tag == "2d" else np.repeat(m[None], 8, 0))
            extra = ("--data.mask_array", "mask")
        comp, _, _ = _fit(root, *extra)
        errs[tag] = composed_error(comp, clean.composed, SHAPE).mean()
    assert errs["2d"] < 0.03 and abs(errs["2d"] - errs["3d"]) < 1e-6 and errs["plain"] > 3 * errs["2d"], errs


def test_bad_mask_array_is_a_one_line_error(tmp_path, clean):
    root = tmp_path / "b.zarr"
    write_zarr(clean.stack, root)
    zarr.open_group(str(root), mode="a").create_array("mask", data=np.ones((5, 5), np.uint8))
    r = subprocess.run([sys.executable, "-m", "sphero_lightning", *_args(root, "--data.mask_array", "mask")],
                       capture_output=True, text=True, cwd=tmp_path, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--data.mask_array 'mask' has shape (5, 5)" in r.stderr


def test_destripe_removes_curtaining(tmp_path, clean):
    st = _case(clean, "stripes")
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
    st = _case(clean, "disk")
    m = (~_disk()).astype(np.uint8)
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
    st = _case(clean, "frame")
    outs = []
    for devices in ("1", "2"):
        root = tmp_path / f"d{devices}.zarr"
        write_zarr(st, root)
        extra = ("--data.ignore_value", "0", "--trainer.devices", devices, "--data.pairs_per_block", "2")
        extra += ("--trainer.strategy", "ddp") if devices == "2" else ()
        r = subprocess.run([sys.executable, "-m", "sphero_lightning", *_args(root, *extra)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
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
