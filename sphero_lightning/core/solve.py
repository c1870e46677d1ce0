"""The volume from its pairs: composed transforms by a robust least-squares solve over every fitted pair.

A chain ``C_k = A_k C_(k-1)`` trusts every pair: one pair with no true answer (a foreign, misfiled or re-imaged
slice) moves every slice after it. With redundant pairs (each slice also registered to slices further back) each
fitted pair ``(i, j)`` with transform ``A_ij`` says ``C_j ~ A_ij C_i``, which is linear in the entries of the unknown
composed transforms. This module finds them by weighted least squares, the reference slice fixed, and iteratively
reweights (Huber, then Tukey's biweight) so that a pair that disagrees with the other paths between its slices loses
its weight. A slice left without any pair of weight is *unregistered*: it gets the transform interpolated between its
neighbours', like a damaged slice, and is listed.

Numpy only (no torch): transforms are given and returned as normalized ``(2, 3)`` matrices (torch's ``affine_grid``
convention) and solved in centered pixels, where a residual is a displacement in pixels.

The algebra: with ``C_k = [L_k | t_k]`` (2 x 2 linear part, translation) and ``A = [a | b]``,
``C_j - A C_i = [L_j - a L_i | t_j - a t_i - b]``: each of the three columns of ``C`` is its own linear problem
``v_j - a v_i = r`` (``r = b`` for the translation column, else 0), all three with the same matrix. The mean squared
displacement over the slice of a residual ``E`` is ``sum_c m_c |E_c|^2`` with ``m = (var x, var y, 1)`` of the
pixel centres, so one banded normal matrix serves all three columns. Its band is as wide as the longest pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .frames import fill_between

#: Tukey's biweight constant (95 % efficiency for Gaussian residuals) and the smallest scale it uses, in pixels: where
#: every pair agrees to hundredths of a pixel, a pair must still be off by this much before it loses all its weight.
TUKEY = 4.685
MIN_SCALE_PX = 0.25
#: A slice whose pairs keep less than this fraction of their weight after reweighting is unregistered.
UNSUPPORTED = 1e-3


@dataclass
class SolveResult:
    """What the solve found.

    Attributes
    ----------
    composed : ``(n, 2, 3)`` normalized transforms of every slice to the reference's frame (the reference: identity).
    weights : ``(P,)`` each pair's final weight (its prior times the robust factor; 0: overruled or unused).
    residual_px : ``(P,)`` RMS displacement over the slice between ``A_ij C_i`` and ``C_j`` at the solution.
    unregistered : slices no pair supports (placed between their neighbours).
    overruled : pairs that had weight and lost it (disagreeing with the other paths).
    kept_despite : pairs kept with their prior weight although they disagree, because without them part of the
        stack would be connected to the reference by no pair at all (the chain is never split).
    scale_px : the robust residual scale of the last reweighting.
    """

    composed: np.ndarray
    weights: np.ndarray
    residual_px: np.ndarray
    unregistered: list[int] = field(default_factory=list)
    overruled: list[int] = field(default_factory=list)
    kept_despite: list[int] = field(default_factory=list)
    scale_px: float = 0.0


def to_centered(theta: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(..., 2, 3)`` normalized matrices to centered-pixel ones (``u = x_pixel - (W - 1) / 2``)."""
    h, w = shape
    d = np.array([2.0 / w, 2.0 / h])
    out = np.array(theta, dtype=np.float64, copy=True)
    out[..., :2] = out[..., :2] * d[None, :] / d[:, None]  # D^-1 L D
    out[..., 2] = out[..., 2] / d
    return out


