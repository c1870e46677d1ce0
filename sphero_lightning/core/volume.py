"""From fitted pairs to the volume: the chain, or the robust solve over redundant pairs, then the drift priors the
user chose. What the writer stores and the report shows of it.

* One neighbour, no anchors: the chain (:func:`~.transforms.chain_with_gaps`), as before the solve existed.
* More neighbours: :func:`~.solve.diagnose` reads the cycles of three consecutive slices; where every pair has a
  true answer the result is the chain itself, bit for bit. Otherwise :func:`~.solve.solve` over every fitted pair:
  consecutive pairs carry the solution, longer ones only where they are the only path (a foreign slice's bridge), a
  pair with no true answer only where nothing else keeps the stack in one piece (then bridging pairs are fitted).
* Priors, off by default, applied to the composed transforms afterwards (the reference slice stays the identity):
  ``detrend`` removes a polynomial trend along z, ``highpass`` keeps only what changes faster than a window of slices.
  Both assume that the true alignment has no such slow component: a real slow tilt or drift of the sample is removed
  with the artefact.

The convention: ``composed[k]`` (normalized, ``(2, 3)``) maps the output frame (the reference slice's, slice 0 by
default, whose transform is the identity) to the position sampled in slice ``k``; two pairs shifted by 0.1 each
(10 px on a 200 px wide slice) put slice 2 at 0.2 (20 px):

>>> from sphero_lightning.core.frames import Affine, Frame
>>> from sphero_lightning.core.records import fitted_pair
>>> fits = [fitted_pair(z, (z, z + 1), [[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]], final_loss=0.1, ncc_after=0.9) for z in (0, 1)]
>>> composed, pairwise, log, record = compose_volume(3, fits, {}, (100, 200))
>>> composed[:, 0, 2].tolist(), Affine(composed[0], Frame.NORMALIZED, (100, 200)).is_identity()
([0.0, 0.1, 0.2], True)
>>> Affine(composed, Frame.NORMALIZED, (100, 200)).to(Frame.PIXEL).matrix[:, 0, 2].tolist()
[0.0, 10.0, 20.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from .frames import fill_between, to_centered, to_normalized
from .records import PairRecord, PairStatus
from .settings import MODEL, SOLVE
from .solve import Diagnosis, diagnose, solve
from .transforms import chain_with_gaps, homogeneous

#: Weight of a pair with no true answer (:func:`~.solve.diagnose`): enough to keep the stack in one piece where nothing
#: else joins two parts, nothing where any other path exists.
LAST_RESORT = 1e-9
#: Weight of a pair further apart than consecutive slices (a consecutive pair's: 1): there to stand in where a
#: consecutive pair has no true answer, not to pull the others. On real sections it is biased by the content that
#: changes in between (ISBI at distance 2 disagrees with the chain by tenths of a pixel to pixels); given a
#: consecutive pair's weight it made the aligned volume less straight.
DISTANCE_WEIGHT = 1e-3

#: A slice is a suspect when even the better of its two consecutive pairs matches worse than the stack's typical
#: consecutive pair by more than this robust z-score of NCC (the rule the QC outliers follow on the loss): its pairs'
#: cycles may still close (two weak fits near the identity compose to about the bridge's answer), so it is tested
#: against a bridge over it instead.
SUSPECT_Z = 3.5
#: ... and it is foreign when the bridge over it, fitted at full resolution, matches better than that better pair by
#: at least this much NCC: its neighbours agree with each other and not with it.
BRIDGE_MARGIN = 0.02

#: Families closed under composition: the solve's transforms are projected onto them. (Affine with scale or shear
#: switched off is not closed: the chain's own compositions leave it, and so may the solve's.)
GROUPS = ("translation", "rigid", "similarity")


@dataclass
class Priors:
    """Drift priors applied after the solve (all off by default).

    Attributes
    ----------
    detrend : int or None
        Degree of the polynomial (in z) removed from the composed transforms: 1 removes a linear drift of translation,
        rotation, scale and shear. Assumes the sample itself does not drift or tilt along z.
    highpass : float or None
        Keep only corrections that change faster than this many slices (the composed transforms minus their Gaussian
        smoothing with this sigma). Assumes every slow change is an artefact.
    anchors : dict
        ``{slice: (2, 3) normalized transform}`` known for some slices (e.g. from landmarks): hard constraints of the
        solve. Assumes they are right: everything else bends to meet them.
    """

    detrend: int | None = None
    highpass: float | None = None
    anchors: dict[int, np.ndarray] | None = None

    @property
    def any(self) -> bool:
        return self.detrend is not None or self.highpass is not None or bool(self.anchors)


def project_to_family(composed: np.ndarray, shape: tuple[int, int], transformation: str, scaling: bool = MODEL.scaling,
                      shear: bool = MODEL.shear) -> np.ndarray:
    """The nearest transforms of the family (``(n, 2, 3)`` normalized in and out): a weighted average of rigid
    transforms is not rigid. In centered pixels the linear part ``A = R [[sx, k sy], [0, sy]]`` keeps its rotation and
    only what the family fits: rigid drops scale and shear (the polar rotation), similarity keeps one scale (the mean
    singular value), translation keeps no linear part."""
    c = to_centered(composed, shape)
    lin = c[:, :, :2]
    rot = np.arctan2(lin[:, 1, 0], lin[:, 0, 0])
    cos, sin = np.cos(rot), np.sin(rot)
    r = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    u = np.swapaxes(r, -1, -2) @ lin  # upper triangular: [[sx, k sy], [0, sy]]
    free_scale = transformation == "affine" and scaling
    free_shear = transformation == "affine" and shear
    if transformation == "translation":
        new = np.repeat(np.eye(2)[None], len(c), 0)
    elif transformation in ("rigid", "similarity") or not (free_scale or free_shear):
        svd = np.linalg.svd(lin, compute_uv=True)
        polar = svd[0] @ svd[2]
        scale = svd[1].mean(-1) if transformation == "similarity" else np.ones(len(c))
        new = polar * scale[:, None, None]
    else:
        keep = u.copy()
        if not free_scale:  # shear only: unit scales
            keep[:, 0, 0], keep[:, 1, 1] = 1.0, 1.0
            keep[:, 0, 1] = u[:, 0, 1] / u[:, 1, 1]
        if not free_shear:
            keep[:, 0, 1] = 0.0
        new = r @ keep
    out = c.copy()
    out[:, :, :2] = new
    return to_normalized(out, shape)


def remove_drift(composed: np.ndarray, shape: tuple[int, int], use: list[int], reference: int,
                 detrend: int | None, highpass: float | None) -> np.ndarray:
    """The composed transforms (``(n, 2, 3)`` normalized) with their slow component removed: ``T_ref T_k^-1 C_k``,
    ``T`` the polynomial fit (``detrend``: its degree) of the transforms' entries along z over the slices ``use``,
    then (``highpass``) their Gaussian smoothing along z with that sigma in slices."""
    c = to_centered(composed, shape)
    if detrend is not None:
        c = _correct(c, _polynomial(c, use, int(detrend)), reference)
    if highpass is not None:
        c = _correct(c, _smoothed(c, use, float(highpass)), reference)
    return to_normalized(c, shape)


def _polynomial(c: np.ndarray, use: list[int], degree: int) -> np.ndarray:
    z = np.arange(len(c), dtype=np.float64)
    flat = c.reshape(len(c), 6)
    deg = min(degree, max(0, len(use) - 1))
    return np.stack([np.polyval(np.polyfit(z[use], flat[use, e], deg), z) for e in range(6)], 1).reshape(-1, 2, 3)


def _smoothed(c: np.ndarray, use: list[int], sigma: float) -> np.ndarray:
    """Gaussian smoothing along z of the entries, over the slices ``use`` only (normalized by the weights there)."""
    flat = c.reshape(len(c), 6)
    taps = np.arange(-int(3 * sigma) - 1, int(3 * sigma) + 2)
    kern = np.exp(-0.5 * (taps / sigma) ** 2)
    mask = np.zeros(len(c))
    mask[use] = 1.0
    off = (len(kern) - 1) // 2

    def conv(x: np.ndarray) -> np.ndarray:  # centred, as long as x whatever the kernel's length
        return np.convolve(x, kern)[off:off + len(x)]

    den = np.maximum(conv(mask), 1e-12)
    return np.stack([conv(flat[:, e] * mask) / den for e in range(6)], 1).reshape(-1, 2, 3)


def _correct(c: np.ndarray, trend: np.ndarray, reference: int) -> np.ndarray:
    """``T_ref T_k^-1 C_k`` (centered matrices): the slow part removed, the reference slice unchanged."""
    t = homogeneous(torch.from_numpy(np.ascontiguousarray(trend))).numpy()
    hom = homogeneous(torch.from_numpy(np.ascontiguousarray(c))).numpy()
    return (t[reference] @ np.linalg.inv(t) @ hom)[:, :2]


def compose_volume(n_slices: int, fitted: list[PairRecord], damaged: dict[int, str], shape: tuple[int, int],
                   neighbours: int = SOLVE.neighbours, reference: int = SOLVE.reference, priors: Priors | None = None,
                   family: tuple[str, bool, bool] = ("affine", True, True)
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]], dict[str, Any] | None]:
    """Composed transforms of every slice, the consecutive pairs' transforms and log, and the solve's record.

    ``fitted``: every fitted pair (``slice_indices``, ``matrix``, ``ncc_after``, ``status``...), in the order of
    :func:`~.pairs.pair_graph`. Returns ``composed`` ``(n_slices, 2, 3)``, ``pairwise`` ``(n_slices - 1, 2, 3)`` (each
    consecutive pair's transform as the composed ones imply it, so the chain stays consistent), ``log`` (one entry per
    consecutive pair) and ``record`` (None for the plain chain; else the cycle diagnosis, what it found foreign or
    without a true answer, the unregistered slices, the pairs kept though they disagree, and every pair's weight and
    residual). ``family``: ``(transformation, scaling, shear)`` of the
    fit; the solve's transforms are projected onto it where it is closed under composition (:data:`GROUPS`). With the
    solve, a consecutive pair's transform is its own fit where it has a true answer, else (or next to a damaged slice)
    what the composed transforms imply; the composed transforms are the solve's, not the chain of these.
    """
    priors = priors or Priors()
    gaps = set(damaged)
    fitted = finest_fits(fitted)
    consecutive = [r for r in fitted if _chain_pair(r, gaps)]
    if neighbours <= 1 and not priors.anchors and reference == 0:
        composed, pairwise, log = _chain_in_family(n_slices, consecutive, damaged, shape, family)
        if priors.detrend is not None or priors.highpass is not None:
            use = [z for z in range(n_slices) if z not in damaged]
            drift_free = remove_drift(composed.numpy(), shape, use, 0, priors.detrend, priors.highpass)
            composed = torch.from_numpy(project_to_family(drift_free, shape, *family) if family[0] in GROUPS else drift_free)
            pairwise = _implied(composed)
        return composed, pairwise, log, None
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    mats = np.array([r["matrix"] for r in fitted], dtype=np.float64).reshape(-1, 2, 3)
    good = [z for z in range(n_slices) if z not in damaged]
    diag = diagnose(pairs, mats, good, shape)
    by_bridge = [z for z in foreign_by_bridge(fitted, good) if z not in diag.foreign]
    if by_bridge:  # a cycle over a foreign slice is inconsistent because of the slice, not of the pair across it
        diag.foreign = sorted(set(diag.foreign) | set(by_bridge))
        diag.bad_bridges = [(i, j) for i, j in diag.bad_bridges if not any(i < z < j for z in diag.foreign)]
    weights, flagged = _weights(fitted, good, diag)
    summary = {"neighbours": neighbours, "reference": reference, "cycle_threshold_px": diag.threshold_px,
               "cycle_errors_px": {str(k): v for k, v in diag.errors.items()}, "foreign": diag.foreign,
               "foreign_by_bridge": by_bridge,
               "bad_pairs": [list(p) for p in diag.bad_pairs], "bad_bridges": [list(p) for p in diag.bad_bridges]}
    if diag.clean and not priors.anchors and reference == 0:  # every pair has a true answer: the chain, bit for bit
        composed, pairwise, log = _chain_in_family(n_slices, consecutive, damaged, shape, family)
        if priors.detrend is not None or priors.highpass is not None:
            drift_free = remove_drift(composed.numpy(), shape, good, 0, priors.detrend, priors.highpass)
            composed = torch.from_numpy(project_to_family(drift_free, shape, *family) if family[0] in GROUPS else drift_free)
            pairwise = _implied(composed)
        return composed, pairwise, log, summary | {"unregistered": [], "kept_despite": [], "pairs": _pair_record(fitted, weights)}
    foreign = set(diag.foreign)
    result = solve(n_slices, pairs, mats, weights, shape, reference=reference, anchors=priors.anchors, skip=gaps,
                   leave_out=foreign)
    kept: list[tuple[int, int]] = []
    split = set(result.unregistered) - foreign
    if split:  # left out, they split the stack: keep it in one piece through them (and fit pairs across: bridge_pairs)
        result = solve(n_slices, pairs, mats, weights, shape, reference=reference, anchors=priors.anchors, skip=gaps)
        kept = [pairs[q] for q in flagged if set(pairs[q]) & split]  # what the detached part hangs on
        placed = {z: to_centered(result.composed[z], shape) for z in good if z not in foreign}
        result.composed = to_normalized(fill_between(placed, n_slices, np.eye(3)[:2]), shape)
        result.unregistered = sorted(foreign)
    use = [z for z in good if z not in result.unregistered]
    composed_np = remove_drift(result.composed, shape, use, reference, priors.detrend, priors.highpass)
    composed = torch.from_numpy(project_to_family(composed_np, shape, *family) if family[0] in GROUPS else composed_np)
    # the log of consecutive pairs, as the chain writes it, each with what the solve made of it
    _, chain_pairwise, log = chain_with_gaps(n_slices, consecutive, damaged)
    by_pair = {p: q for q, p in enumerate(pairs)}
    flagged_pairs = {pairs[q] for q in flagged}
    unreg = set(result.unregistered)
    pairwise = _implied(composed)  # a consecutive pair's transform: its fit where trusted, else what the solve implies
    for entry in log:
        i, j = entry["slice_indices"]
        q = by_pair.get((i, j))
        if q is not None:
            entry["solve_residual_px"] = float(result.residual_px[q])
            if (i, j) not in flagged_pairs and j == i + 1:
                pairwise[i] = chain_pairwise[i]
        if (i, j) in diag.bad_pairs:
            entry["status"] = PairStatus.NO_TRUE_ANSWER
        bad = [z for z in (i, j) if z in unreg]
        if bad:
            entry["status"] = PairStatus.UNREGISTERED
            entry["unregistered_slices"] = bad
    record = summary | {"unregistered": result.unregistered, "kept_despite": [list(p) for p in kept],
                        "pairs": _pair_record(fitted, weights, result.residual_px)}
    return composed, pairwise, log, record


def _weights(fitted: list[PairRecord], good: list[int], diag: Diagnosis) -> tuple[np.ndarray, list[int]]:
    """Each pair's weight in the solve (1 consecutive, :data:`DISTANCE_WEIGHT` longer, :data:`LAST_RESORT` with no
    true answer, 0 for a failed fit) and the indices of those with no true answer."""
    pos = {z: q for q, z in enumerate(good)}
    bad = set(diag.bad_pairs) | set(diag.bad_bridges)
    foreign = set(diag.foreign)
    w, flagged = [], []
    for q, r in enumerate(fitted):
        i, j = r["slice_indices"]
        finite = bool(np.all(np.isfinite(np.asarray(r["matrix"], dtype=np.float64)))) and r.get("status") != PairStatus.FAILED
        if not finite:
            w.append(0.0)
        elif (i, j) in bad or i in foreign or j in foreign:
            w.append(LAST_RESORT)
            flagged.append(q)
        else:
            w.append(1.0 if pos[j] - pos[i] == 1 else DISTANCE_WEIGHT)
    return np.array(w), flagged


def _pair_record(fitted: list[PairRecord], weights: np.ndarray, residual: np.ndarray | None = None) -> list[dict[str, Any]]:
    return [{"slice_indices": list(r["slice_indices"]), "matrix": r["matrix"], "ncc_after": r.get("ncc_after"),
             "status": r.get("status"), "finest_factor": r.get("finest_factor"), "weight": float(weights[q]),
             **({"residual_px": float(residual[q])} if residual is not None else {})} for q, r in enumerate(fitted)]


def bridge_pairs(n_slices: int, fitted: list[PairRecord], damaged: dict[int, str], shape: tuple[int, int]
                 ) -> list[tuple[int, int]]:
    """Pairs to fit (again) at full resolution because they stand in for pairs with no true answer: across each run
    of foreign slices ``a+1..b-1`` the pair ``(a, b)`` (and ``(a', b)``, ``a'`` the usable slice before ``a``, where no
    pair was fitted across the run at all: two foreign slices in a row with two neighbours); around a consecutive pair
    ``(b, c)`` with no true answer, ``(a, c)`` and ``(b, d)``; across each run of suspect slices (:func:`suspect_runs`)
    the pair that tests them. None that is fitted at full resolution already."""
    fitted = finest_fits(fitted)
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    full = min((r.get("finest_factor", 1.0) for r in fitted), default=1.0)
    have_full = {p for p, r in zip(pairs, fitted) if r.get("finest_factor", 1.0) <= full}
    good = [z for z in range(n_slices) if z not in damaged]
    diag = diagnose(pairs, np.array([r["matrix"] for r in fitted], dtype=np.float64).reshape(-1, 2, 3), good, shape)
    foreign, pos = set(diag.foreign), {z: q for q, z in enumerate(good)}
    wanted: list[tuple[int, int]] = []
    k = 0
    while k < len(good):
        if good[k] not in foreign:
            k += 1
            continue
        end = k
        while end + 1 < len(good) and good[end + 1] in foreign:
            end += 1
        if k > 0 and end + 1 < len(good):
            a, b = good[k - 1], good[end + 1]
            wanted.append((a, b))
            if k >= 2 and not any(x <= a and y >= b and x not in foreign and y not in foreign for x, y in pairs):
                wanted.append((good[k - 2], b))
        k = end + 1
    for b, c in diag.bad_pairs:
        q, r = pos[b], pos[c]
        wanted += ([(good[q - 1], c)] if q >= 1 else []) + ([(b, good[r + 1])] if r + 1 < len(good) else [])
    wanted += [_around(run, good) for run in suspect_runs(fitted, good)]  # to test the suspects against
    return [p for p in dict.fromkeys(wanted) if p not in have_full]


def _full_ncc(fitted: list[PairRecord]) -> dict[tuple[int, int], float]:
    """NCC after fitting (over what the loss saw) of every pair fitted at the run's finest level."""
    full = min((r.get("finest_factor", 1.0) for r in fitted), default=1.0)
    out = {}
    for r in fitted:
        ncc = r.get("ncc_after")
        if r.get("finest_factor", 1.0) <= full and ncc is not None and np.isfinite(ncc) and r.get("status") != PairStatus.FAILED:
            out[tuple(r["slice_indices"])] = float(ncc)
    return out


def suspect_runs(fitted: list[PairRecord], good: list[int]) -> list[list[int]]:
    """Runs of consecutive usable slices (``good``) whose consecutive pairs both match far worse than the stack's
    typical consecutive pair (:data:`SUSPECT_Z`; at least 5 such pairs), each with a usable slice on either side.

    >>> fits = [{"slice_indices": [z, z + 1], "ncc_after": 0.9, "finest_factor": 1.0} for z in range(9)]
    >>> fits[4]["ncc_after"] = fits[5]["ncc_after"] = 0.1  # slice 5 matches neither neighbour
    >>> suspect_runs(fits, list(range(10)))
    [[5]]
    """
    ncc = _full_ncc(fitted)
    chain = [ncc.get((a, b)) for a, b in pairwise(good)]
    values = np.array([v for v in chain if v is not None])
    if len(values) < 5:
        return []
    med = float(np.median(values))
    scale = max(float(np.median(np.abs(values - med))), 0.05 * abs(med), 1e-6)
    runs: list[list[int]] = []
    for q in range(1, len(good) - 1):
        before, after = chain[q - 1], chain[q]
        if before is None or after is None or 0.6745 * (med - max(before, after)) / scale <= SUSPECT_Z:
            continue
        if runs and runs[-1][-1] == good[q - 1]:
            runs[-1].append(good[q])
        else:
            runs.append([good[q]])
    return runs


def _around(run: list[int], good: list[int]) -> tuple[int, int]:
    pos = good.index(run[0]), good.index(run[-1])
    return good[pos[0] - 1], good[pos[1] + 1]


def foreign_by_bridge(fitted: list[PairRecord], good: list[int]) -> list[int]:
    """Suspects (:func:`suspect_runs`) that a bridge over their run, fitted at full resolution, outmatches by
    :data:`BRIDGE_MARGIN`: their neighbours agree with each other and not with them."""
    ncc = _full_ncc(fitted)
    out = []
    for run in suspect_runs(fitted, good):
        a, b = _around(run, good)
        bridge = ncc.get((a, b))
        inside = [v for (i, j), v in ncc.items() if (i in run or j in run) and a <= i and j <= b]
        if bridge is not None and inside and bridge > max(inside) + BRIDGE_MARGIN:
            out += run
    return out


def finest_fits(fitted: list[PairRecord]) -> list[PairRecord]:
    """One fit per pair of slices: the finest (a pair fitted coarsely, then again at full resolution as a stand-in)."""
    best: dict[tuple[int, int], dict[str, Any]] = {}
    for r in fitted:
        key = tuple(r["slice_indices"])
        if key not in best or r.get("finest_factor", 1.0) < best[key].get("finest_factor", 1.0):
            best[key] = r
    return [r for r in fitted if best[tuple(r["slice_indices"])] is r]


def _chain_pair(entry: PairRecord, damaged: set[int]) -> bool:
    """Whether a fitted pair joins two consecutive usable slices (only damaged slices between them)."""
    i, j = entry["slice_indices"]
    return all(z in damaged for z in range(i + 1, j))


def _chain_in_family(n_slices: int, consecutive: list[dict[str, Any]], damaged: dict[int, str], shape: tuple[int, int],
                     family: tuple[str, bool, bool]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """:func:`~.transforms.chain_with_gaps`, with each damaged slice's interpolated transform projected onto the fitted
    family (an average of rotations is not a rotation: a bridged slice of a rigid run had scale 0.9995) and the two
    pairwise transforms next to it implied from that; every other slice's transform stays the chain's, bit for bit."""
    composed, pairwise, log = chain_with_gaps(n_slices, consecutive, damaged)
    if not damaged or family[0] not in GROUPS:
        return composed, pairwise, log
    rows = [z for z in damaged if 0 < z < n_slices]
    if rows:
        composed = composed.clone()
        composed[rows] = torch.from_numpy(project_to_family(composed[rows].numpy(), shape, *family))
        implied = _implied(composed)
        pairwise = pairwise.clone()
        for i in sorted({i for z in rows for i in (z - 1, z) if 0 <= i < len(pairwise)}):
            pairwise[i] = implied[i]
    return composed, pairwise, log


def _implied(composed: torch.Tensor) -> torch.Tensor:
    """Consecutive pairs' transforms as the composed ones imply them: ``A_i = C_(i+1) C_i^-1``."""
    hom = homogeneous(composed)
    if len(hom) < 2:
        return composed.new_zeros(0, 2, 3)
    return (hom[1:] @ torch.linalg.inv(hom[:-1]))[:, :2]
