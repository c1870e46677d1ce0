"""core/fit.py: a block of pairs fitted by plain functions without Lightning equals the Lightning run bit for bit (issue
27; the whole stack: test_stack.py); with ``sync_free`` (issue 28) a block's levels read the device's state a bounded
number of times, whatever the block size and however many steps a level takes, and give the same transforms as the
default (compacted) fit. Host reads are counted on the CPU with a TorchDispatchMode on the operators that read a
tensor on the host (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``;
``aten.nonzero``: boolean indexing, ``nonzero``)."""

from __future__ import annotations

import collections
import contextlib
import io
import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sphero_lightning.commands.main import main
from sphero_lightning.core.fastncc import ncc_and_gradient
from sphero_lightning.core.fit import BlockFit, Level, StoppingRule, fit_block, reads_state
from sphero_lightning.core.interpolation import bspline_prefilter
from sphero_lightning.core.masks import block_images, to_tensor
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.pairs import StackPairs, block_layout
from sphero_lightning.core.stack import pyramid_levels, stopping_rule
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.slices import intensity_range, slice_stats
from sphero_lightning.storage.stacks import write_zarr

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class CountHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in HOST_READS
        return func(*args, **(kwargs or {}))


def weak_pairs(n: int, size: int = 96) -> torch.Tensor:
    """``n + 1`` slices, each cut from its own synthetic image but sharing a common part: pairs that match weakly
    (several BFGS steps a level, different for every pair), like consecutive real sections."""
    common = em_like_image(size + 32, seed=1).astype(np.float32)
    s = make_stack(common, n + 1, (size, size), seed=2).stack.astype(np.float32)
    own = np.stack([em_like_image(size, seed=10 + k) for k in range(n + 1)]).astype(np.float32)
    return torch.from_numpy(0.6 * s + 0.4 * own)[:, None] / 255


def run(slices: torch.Tensor, sync_free: bool, budget: int = 100, tol: float = 0.003, model: str = "rigid",
        masks: torch.Tensor | None = None):
    """Fit one block of consecutive pairs; host reads and steps per level, and the results."""
    n, size = len(slices) - 1, tuple(slices.shape[-2:])
    levels = [Level(4.0, budget, 1e-2), Level(2.0, budget, 1e-2), Level(1.0, budget, 1e-2)]
    fit = BlockFit(PairObjective(model, shape=size), levels, slices, torch.arange(n), torch.arange(1, n + 1),
                   list(range(n)), [1.0] * n, masks=masks, sync_free=sync_free)
    rule = StoppingRule([tol, tol, tol], tol=0.0)  # tol 0: only the step rule ends a pair (or the budget)
    fit.start_level(0)
    reads, steps = collections.Counter(), collections.Counter()
    while not fit.block.done:
        with CountHostReads() as count:
            fit.step()
            rule.after_step(fit)
            level = fit.block.level
            if fit.level_finished():
                fit.next_level() if level < fit.last_level else fit.finish()
        reads[level] += count.n
        steps[level] += 1
    return reads, steps, fit.results


