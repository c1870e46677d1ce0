import math

import torch

from sphero_lightning.interpolation import bspline_prefilter, bspline_sample, downscale, inside_weight, warp


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


def test_upsample2_is_the_bspline_interpolant_on_a_twice_finer_grid():
    from sphero_lightning.interpolation import upsample2

    img = torch.rand(2, 1, 20, 30, dtype=torch.float64)
    up = upsample2(img)
    assert up.shape == (2, 1, 40, 60)
    ys = (torch.arange(40, dtype=torch.float64) + 0.5) / 2 - 0.5
    xs = (torch.arange(60, dtype=torch.float64) + 0.5) / 2 - 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ref = bspline_sample(bspline_prefilter(img), gx.expand(2, -1, -1), gy.expand(2, -1, -1))
    assert torch.allclose(up, ref, atol=1e-9)
