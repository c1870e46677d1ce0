"""The fit as plain functions (issue 27): a block of pairs fitted by :mod:`sphero_lightning.core.fit` without
Lightning equals the Lightning run bit for bit (the whole stack: ``test_stack.py``)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from sphero_lightning.commands.main import main
from sphero_lightning.core.fit import fit_block
from sphero_lightning.core.masks import block_images, to_tensor
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.pairs import StackPairs, block_layout
from sphero_lightning.core.stack import pyramid_levels, stopping_rule
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.slices import intensity_range, slice_stats
from sphero_lightning.storage.stacks import write_zarr


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