@pytest.mark.parametrize("transformation", ["rigid", "affine"])
def test_a_block_fitted_without_lightning_equals_the_lightning_run(tmp_path, transformation):
    """Catches the core and the Lightning glue drifting apart (a level, a stopping rule or an initialisation that one
    of them does differently): every pair's matrix, loss and step counts identical to the last bit."""
    s = make_stack(em_like_image(256, seed=4), 7, (96, 96), seed=8)
    root = tmp_path / "s.zarr"
    write_zarr(s.stack, root)
    with contextlib.redirect_stderr(io.StringIO()):
        cli = main(["fit", "--data.root", str(root), "--data.array", "images/50-4-4", "--model.transformation",
                    transformation, "--pyramid.levels", "3", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false"])
    lightning = cli.model.results

    # the same block through core.fit: the data module's normalization and pairs (two neighbours, the default), the
    # pyramid's levels, the early-stopping defaults (core.stack's pieces, as the Lightning layer calls them)
    low, high = intensity_range(np.array([slice_stats(z) for z in s.stack]), list(range(7)))
    data, offset, scale = to_tensor(s.stack, low, high)
    slices, _ = block_images(data, offset, scale, 1.0, None, "none")
    graph = StackPairs.of(list(range(7)), neighbours=2, coarse_factor=4.0)
    pairs = graph.pairs
    order, fixed, moving = block_layout(pairs)
    assert order == list(range(7))
    obj = PairObjective(transformation, shape=(96, 96))
    out = fit_block(obj, pyramid_levels(3), slices, torch.tensor(fixed), torch.tensor(moving), stop_factor=graph.stop,
                    stopping=stopping_rule(3))
    assert len(lightning) == len(out) == len(pairs) == 11
    for p, r in out.items():
        assert tuple(lightning[p]["slice_indices"]) == pairs[p]
        for key in ("matrix", "final_loss", "num_steps_taken", "steps_per_level", "ncc_before", "ncc_after", "finest_factor"):
            assert r[key] == lightning[p][key], (pairs[p], key, r[key], lightning[p][key])


def test_the_read_schedule_is_logarithmic_in_the_budget():
    """At most 2 log2(budget) + 1 reads a level; consecutive reads at most 1.5x apart (or one step) (so a level runs at most half
    again the steps it needs)."""
    for budget in (10, 100, 1000):
        at = [n for n in range(1, budget + 1) if reads_state(n)]
        assert len(at) <= 2 * np.log2(budget) + 1
        assert all(b <= max(1.5 * a, a + 1) for a, b in itertools.pairwise(at)) and at[0] == 1


def test_host_reads_per_level_do_not_grow_with_the_block_or_the_steps():
    """Catches a per-step or per-pair read sneaking into a sync-free fit (a branch on ``mask.any()``, boolean
    indexing, a per-row ``float()``): the reads of a level are the same for 2 and 12 pairs, and a level run for its
    whole budget of 24 steps reads at most 3 more times per scheduled read than one of 8 steps; the compacted
    fit (the CPU default) reads at every step and for every pair."""
    run(weak_pairs(2, 64), True, budget=2)  # the caches of the interpolation's matrices (built once per process and size)
    small, small_steps, _ = run(weak_pairs(2, 64), True, budget=24, tol=1e-9)
    large, large_steps, _ = run(weak_pairs(12, 64), True, budget=24, tol=1e-9)
    assert small_steps == large_steps == {0: 24, 1: 24, 2: 24}  # nothing converges: every level spends its budget
    assert small == large, (small, large)
    short, _, _ = run(weak_pairs(12, 64), True, budget=8, tol=1e-9)
    extra = sum(reads_state(k) for k in range(9, 25))  # 12, 16, 24: the reads a longer level adds
    for level in range(3):
        assert large[level] - short[level] <= 3 * extra, (level, short, large)
        assert large[level] <= 50
    compact, _, _ = run(weak_pairs(12, 64), False, budget=24, tol=1e-9)
    assert all(compact[level] > 2 * 24 for level in range(3)), compact  # what the count would catch


@pytest.mark.parametrize("model", ["rigid", "affine"])
def test_sync_free_fit_gives_the_compacted_fits_transforms(model):
    """Catches the masked (sync-free) solver, objective or read schedule changing a result, on weakly matching pairs
    that converge after different numbers of steps: most pairs' matrices equal to 1e-5 px of the default fit, every
    pair's within the stopping tolerance (0.003 px). Only the ramp's gradient, summed densely, differs (1e-10 of the
    gradient), and on the flat valleys of a weakly matching affine pair that moves where a fit stops inside its
    tolerance (0.002 px seen); with the gathered ramp the two fits are identical."""
    slices = weak_pairs(8)
    _, steps_a, a = run(slices, False, model=model)
    _, _, b = run(slices, True, model=model)
    assert sum(steps_a.values()) > 3 * 4  # not every pair converged at once: rows were frozen mid-level
    d = [np.abs(np.array(a[p]["matrix"]) - np.array(b[p]["matrix"])).max() * 48 for p in a]  # normalized -> px
    assert max(d) < 0.003 and np.median(d) < 1e-5, d
    for p in a:
        # float32 sums chunked otherwise; the affine pair that stops elsewhere in its flat valley (0.002 px) differs by
        # up to ~1e-7 in loss as well (1.09e-7 seen with one torch thread)
        assert abs(a[p]["final_loss"] - b[p]["final_loss"]) < 5e-7


def test_dense_ramp_gradient_equals_the_gathered_one():
    """The weight ramp's and the mask boundary's part of the gradient summed densely (sync-free) equals gathering
    their pixels, with and without masks; the loss is untouched."""
    img = torch.from_numpy(em_like_image(200, seed=3) / 255.0).float()[None, None]
    fixed = torch.cat([img[..., 10:110, 10:130], img[..., 30:130, 40:160]])
    coeffs = bspline_prefilter(torch.cat([img[..., 13:113, 8:128], img[..., 33:133, 37:157]]))
    theta = torch.tensor([[[1.01, 0.02, 0.05], [-0.01, 0.99, -0.03]], [[0.98, -0.03, 0.1], [0.02, 1.02, 0.04]]])
    moving_mask = torch.ones(2, 1, 100, 120)
    moving_mask[..., 40:60, 50:70] = 0
    for masks in (None, ((torch.rand(2, 1, 100, 120, generator=torch.Generator().manual_seed(0)) > 0.02).float(),
                         moving_mask)):
        (la, ga), (lb, gb) = (ncc_and_gradient(theta, fixed, coeffs, masks=masks, dense=d) for d in (False, True))
        assert torch.equal(la, lb)
        assert (ga - gb).abs().max() < 1e-8 * ga.abs().max()
        ramp_only = ga - ncc_and_gradient(theta, fixed, coeffs, ramp=1e-6, masks=masks)[1]
        assert ramp_only.abs().max() > 1e-4  # the ramp's part is there to get wrong


def test_sync_free_through_lightning_equals_the_default(tmp_path, monkeypatch):
    """The Lightning glue drives a sync-free fit (what a GPU runs) to the same transforms as the default."""
    from sphero_lightning.commands.main import main
    from sphero_lightning.storage.stacks import write_zarr
    from sphero_lightning.training.module import RegistrationModule

    s = make_stack(em_like_image(256, seed=4), 6, (96, 96), seed=8)
    write_zarr(s.stack, tmp_path / "s.zarr")
    args = ["fit", "--data.root", str(tmp_path / "s.zarr"), "--data.array", "images/50-4-4", "--pyramid.levels", "3",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--output.crop_borders", "false"]
    results = []
    for sync_free in (None, True):
        monkeypatch.setattr(RegistrationModule, "sync_free", sync_free)
        with contextlib.redirect_stderr(io.StringIO()):
            results.append(main([*args, "--data.overwrite", "true"]).model.results)
    assert results[0].keys() == results[1].keys() and len(results[0]) == 9
    for p in results[0]:
        d = np.abs(np.array(results[0][p]["matrix"]) - np.array(results[1][p]["matrix"])).max() * 48
        assert d < 1e-6, (p, d)
