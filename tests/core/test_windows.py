"""A window of a slice, computed from only the source region it needs, equals the whole slice's result to the last
bit or two (core/windows.py): the writer's chunks do not change the output."""

from __future__ import annotations

import random

import pytest
import torch

from sphero_lightning.core import interpolation as interp
from sphero_lightning.core import warping, windows


@pytest.mark.parametrize("shape", [(100, 120), (1100, 1300), (500, 1000), (1000, 500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefilter_window_equals_the_whole_slice(shape, dtype):
    """Short axes (the exact dense inverse) and long ones (the banded filter), alone and mixed, random windows
    including the mirrored borders."""
    h, w = shape
    gen = torch.Generator().manual_seed(h + w)
    x = torch.rand(h, w, dtype=dtype, generator=gen) * 255
    whole = interp.bspline_prefilter(x[None, None])[0, 0]
    rnd = random.Random(h * w)
    windows_ = [((0, h + 4), (0, w + 4)), ((0, 3), (w + 1, w + 4))]
    for _ in range(8):
        r0 = rnd.randrange(0, h + 3)
        c0 = rnd.randrange(0, w + 3)
        windows_.append(((r0, rnd.randrange(r0 + 1, h + 5)), (c0, rnd.randrange(c0 + 1, w + 5))))
    for rows, cols in windows_:
        (a, b), (c, d) = windows.source_span(*rows, h), windows.source_span(*cols, w)
        got = windows.prefilter_window(x[a:b, c:d], (h, w), (a, c), rows, cols)
        # bit for bit where the BLAS sums both shapes in the same order; MKL on an AMD EPYC (AVX512) picks other
        # kernels for tiny windows: 1 ulp of the slice's range there (3e-5 of 255 in float32, 1e-13 in float64)
        ref = whole[rows[0]:rows[1], cols[0]:cols[1]]
        ulp = torch.finfo(dtype).eps * float(whole.abs().max())
        assert float((got - ref).abs().max()) <= 2 * ulp, (rows, cols)
        if h > interp.DENSE_MAX and w > interp.DENSE_MAX and b - a < h:  # a long axis reads a band, not the slice
            assert b - a <= rows[1] - rows[0] + 2 * interp._BAND + 2 * interp._RADIUS + 2 * interp.PAD


def test_window_read_must_cover_the_span():
    x = torch.zeros(10, 10)
    with pytest.raises(ValueError, match="do not cover"):
        windows.prefilter_window(x, (1100, 1300), (500, 500), (500, 520), (500, 520))


@pytest.mark.parametrize("shape", [(120, 140), (900, 1000)])
def test_sampling_a_window_canvas_equals_the_whole_slice(shape, monkeypatch):
    """The canvas outside the window is NaN here: a single read outside the region would turn up in the result."""
    monkeypatch.setattr(windows, "CANVAS_FILL", float("nan"))
    h, w = shape
    x = torch.rand(h, w, generator=torch.Generator().manual_seed(1)) * 255
    theta = torch.tensor([[[0.99, 0.02, 0.013], [-0.021, 1.01, -0.02]]])
    whole = interp.bspline_prefilter(x[None, None])
    for out_shape, offset in (((40, 50), (37, 51)), ((h - 20, w - 30), (10, 15)), ((1, 7), (h - 1, 0))):
        canvas = windows.bspline_window(lambda a, b, c, d: x[a:b, c:d], theta, (h, w), out_shape, offset)
        got = warping.warp_coefficients(canvas, theta, (h, w), out_shape, offset, (h, w))
        ref = warping.warp_coefficients(whole, theta, (h, w), out_shape, offset, (h, w))
        assert torch.isfinite(got).all()
        assert torch.equal(got, ref)
