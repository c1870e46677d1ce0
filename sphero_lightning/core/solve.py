"""The volume from its pairs: which pairs have no true answer, and the composed transforms by weighted least squares.

A chain ``C_k = A_k C_(k-1)`` trusts every pair: one pair with no true answer (a foreign, misfiled or re-imaged
slice) moves every slice after it. With redundant pairs (each slice also registered to the slice before its
neighbour) every three consecutive usable slices ``a, b, c`` form a cycle: ``A_bc A_ab`` and ``A_ac`` must agree.
:func:`diagnose` reads the pattern of cycles that do not (their error in pixels, against the stack's own scale):

* one inconsistent cycle: its long pair ``(a, c)`` has no true answer;
* two in a row, around slices ``b, c``: the consecutive pair ``(b, c)`` has none;
* three or more in a row: the slices in the middle are *foreign*, they agree with no neighbour (also where the middle
  cycle of the three agrees by chance: two inconsistent cycles with one consistent between them).

:func:`solve` then finds the composed transforms by weighted least squares (each fitted pair ``(i, j)`` with transform
``A_ij`` says ``C_j ~ A_ij C_i``, linear in the unknown ``C``), the reference slice fixed: consecutive pairs carry the
solution, longer ones almost nothing (their content changes more in between) except where they are the only path, and
a pair with no true answer only where nothing else joins two parts of the stack. A foreign slice (or one no pair
ties to the reference) is *unregistered*: it gets the transform interpolated between its neighbours', like a damaged
slice, and is listed.

Numpy only (no torch): transforms are given and returned as normalized ``(2, 3)`` matrices (torch's ``affine_grid``
convention) and solved in centered pixels (:func:`~.frames.to_centered`), where a residual is a displacement in pixels.

The algebra: with ``C_k = [L_k | t_k]`` (2 x 2 linear part, translation) and ``A = [a | b]``,
``C_j - A C_i = [L_j - a L_i | t_j - a t_i - b]``: each of the three columns of ``C`` is its own linear problem
``v_j - a v_i = r`` (``r = b`` for the translation column, else 0), all three with the same matrix. The mean squared
displacement over the slice of a residual ``E`` is ``sum_c m_c |E_c|^2`` with ``m = (var x, var y, 1)`` of the
pixel centres, so one banded normal matrix serves all three columns. Its band is as wide as the longest pair.

Three slices, their consecutive pairs and the pair over the middle one, all consistent: the solve returns the
chain (slice 0, the reference, the identity; normalized matrices, ``C_j = A_ij C_i``):

>>> a = np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]])
>>> two = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.0]])
>>> r = solve(3, [(0, 1), (1, 2), (0, 2)], np.stack([a, a, two]), np.ones(3), (100, 200))
>>> np.round(r.composed[:, 0, 2], 6).tolist(), r.unregistered
([0.0, 0.1, 0.2], [])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .frames import fill_between, to_centered, to_normalized
from .settings import SOLVE

#: A cycle of three consecutive slices is inconsistent when its error exceeds this many robust standard deviations of
#: the stack's cycle errors, and at least MIN_CYCLE_PX pixels (where every pair agrees to hundredths of a pixel).
CYCLE_FACTOR = 6.0
MIN_CYCLE_PX = 1.0


@dataclass
class SolveResult:
    """What the solve found.

    Attributes
    ----------
    composed : ``(n, 2, 3)`` normalized transforms of every slice to the reference's frame (the reference: identity).
    residual_px : ``(P,)`` RMS displacement over the slice between ``A_ij C_i`` and ``C_j`` at the solution.
    unregistered : slices left out (foreign) or tied to the reference by no pair (placed between their neighbours).
    """

    composed: np.ndarray
    residual_px: np.ndarray
    unregistered: list[int] = field(default_factory=list)


@dataclass
class Diagnosis:
    """Which pairs have no true answer, from the cycles of three consecutive usable slices (:func:`diagnose`).

    Attributes
    ----------
    errors : ``{b: px}`` the cycle error of each consecutive ``a, b, c`` (keyed by the middle slice).
    threshold_px : above it a cycle is inconsistent.
    foreign : slices that agree with no neighbour.
    bad_pairs : consecutive pairs with no true answer between slices that are fine.
    bad_bridges : pairs over one slice with no true answer.
    """

    errors: dict[int, float]
    threshold_px: float
    foreign: list[int] = field(default_factory=list)
    bad_pairs: list[tuple[int, int]] = field(default_factory=list)
    bad_bridges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.foreign or self.bad_pairs or self.bad_bridges)


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


def diagnose(pairs: list[tuple[int, int]], matrices: np.ndarray, good: list[int], shape: tuple[int, int]) -> Diagnosis:
    """The cycles of every three consecutive usable slices ``good`` whose three pairs were fitted, and what their
    pattern says has no true answer (see the module's description). ``matrices``: the pairs' normalized transforms."""
    a = {pr: np.vstack([m, [0, 0, 1]]) for pr, m in zip(pairs, to_centered(np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3), shape))}
    h, w = shape
    mom = np.array([(w * w - 1) / 12.0, (h * h - 1) / 12.0, 1.0])
    errors: dict[int, float] = {}
    for m in range(1, len(good) - 1):
        x, y, z = good[m - 1], good[m], good[m + 1]
        if (x, y) in a and (y, z) in a and (x, z) in a:
            e = (a[(y, z)] @ a[(x, y)] - a[(x, z)])[:2]
            errors[y] = math.sqrt(float((mom * (e * e).sum(0)).sum()))
    values = np.array(list(errors.values()))
    threshold = max(MIN_CYCLE_PX, CYCLE_FACTOR * 1.4826 * float(np.median(values))) if len(values) else MIN_CYCLE_PX
    pos = {z: q for q, z in enumerate(good)}
    bad = sorted(pos[y] for y, e in errors.items() if e > threshold)
    out = Diagnosis(errors=errors, threshold_px=threshold)
    runs: list[list[int]] = []
    for q in bad:
        if runs and q == runs[-1][-1] + 1:
            runs[-1].append(q)
        elif runs and q == runs[-1][-1] + 2:
            # one consistent cycle between two inconsistent ones: a foreign slice whose two consecutive pairs happen
            # to compose to nearly the right transform (its cycle then agrees; its two bridges still do not)
            runs[-1] += [q - 1, q]
        else:
            runs.append([q])
    for run in runs:  # positions (in good) of the middle slices of consecutive inconsistent cycles
        if len(run) == 1:
            out.bad_bridges.append((good[run[0] - 1], good[run[0] + 1]))
        elif len(run) == 2:
            out.bad_pairs.append((good[run[0]], good[run[1]]))
        else:
            out.foreign += [good[q] for q in run[1:-1]]
    return out


def solve(n_slices: int, pairs: list[tuple[int, int]], matrices: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
          reference: int = SOLVE.reference, anchors: dict[int, np.ndarray] | None = None, skip: set[int] | None = None,
          leave_out: set[int] | None = None) -> SolveResult:
    """Composed transforms of every slice by weighted least squares over the fitted pairs.

    Parameters
    ----------
    n_slices : int
    pairs : list of ``(i, j)``
        Fitted pairs: slice ``j`` (moving) registered to slice ``i`` (fixed).
    matrices : ``(P, 2, 3)``
        Their normalized transforms (``C_j = A_ij C_i``).
    weights : ``(P,)``
        Each pair's weight (0 leaves it out).
    shape : (H, W)
    reference : int
        The slice whose transform is the identity (the output's frame).
    anchors : dict, optional
        ``{slice: (2, 3) normalized transform}`` known for some slices (hard constraints).
    skip, leave_out : set of int, optional
        Slices not in the solve (damaged; foreign): they get transforms interpolated between their neighbours'.
    """
    out_of = set(skip or ()) | set(leave_out or ())
    a = to_centered(np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3), shape)
    w = np.asarray(weights, dtype=np.float64).copy()
    w[[p for p, (i, j) in enumerate(pairs) if i in out_of or j in out_of]] = 0.0
    nodes = sorted({z for pr in pairs for z in pr} - out_of)
    if reference not in nodes:
        reference = nodes[0] if nodes else reference
    eye = np.eye(3)[:2]
    fixed = {reference: eye.copy()} | {z: to_centered(np.asarray(v, dtype=np.float64), shape)
                                        for z, v in (anchors or {}).items() if z in nodes}
    comp = _components(nodes, pairs, w)
    anchored = {comp[z] for z in fixed}
    free = [z for z in nodes if z not in fixed and comp[z] in anchored]
    composed = _solve_once(n_slices, pairs, a, w, fixed, free)
    placed = sorted(set(free) | set(fixed))
    # left out, or tied to no fixed slice: between the nearest placed neighbours (entry-wise)
    out = fill_between({z: composed[z] for z in placed}, n_slices, eye)
    unregistered = sorted(z for z in range(n_slices) if z not in placed and z not in set(skip or ()))
    return SolveResult(composed=to_normalized(out, shape), residual_px=residuals_px(out, pairs, a, shape),
                       unregistered=unregistered)
