"""core/solve.py: the robust least-squares solve of the composed transforms from fitted pairs, and the cycle check that
tells a foreign slice from a bad pair and a bad bridge, on graphs with known composed transforms (no images: exact and
fast).

To add a test: make the truth with ``truth_transforms(n)`` (centred-pixel composed transforms, slice 0 the
identity), the fitted pairs a run would record with ``fake_pairs(truth, neighbours, ...)`` (each one a
``core.records.fitted_pair``: a bad slice's or a wrong pair's record gets a random transform and a poor NCC), pass
their ``slice_indices`` and ``matrix`` to ``solve`` or ``diagnose``, and compare with ``errors_px(composed, truth)``.
A record's keys are ``core.records.PairRecord``'s; statuses are ``core.records.PairStatus`` members."""

from __future__ import annotations

import numpy as np
import torch

from sphero_lightning.core.frames import to_centered, to_normalized
from sphero_lightning.core.pairs import pair_graph
from sphero_lightning.core.records import PairRecord, PairStatus, fitted_pair
from sphero_lightning.core.solve import _banded_solve, diagnose, solve

#: The slices' shape (pixels) the fake records' normalized matrices refer to.
SHAPE = (384, 384)


def rigid(tx: float, ty: float, theta: float) -> np.ndarray:
    """A ``(2, 3)`` centred-pixel rigid transform: rotation ``theta`` (radians), then ``(tx, ty)`` px."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, tx], [s, c, ty]])


def homogeneous(m: np.ndarray) -> np.ndarray:
    """``(2, 3)`` -> ``(3, 3)``."""
    return np.vstack([m, [0, 0, 1]])


def truth_transforms(n: int, seed: int = 1) -> np.ndarray:
    """``(n, 2, 3)`` centred-pixel composed transforms of a stack of ``n`` slices, slice 0 the identity."""
    rng = np.random.default_rng(seed)
    t = np.stack([rigid(*rng.normal(0, 4, 2), rng.normal(0, 0.01)) for _ in range(n)])
    t[0] = np.eye(3)[:2]
    return t


def exact_pair(truth: np.ndarray, i: int, j: int, ncc: float, pair_index: int = -1) -> PairRecord:
    """The record of pair ``(i, j)`` fitted exactly (at full resolution), as ``core.records.fitted_pair`` makes it."""
    a = (homogeneous(truth[j]) @ np.linalg.inv(homogeneous(truth[i])))[:2]
    return fitted_pair(pair_index, (i, j), to_normalized(a, SHAPE).tolist(), final_loss=1 - ncc, ncc_after=ncc)


def fake_pairs(truth: np.ndarray, neighbours: int, bad: set[int] = frozenset(), noise: float = 1e-4, seed: int = 2,
               wrong: set[tuple[int, int]] = frozenset(), coarse: float = 1.0) -> list[PairRecord]:
    """The records a run with ``neighbours`` would make (``core.records.fitted_pair``, in the pair graph's order): each
    pair's exact transform plus ``noise`` px; a pair touching a ``bad`` slice, or in ``wrong``, gets a random
    transform (no true answer) and a poor NCC, as a foreign section's pairs have; pairs further apart fitted down to
    the factor ``coarse``."""
    rng = np.random.default_rng(seed)
    out = []
    for i, j in pair_graph(list(range(len(truth))), neighbours):
        if i in bad or j in bad or (i, j) in wrong:
            a, ncc = rigid(*rng.normal(0, 60, 2), rng.normal(0, 0.1)), 0.15
        else:
            a = (homogeneous(truth[j]) @ np.linalg.inv(homogeneous(truth[i])))[:2]
            a = a + np.concatenate([rng.normal(0, noise * 1e-2, (2, 2)), rng.normal(0, noise, (2, 1))], 1)
            ncc = 0.8 if j - i == 1 else 0.6
        out.append(fitted_pair(len(out), (i, j), to_normalized(a, SHAPE).tolist(), final_loss=1 - ncc, ncc_after=ncc,
                               finest_factor=1.0 if j - i == 1 else coarse))
    return out


def errors_px(composed: torch.Tensor | np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per slice, the largest translation error (px) of normalized ``composed`` against the centred-pixel ``truth``."""
    est = to_centered(np.asarray(composed), SHAPE)
    return np.abs(est - truth)[:, :, 2].max(-1)


def test_fake_pairs_are_records_a_run_makes():
    """The helpers above make what the fit makes: ``fitted_pair`` records, ``ok`` with a finite loss."""
    records = fake_pairs(truth_transforms(4), 2)
    assert [r["slice_indices"] for r in records] == [[0, 1], [1, 2], [0, 2], [2, 3], [1, 3]]
    assert all(r["status"] is PairStatus.OK and set(PairRecord.__annotations__) >= set(r) for r in records)


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
    truth = truth_transforms(30)
    fitted = fake_pairs(truth, 2, noise=0.0)
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    r = solve(30, pairs, np.array([f["matrix"] for f in fitted]), np.ones(len(pairs)), SHAPE)
    assert errors_px(r.composed, truth).max() < 1e-9 and r.residual_px.max() < 1e-9 and not r.unregistered


def test_cycles_tell_a_foreign_slice_from_a_bad_pair_and_a_bad_bridge():
    """The pattern of inconsistent cycles of three consecutive slices: three in a row around a foreign slice, two
    around a consecutive pair with no true answer, one for a bad pair over one slice; none on a clean stack (whose
    cycle errors set the threshold from the noise, at least MIN_CYCLE_PX)."""
    truth = truth_transforms(40)
    cases = {"clean": ({}, set()), "foreign": ({"bad": {20}}, set()), "pair": ({"wrong": {(12, 13)}}, set()),
             "bridge": ({"wrong": {(30, 32)}}, set())}
    found = {}
    for name, (kw, _) in cases.items():
        fitted = fake_pairs(truth, 2, **kw)
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
    truth = truth_transforms(40)
    fitted = fake_pairs(truth, 2, bad={20})
    a = {tuple(r["slice_indices"]): homogeneous(to_centered(np.array(r["matrix"]), SHAPE)) for r in fitted}
    a[(20, 21)] = homogeneous(truth[21]) @ np.linalg.inv(homogeneous(truth[19])) @ np.linalg.inv(a[(19, 20)])  # cancels exactly
    a[(20, 21)][:2, 2] += 0.2
    for r in fitted:
        r["matrix"] = to_normalized(a[tuple(r["slice_indices"])][:2], SHAPE).tolist()
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    d = diagnose(pairs, np.array([r["matrix"] for r in fitted]), list(range(40)), SHAPE)
    assert d.errors[20] < d.threshold_px < min(d.errors[19], d.errors[21]), d.errors
    assert d.foreign == [20] and not d.bad_bridges and not d.bad_pairs
