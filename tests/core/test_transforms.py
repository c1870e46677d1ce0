"""core/transforms.py: the torch frames (normalized, pixel), composition, the families, the chain with gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sphero_lightning.core.transforms import (
    centered_to_normalized,
    chain_with_gaps,
    compose,
    corner_displacement,
    describe,
    family_basis,
    homogeneous,
    mean_displacement,
    normalized_to_centered,
    normalized_to_pixel,
    params_to_centered,
    params_to_normalized,
    pixel_to_normalized,
)


@pytest.mark.parametrize("shape", [(288, 416), (416, 288), (100, 100)])
def test_rotation_is_a_true_rotation_in_pixels_for_non_square_slices(shape):
    q = torch.tensor([[0.0, 0.0, math.radians(2.0), 0.0, 0.0, 0.0]], dtype=torch.float64)
    theta = params_to_normalized(q, shape)
    m = normalized_to_pixel(theta, shape)[0, :2, :2]
    # Orthonormal with determinant 1 in pixel units: lengths and angles are kept.
    assert torch.allclose(m @ m.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(torch.det(m)), 1.0, abs_tol=1e-12)
    assert math.isclose(describe(theta, shape)[0]["rotation_deg"], 2.0, abs_tol=1e-9)


def test_translation_unit_is_half_the_larger_side():
    shape = (288, 416)
    q = torch.tensor([[0.1, -0.05, 0, 0, 0, 0]], dtype=torch.float64)
    a = params_to_centered(q, shape)
    assert torch.allclose(a[0, :, 2], torch.tensor([20.8, -10.4], dtype=torch.float64))


def test_conversions_round_trip():
    shape = (288, 416)
    q = torch.tensor([[0.03, -0.02, 0.05, 0.01, -0.02, 0.015]], dtype=torch.float64)
    theta = params_to_normalized(q, shape)
    assert torch.allclose(pixel_to_normalized(normalized_to_pixel(theta, shape), shape), theta, atol=1e-12)
    assert torch.allclose(centered_to_normalized(normalized_to_centered(theta, shape), shape), theta, atol=1e-12)


def test_pixel_matrix_agrees_with_affine_grid_sampling():
    # The pixel-index matrix must say where torch samples: check with a one-hot image.
    shape = (20, 30)
    theta = params_to_normalized(torch.tensor([[0.1, 0.2, 0.0, 0, 0, 0]], dtype=torch.float64), shape)
    m = normalized_to_pixel(theta, shape)[0]
    p_out = torch.tensor([5.0, 7.0, 1.0], dtype=torch.float64)
    src = m @ p_out
    grid = torch.nn.functional.affine_grid(theta, [1, 1, *shape], align_corners=False)
    gx, gy = grid[0, 7, 5]
    assert math.isclose(float((gx + 1) * shape[1] / 2 - 0.5), float(src[0]), abs_tol=1e-9)
    assert math.isclose(float((gy + 1) * shape[0] / 2 - 0.5), float(src[1]), abs_tol=1e-9)


def test_compose_chains_in_the_spec_order():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(0, 0.05, (4, 2, 3))) + torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    c = compose(a)
    h = homogeneous(a)
    expect = h[3] @ h[2] @ h[1] @ h[0]
    assert torch.allclose(homogeneous(c)[3], expect)
    assert torch.allclose(c[0], a[0])


def test_families():
    assert family_basis("translation").shape == (2, 6)
    assert family_basis("rigid").shape == (3, 6)
    sim = family_basis("similarity")
    assert sim.shape == (4, 6) and sim[3, 3] == 1 and sim[3, 4] == 1  # one isotropic scale, not rigid
    assert family_basis("affine").shape == (6, 6)
    assert family_basis("affine", scaling=False).shape == (4, 6)
    with pytest.raises(ValueError, match="unknown transformation"):
        family_basis("elastic")


def test_displacements():
    shape = (100, 200)
    t0 = params_to_normalized(torch.zeros(1, 6, dtype=torch.float64), shape)
    t1 = params_to_normalized(torch.tensor([[0.03, 0, 0, 0, 0, 0]], dtype=torch.float64), shape)  # 3 px
    assert math.isclose(float(mean_displacement(t0, t1, shape)), 3.0, rel_tol=1e-9)
    assert math.isclose(float(corner_displacement(t0, t1, shape)), 3.0, rel_tol=1e-9)


def test_chain_with_gaps_interpolates_and_stays_consistent():
    rng = np.random.default_rng(0)
    mats = [np.array([[1, 0.01 * rng.normal(), 0.02 * rng.normal()], [0.01 * rng.normal(), 1, 0.02 * rng.normal()]])
            for _ in range(3)]
    # slices 0..5; slices 2 and 3 damaged: fitted pairs (0,1), (1,4), (4,5)
    fitted = [{"slice_indices": [a, b], "matrix": m.tolist(), "final_loss": 0.1, "status": "ok"}
              for (a, b), m in zip([(0, 1), (1, 4), (4, 5)], mats)]
    composed, pairwise, log = chain_with_gaps(6, fitted, {2: "constant", 3: "constant"})
    c = compose(torch.tensor(np.stack(mats)))  # C_1, C_4, C_5
    assert torch.allclose(composed[0], torch.eye(3, dtype=torch.float64)[:2])
    assert torch.allclose(composed[1], c[0]) and torch.allclose(composed[4], c[1]) and torch.allclose(composed[5], c[2])
    assert torch.allclose(composed[2], (2 * c[0] + c[1]) / 3)  # a third of the way from slice 1 to slice 4
    # the pairwise transforms chain to the composed ones
    assert torch.allclose(compose(pairwise), composed[1:], atol=1e-12)
    assert [e["status"] for e in log] == ["ok", "damaged_slice", "damaged_slice", "damaged_slice", "ok"]
    assert log[2]["bridged_by"]["slice_indices"] == [1, 4]
    assert all(e["slice_indices"] == [i, i + 1] for i, e in enumerate(log))
    assert torch.allclose(homogeneous(pairwise[0:1])[0, :2], torch.tensor(mats[0]))


def test_the_closed_form_jacobian_of_the_matrices_is_autograd_s():
    """``params_jacobian`` (the chain rule of every evaluation and the Gauss-Newton model) equals autograd through
    ``params_to_normalized`` for every family, away from the identity, on a non-square slice."""
    import torch

    from sphero_lightning.core.transforms import family_basis, params_jacobian, params_to_normalized

    g = torch.Generator().manual_seed(0)
    for fam, kw in (("translation", {}), ("rigid", {}), ("similarity", {}), ("affine", {"scaling": True, "shear": True}),
                    ("affine", {"scaling": False, "shear": True})):
        basis = family_basis(fam, **kw)
        p = 0.1 * torch.randn(3, basis.shape[0], dtype=torch.float64, generator=g)
        jac = params_jacobian(p, basis, (100, 140))
        auto = torch.autograd.functional.jacobian(lambda x, b=basis: params_to_normalized(x @ b, (100, 140)).reshape(3, 6), p)
        auto = torch.stack([auto[b, :, b, :] for b in range(3)])
        assert jac.shape == (3, 6, basis.shape[0])
        assert torch.allclose(jac, auto, atol=1e-12), fam
        assert float(jac.abs().max()) > 0.1
