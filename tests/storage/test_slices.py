"""storage/slices.py: the slice scan (blank, constant and NaN slices)."""

from __future__ import annotations

import numpy as np

from sphero_lightning.core.synthetic import make_stack
from sphero_lightning.storage.slices import damaged_slices, slice_stats


def test_slice_scan_finds_blank_constant_and_nan(base_image):
    s = make_stack(base_image, 6, (64, 64), seed=0, dtype="float32")
    st = s.stack.copy()
    st[1] = 0
    st[2] = np.nan
    st[2, 5:10, 5:10] = 7.0  # a few finite pixels: still mostly NaN
    st[3] = st[3].mean() + np.random.default_rng(0).normal(0, 0.5, st[3].shape)  # faint noise, no content
    st[4, 4, 4] = np.nan  # one NaN pixel: registered (left out of the loss), not damaged
    stats = np.array([slice_stats(im) for im in st])
    bad = damaged_slices(stats, 0.05)
    assert sorted(bad) == [1, 2, 3]
    assert bad[1] == "constant" and "non-finite values (NaN or inf) over 100 % of the slice" == bad[2] and bad[3].startswith("blank")
    assert 0.99 < stats[4, 0] < 1.0
