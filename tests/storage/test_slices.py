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


def test_the_scan_reads_runs_of_slices_and_its_ranks_shares_add_up_to_every_slice(base_image, monkeypatch):
    """scan_stats: small slices several to a read (fewer reads than slices), the same numbers as slice by slice; two
    ranks' shares are disjoint and sum to the whole; the first slices only (--data.max_pairs) read only those."""
    import zarr

    from sphero_lightning.storage import slices

    st = make_stack(base_image, 40, (64, 64), seed=1, dtype="float32").stack
    st[5, 3:9, 3:9] = np.nan
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=st.shape, chunks=(1, 64, 64), dtype=st.dtype)
    arr[:] = st
    reads = []
    monkeypatch.setattr(slices, "read_block", lambda a, z0, z1: reads.append((z0, z1)) or np.asarray(a[z0:z1]))
    whole = slices.scan_stats(arr, 40)
    np.testing.assert_array_equal(whole, np.array([slice_stats(im) for im in st]))
    assert len(reads) == 8 and min(reads) == (0, 5)  # 40 slices in 8 runs of 5 (group_depth)
    shares = [slices.scan_stats(arr, 40, rank, 2) for rank in (0, 1)]
    assert not np.any((shares[0] != 0).all(1) & (shares[1] != 0).all(1))
    np.testing.assert_array_equal(shares[0] + shares[1], whole)
    reads.clear()
    np.testing.assert_array_equal(slices.scan_stats(arr, 12), whole[:12])
    assert max(z1 for _, z1 in reads) == 12  # the slices after them are not read (the scan once read all 40)
