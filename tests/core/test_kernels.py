"""Issue 37: the default objective's compiled pass (core/kernels.py) gives the torch path's loss, gradient and
Gauss-Newton sums, with and without masks, whatever the number of threads; without numba the torch path runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sphero_lightning.core import fastncc, kernels
from sphero_lightning.core.interpolation import bspline_prefilter
from sphero_lightning.core.synthetic import em_like_image, make_stack

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is a dependency; SPHERO_KERNELS=torch turned it off")


@pytest.fixture(scope="module")
def pairs():
    s = make_stack(em_like_image(256, seed=1).astype(np.float64), 5, (96, 112), max_shift=4, seed=2)
    img = torch.from_numpy(s.stack.astype(np.float32) / 255)[:, None]
    fixed, moving = img[:-1], img[1:]
    g = torch.Generator().manual_seed(3)
    theta = torch.eye(3, dtype=torch.float64)[:2].expand(4, 2, 3).clone() + 0.02 * torch.randn(4, 2, 3, generator=g,
                                                                                                 dtype=torch.float64)
    fm = (torch.rand(4, 1, 96, 112, generator=g) > 0.05).float()
    mm = torch.ones(4, 1, 96, 112)
    mm[:, :, 30:50, 40:70] = 0
    return fixed, bspline_prefilter(moving), bspline_prefilter(fixed), theta, (fm, mm)


def _both(monkeypatch, *args, **kwargs):
    out = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "available", lambda c=compiled: c)
        curv: dict = {}
        loss, grad = fastncc.ncc_and_gradient(*args, curvature=curv, compiled=True, **kwargs)
        out.append((loss, grad, curv))
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masks"])
def test_the_compiled_pass_gives_the_torch_path_s_results(pairs, monkeypatch, masked):
    fixed, coeffs, fcoeffs, theta, masks = pairs
    (l1, g1, c1), (l0, g0, c0) = _both(monkeypatch, theta, fixed, coeffs, fixed_coeffs=fcoeffs,
                                       masks=masks if masked else None)
    assert float((l1 - l0).abs().max()) < 1e-6  # positions in float64 there, float32 here: ~1e-7
    assert float(((g1 - g0).abs() / g0.abs().amax((1, 2), keepdim=True)).max()) < 1e-4
    assert set(c1) == set(c0)
    for key in c0:
        if key == "sums":  # the compiled pass sums the data as they are (float64), torch centres them: compare what
            a, b = (torch.stack([s[:, 0], s[:, 3] - s[:, 1] ** 2 / s[:, 0], s[:, 4] - s[:, 2] ** 2 / s[:, 0],
                                 s[:, 5] - s[:, 1] * s[:, 2] / s[:, 0]], 1) for s in (c1[key], c0[key]))  # S1, vf, vm, cov
            assert float(((a - b).abs() / b.abs()).max()) < 1e-4
            continue
        assert float((c1[key] - c0[key]).abs().max() / c0[key].abs().max()) < 1e-4, key


def test_the_compiled_pass_does_not_depend_on_the_number_of_threads(pairs, monkeypatch):
    fixed, coeffs, fcoeffs, theta, _ = pairs
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fastncc.ncc_and_gradient(theta, fixed, coeffs, fixed_coeffs=fcoeffs, curvature={}, compiled=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_small_fit_never_loads_numba(tmp_path):
    """Under kernels.MIN_WORK the torch path runs: a tiny fit does not pay numba's start (~0.5-0.8 s a process); a fit
    of many large pairs decides for the compiled pass once, for all its evaluations."""
    assert not kernels.worth(3, 64 * 64) and kernels.worth(57, 512 * 512)
    from sphero_lightning.storage.stacks import write_zarr

    write_zarr(make_stack(em_like_image(128, seed=1), 4, (64, 64), seed=1).stack, tmp_path / "t.zarr")
    code = ("import sys\nfrom sphero_lightning.commands.main import main\n"
            f"main(['fit', '--data.root', {str(tmp_path / 't.zarr')!r}, '--data.array', 'images/50-4-4', "
            "'--trainer.logger', 'false', '--trainer.enable_progress_bar', 'false'])\nprint('numba' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout


def test_without_numba_the_torch_path_runs():
    code = ("from sphero_lightning.core import kernels, fastncc\nimport torch\n"
            "x = torch.rand(1, 1, 32, 32)\nfrom sphero_lightning.core.interpolation import bspline_prefilter\n"
            "l, g = fastncc.ncc_and_gradient(torch.eye(3, dtype=torch.float64)[:2][None], x, bspline_prefilter(x),"
            " compiled=True)\n"
            "print(kernels.available(), abs(float(l[0])) < 1e-6)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "SPHERO_KERNELS": "torch"})
    assert r.stdout.split() == ["False", "True"], r.stdout  # the same slice: NCC 1, loss 0


def test_a_fit_on_the_compiled_pass_gives_the_torch_fit_s_transforms_and_records():
    """A block fitted coarse to fine with ``objective.compiled`` (what a large fit decides) ends where the torch fit
    ends (the same iterates to rounding: a few 1e-6 px) and records the same NCC before and after."""
    from sphero_lightning.core.fit import Level, fit_block
    from sphero_lightning.core.objective import PairObjective

    s = make_stack(em_like_image(256, seed=4).astype(np.float64), 4, (128, 128), max_shift=4, seed=5)
    slices = torch.from_numpy(s.stack.astype(np.float32) / 255)[:, None]
    levels = [Level(4.0, 100, 1e-2), Level(2.0, 100, 1e-2), Level(1.0, 100, 1e-2)]
    out = []
    for compiled in (False, True):
        obj = PairObjective("rigid", shape=(128, 128))
        obj.compiled = compiled
        out.append(fit_block(obj, levels, slices, torch.arange(3), torch.arange(1, 4)))
    for q in range(3):
        a, b = out[0][q], out[1][q]
        assert np.abs(np.asarray(a["matrix"]) - np.asarray(b["matrix"])).max() * 64 < 1e-4, (a["matrix"], b["matrix"])
        assert abs(a["ncc_before"] - b["ncc_before"]) < 1e-5 and abs(a["ncc_after"] - b["ncc_after"]) < 1e-5
        assert a["ncc_after"] > a["ncc_before"] + 0.05


@pytest.mark.parametrize("shape", [(3, 96, 112), (2, 9, 8), (1, 3, 5), (2, 30, 25)])
def test_the_compiled_prefilter_gives_the_dense_inverse_s_coefficients(shape):
    """The recursive B-spline prefilter (long lines: the causal start over a horizon; short ones: in closed form)
    gives the torch path's exact inverse of the [1 4 1] / 6 filter, mirrored borders included, to float32 rounding."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(7))
    ref = bspline_prefilter(x[:, None])[:, 0].numpy()
    got = kernels.bspline_prefilter(x.numpy())
    assert got.shape == ref.shape and np.abs(got - ref).max() < 4e-6 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("shape", [(3, 96, 112), (1, 3, 5)])
def test_the_compiled_blur_gives_the_torch_blur(shape):
    from sphero_lightning.core.interpolation import gaussian_blur, gaussian_kernel

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(8))
    ref = gaussian_blur(x[:, None], 0.7)[:, 0].numpy()
    assert np.abs(kernels.gaussian_blur(x.numpy(), gaussian_kernel(0.7).double().numpy()) - ref).max() < 1e-6
