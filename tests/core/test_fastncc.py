"""The analytic NCC path (fastncc.py) equals autograd through the B-spline sampling: loss and gradient."""

from __future__ import annotations

import pytest
import torch

from sphero_lightning.core.fastncc import ncc_and_gradient, sample_with_gradient
from sphero_lightning.core.interpolation import bspline_prefilter, bspline_sample, gaussian_blur, inside_weight, sample_positions
from sphero_lightning.core.objective import PairObjective


@pytest.fixture(scope="module")
def images(base_image):
    img = torch.from_numpy(base_image[:200, :240].astype("float32") / 255)
    moved = torch.roll(img, shifts=(3, -2), dims=(0, 1))
    stack = gaussian_blur(torch.stack([img, moved, img.flip(0), moved.flip(1)])[:, None], 0.7)
    return stack[:2], bspline_prefilter(stack[2:])


def test_value_and_derivatives_of_the_interpolant(images):
    _, coeffs = images
    g = torch.Generator().manual_seed(0)
    px = (torch.rand(2, 30, 40, generator=g) * 236 + 1).requires_grad_(True)
    py = (torch.rand(2, 30, 40, generator=g) * 196 + 1).requires_grad_(True)
    ref = bspline_sample(coeffs, px, py)[:, 0]
    gx, gy = torch.autograd.grad(ref.sum(), (px, py))
    v, dx, dy = sample_with_gradient(coeffs, px.detach(), py.detach())
    assert torch.allclose(v, ref.detach(), atol=1e-5)
    assert torch.allclose(dx, gx, atol=1e-4) and torch.allclose(dy, gy, atol=1e-4)


@pytest.mark.parametrize("family", ["rigid", "affine"])
def test_loss_and_gradient_equal_autograd(images, family):
    fixed, coeffs = images
    m = PairObjective(transformation=family, regularization=0.3, shape=tuple(fixed.shape[-2:]))
    n = m.n_params
    # off the identity, and far enough out that the border ramp of the inside weight is crossed
    p = torch.tensor([[0.013, -0.021, 0.004, 0.01, -0.02, 0.015][:n], [0.031, 0.017, -0.006, 0.0, 0.01, -0.01][:n]],
                     dtype=torch.float64)
    pr = p.clone().requires_grad_(True)
    ref = m.pair_losses(pr, fixed, coeffs)  # autograd through sampling, weight and loss
    (g_ref,) = torch.autograd.grad(ref.sum(), pr)
    assert m.uses_fast_ncc
    loss, grad, _ = m.evaluate(p, fixed, coeffs)
    assert torch.allclose(loss, ref.detach(), atol=1e-6), (loss, ref)
    rel = (grad - g_ref).abs().amax(1) / g_ref.abs().amax(1)
    assert rel.max() < 2e-3, (grad, g_ref)


def test_the_inside_weights_ramp_counts_in_the_gradient(images):
    """Dropping the weight's derivative (pixels crossing the border) would leave the gradient off."""
    fixed, coeffs = images
    theta = torch.tensor([[[1.0, 0.0, 0.0517], [0.0, 1.0, -0.0331]]] * 2)  # not at whole pixels (kinks of the ramp)
    _, g_full = ncc_and_gradient(theta, fixed, coeffs)
    shifted = theta.clone().double()
    eps = 1e-4
    shifted[:, 0, 2] += eps
    lp, _ = ncc_and_gradient(shifted.float(), fixed, coeffs)
    shifted[:, 0, 2] -= 2 * eps
    lm, _ = ncc_and_gradient(shifted.float(), fixed, coeffs)
    fd = (lp - lm) / (2 * eps)
    assert torch.allclose(g_full[:, 0, 2], fd, rtol=0.05, atol=1e-3), (g_full[:, 0, 2], fd)


