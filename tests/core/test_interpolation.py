"""core/interpolation.py: the B-spline prefilter and sampling, the inside weights, the pyramid's downscaling."""

import math

import pytest
import torch

from sphero_lightning.core.interpolation import bspline_prefilter, bspline_sample, downscale, inside_weight
from sphero_lightning.core.warping import warp


def _smooth(h=40, w=50, dtype=torch.float64):
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return (torch.sin(x / 4.0) * torch.cos(y / 5.0) + 0.3 * torch.sin((x + y) / 7.0))[None, None]


def test_bspline_interpolates_the_samples_exactly():
    img = torch.rand(2, 1, 33, 47, dtype=torch.float64)
    c = bspline_prefilter(img)
    y, x = torch.meshgrid(torch.arange(33.0, dtype=torch.float64), torch.arange(47.0, dtype=torch.float64), indexing="ij")
    out = bspline_sample(c, x.expand(2, -1, -1), y.expand(2, -1, -1))
    assert torch.allclose(out, img, atol=1e-6)


def test_bspline_between_samples_is_accurate_for_smooth_content():
    img = _smooth()
    c = bspline_prefilter(img)
    y, x = torch.meshgrid(torch.arange(10, 30, dtype=torch.float64) + 0.37, torch.arange(10, 40, dtype=torch.float64) + 0.61, indexing="ij")
    truth = torch.sin(x / 4.0) * torch.cos(y / 5.0) + 0.3 * torch.sin((x + y) / 7.0)
    out = bspline_sample(c, x[None], y[None])[0, 0]
    assert (out - truth).abs().max() < 2e-3


def test_gradient_with_respect_to_position_matches_finite_differences():
    c = bspline_prefilter(_smooth())
    x = torch.tensor([[[12.3]]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[[17.8]]], dtype=torch.float64)
    v = bspline_sample(c, x, y).sum()
    (g,) = torch.autograd.grad(v, x)
    eps = 1e-5
    fd = (bspline_sample(c, x.detach() + eps, y) - bspline_sample(c, x.detach() - eps, y)).item() / (2 * eps)
    assert math.isclose(g.item(), fd, rel_tol=1e-4, abs_tol=1e-8)


def test_inside_weight_ramps_at_the_border():
    px = torch.tensor([[[-1.0, 0.0, 0.5, 1.0, 5.0, 9.0, 10.0]]])
    w = inside_weight(px, torch.full_like(px, 5.0), (11, 10))
    assert w.tolist() == [[[0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.0]]]


def test_warp_identity_and_shift():
    img = _smooth(32, 32)
    ident = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    assert torch.allclose(warp(img, ident), img, atol=1e-6)
    shift = ident.clone()
    shift[0, 0, 2] = 2 * 3 / 32  # 3 px in normalized units
    out = warp(img, shift)
    assert torch.allclose(out[..., :, :20], img[..., :, 3:23], atol=1e-6)


def test_downscale_keeps_the_extent():
    img = torch.rand(1, 1, 100, 60)
    assert downscale(img, 4).shape[-2:] == (25, 15)
    assert downscale(img, 1) is img


def _tent_matrix(n_in: int, n_out: int):
    """Anti-aliased linear resampling as a matrix, from its definition (numpy, float64): output sample ``i`` sits at
    ``(i + 0.5) s - 0.5`` in input pixel indices (``s = n_in / n_out``: the same extent edge to edge) and averages the
    input with a tent ``max(0, 1 - |d| / s)`` stretched by the factor, its weights renormalized to sum to 1 (the
    tent's part outside the slice is dropped)."""
    import numpy as np

    s = n_in / n_out
    centre = (np.arange(n_out) + 0.5) * s - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centre[:, None]) / s)
    return w / w.sum(1, keepdims=True), centre


@pytest.mark.parametrize("shape,factor,out", [((100, 60), 4, (25, 15)), ((90, 75), 3, (30, 25)),
                                              ((101, 67), 2.5, (40, 27)), ((40, 30), 8, (8, 8))])
