"""The default objective's evaluation on the CPU as one compiled pass over the pixels (numba), where numba is installed.

:func:`~.fastncc.ncc_and_gradient` in torch makes several passes over chunks of rows and keeps temporaries of them
(tap positions, tap values, weights, products: about 65 ns per pixel of a 512 x 512 pair on this project's 2-core
CPU). Here each pixel is visited once: its position, the inside weight and the masks, the 4 x 4 cubic B-spline taps
with both derivatives, the NCC's moment sums and the gradient's moments, all in registers and summed in float64; at a
level's first evaluation the same pass adds the Gauss-Newton curvature's sums (one set of taps for both). The same loss and gradient to
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
             threads: int, fidx: np.ndarray | None = None, midx: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sums of each pair (see the module's description): ``theta`` ``(B, 2, 3)`` float64, ``fixed`` ``(B, h, w)``
    and ``coeffs`` / ``fcoeffs`` ``(B, h + 4, w + 4)`` float32, masks ``(B, h, w)`` float32 or None, ``want`` ``(B,)``
    bool: the pairs whose curvature sums are wanted (``fcoeffs`` given; None: none). With ``fidx`` and ``midx``
    (``(B,)`` int64), pair ``p`` reads ``fixed[fidx[p]]``, ``fcoeffs[fidx[p]]`` and ``coeffs[midx[p]]`` (a block's slices,
    not a copy per pair); without, pair ``p`` reads row ``p`` of each.

    Returns ``sums`` ``(B, 6)`` (S1, Sf, Sm, Sff, Smm, Sfm of the centred data), ``mom`` ``(B, 3, 2, 2, 2)`` (the
    gradient's moments: [u: w m, w f, w][d: x, y][j: yn, 1][i: xn, 1] of u times the interpolant's derivative d),
    ``ramp`` ``(B, 2, 6, 2, 2)`` (the weight's derivative d times [q: 1, f, m, ff, mm, fm][j][i]) and ``curv``
    ``(B, 9, 3, 3)`` (the curvature's sums [k][j: 1, yn, yn^2][i: 1, xn, xn^2]; zero for the pairs not wanted)."""
    jit = _kernels()
    b, h = theta.shape[0], fixed.shape[1]
    fidx, midx = _rows(fidx, b), _rows(midx, b)
    out = np.zeros((b, -(-h // jit.BAND_ROWS), jit.WIDTH), dtype=np.float64)
    if want is None or fcoeffs is None:  # no curvature wanted: nothing reads the fixed slices' coefficients
        want, fcoeffs = np.zeros(b, dtype=np.bool_), _given(None)
    _call(jit.bands, threads, theta, fixed, coeffs, fidx, midx, fmean, cmean, float(ramp), _given(fmask), _given(mmask), fcoeffs,
          np.ascontiguousarray(want, dtype=np.bool_), out)
    total = out.sum(1)
    n0, n1, n2 = jit.N_SUMS, jit.N_SUMS + jit.N_MOM, jit.N_SUMS + jit.N_MOM + jit.N_RAMP
    return (total[:, :n0], total[:, n0:n1].reshape(b, 3, 2, 2, 2), total[:, n1:n2].reshape(b, 2, 6, 2, 2),
            total[:, n2:].reshape(b, 9, 3, 3))


def identity_sums(fixed: np.ndarray, moving: np.ndarray, ramp: float, fmask: np.ndarray | None, mmask: np.ndarray | None,
                  threads: int, fidx: np.ndarray | None = None, midx: np.ndarray | None = None) -> np.ndarray:
    """``(B, 6)``: the NCC's sums (S1, Sf, Sm, Sff, Smm, Sfm) of each pair of ``(B, h, w)`` float32 slices at the
    identity, the slices themselves in place of the interpolant (:func:`ncc_sums` at the identity to rounding, in a
    fraction of its time); ``fidx``, ``midx``: as :func:`ncc_sums` 's (``B`` their length)."""
    jit = _kernels()
    b, h = len(fidx) if fidx is not None else fixed.shape[0], fixed.shape[1]
    fidx, midx = _rows(fidx, b), _rows(midx, b)
    out = np.zeros((b, -(-h // jit.BAND_ROWS), 6), dtype=np.float64)
    _call(jit.identity_sums, threads, fixed, moving, fidx, midx, float(ramp), _given(fmask), _given(mmask), out)
    return out.sum(1)


def _given(a: np.ndarray | None) -> np.ndarray:
    """``a``, or for None the empty ``(0, 1, 1)`` float32 array by which a kernel knows an optional input is absent."""
    return np.zeros((0, 1, 1), dtype=np.float32) if a is None else a


def _rows(index: np.ndarray | None, b: int) -> np.ndarray:
    """The rows ``index`` (int64), or ``0 .. b - 1``."""
    return np.arange(b, dtype=np.int64) if index is None else np.ascontiguousarray(index, dtype=np.int64)


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


def warp_slice(image: np.ndarray | None, theta: np.ndarray, offset: tuple[int, int], out_shape: tuple[int, int],
               dtype: Any, coeffs: np.ndarray | None = None) -> np.ndarray:
    """One output window of a B-spline warp on the calling thread (the writer's tasks run on threads of their own):
    ``image`` (the whole ``(H, W)`` slice, float32) prefiltered by the recursive filter, or its padded ``coeffs``
    (``(H + 4, W + 4)``, e.g. a window's canvas) given, sampled at the source positions of the output pixels ``offset
    ..`` ``out_shape`` of the slice's frame under the normalized ``theta`` (``(2, 3)``), rounded and clipped to an
    integer ``dtype`` (a float one keeps the values). What :func:`~.warping.warp` gives in ``bspline`` mode to float32
    rounding (the interpolant's 16 taps summed in float64 here)."""
    from . import _jit_filters as jit
    from .frames import Affine, Frame

    if coeffs is None:
        coeffs = np.empty((image.shape[0] + 2 * jit.PAD, image.shape[1] + 2 * jit.PAD), dtype=np.float32)
        jit.prefilter_slice(np.ascontiguousarray(image, dtype=np.float32), coeffs)
    shape = (coeffs.shape[0] - 2 * jit.PAD, coeffs.shape[1] - 2 * jit.PAD)
    # output pixel (x, y) of the slice's frame -> the source pixel it samples
    m = Affine(np.asarray(theta, dtype=np.float64), Frame.NORMALIZED, shape).to(Frame.PIXEL).matrix[:2].ravel()
    out = np.empty(out_shape, dtype=dtype)
    integer = np.issubdtype(out.dtype, np.integer)
    info = np.iinfo(out.dtype) if integer else None
    jit.sample_window(coeffs, m, offset[0], offset[1], float(info.min if integer else 0), float(info.max if integer else 0),
                      integer, out)
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
