"""core/volume.py: the volume from its pairs (issue 25): the robust solve with the cycle check, bridges, drift priors,
anchors and the projection onto the transform family, on graphs with known composed transforms (no images: exact and
fast). The fake pair records come from test_solve.py's helpers (``fake_pairs``, ``exact_pair``), built with
``core.records.fitted_pair``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sphero_lightning.core.frames import to_centered, to_normalized
from sphero_lightning.core.records import PairStatus, fitted_pair
from sphero_lightning.core.transforms import chain_with_gaps
from sphero_lightning.core.volume import Priors, bridge_pairs, compose_volume, project_to_family, remove_drift, suspect_runs
from tests.core.test_solve import SHAPE, errors_px, exact_pair, fake_pairs, truth_transforms


@pytest.mark.parametrize("bad", [{20}, {5, 20, 30}], ids=["one", "three apart"])
def test_a_slice_no_pair_agrees_with_moves_nothing_else(bad):
    """A foreign slice's pairs all disagree: it is left out, the bridge past it (distance 2) carries the chain; every
    other slice stays where its truth is, the foreign one is listed. With the chain (one neighbour) everything after it
    moves."""
    truth = truth_transforms(40)
    fitted = fake_pairs(truth, 2, bad=bad)
    composed, _, log, record = compose_volume(40, fitted, {}, SHAPE, neighbours=2, family=("rigid", True, True))
    good = [z for z in range(40) if z not in bad]
    assert errors_px(composed, truth)[good].max() < 0.01
    assert record["unregistered"] == sorted(bad) == record["foreign"]
    assert all(e["status"] == PairStatus.UNREGISTERED for e in log if set(e["slice_indices"]) & bad)
    assert all(e["status"] == PairStatus.OK for e in log if not set(e["slice_indices"]) & bad)
    composed1, _, _, none = compose_volume(40, fake_pairs(truth, 1, bad=bad), {}, SHAPE, neighbours=1)
    assert none is None and errors_px(composed1, truth)[good].max() > 10  # the break this test is about


def test_a_consecutive_pair_with_no_true_answer_is_stood_in_for():
    truth = truth_transforms(30)
    fitted = fake_pairs(truth, 2, wrong={(12, 13)})
    composed, _, log, record = compose_volume(30, fitted, {}, SHAPE, neighbours=2)
    assert record["bad_pairs"] == [[12, 13]] and not record["unregistered"]
    assert errors_px(composed, truth).max() < 0.01
    assert log[12]["status"] == PairStatus.NO_TRUE_ANSWER


def test_clean_stacks_give_the_chain_bit_for_bit_with_two_neighbours():
    truth = truth_transforms(20)
    fitted = fake_pairs(truth, 2, noise=1e-3)
    c2, p2, log2, record = compose_volume(20, fitted, {}, SHAPE, neighbours=2)
    c1, p1, log1 = chain_with_gaps(20, [f for f in fitted if f["slice_indices"][1] - f["slice_indices"][0] == 1], {})
    assert record["unregistered"] == [] and torch.equal(c1, c2) and torch.equal(p1, p2) and log1 == log2


def test_coarse_stand_ins_are_fitted_again_at_full_resolution():
    """Pairs further apart fitted coarsely (finest_factor 4) only tell which pairs have no true answer; the one that
    stands in for a foreign slice's pairs is asked for at full resolution, and once fitted there it is used, not the
    coarse one."""
    truth = truth_transforms(40)
    fitted = fake_pairs(truth, 2, bad={20}, coarse=4.0)
    assert bridge_pairs(40, fitted, {}, SHAPE) == [(19, 21)]
    refit = exact_pair(truth, 19, 21, ncc=0.6)
    coarse_bridge = next(f for f in fitted if f["slice_indices"] == [19, 21])
    coarse_bridge["matrix"] = (np.asarray(coarse_bridge["matrix"]) + np.array([[0, 0, 0.002], [0, 0, 0]])).tolist()  # 0.4 px off
    composed, _, _, _ = compose_volume(40, fitted + [refit], {}, SHAPE, neighbours=2)
    assert errors_px(composed, truth)[[z for z in range(40) if z != 20]].max() < 0.01
    assert bridge_pairs(40, fitted + [refit], {}, SHAPE) == []


def test_two_foreign_slices_in_a_row_need_a_bridge():
    """With two neighbours no pair jumps two foreign slices: the solve keeps the stack in one piece through pairs that
    disagree (listed), and bridge_pairs names the pairs to fit across; with those fitted, every other slice is right."""
    truth = truth_transforms(40)
    bad = {20, 21}
    fitted = fake_pairs(truth, 2, bad=bad)
    _, _, _, record = compose_volume(40, fitted, {}, SHAPE, neighbours=2)
    assert record["kept_despite"]
    bridges = bridge_pairs(40, fitted, {}, SHAPE)
    assert bridges == [(19, 22), (18, 22)]
    extra = [exact_pair(truth, i, j, ncc=0.5) for i, j in bridges]
    composed, _, _, record = compose_volume(40, fitted + extra, {}, SHAPE, neighbours=2)
    assert not record["kept_despite"] and record["unregistered"] == [20, 21]
    assert errors_px(composed, truth)[[z for z in range(40) if z not in bad]].max() < 0.01
    assert bridge_pairs(40, fitted + extra, {}, SHAPE) == []  # nothing more to bridge


def test_one_neighbour_is_the_chain_bit_for_bit():
    truth = truth_transforms(12)
    fitted = fake_pairs(truth, 1, noise=1e-3)
    damaged = {5: "blank"}
    kept = [f for f in fitted if 5 not in f["slice_indices"]]
    bridge = exact_pair(truth, 4, 6, ncc=0.7)
    ordered = kept[:4] + [bridge] + kept[4:]
    c1, p1, log1 = chain_with_gaps(12, ordered, damaged)
    c2, p2, log2, record = compose_volume(12, ordered, damaged, SHAPE, neighbours=1)
    assert record is None and torch.equal(c1, c2) and torch.equal(p1, p2) and log1 == log2


def test_anchors_are_met_and_the_rest_bends_to_them():
    """An anchor (a transform known for one slice) is a hard constraint: the chain's mismatch with it is spread over the
    pairs between the reference and the anchor, not put on one pair."""
    truth = truth_transforms(11)
    fitted = fake_pairs(truth, 1, noise=0.0)
    anchor = truth[10].copy()
    anchor[:, 2] += [5.0, 0.0]  # 5 px away from where the pairs put slice 10
    composed, _, _, record = compose_volume(11, fitted, {}, SHAPE, neighbours=1,
                                            priors=Priors(anchors={10: to_normalized(anchor, SHAPE)}))
    est = to_centered(composed.numpy(), SHAPE)
    assert np.abs(est[10] - anchor).max() < 1e-9 and np.abs(est[0] - np.eye(3)[:2]).max() < 1e-12
    res = np.array([p["residual_px"] for p in record["pairs"]])
    assert res.max() < 1.0 and res.min() > 0.3  # 5 px over 10 pairs, evenly


def test_detrend_and_highpass_remove_slow_drift_and_keep_jitter():
    n = 60
    rng = np.random.default_rng(3)
    jitter = rng.normal(0, 1.0, (n, 2))
    jitter[0] = 0
    drift = np.stack([0.5 * np.arange(n), -0.2 * np.arange(n)], 1)
    c = np.repeat(np.eye(3)[:2][None], n, 0)
    c[:, :, 2] = drift + jitter
    c[0, :, 2] = 0
    use = list(range(n))
    out = to_centered(remove_drift(to_normalized(c, SHAPE), SHAPE, use, 0, detrend=1, highpass=None), SHAPE)
    assert np.abs(out[0] - np.eye(3)[:2]).max() < 1e-12  # the reference stays the identity
    left = out[:, :, 2] - out[:, :, 2].mean(0)
    assert np.abs(left - (jitter - jitter.mean(0))).max() < 0.5  # the trend went, the jitter stayed
    assert np.abs(np.polyfit(np.arange(n), out[:, 0, 2], 1)[0]) < 0.05  # no slope left (was 0.5 px per slice)
    hp = to_centered(remove_drift(to_normalized(c, SHAPE), SHAPE, use, 0, detrend=None, highpass=5.0), SHAPE)
    assert np.abs(np.polyfit(np.arange(10, n - 10), hp[10:n - 10, 0, 2], 1)[0]) < 0.05
    assert np.corrcoef(hp[10:n - 10, 0, 2], jitter[10:n - 10, 0])[0, 1] > 0.8  # fast changes kept


def test_projection_onto_the_family():
    rng = np.random.default_rng(4)
    c = np.repeat(np.eye(3)[:2][None], 5, 0) + rng.normal(0, 0.02, (5, 2, 3))
    c[:, :, 2] = rng.normal(0, 3, (5, 2))
    norm = to_normalized(c, SHAPE)
    rigid = to_centered(project_to_family(norm, SHAPE, "rigid"), SHAPE)[:, :, :2]
    assert np.allclose(np.swapaxes(rigid, 1, 2) @ rigid, np.eye(2), atol=1e-12) and np.allclose(np.linalg.det(rigid), 1)
    sim = to_centered(project_to_family(norm, SHAPE, "similarity"), SHAPE)[:, :, :2]
    assert np.allclose(sim[:, 0, 0], sim[:, 1, 1]) and np.allclose(sim[:, 0, 1], -sim[:, 1, 0])
    assert np.allclose(to_centered(project_to_family(norm, SHAPE, "translation"), SHAPE)[:, :, :2], np.eye(2))
    aff = project_to_family(norm, SHAPE, "affine", True, True)
    assert np.allclose(aff, norm)  # nothing to drop
    noshear = to_centered(project_to_family(norm, SHAPE, "affine", True, False), SHAPE)[:, :, :2]
    rot = np.arctan2(noshear[:, 1, 0], noshear[:, 0, 0])
    u = np.einsum("bji,bjk->bik", np.stack([np.stack([np.cos(rot), -np.sin(rot)], -1),
                                             np.stack([np.sin(rot), np.cos(rot)], -1)], -2), noshear)
    assert np.abs(u[:, 0, 1]).max() < 1e-12  # no shear left
    assert np.allclose(to_centered(project_to_family(norm, SHAPE, "rigid"), SHAPE)[:, :, 2], c[:, :, 2])  # translation kept


def test_the_bridge_test_needs_a_bridge_that_matches_better():
    """A slice whose two pairs match far worse than the stack's (a damaged or very different section) is a suspect; it
    is foreign only where the pair across it matches better than its own (here it does not: nothing is left out)."""
    identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    fits = [fitted_pair(z, (z, z + 1), identity, final_loss=0.7, ncc_after=0.3) for z in range(11)]
    fits[4]["ncc_after"] = fits[5]["ncc_after"] = 0.05
    fits.append(fitted_pair(11, (4, 6), identity, final_loss=0.94, ncc_after=0.06))
    assert suspect_runs(fits, list(range(12))) == [[5]]
    _, _, _, record = compose_volume(12, fits, {}, (64, 64), neighbours=2)
    assert record["unregistered"] == [] and record["foreign_by_bridge"] == []
    fits[-1]["ncc_after"] = 0.29  # the bridge matches as its neighbours do: slice 5 agrees with no neighbour
    _, _, _, record = compose_volume(12, fits, {}, (64, 64), neighbours=2)
    assert record["unregistered"] == [5] and record["foreign_by_bridge"] == [5]