def test_chunked_evaluation_equals_one_pass(images, monkeypatch):
    """The evaluation runs over chunks of rows (bounded temporaries); any chunk size gives the same numbers."""
    from sphero_lightning.core import fastncc

    fixed, coeffs = images
    theta = torch.tensor([[[0.999, 0.02, 0.0317], [-0.02, 0.999, -0.0121]]] * 2)
    one = ncc_and_gradient(theta, fixed, coeffs)
    monkeypatch.setattr(fastncc, "CHUNK_PIXELS", 2 * 240 * 7)  # 7 rows of both pairs per chunk: 29 chunks
    chunked = ncc_and_gradient(theta, fixed, coeffs)
    assert torch.allclose(one[0], chunked[0], rtol=0, atol=1e-12)
    assert torch.allclose(one[1], chunked[1], rtol=1e-4, atol=1e-7)  # float32 moment sums, summed in another order
    v1 = sample_with_gradient(coeffs, torch.full((2, 200, 240), 17.3), torch.full((2, 200, 240), 40.6))
    monkeypatch.setattr(fastncc, "CHUNK_PIXELS", 1)  # one row per chunk
    v2 = sample_with_gradient(coeffs, torch.full((2, 200, 240), 17.3), torch.full((2, 200, 240), 40.6))
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))


def test_sampling_without_autograd_equals_the_differentiable_path(images):
    """bspline_sample takes a lean path (4 merged taps) when no gradient is wanted: same values."""
    _, coeffs = images
    g = torch.Generator().manual_seed(1)
    px = torch.rand(2, 30, 40, generator=g) * 237 - 0.5
    py = torch.rand(2, 30, 40, generator=g) * 197 - 0.5
    with torch.no_grad():
        lean = bspline_sample(coeffs, px, py)
    full = bspline_sample(coeffs, px.clone().requires_grad_(True), py)
    assert full.requires_grad and not lean.requires_grad
    assert torch.allclose(lean, full.detach(), atol=2e-6)


def test_value_without_autograd_equals_the_autograd_path(images):
    """The no-grad sampler (four taps read from position planes) equals the differentiable one, multi-channel too."""
    _, coeffs = images
    g = torch.Generator().manual_seed(3)
    px = torch.rand(2, 25, 33, generator=g) * 250 - 5  # some outside the slice: the border is extended alike
    py = torch.rand(2, 25, 33, generator=g) * 210 - 5
    two = torch.cat([coeffs, coeffs.flip(-1)], 1)  # (2, 2, H, W): both channels at the same positions
    with torch.no_grad():
        fast = bspline_sample(two, px, py)
    slow = bspline_sample(two, px.requires_grad_(True), py)
    assert fast.shape == slow.shape == (2, 2, 25, 33)
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


@pytest.mark.parametrize("family", ["rigid", "affine"])
def test_curvature_summed_in_the_pass_equals_the_one_from_images(images, family):
    """The Gauss-Newton Hessian the analytic pass sums on the fly equals the one made from the warped images
    (gauss_newton_hessian, with the interpolant's derivatives), and the fixed slices' coefficients are optional."""
    fixed, coeffs = images
    h, w = fixed.shape[-2:]
    m = PairObjective(transformation=family, regularization=0.2, shape=(h, w))
    p = torch.zeros(2, m.n_params, dtype=torch.float64)
    p[:, 0], p[:, 1], p[:, 2] = torch.tensor([0.011, -0.019]), torch.tensor([0.02, -0.013]), 0.004
    fixed_coeffs = bspline_prefilter(fixed)
    _, _, hess = m.evaluate(p, fixed, coeffs, curvature=True, fixed_coeffs=fixed_coeffs)
    px, py = sample_positions(m.matrices(p).float(), (h, w), (h, w))
    value, dx, dy = sample_with_gradient(coeffs, px, py)
    ref = m.gauss_newton_hessian(p, fixed, value.unsqueeze(1), inside_weight(px, py, (h, w)).unsqueeze(1),
                                 (dx.unsqueeze(1), dy.unsqueeze(1)))
    assert (hess[0].diagonal() > 0).all()
    assert torch.allclose(hess, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max())), (hess, ref)
    _, _, again = m.evaluate(p, fixed, coeffs, curvature=True)  # coefficients made inside
    assert torch.equal(again, hess)
