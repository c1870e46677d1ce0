"""From fitted pairs to the volume: the chain, or the robust solve over redundant pairs, then the drift priors the
user chose. What the writer stores and the report shows of it.

* One neighbour, no anchors: the chain (:func:`~.transforms.chain_with_gaps`), as before the solve existed.
* Otherwise: :func:`~.solve.solve` over every fitted pair, each weighted by its fit quality (NCC after fitting,
  squared; a pair that barely matches, NCC < 0.1, only as a last resort) and reweighted by its agreement with the
  other paths.
* Priors, off by default, applied to the composed transforms afterwards (the reference slice stays the identity):
  ``detrend`` removes a polynomial trend along z, ``highpass`` keeps only what changes faster than a window of slices.
  Both assume that the true alignment has no such slow component: a real slow tilt or drift of the sample is removed
  with the artefact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .solve import SolveResult, solve, to_centered, to_normalized
from .transforms import chain_with_gaps, homogeneous

#: A pair whose slices barely match after fitting (NCC below this) carries only this weight into the solve: enough to
#: keep the stack in one piece where nothing else joins two parts, nothing where any other path exists.
LAST_RESORT = 1e-6
LOW_NCC = 0.1
#: A pair's weight falls by this factor per slice of distance beyond the first: a pair further apart is there to
#: outvote a pair with no true answer, not to pull the others. On real sections it is biased by the content that
#: changes in between (ISBI at distance 2 disagrees with the chain by tenths of a pixel to pixels), and given the
#: weight of a consecutive pair it made the aligned volume less straight.
DISTANCE_WEIGHT = 0.1
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


def project_to_family(composed: np.ndarray, shape: tuple[int, int], transformation: str = "affine", scaling: bool = True,
                      shear: bool = True) -> np.ndarray:
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


def pair_prior(entry: dict[str, Any], distance: int = 1) -> float:
    """A fitted pair's weight before reweighting: its NCC after fitting, squared, times :data:`DISTANCE_WEIGHT` per
    slice of ``distance`` (among usable slices) beyond 1 (0 for a failed fit)."""
    ncc = entry.get("ncc_after")
    if entry.get("status") == "failed" or ncc is None or not np.isfinite(ncc):
        return 0.0
    if ncc < LOW_NCC:
        return LAST_RESORT
    return float(ncc) ** 2 * DISTANCE_WEIGHT ** (max(1, distance) - 1)


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


def compose_volume(n_slices: int, fitted: list[dict[str, Any]], damaged: dict[int, str], shape: tuple[int, int],
                   neighbours: int = 1, reference: int = 0, priors: Priors | None = None,
                   family: tuple[str, bool, bool] = ("affine", True, True)
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]], dict[str, Any] | None]:
    """Composed transforms of every slice, the consecutive pairs' transforms and log, and the solve's record.

    ``fitted``: every fitted pair (``slice_indices``, ``matrix``, ``ncc_after``, ``status``...), in the order of
    :func:`~.pairs.pair_graph`. Returns ``composed`` ``(n_slices, 2, 3)``, ``pairwise`` ``(n_slices - 1, 2, 3)`` (each
    consecutive pair's transform as the composed ones imply it, so the chain stays consistent), ``log`` (one entry per
    consecutive pair) and ``record`` (None for the plain chain; else the solve's weights, residuals, unregistered
    slices and overruled pairs, and every redundant pair). ``family``: ``(transformation, scaling, shear)`` of the
    fit; the solve's transforms are projected onto it where it is closed under composition (:data:`GROUPS`). With the
    solve, a consecutive pair's transform is its own fit where the solve kept it, else (overruled, or next to a
    damaged slice) what the composed transforms imply; the composed transforms are the solve's, not the chain of these.
    """
    priors = priors or Priors()
    gaps = set(damaged)
    consecutive = [r for r in fitted if _chain_pair(r, gaps)]
    if neighbours <= 1 and not priors.anchors and reference == 0:
        composed, pairwise, log = chain_with_gaps(n_slices, consecutive, damaged)
        if priors.detrend is not None or priors.highpass is not None:
            use = [z for z in range(n_slices) if z not in damaged]
            drift_free = remove_drift(composed.numpy(), shape, use, 0, priors.detrend, priors.highpass)
            composed = torch.from_numpy(project_to_family(drift_free, shape, *family) if family[0] in GROUPS else drift_free)
            pairwise = _implied(composed)
        return composed, pairwise, log, None
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    prior, dist = _priors(fitted, n_slices, damaged)
    mats = np.array([r["matrix"] for r in fitted], dtype=np.float64).reshape(-1, 2, 3)
    result: SolveResult = solve(n_slices, pairs, mats, prior, shape, reference=reference, anchors=priors.anchors,
                                skip=gaps, distance=dist)
    composed_np = result.composed
    use = [z for z in range(n_slices) if z not in damaged and z not in result.unregistered]
    composed_np = remove_drift(composed_np, shape, use, reference, priors.detrend, priors.highpass)
    composed = torch.from_numpy(project_to_family(composed_np, shape, *family) if family[0] in GROUPS else composed_np)
    # the log of consecutive pairs, as the chain writes it, each with what the solve made of it
    _, chain_pairwise, log = chain_with_gaps(n_slices, consecutive, damaged)
    by_pair = {p: q for q, p in enumerate(pairs)}
    # a consecutive pair's transform: its fit where the solve kept it, else what the solve's transforms imply
    pairwise = _implied(composed)
    for i in range(n_slices - 1):
        q = by_pair.get((i, i + 1))
        if q is not None and q not in result.overruled:
            pairwise[i] = chain_pairwise[i]
    unreg = set(result.unregistered)
    for entry in log:
        q = by_pair.get(tuple(entry["slice_indices"]))
        if q is not None:
            entry["solve_weight"] = float(result.weights[q])
            entry["solve_residual_px"] = float(result.residual_px[q])
        bad = [z for z in entry["slice_indices"] if z in unreg]
        if bad:
            entry["status"] = "unregistered"
            entry["unregistered_slices"] = bad
    record = {
        "neighbours": neighbours, "reference": reference, "scale_px": result.scale_px,
        "unregistered": result.unregistered,
        "overruled": [list(pairs[q]) for q in result.overruled],
        "kept_despite": [list(pairs[q]) for q in result.kept_despite],
        "pairs": [{"slice_indices": list(pairs[q]), "matrix": fitted[q]["matrix"], "ncc_after": fitted[q].get("ncc_after"),
                   "status": fitted[q].get("status"), "weight": float(result.weights[q]),
                   "residual_px": float(result.residual_px[q])} for q in range(len(pairs))],
    }
    return composed, pairwise, log, record


def bridge_pairs(n_slices: int, fitted: list[dict[str, Any]], damaged: dict[int, str], shape: tuple[int, int],
                 reference: int = 0) -> list[tuple[int, int]]:
    """Pairs to fit across runs of slices that no pair agrees with, where the solve could only keep the stack in one
    piece through pairs that disagree (two foreign slices in a row with two neighbours: no pair jumps both).

    For each such run, its last usable slice before ``a`` and first after ``b``: ``(a, b)`` and ``(a', b)``, ``a'``
    the usable slice before ``a`` (a second path, so that a bad bridge shows). None where the solve needed no help.
    """
    pairs = [tuple(r["slice_indices"]) for r in fitted]
    prior, dist = _priors(fitted, n_slices, damaged)
    mats = np.array([r["matrix"] for r in fitted], dtype=np.float64).reshape(-1, 2, 3)
    result = solve(n_slices, pairs, mats, prior, shape, reference=reference, skip=set(damaged), distance=dist)
    if not result.kept_despite:
        return []
    kept = set(result.kept_despite)
    overruled = set(result.overruled)
    suspect = set(result.unregistered)
    for q in kept:  # a slice whose every other pair was overruled: only the kept pairs hold it
        for z in pairs[q]:
            own = [p for p, pr in enumerate(pairs) if z in pr and p not in kept and prior[p] > 0]
            if own and all(p in overruled for p in own):
                suspect.add(z)
    good = [z for z in range(n_slices) if z not in damaged]
    have = set(pairs)
    out: list[tuple[int, int]] = []
    k = 0
    while k < len(good):
        if good[k] not in suspect:
            k += 1
            continue
        end = k
        while end + 1 < len(good) and good[end + 1] in suspect:
            end += 1
        if k > 0 and end + 1 < len(good):
            a, b = good[k - 1], good[end + 1]
            for cand in ((a, b), (good[k - 2], b) if k >= 2 else None):
                if cand is not None and cand not in have and cand not in out:
                    out.append(cand)
        k = end + 1
    return out


def _priors(fitted: list[dict[str, Any]], n_slices: int, damaged: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_prior` of every fitted pair and its distance, counted in usable slices."""
    rank = {z: q for q, z in enumerate(z for z in range(n_slices) if z not in damaged)}
    dist = np.array([rank[r["slice_indices"][1]] - rank[r["slice_indices"][0]] for r in fitted])
    return np.array([pair_prior(r, int(d)) for r, d in zip(fitted, dist)]), dist


def _chain_pair(entry: dict[str, Any], damaged: set[int]) -> bool:
    """Whether a fitted pair joins two consecutive usable slices (only damaged slices between them)."""
    i, j = entry["slice_indices"]
    return all(z in damaged for z in range(i + 1, j))


def _implied(composed: torch.Tensor) -> torch.Tensor:
    """Consecutive pairs' transforms as the composed ones imply them: ``A_i = C_(i+1) C_i^-1``."""
    hom = homogeneous(composed)
    if len(hom) < 2:
        return composed.new_zeros(0, 2, 3)
    return (hom[1:] @ torch.linalg.inv(hom[:-1]))[:, :2]
