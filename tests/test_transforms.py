import math

import numpy as np
import pytest
import torch

from sphero_lightning.core.transforms import (
    centered_to_normalized,
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


def test_the_frame_type_converts_and_tests_the_identity_for_numpy_and_torch():
    from sphero_lightning.core.frames import Affine, Frame

    theta = np.array([[[0.9, 0.1, 0.05], [-0.2, 1.1, -0.1]]])
    shape = (30, 50)
    for m in (theta, torch.from_numpy(theta)):
        a = Affine(m, Frame.NORMALIZED, shape)
        for frame in Frame:
            assert a.to(frame).matrix.shape[-2:] == (frame.rows, 3)
            back = a.to(frame).to(Frame.NORMALIZED).matrix
            assert type(back) is type(m) and np.allclose(np.asarray(back), theta), frame
            centred = a.to(frame).to(Frame.CENTRED).matrix
            assert np.allclose(np.asarray(centred), np.asarray(a.to(Frame.CENTRED).matrix)), frame
        assert not a.is_identity() and a.is_identity(tol=0.2)
        eye = m * 0 + (torch.eye(3, dtype=m.dtype)[:2] if isinstance(m, torch.Tensor) else np.eye(3)[:2])
        assert Affine(eye, Frame.CENTRED, shape).is_identity() and Affine(eye, Frame.NORMALIZED, shape).to(Frame.PIXEL).is_identity()
    for frame in Frame:  # numpy and torch agree
        assert np.allclose(Affine(torch.from_numpy(theta), Frame.NORMALIZED, shape).to(frame).matrix.numpy(),
                           Affine(theta, Frame.NORMALIZED, shape).to(frame).matrix)
    with pytest.raises(ValueError, match="pixel matrix is"):
        Affine(theta, Frame.PIXEL, shape)
