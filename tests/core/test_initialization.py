"""Phase correlation: the translation it finds, and the consecutive-pairs form the fit uses."""

from __future__ import annotations

from itertools import pairwise

import torch

from sphero_lightning.core.initialization import consecutive_phase_correlation, phase_correlation
from sphero_lightning.core.interpolation import gaussian_blur


def test_finds_a_known_shift_and_pairs_of_a_stack_agree():
    g = torch.Generator().manual_seed(5)
    big = gaussian_blur(torch.rand(1, 1, 400, 460, generator=g), 2.0)
    # slice k is the window at (40 + dy_k, 50 + dx_k): moving(x + d) = fixed(x) with d = offset_{k+1} - offset_k
    offsets = [(0, 0), (7, -12), (-5, 3), (20, 9)]
    slices = torch.cat([big[..., 40 + dy:40 + dy + 300, 50 + dx:50 + dx + 340] for dy, dx in offsets])
    pairs = consecutive_phase_correlation(slices)
    want = torch.tensor([[b[1] - a[1], b[0] - a[0]] for a, b in pairwise(offsets)], dtype=pairs.dtype)
    # moving(x + d) = fixed(x): the moving slice's content sits at -d
    assert torch.allclose(pairs, -want, atol=0.35), (pairs, want)
    assert torch.equal(pairs, phase_correlation(slices[:-1], slices[1:]))
