"""The fit as plain functions (issue 27): a block of pairs fitted by :mod:`sphero_lightning.core.fit` without
Lightning equals the Lightning run bit for bit."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from sphero_lightning.commands.main import main
from sphero_lightning.core.fit import Level, StoppingRule, fit_block
from sphero_lightning.core.masks import loss_images
from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.pairs import block_layout, pair_graph
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
    # pyramid's levels, the early-stopping defaults
    low, high = intensity_range(np.array([slice_stats(z) for z in s.stack]), list(range(7)))
    raw = torch.from_numpy(s.stack)
    slices, _ = loss_images(((z[None, None].float() - torch.tensor(low).float()) / torch.tensor(high - low).float()
                                 for z in raw), 1.0, None, "none")
    pairs = pair_graph(list(range(7)), 2)
    order, fixed, moving = block_layout(pairs)
    assert order == list(range(7))
    obj = PairObjective(transformation, shape=(96, 96))
    levels = [Level(4.0, 100, 1e-2), Level(2.0, 100, 1e-2), Level(1.0, 100, 1e-2)]
    stop = [1.0 if j - i == 1 else 4.0 for i, j in pairs]
    out = fit_block(obj, levels, slices, torch.tensor(fixed), torch.tensor(moving), stop_factor=stop,
                    stopping=StoppingRule([0.01, 0.01, 0.003]))
    assert len(lightning) == len(out) == len(pairs) == 11
    for p, r in out.items():
        assert tuple(lightning[p]["slice_indices"]) == pairs[p]
        for key in ("matrix", "final_loss", "num_steps_taken", "steps_per_level", "ncc_before", "ncc_after", "finest_factor"):
            assert r[key] == lightning[p][key], (pairs[p], key, r[key], lightning[p][key])
