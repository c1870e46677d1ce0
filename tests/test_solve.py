"""The volume from its pairs (issue 25): the pair graph, the robust least-squares solve, bridges, drift priors and the
projection onto the transform family, on graphs with known composed transforms (no images: exact and fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sphero_lightning.core.frames import to_centered, to_normalized
from sphero_lightning.core.pairs import block_layout, blocks, pair_graph
from sphero_lightning.core.records import fitted_pair
from sphero_lightning.core.solve import _banded_solve, diagnose, solve
from sphero_lightning.core.transforms import chain_with_gaps
from sphero_lightning.core.volume import Priors, bridge_pairs, compose_volume, project_to_family, remove_drift

SHAPE = (384, 384)


def _rigid(tx: float, ty: float, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, tx], [s, c, ty]])


def _hom(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0, 0, 1]])


def _truth(n: int, seed: int = 1) -> np.ndarray:
    """``(n, 2, 3)`` centered-pixel composed transforms, slice 0 the identity."""
    rng = np.random.default_rng(seed)
    t = np.stack([_rigid(*rng.normal(0, 4, 2), rng.normal(0, 0.01)) for _ in range(n)])
    t[0] = np.eye(3)[:2]
    return t


def _fitted(truth: np.ndarray, neighbours: int, bad: set[int] = frozenset(), noise: float = 1e-4, seed: int = 2,
            wrong: set[tuple[int, int]] = frozenset(), coarse: float = 1.0) -> list[dict]:
    """Fitted pairs as the fit records them (core.records.fitted_pair): each pair's exact transform plus noise; a pair touching a ``bad``
    slice, or in ``wrong``, gets a random transform (no true answer) and a poor NCC, as a foreign section's pairs have;
    pairs further apart fitted down to the factor ``coarse``."""
    rng = np.random.default_rng(seed)
    out = []
    for j, i in ((j, i) for j, i in ((p[1], p[0]) for p in pair_graph(list(range(len(truth))), neighbours))):
        if i in bad or j in bad or (i, j) in wrong:
            a, ncc = _rigid(*rng.normal(0, 60, 2), rng.normal(0, 0.1)), 0.15
        else:
            a = (_hom(truth[j]) @ np.linalg.inv(_hom(truth[i])))[:2]
            a = a + np.concatenate([rng.normal(0, noise * 1e-2, (2, 2)), rng.normal(0, noise, (2, 1))], 1)
            ncc = 0.8 if j - i == 1 else 0.6
        out.append(fitted_pair(len(out), (i, j), to_normalized(a, SHAPE).tolist(), final_loss=1 - ncc, ncc_after=ncc,
                               finest_factor=1.0 if j - i == 1 else coarse))
    return out


def _exact(truth: np.ndarray, i: int, j: int, ncc: float, pair_index: int = -1) -> dict:
    """The record of pair ``(i, j)`` fitted exactly (at full resolution)."""
    a = (_hom(truth[j]) @ np.linalg.inv(_hom(truth[i])))[:2]
    return fitted_pair(pair_index, (i, j), to_normalized(a, SHAPE).tolist(), final_loss=1 - ncc, ncc_after=ncc)


def _errors(composed: torch.Tensor | np.ndarray, truth: np.ndarray) -> np.ndarray:
    est = to_centered(np.asarray(composed), SHAPE)
    return np.abs(est - truth)[:, :, 2].max(-1)


def test_pair_graph_blocks_and_layout():
    assert pair_graph([0, 1, 2, 3], 1) == [(0, 1), (1, 2), (2, 3)]
    assert pair_graph([0, 1, 2, 4], 2) == [(0, 1), (1, 2), (0, 2), (2, 4), (1, 4)]  # slice 3 damaged: bridged
    assert block_layout([(1, 2), (0, 2), (2, 4)]) == ([0, 1, 2, 4], [1, 0, 2], [2, 2, 3])
    assert blocks(10, [0, 7], 4) == [(0, 4), (4, 7), (7, 10)]  # pairs added later start a block of their own
    with pytest.raises(ValueError):
        pair_graph([0, 1], 0)


def test_banded_solve_equals_a_dense_solve():
    rng = np.random.default_rng(0)
    n, band = 12, 3
    dense = np.zeros((2 * n, 2 * n))
    diag, off = [], {}
    for k in range(n):
        m = rng.normal(size=(2, 2))
        diag.append(m @ m.T + 5 * np.eye(2))
        dense[2 * k:2 * k + 2, 2 * k:2 * k + 2] = diag[-1]
    for i in range(n):
        for j in range(max(0, i - band), i):
            if rng.random() < 0.7:
                off[(i, j)] = rng.normal(size=(2, 2)) * 0.5
                dense[2 * i:2 * i + 2, 2 * j:2 * j + 2] = off[(i, j)]
                dense[2 * j:2 * j + 2, 2 * i:2 * i + 2] = off[(i, j)].T
    rhs = rng.normal(size=(n, 2, 3))
    x = _banded_solve(diag, off, rhs, band)
    assert np.abs(x - np.linalg.solve(dense, rhs.reshape(2 * n, 3)).reshape(n, 2, 3)).max() < 1e-12


def test_consistent_pairs_give_the_truth():
    truth = _truth(30)
    fitted = _fitted(truth, 2, noise=0.0)
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    r = solve(30, pairs, np.array([f["matrix"] for f in fitted]), np.ones(len(pairs)), SHAPE)
    assert _errors(r.composed, truth).max() < 1e-9 and r.residual_px.max() < 1e-9 and not r.unregistered


def test_cycles_tell_a_foreign_slice_from_a_bad_pair_and_a_bad_bridge():
    """The pattern of inconsistent cycles of three consecutive slices: three in a row around a foreign slice, two
    around a consecutive pair with no true answer, one for a bad pair over one slice; none on a clean stack (whose
    cycle errors set the threshold from the noise, at least MIN_CYCLE_PX)."""
    truth = _truth(40)
    cases = {"clean": ({}, set()), "foreign": ({"bad": {20}}, set()), "pair": ({"wrong": {(12, 13)}}, set()),
             "bridge": ({"wrong": {(30, 32)}}, set())}
    found = {}
    for name, (kw, _) in cases.items():
        fitted = _fitted(truth, 2, **kw)
        pairs = [tuple(r["slice_indices"]) for r in fitted]
        found[name] = diagnose(pairs, np.array([r["matrix"] for r in fitted]), list(range(40)), SHAPE)
    assert found["clean"].clean and found["clean"].threshold_px == 1.0
    assert found["foreign"].foreign == [20] and not found["foreign"].bad_pairs and not found["foreign"].bad_bridges
    assert found["pair"].bad_pairs == [(12, 13)] and not found["pair"].foreign
    assert found["bridge"].bad_bridges == [(30, 32)] and not found["bridge"].foreign and not found["bridge"].bad_pairs


def test_a_foreign_slice_whose_pairs_cancel_is_still_foreign():
    """A foreign slice's two consecutive pairs can compose to nearly the right transform (measured: 0.2 px off over a
    foreign ISBI section), so its own cycle agrees; its two bridges still do not. Catches reading that pattern as two
    bad bridges (the slice then stays in the chain and moves everything after it by the residue)."""
    truth = _truth(40)
    fitted = _fitted(truth, 2, bad={20})
    a = {tuple(r["slice_indices"]): _hom(to_centered(np.array(r["matrix"]), SHAPE)) for r in fitted}
    a[(20, 21)] = _hom(truth[21]) @ np.linalg.inv(_hom(truth[19])) @ np.linalg.inv(a[(19, 20)])  # cancels exactly
    a[(20, 21)][:2, 2] += 0.2
    for r in fitted:
        r["matrix"] = to_normalized(a[tuple(r["slice_indices"])][:2], SHAPE).tolist()
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    d = diagnose(pairs, np.array([r["matrix"] for r in fitted]), list(range(40)), SHAPE)
    assert d.errors[20] < d.threshold_px < min(d.errors[19], d.errors[21]), d.errors
    assert d.foreign == [20] and not d.bad_bridges and not d.bad_pairs


@pytest.mark.parametrize("bad", [{20}, {5, 20, 30}], ids=["one", "three apart"])
def test_a_slice_no_pair_agrees_with_moves_nothing_else(bad):
    """A foreign slice's pairs all disagree: it is left out, the bridge past it (distance 2) carries the chain; every
    other slice stays where its truth is, the foreign one is listed. With the chain (one neighbour) everything after it
    moves."""
    truth = _truth(40)
    fitted = _fitted(truth, 2, bad=bad)
    composed, _, log, record = compose_volume(40, fitted, {}, SHAPE, neighbours=2, family=("rigid", True, True))
    good = [z for z in range(40) if z not in bad]
    assert _errors(composed, truth)[good].max() < 0.01
    assert record["unregistered"] == sorted(bad) == record["foreign"]
    assert all(e["status"] == "unregistered" for e in log if set(e["slice_indices"]) & bad)
    assert all(e["status"] == "ok" for e in log if not set(e["slice_indices"]) & bad)
    composed1, _, _, none = compose_volume(40, _fitted(truth, 1, bad=bad), {}, SHAPE, neighbours=1)
    assert none is None and _errors(composed1, truth)[good].max() > 10  # the break this test is about


def test_a_consecutive_pair_with_no_true_answer_is_stood_in_for():
    truth = _truth(30)
    fitted = _fitted(truth, 2, wrong={(12, 13)})
    composed, _, log, record = compose_volume(30, fitted, {}, SHAPE, neighbours=2)
    assert record["bad_pairs"] == [[12, 13]] and not record["unregistered"]
    assert _errors(composed, truth).max() < 0.01
    assert log[12]["status"] == "no_true_answer"


def test_clean_stacks_give_the_chain_bit_for_bit_with_two_neighbours():
    truth = _truth(20)
    fitted = _fitted(truth, 2, noise=1e-3)
    c2, p2, log2, record = compose_volume(20, fitted, {}, SHAPE, neighbours=2)
    c1, p1, log1 = chain_with_gaps(20, [f for f in fitted if f["slice_indices"][1] - f["slice_indices"][0] == 1], {})
    assert record["unregistered"] == [] and torch.equal(c1, c2) and torch.equal(p1, p2) and log1 == log2


def test_coarse_stand_ins_are_fitted_again_at_full_resolution():
    """Pairs further apart fitted coarsely (finest_factor 4) only tell which pairs have no true answer; the one that
    stands in for a foreign slice's pairs is asked for at full resolution, and once fitted there it is used, not the
    coarse one."""
    truth = _truth(40)
    fitted = _fitted(truth, 2, bad={20}, coarse=4.0)
    assert bridge_pairs(40, fitted, {}, SHAPE) == [(19, 21)]
    refit = _exact(truth, 19, 21, ncc=0.6)
    coarse_bridge = next(f for f in fitted if f["slice_indices"] == [19, 21])
    coarse_bridge["matrix"] = (np.asarray(coarse_bridge["matrix"]) + np.array([[0, 0, 0.002], [0, 0, 0]])).tolist()  # 0.4 px off
    composed, _, _, _ = compose_volume(40, fitted + [refit], {}, SHAPE, neighbours=2)
    assert _errors(composed, truth)[[z for z in range(40) if z != 20]].max() < 0.01
    assert bridge_pairs(40, fitted + [refit], {}, SHAPE) == []


def test_two_foreign_slices_in_a_row_need_a_bridge():
    """With two neighbours no pair jumps two foreign slices: the solve keeps the stack in one piece through pairs that
    disagree (listed), and bridge_pairs names the pairs to fit across; with those fitted, every other slice is right."""
    truth = _truth(40)
    bad = {20, 21}
    fitted = _fitted(truth, 2, bad=bad)
    _, _, _, record = compose_volume(40, fitted, {}, SHAPE, neighbours=2)
    assert record["kept_despite"]
    bridges = bridge_pairs(40, fitted, {}, SHAPE)
    assert bridges == [(19, 22), (18, 22)]
    extra = [_exact(truth, i, j, ncc=0.5) for i, j in bridges]
    composed, _, _, record = compose_volume(40, fitted + extra, {}, SHAPE, neighbours=2)
    assert not record["kept_despite"] and record["unregistered"] == [20, 21]
    assert _errors(composed, truth)[[z for z in range(40) if z not in bad]].max() < 0.01
    assert bridge_pairs(40, fitted + extra, {}, SHAPE) == []  # nothing more to bridge


def test_one_neighbour_is_the_chain_bit_for_bit():
    truth = _truth(12)
    fitted = _fitted(truth, 1, noise=1e-3)
    damaged = {5: "blank"}
    kept = [f for f in fitted if 5 not in f["slice_indices"]]
    bridge = _exact(truth, 4, 6, ncc=0.7)
    ordered = kept[:4] + [bridge] + kept[4:]
    c1, p1, log1 = chain_with_gaps(12, ordered, damaged)
    c2, p2, log2, record = compose_volume(12, ordered, damaged, SHAPE, neighbours=1)
    assert record is None and torch.equal(c1, c2) and torch.equal(p1, p2) and log1 == log2


def test_anchors_are_met_and_the_rest_bends_to_them():
    """An anchor (a transform known for one slice) is a hard constraint: the chain's mismatch with it is spread over the
    pairs between the reference and the anchor, not put on one pair."""
    truth = _truth(11)
    fitted = _fitted(truth, 1, noise=0.0)
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
