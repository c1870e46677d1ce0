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


def test_the_compiled_ncc_at_the_identity_is_the_torch_one(base_image):
    """``pair_ncc_identity_compiled`` (what a compiled fit records as ``ncc_before``) equals ``pair_ncc_identity``, with
    and without masks."""
    import pytest

    from sphero_lightning.core import kernels

    if not kernels.available():
        pytest.skip("numba is a dependency; SPHERO_KERNELS=torch turned it off")
    img = torch.from_numpy(base_image[:192, :80].reshape(3, 64, 80).copy()).float() / 255
    m = PairObjective(shape=(64, 80))
    imgs = m.level_stack(img.unsqueeze(1), 1.0)
    p = torch.zeros(2, m.n_params, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    masks = ((torch.rand(2, 1, 64, 80, generator=g) > 0.1).float(), (torch.rand(2, 1, 64, 80, generator=g) > 0.3).float())
    for mk in (None, masks):
        torch_ncc = m.pair_ncc_identity(p, imgs[:-1], imgs[1:], mk)
        compiled = m.pair_ncc_identity_compiled(p, imgs[:-1], imgs[1:], mk)
        assert torch.allclose(torch_ncc, compiled, atol=1e-6), (torch_ncc, compiled)
    assert not torch.allclose(m.pair_ncc_identity_compiled(p, imgs[:-1], imgs[1:], masks),
                              m.pair_ncc_identity_compiled(p, imgs[:-1], imgs[1:]), atol=1e-3)  # the masks count


def test_the_penalty_gradient_is_the_penalty_s_derivative():
    m = PairObjective(transformation="affine", regularization=0.3, shape=(64, 80))
    p = torch.randn(3, m.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    m.penalty(p).sum().backward()
    assert float(p.grad.abs().max()) > 0.01  # the penalty depends on these parameters
    torch.testing.assert_close(m.penalty_gradient(p.detach()), p.grad)
