"""core/masks.py (and the value mask of storage/slices.py): what the loss leaves out. Masked pixels change neither the
loss nor the gradient on either evaluation path, the masks erode with the level, destriping, the static-pattern guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sphero_lightning.core.masks import destripe, level_mask, static_patterns
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.slices import value_mask

SHAPE = (160, 160)
FRAME = (24, 16)  # rows at the top, columns at the left, at 0 in every slice
DISK = ((60, 100), 22)  # centre (y, x), radius


def clean_stack():
    """8 slices of 160 x 160 with known misalignment and nothing fixed in the detector."""
    return make_stack(em_like_image(384, seed=5), 8, SHAPE, seed=11)


@pytest.fixture(scope="module")
def clean():
    return clean_stack()


def disk() -> np.ndarray:
    """The bright disk fixed in the detector (:data:`DISK`), as a boolean image."""
    (cy, cx), r = DISK
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def with_pattern(s, case: str) -> np.ndarray:
    """``s``'s slices with a pattern that does not move with the sample: ``frame`` (a dark frame, :data:`FRAME`),
    ``stripes`` (vertical curtaining) or ``disk`` (:func:`disk`)."""
    st = s.stack.astype(np.float64)
    if case == "frame":
        st[:, :FRAME[0]] = 0
        st[:, :, :FRAME[1]] = 0
    elif case == "stripes":
        st += np.random.default_rng(3).normal(0, 40, SHAPE[1])[None, None, :]
    elif case == "disk":
        st[:, disk()] = 250
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
    frame = static_patterns(with_pattern(clean, "frame"), None, "none")
    assert len(frame) == 1 and "--data.ignore_value 0" in frame[0]
    stripes = static_patterns(with_pattern(clean, "stripes"), None, "none")
    assert len(stripes) == 1 and "--data.destripe vertical" in stripes[0]
    assert static_patterns(with_pattern(clean, "stripes"), None, "vertical") == []  # already handled: nothing said