def test_downscale_values_are_the_stretched_tent_filter(shape, factor, out):
    """downscale's values against the filter written out directly (any factor, the 8 px floor included)."""
    import numpy as np

    g = torch.Generator().manual_seed(5)
    img = torch.rand(2, 1, *shape, generator=g, dtype=torch.float64)
    got = downscale(img, factor)
    assert got.shape[-2:] == out
    my, _ = _tent_matrix(shape[0], out[0])
    mx, _ = _tent_matrix(shape[1], out[1])
    ref = np.einsum("ih,bhw,jw->bij", my, img[:, 0].numpy(), mx)
    assert np.allclose(got[:, 0].numpy(), ref, rtol=1e-10, atol=1e-12), np.abs(got[:, 0].numpy() - ref).max()
    got32 = downscale(img.float(), factor)[:, 0].double().numpy()
    assert np.allclose(got32, ref, rtol=1e-5, atol=1e-6), np.abs(got32 - ref).max()


def test_downscale_keeps_constants_and_linear_ramps_at_the_new_sample_positions():
    """A constant stays that constant everywhere; a ramp (integer factor, away from the borders where the tent is cut)
    becomes the ramp sampled at the new pixel centres ``(i + 0.5) factor - 0.5``: nothing shifts between levels."""
    import numpy as np

    const = torch.full((1, 1, 97, 64), 0.37, dtype=torch.float64)
    for factor in (2, 3, 4, 2.5):
        assert torch.allclose(downscale(const, factor), torch.full_like(downscale(const, factor), 0.37), rtol=0, atol=1e-12)
    h, w = 96, 120
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = (0.5 + 0.013 * x - 0.007 * y)[None, None]
    for factor in (2, 3, 4):
        got = downscale(ramp, factor)[0, 0].numpy()
        cy = (np.arange(h // factor) + 0.5) * factor - 0.5
        cx = (np.arange(w // factor) + 0.5) * factor - 0.5
        expect = 0.5 + 0.013 * cx[None, :] - 0.007 * cy[:, None]
        assert np.allclose(got[1:-1, 1:-1], expect[1:-1, 1:-1], rtol=0, atol=1e-12), factor


def test_upsample2_is_the_bspline_interpolant_on_a_twice_finer_grid():
    from sphero_lightning.core.interpolation import upsample2

    img = torch.rand(2, 1, 20, 30, dtype=torch.float64)
    up = upsample2(img)
    assert up.shape == (2, 1, 40, 60)
    ys = (torch.arange(40, dtype=torch.float64) + 0.5) / 2 - 0.5
    xs = (torch.arange(60, dtype=torch.float64) + 0.5) / 2 - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ref = bspline_sample(bspline_prefilter(img), gx.expand(2, -1, -1), gy.expand(2, -1, -1))
    assert torch.allclose(up, ref, atol=1e-9)


def _reference_prefilter(img: torch.Tensor) -> torch.Tensor:
    """The textbook form: truncated symmetric FIR inverse of [1 4 1] / 6 with reflect padding, by convolution."""
    import torch.nn.functional as F

    from sphero_lightning.core.interpolation import PAD, _prefilter_kernel

    b, c, h, w = img.shape
    x = img.reshape(b * c, 1, h, w)
    for dim, size in ((3, w), (2, h)):
        r = min(16, size - 1)
        k = _prefilter_kernel(r, x.dtype, x.device)
        if dim == 3:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        else:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect").reshape(b, c, h + 2 * PAD, w + 2 * PAD)


def test_dense_and_banded_filters_agree_with_direct_convolution(monkeypatch):
    import torch.nn.functional as F

    import sphero_lightning.core.interpolation as interp

    img = torch.rand(2, 1, 70, 150, dtype=torch.float64)
    ref = _reference_prefilter(img)
    sigma = 0.7
    r = math.ceil(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    blur_ref = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    dense = interp.bspline_prefilter(img)
    dense_blur = interp.gaussian_blur(img, sigma)
    monkeypatch.setattr(interp, "DENSE_MAX", 16)  # both axes take the banded path (several bands on x)
    banded = interp.bspline_prefilter(img)
    banded_blur = interp.gaussian_blur(img, sigma)
    assert dense.shape == banded.shape == ref.shape
    assert (dense - ref).abs().max() < 1e-8  # exact inverse vs the FIR truncated at |pole|**16
    assert (banded - ref).abs().max() < 1e-12
    assert (dense_blur - blur_ref).abs().max() < 1e-12
    assert (banded_blur - blur_ref).abs().max() < 1e-12
    # and the banded coefficients interpolate the samples
    y, xx = torch.meshgrid(torch.arange(70.0, dtype=torch.float64), torch.arange(150.0, dtype=torch.float64), indexing="ij")
    assert torch.allclose(bspline_sample(banded, xx.expand(2, -1, -1), y.expand(2, -1, -1)), img, atol=1e-6)
