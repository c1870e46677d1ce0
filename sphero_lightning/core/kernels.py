"""The default objective's evaluation on the CPU as one compiled pass over the pixels (numba), where numba is installed.

:func:`~.fastncc.ncc_and_gradient` in torch makes several passes over chunks of rows and keeps temporaries of them
(tap positions, tap values, weights, products: about 65 ns per pixel of a 512 x 512 pair on this project's 2-core
CPU). Here each pixel is visited once: its position, the inside weight and the masks, the 4 x 4 cubic B-spline taps
with both derivatives, the NCC's moment sums and the gradient's moments, all in registers and summed in float64; at a
level's first evaluation a second kernel adds the Gauss-Newton curvature's sums. The same loss and gradient to
rounding (positions in float64 here, float32 there: ~1e-7 of the loss, ~1e-5 of the gradient); the sums go in fixed
bands of rows, so the result does not depend on the number of threads.

The same fits also make each level's images with compiled filters (:mod:`._jit_filters`: the B-spline prefilter as
its recursive filter, the Gaussian pre-smoothing as a separable one), in place of the dense matrix products of
:mod:`.interpolation` (5-7x the time at 512 px): the same images to float32 rounding.

Compiled once per machine and kept in numba's cache (beside this file, or in the user's cache folder where the
package's is not writable): a fresh process loads it in a fraction of a second. Without numba (or with
``SPHERO_KERNELS=torch``) :func:`available` is False and the torch path runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

#: Work of a fit (pairs x pixels of the finest level) from which the compiled pass is used: below it the torch path
#: finishes about as soon, and the fit does not pay numba's start (~0.5-0.8 s a process: its import and target set-up).
MIN_WORK = 1 << 21


def _numba_installed() -> bool:
    from importlib.util import find_spec

    return os.environ.get("SPHERO_KERNELS", "").lower() != "torch" and find_spec("numba") is not None


_INSTALLED = _numba_installed()
_JIT: Any = None


def available() -> bool:
    """Whether the compiled evaluation can run (numba installed, not switched off with ``SPHERO_KERNELS=torch``)."""
    return _INSTALLED


def worth(n_pairs: int, pixels: int) -> bool:
    """Whether a fit of ``n_pairs`` pairs of ``pixels`` pixels at the finest level uses the compiled pass (decided once
    per fit, so that every evaluation of a fit takes the same path, whatever ran before in the process)."""
    return available() and n_pairs * pixels >= MIN_WORK


def _kernels() -> Any:
    global _JIT
    if _JIT is None:
        from . import _jit

        _JIT = _jit
    return _JIT


def ncc_sums(theta: np.ndarray, fixed: np.ndarray, coeffs: np.ndarray, fmean: np.ndarray, cmean: np.ndarray, ramp: float,
             fmask: np.ndarray | None, mmask: np.ndarray | None, fcoeffs: np.ndarray | None, want: np.ndarray | None,
             threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sums of each pair (see the module's description): ``theta`` ``(B, 2, 3)`` float64, ``fixed`` ``(B, h, w)``
    and ``coeffs`` / ``fcoeffs`` ``(B, h + 4, w + 4)`` float32, masks ``(B, h, w)`` float32 or None, ``want`` ``(B,)``
    bool: the pairs whose curvature sums are wanted (``fcoeffs`` given; None: none).

    Returns ``sums`` ``(B, 6)`` (S1, Sf, Sm, Sff, Smm, Sfm of the centred data), ``mom`` ``(B, 3, 2, 2, 2)`` (the
    gradient's moments: [u: w m, w f, w][d: x, y][j: yn, 1][i: xn, 1] of u times the interpolant's derivative d),
    ``ramp`` ``(B, 2, 6, 2, 2)`` (the weight's derivative d times [q: 1, f, m, ff, mm, fm][j][i]) and ``curv``
    ``(B, 9, 3, 3)`` (the curvature's sums [k][j: 1, yn, yn^2][i: 1, xn, xn^2]; zero for the pairs not wanted)."""
    jit = _kernels()
    b, h, _ = fixed.shape
    out = np.zeros((b, -(-h // jit.BAND_ROWS), jit.WIDTH), dtype=np.float64)
    empty = np.zeros((0, 1, 1), dtype=np.float32)
    fmask = empty if fmask is None else fmask
    mmask = empty if mmask is None else mmask
    _call(jit.bands, threads, theta, fixed, coeffs, fmean, cmean, float(ramp), fmask, mmask, out)
    if want is not None and fcoeffs is not None and want.any():
        _call(jit.curvature, threads, theta, fixed, coeffs, fmean, cmean, float(ramp), fmask, mmask, fcoeffs, want, out)
    total = out.sum(1)
    n0, n1, n2 = jit.N_SUMS, jit.N_SUMS + jit.N_MOM, jit.N_SUMS + jit.N_MOM + jit.N_RAMP
    return (total[:, :n0], total[:, n0:n1].reshape(b, 3, 2, 2, 2), total[:, n1:n2].reshape(b, 2, 6, 2, 2),
            total[:, n2:].reshape(b, 9, 3, 3))


def bspline_prefilter(images: np.ndarray, threads: int = 1) -> np.ndarray:
    """:func:`~.interpolation.bspline_prefilter` of ``(B, h, w)`` float32 images by the compiled recursive filter on
    ``threads`` threads: ``(B, h + 4, w + 4)`` float32, the same coefficients to float32 rounding (the torch path
    multiplies by the filter's dense inverse, ~5x the arithmetic at 512 px)."""
    from . import _jit_filters as jit

    out = np.empty((images.shape[0], images.shape[1] + 2 * jit.PAD, images.shape[2] + 2 * jit.PAD), dtype=np.float32)
    _call(jit.prefilter, threads, np.ascontiguousarray(images, dtype=np.float32), out)
    return out


def gaussian_blur(images: np.ndarray, kernel: np.ndarray, threads: int = 1) -> np.ndarray:
    """:func:`~.interpolation.gaussian_blur` of ``(B, h, w)`` float32 images with the 1-D ``kernel`` (float64), by the
    compiled separable filter on ``threads`` threads: the same values to float32 rounding, without the dense matrix
    product."""
    from . import _jit_filters as jit

    out = np.empty(images.shape, dtype=np.float32)
    _call(jit.blur, threads, np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(kernel, dtype=np.float64), out)
    return out


def _call(kernel: Any, threads: int, *args: Any) -> None:
    """``kernel(*args)`` on ``threads`` threads (the run's share of the cores, as torch has it). Its first call in a
    process loads it from numba's cache, or compiles it (once a machine, seconds): a compile says so in one line."""
    nb = _kernels()._nb
    nb.set_num_threads(max(1, min(threads, nb.config.NUMBA_NUM_THREADS)))
    fresh = not kernel.signatures
    t0 = time.perf_counter()
    kernel(*args)
    if fresh and time.perf_counter() - t0 > 3.0:
        print(f"sphero: compiled {kernel.__name__} for this machine in {time.perf_counter() - t0:.0f} s (once: numba "
              "keeps it in its cache)", file=sys.stderr)
