"""``core/stack.py``: the whole stack's fit without Lightning (pairs, blocks, bridging rounds, the volume, the QC) equals
``sphero fit`` bit for bit, and its resume hooks skip what is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from sphero_lightning.core.objective import PairObjective
from sphero_lightning.core.stack import fit_stack, pyramid_levels, stopping_rule
from sphero_lightning.core.synthetic import em_like_image, make_stack
from sphero_lightning.storage.slices import intensity_range, slice_stats
from sphero_lightning.storage.stacks import write_zarr
from tests.conftest import fit_argv, run_fit

SHAPE = (112, 112)
FOREIGN = 6


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    """11 slices with a foreign one (no neighbour agrees with it: its pairs have no true answer, a bridge goes over)."""
    s = make_stack(em_like_image(256, seed=5), 11, SHAPE, max_shift=5, max_rot_deg=1.0, seed=2).stack.copy()
    s[FOREIGN] = make_stack(em_like_image(256, seed=9), 1, SHAPE, seed=3).stack[0]
    return s


def _core(stack: np.ndarray, transformation: str, **kw):
    reads: list[list[int]] = []

    def read(zs: list[int]) -> np.ndarray:
        reads.append(list(zs))
        return stack[zs]

    low, high = intensity_range(np.array([slice_stats(z) for z in stack]), list(range(len(stack))))
    out = fit_stack(read, len(stack), SHAPE, PairObjective(transformation), pyramid_levels(3), stopping_rule(3),
                    intensity=(low, high), neighbours=2, coarse_factor=4.0, pairs_per_block=8, **kw)
    return out, reads


@pytest.mark.parametrize("transformation", ["rigid", "affine"])
def test_the_whole_stack_fitted_without_lightning_equals_sphero_fit(tmp_path, stack, transformation):
    """Catches the core and the Lightning glue drifting apart anywhere between the first block and the written
    attributes (pairs, blocks, stop factors, normalisation, levels, stopping, bridges, the solve, the crop, the QC):
    every transform, every log entry and the crop box identical to the last bit."""
    root = tmp_path / "s.zarr"
    write_zarr(stack, root)
    run_fit(fit_argv(root, "--model.transformation", transformation, "--data.pairs_per_block", "8", levels=3))
    attrs = dict(zarr.open_array(str(root), path="images/registered/50-4-4", mode="r").attrs)

    out, _ = _core(stack, transformation)
    vol = out.volume
    assert out.pairs.segments[1:], "the foreign slice should have needed bridging pairs (a second round)"
    assert attrs["volume_solve"]["unregistered"] == [FOREIGN] == vol.solved["unregistered"]
    assert vol.pairwise.tolist() == attrs["pairwise_transforms"]
    assert vol.later.tolist() == attrs["composed_transforms"]
    assert vol.box == attrs["crop_box"]
    assert json.loads(json.dumps(vol.log)) == attrs["registration_log"]  # statuses, NCC, QC verdicts, residuals
    assert json.loads(json.dumps(vol.solved)) == attrs["volume_solve"]


def test_resume_hooks_reuse_known_pairs_and_skip_their_blocks(stack):
    """``on_block`` hears the results after each block; given back as ``done`` they are not fitted again (their
    blocks are not read) and the result is the same."""
    saved: list[dict] = []
    first, reads = _core(stack, "rigid", on_block=lambda results: saved.append(results))
    assert len(saved) == len(reads) >= 3  # two blocks of pairs, then the bridges' block
    again, reads_again = _core(stack, "rigid", done=saved[0])
    assert len(reads_again) == len(reads) - 1  # the first block is known
    assert again.volume.later.tolist() == first.volume.later.tolist()
    assert [again.fitted[p] for p in sorted(again.fitted)] == [first.fitted[p] for p in sorted(first.fitted)]