def to_normalized(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`to_centered`."""
    h, w = shape
    d = np.array([2.0 / w, 2.0 / h])
    out = np.array(a, dtype=np.float64, copy=True)
    out[..., :2] = out[..., :2] * d[:, None] / d[None, :]
    out[..., 2] = out[..., 2] * d
    return out


def _banded_solve(diag: list[np.ndarray], off: dict[tuple[int, int], np.ndarray], rhs: np.ndarray, band: int) -> np.ndarray:
    """Solve the symmetric positive definite system with 2 x 2 blocks ``diag[k]`` on the diagonal and ``off[(i, j)]``
    below it (``i > j``, ``i - j <= band`` slices) for ``rhs`` (``(n, 2, m)``): a banded Cholesky factorisation, row by
    row (each row of the factor solves a triangular system with the ``2 band`` rows before it). O(n band^3) time and
    O(n band) memory: thousands of slices with a few neighbours each solve in well under a second."""
    n = len(diag)
    size = 2 * n
    bw = 2 * band + 1  # scalar bandwidth below the diagonal
    rows = np.zeros((size, bw + 1))  # rows[i, d] = A[i, i - d]
    for k in range(n):
        for r in range(2):
            for c in range(r + 1):
                rows[2 * k + r, r - c] = diag[k][r, c]
    for (i, j), blk in off.items():
        for r in range(2):
            for c in range(2):
                rows[2 * i + r, 2 * i + r - (2 * j + c)] = blk[r, c]
    fac = np.zeros((size, bw + 1))  # fac[i, d] = L[i, i - d]
    for i in range(size):
        lo = max(0, i - bw)
        width = i - lo
        a = rows[i, width:0:-1] if width else np.zeros(0)  # A[i, lo:i]
        if width:
            sub = np.zeros((width, width))  # L[lo:i, lo:i]
            for q in range(width):
                g = lo + q
                take = min(q, bw) + 1
                sub[q, q - take + 1:q + 1] = fac[g, take - 1::-1]
            lrow = np.linalg.solve(sub, a)
            fac[i, width:0:-1] = lrow
            fac[i, 0] = math.sqrt(max(rows[i, 0] - float(lrow @ lrow), 1e-300))
        else:
            fac[i, 0] = math.sqrt(max(rows[i, 0], 1e-300))
    b = np.asarray(rhs, dtype=np.float64).reshape(size, -1).copy()
    for i in range(size):  # L y = b
        lo = max(0, i - bw)
        if i > lo:
            b[i] -= fac[i, i - lo:0:-1] @ b[lo:i]
        b[i] /= fac[i, 0]
    for i in range(size - 1, -1, -1):  # L^T x = y
        hi = min(size, i + bw + 1)
        for g in range(i + 1, hi):
            b[i] -= fac[g, g - i] * b[g]
        b[i] /= fac[i, 0]
    return b.reshape(rhs.shape)


def _solve_once(n: int, pairs: list[tuple[int, int]], a: np.ndarray, w: np.ndarray, fixed: dict[int, np.ndarray],
                free: list[int]) -> np.ndarray:
    """Weighted least squares for the composed centered transforms of the ``free`` slices, the ``fixed`` ones given.

    ``a``: ``(P, 2, 3)`` centered pair transforms; ``w``: ``(P,)`` weights. Returns ``(n, 2, 3)`` (rows of neither
    set stay 0)."""
    pos = {z: q for q, z in enumerate(free)}
    m = len(free)
    diag = [np.zeros((2, 2)) for _ in range(m)]
    off: dict[tuple[int, int], np.ndarray] = {}
    rhs = np.zeros((m, 2, 3))
    band = 1
    for p, (i, j) in enumerate(pairs):
        if w[p] <= 0 or not (i in pos or i in fixed) or not (j in pos or j in fixed):
            continue  # unweighted, or joining a slice the solve leaves out
        lin, b = a[p, :, :2], a[p, :, 2]
        # residual of column c: v_j - lin v_i - r_c, r = (0, 0, b); weight w
        fi, fj = i in fixed, j in fixed
        vi = fixed.get(i)
        vj = fixed.get(j)
        r = np.zeros((2, 3))
        r[:, 2] = b
        if not fj and not fi:
            qi, qj = pos[i], pos[j]
            diag[qj] += w[p] * np.eye(2)
            diag[qi] += w[p] * lin.T @ lin
            hi, lo = max(qi, qj), min(qi, qj)
            blk = -w[p] * lin if qj > qi else -w[p] * lin.T  # block (row hi, column lo)
            off[(hi, lo)] = off.get((hi, lo), np.zeros((2, 2))) + blk
            band = max(band, hi - lo)
            rhs[qj] += w[p] * r
            rhs[qi] -= w[p] * lin.T @ r
        elif not fj:  # i fixed: v_j = lin v_i + r
            qj = pos[j]
            diag[qj] += w[p] * np.eye(2)
            rhs[qj] += w[p] * (lin @ vi + r)
        elif not fi:  # j fixed: lin v_i = v_j - r
            qi = pos[i]
            diag[qi] += w[p] * lin.T @ lin
            rhs[qi] += w[p] * lin.T @ (vj - r)
    sol = _banded_solve(diag, off, rhs, band) if m else np.zeros((0, 2, 3))
    out = np.zeros((n, 2, 3))
    for z, v in fixed.items():
        out[z] = v
    for z, q in pos.items():
        out[z] = sol[q]
    return out


def residuals_px(composed: np.ndarray, pairs: list[tuple[int, int]], a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(P,)`` RMS displacement over the slice (px) between ``A_ij C_i`` and ``C_j`` (centered matrices)."""
    h, w = shape
    m = np.array([(w * w - 1) / 12.0, (h * h - 1) / 12.0, 1.0])
    out = np.zeros(len(pairs))
    for p, (i, j) in enumerate(pairs):
        hi = np.vstack([composed[i], [0, 0, 1]])
        e = composed[j] - a[p] @ hi
        out[p] = math.sqrt(float((m * (e * e).sum(0)).sum()))
    return out


def _components(nodes: list[int], pairs: list[tuple[int, int]], w: np.ndarray) -> dict[int, int]:
    parent = {z: z for z in nodes}

    def find(z: int) -> int:
        while parent[z] != z:
            parent[z] = parent[parent[z]]
            z = parent[z]
        return z

    for p, (i, j) in enumerate(pairs):
        if w[p] > 0 and i in parent and j in parent:
            parent[find(i)] = find(j)
    return {z: find(z) for z in nodes}


def _robust(u: np.ndarray, huber: bool) -> np.ndarray:
    """Weight factors for residuals ``u`` in units of the scale: Huber's (convex) or Tukey's biweight (0 beyond 1)."""
    if huber:
        return np.minimum(1.0, (1.345 / TUKEY) / np.maximum(u, 1e-12))
    return np.where(u < 1, (1 - u * u) ** 2, 0.0)


def solve(n_slices: int, pairs: list[tuple[int, int]], matrices: np.ndarray, prior: np.ndarray, shape: tuple[int, int],
          reference: int = 0, anchors: dict[int, np.ndarray] | None = None, skip: set[int] | None = None,
          distance: np.ndarray | None = None, iterations: int = 30) -> SolveResult:
    """Composed transforms of every slice from fitted pairs, robust to pairs with no true answer.

    Reweighting acts on pairs and on slices, residuals measured in units of the robust scale of the pairs at the same
    distance (pairs further apart disagree more: the content changes in between). A pair loses weight with its own
    residual (Tukey's biweight, after three Huber iterations); every pair of a slice loses weight with that slice's
    median residual. A foreign slice disagrees with every neighbour, so all its pairs go, while a bridge past it (a
    pair at distance 2 or more) stays: one cycle through the foreign slice cannot tell the bridge from the path
    through it, the slice's other pairs can.

    Parameters
    ----------
    n_slices : int
    pairs : list of ``(i, j)``
        Fitted pairs: slice ``j`` (moving) registered to slice ``i`` (fixed).
    matrices : ``(P, 2, 3)``
        Their normalized transforms (``C_j = A_ij C_i``).
    prior : ``(P,)``
        Each pair's weight before reweighting (its fit quality; 0 leaves it out).
    shape : (H, W)
    reference : int
        The slice whose transform is the identity (the output's frame).
    anchors : dict, optional
        ``{slice: (2, 3) normalized transform}`` known for some slices (hard constraints).
    skip : set of int, optional
        Slices not in the solve (damaged): they get interpolated transforms.
    distance : ``(P,)``, optional
        Each pair's distance (default ``j - i``): pairs are compared with those at the same distance.
    """
    skip = set(skip or ())
    a = to_centered(np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3), shape)
    prior = np.asarray(prior, dtype=np.float64)
    dist = np.asarray(distance if distance is not None else [j - i for i, j in pairs])
    nodes = sorted({z for pr in pairs for z in pr} - skip)
    if reference in skip or reference not in nodes:
        reference = nodes[0] if nodes else reference
    eye = np.eye(3)[:2]
    fixed = {reference: eye.copy()} | {z: to_centered(np.asarray(v, dtype=np.float64), shape)
                                        for z, v in (anchors or {}).items() if z in nodes}
    incident: dict[int, list[int]] = {z: [] for z in nodes}
    for p, (i, j) in enumerate(pairs):
        if prior[p] > 0:
            for z in (i, j):
                if z in incident:
                    incident[z].append(p)
    w = prior.copy()
    res = np.zeros(len(pairs))
    scale = np.full(len(pairs), MIN_SCALE_PX)
    node = {z: 1.0 for z in nodes}
    flagged: set[int] = set()
    for it in range(iterations):
        used, _ = _connect(nodes, pairs, w, prior, fixed, res, flagged)
        placed = set(_supported(nodes, pairs, used, fixed)) | set(fixed)
        composed = _solve_once(n_slices, pairs, a, used, fixed, sorted(placed - set(fixed)))
        res = residuals_px(composed, pairs, a, shape)
        # pairs with a slice the solve left out say nothing this round (that slice sits at no place)
        seen = np.array([i in placed and j in placed for i, j in pairs]) & (prior > 0)
        for d in np.unique(dist):
            at = (dist == d) & seen
            scale[dist == d] = max(MIN_SCALE_PX, 1.4826 * float(np.median(res[at]))) if at.any() else MIN_SCALE_PX
        u = res / (TUKEY * scale)
        huber = it < 3
        for z, ps in incident.items():
            ps = [p for p in ps if seen[p]]
            if ps:
                node[z] = float(_robust(np.array([np.median(u[ps])]), huber)[0])
        flagged = {z for z, v in node.items() if v <= 0 and z not in fixed}
        pair_node = np.array([min(node.get(i, 1.0), node.get(j, 1.0)) for i, j in pairs])
        new = np.where(seen, prior * _robust(u, huber) * pair_node, w)
        converged = not huber and np.allclose(new, w, rtol=1e-6, atol=1e-12)
        w = new
        if converged:
            break
    w, kept = _connect(nodes, pairs, w, prior, fixed, res, flagged)
    placed = _supported(nodes, pairs, w, fixed)
    composed = _solve_once(n_slices, pairs, a, w, fixed, placed)
    res = residuals_px(composed, pairs, a, shape)
    unregistered = sorted(z for z in nodes if z not in fixed and z not in placed)
    placed = sorted(set(placed) | set(fixed))
    # damaged or unregistered slices: between the nearest placed neighbours (entry-wise)
    out = fill_between({z: composed[z] for z in placed}, n_slices, eye)
    overruled = [p for p in range(len(pairs)) if prior[p] > 0 and w[p] <= UNSUPPORTED * prior[p]]
    return SolveResult(composed=to_normalized(out, shape), weights=w, residual_px=res, unregistered=unregistered,
                       overruled=overruled, kept_despite=kept, scale_px=float(scale.max()) if len(scale) else 0.0)


