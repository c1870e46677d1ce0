"""core/crop.py: the largest box valid in every slice, against a brute-force search."""

import itertools

import numpy as np
import torch

from sphero_lightning.core.crop import crop_box, largest_box, valid_row_intervals
from sphero_lightning.core.transforms import normalized_to_pixel, params_to_normalized


def _valid_mask(mats, shape):
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    pts = np.stack([x.ravel(), y.ravel(), np.ones(h * w)])
    ok = np.ones(h * w, bool)
    for m in mats:
        q = m @ pts
        ok &= (q[0] >= -1e-6) & (q[0] <= w - 1 + 1e-6) & (q[1] >= -1e-6) & (q[1] <= h - 1 + 1e-6)
    return ok.reshape(h, w)


def _brute_force(mask):
    h, w = mask.shape
    s = np.zeros((h + 1, w + 1), int)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    best = 0
    for u, d in itertools.combinations(range(h + 1), 2):
        for lft, r in itertools.combinations(range(w + 1), 2):
            area = (d - u) * (r - lft)
            if area > best and s[d, r] - s[u, r] - s[d, lft] + s[u, lft] == area:
                best = area
    return best


def _mats(seed, n, shape):
    rng = np.random.default_rng(seed)
    q = np.zeros((n, 6))
    q[:, :2] = rng.uniform(-0.15, 0.15, (n, 2))
    q[:, 2] = rng.uniform(-0.2, 0.2, n)
    q[:, 3:5] = rng.uniform(-0.05, 0.05, (n, 2))
    q[:, 5] = rng.uniform(-0.05, 0.05, n)
    return normalized_to_pixel(params_to_normalized(torch.from_numpy(q), shape), shape).numpy()


def test_crop_box_is_valid_and_largest_against_brute_force():
    for seed, shape in [(0, (17, 23)), (1, (20, 20)), (2, (15, 26)), (3, (22, 14))]:
        mats = _mats(seed, 3, shape)
        mask = _valid_mask(mats, shape)
        up, down, left, right = crop_box(mats, shape)
        assert mask[up:down, left:right].all(), "a pixel of the box falls outside a warped slice"
        assert (down - up) * (right - left) == _brute_force(mask)


def test_row_intervals_match_the_pixel_mask():
    shape = (31, 40)
    mats = _mats(7, 5, shape)
    lo, hi = valid_row_intervals(mats, shape)
    mask = _valid_mask(mats, shape)
    for y in range(shape[0]):
        cols = np.flatnonzero(mask[y])
        if len(cols):
            assert (lo[y], hi[y]) == (cols[0], cols[-1])
        else:
            assert lo[y] > hi[y]


def test_identity_keeps_everything_and_margin_shrinks():
    shape = (10, 12)
    eye = np.eye(3)[None]
    assert crop_box(eye, shape) == [0, 10, 0, 12]
    assert crop_box(eye, shape, margin=2) == [2, 8, 2, 10]
    assert largest_box(np.array([5, 5]), np.array([4, 4])) is None
