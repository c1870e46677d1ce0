"""core/objective.py: the pair objective's evaluations (the loss, its gradient and curvature are tested with their
evaluation paths in test_fastncc.py, test_kernels.py and test_solvers.py)."""

from __future__ import annotations

import torch

from sphero_lightning.core.objective import PairObjective


def test_ncc_at_the_identity_needs_no_resampling(base_image):
    """``pair_ncc_identity`` (used for ``ncc_before``) equals ``pair_ncc`` at parameters 0."""
    img = torch.from_numpy(base_image[:192, :64].reshape(3, 64, 64).copy()).float() / 255
    for mode, tol in (("bspline", 1e-5), ("bicubic", 1e-5), ("bspline2x", 5e-3)):
        m = PairObjective(interpolation=mode, shape=(64, 64))
        imgs = m.level_stack(img.unsqueeze(1), 1.0)
        p = torch.zeros(2, m.n_params, dtype=torch.float64)
        resampled = m.pair_ncc(p, imgs[:-1], m.moving_coeffs(imgs[1:]))
        direct = m.pair_ncc_identity(p, imgs[:-1], imgs[1:])
        assert torch.allclose(resampled, direct, atol=tol), (mode, resampled, direct)
        assert direct.abs().max() < 0.9  # different slices: far from a perfect match