def _supported(nodes: list[int], pairs: list[tuple[int, int]], w: np.ndarray, fixed: dict[int, np.ndarray]) -> list[int]:
    """The slices the solve places: not fixed, and tied by weighted pairs to a fixed slice (the others are left out of
    the solve and placed between their neighbours)."""
    comp = _components(nodes, pairs, w)
    anchored = {comp[z] for z in fixed if z in comp}
    return [z for z in nodes if z not in fixed and comp[z] in anchored]


def _connect(nodes: list[int], pairs: list[tuple[int, int]], w: np.ndarray, prior: np.ndarray,
             fixed: dict[int, np.ndarray], res: np.ndarray, flagged: set[int]) -> tuple[np.ndarray, list[int]]:
    """``w`` with pairs given back their prior weight where, without them, a group of slices tied together by weighted
    pairs would be tied to no fixed slice (the chain is never split): for each such group, the pair with prior weight
    that joins it to the rest and disagrees least (smallest residual ``res``), never through a ``flagged`` slice (one
    that disagrees with all its neighbours). A single slice with no weighted pair is not a split: it is unregistered.
    Returns the weights and the pairs given back."""
    w = w.copy()
    kept: list[int] = []
    for _ in range(len(nodes)):
        comp = _components(nodes, pairs, w)
        anchored = {comp[z] for z in fixed if z in comp}
        groups: dict[int, list[int]] = {}
        for z in nodes:
            if comp[z] not in anchored:
                groups.setdefault(comp[z], []).append(z)
        progress = False
        for members in groups.values():
            inside = set(members)
            if not any(w[p] > 0 and i in inside and j in inside for p, (i, j) in enumerate(pairs)):
                continue  # a lone slice: unregistered, not a split
            cands = [p for p, (i, j) in enumerate(pairs) if prior[p] > 0 and w[p] <= 0 and ((i in inside) != (j in inside))]
            clean = [p for p in cands if pairs[p][0] not in flagged and pairs[p][1] not in flagged]
            cands = clean or cands  # through a flagged slice only where nothing else joins the two parts
            if cands:
                best = min(cands, key=lambda p: (res[p], -prior[p]))
                w[best] = prior[best]
                kept.append(best)
                progress = True
        if not progress:
            break
    return w, kept
