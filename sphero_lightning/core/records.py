"""A fitted pair's record: its keys (:class:`PairRecord`, one place to learn them), the constructor every producer
uses (:func:`fitted_pair`), and its status (:class:`PairStatus`, the one set of values every module sets and reads).

A record is a plain dict at run time (it goes into the journal and the output's ``registration_log`` as JSON), typed
here for the reader and the type checker. The status values are the output's (``registration_log[*].status`` in the Zarr attributes, ``sphero export``'s CSV): a
:class:`PairStatus` is a ``str`` and is written as its value, so records built with it and records read back from a
store compare equal.

>>> PairStatus.LOW_CORRELATION == "low_correlation", str(PairStatus.OK)
(True, 'ok')
>>> import json; json.dumps({"status": PairStatus.NO_TRUE_ANSWER})
'{"status": "no_true_answer"}'
>>> PairStatus.LOW_CORRELATION in UNTRUSTED, PairStatus.OK in UNTRUSTED
(True, False)

A record as a test makes one (the fields a fit fills; the volume, the QC and the writer add theirs later):

>>> r = fitted_pair(3, (3, 4), [[1.0, 0.0, 0.01], [0.0, 1.0, 0.0]], final_loss=0.2, ncc_after=0.8)
>>> str(r["status"]), r["slice_indices"], r["finest_factor"]
('ok', [3, 4], 1.0)
>>> str(fitted_pair(0, (0, 2), [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], final_loss=float("nan"))["status"])
'failed'
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

import numpy as np


class PairStatus(StrEnum):
    """A fitted pair's status."""

    #: Fitted, and matching well enough to trust (NCC after >= :data:`MIN_TRUSTED_NCC`).
    OK = "ok"
    #: The fit ended with a non-finite loss.
    FAILED = "failed"
    #: Fitted, but matching too little for the transform to mean anything.
    LOW_CORRELATION = "low_correlation"
    #: Not fitted: one of its slices is damaged (left out of the registration).
    DAMAGED_SLICE = "damaged_slice"
    #: The cycle check found no transform consistent with the pair's neighbours: it is left out of the solve.
    NO_TRUE_ANSWER = "no_true_answer"
    #: Next to a slice that no neighbour agrees with (a foreign slice), placed between its neighbours.
    UNREGISTERED = "unregistered"


#: The statuses of a result that cannot be trusted as fitted.
UNTRUSTED = frozenset({PairStatus.LOW_CORRELATION, PairStatus.FAILED})


class PairRecord(TypedDict):
    """One pair's record: what the fit fills (:func:`fitted_pair`) and what later stages add (``NotRequired``)."""

    #: The pair's number in the run (its order in the pair graph).
    pair_index: int
    #: ``[fixed, moving]`` slice numbers in the stack.
    slice_indices: list[int]
    #: ``(2, 3)`` normalized matrix (output position -> position sampled in the moving slice; ``C_j = A C_i``).
    matrix: list[list[float]]
    #: The loss at the end (NCC loss ``1 - NCC`` plus the scale and shear penalty for the default objective).
    final_loss: float | None
    num_steps_taken: int
    steps_per_level: list[int]
    status: PairStatus
    #: The resolution the pair was last fitted at (1: full; 4: pairs further apart, ``--solve.coarse_factor``).
    finest_factor: float
    ncc_before: float | None
    ncc_after: float | None
    #: Fraction of the loss's pixels the masks kept (with masks only).
    mask_kept: NotRequired[float]
    #: The QC's verdict and robust z-score of the loss (:func:`flag_outliers`).
    qc: NotRequired[str]
    qc_z: NotRequired[float | None]
    #: The solve's residual (px) and the slices a foreign slice left unregistered (core.volume).
    solve_residual_px: NotRequired[float]
    unregistered_slices: NotRequired[list[int]]
    #: A damaged slice's entry: why each slice was left out, and the pair that bridges it.
    damaged_slices: NotRequired[dict[str, str]]
    bridged_by: NotRequired[dict[str, Any]]


def fitted_pair(pair_index: int, slice_indices: tuple[int, int] | list[int], matrix: list[list[float]], *,
                final_loss: float, ncc_before: float | None = None, ncc_after: float | None = None,
                num_steps_taken: int = 0, steps_per_level: list[int] | None = None, finest_factor: float = 1.0,
                mask_kept: float | None = None) -> PairRecord:
    """The record of a fitted pair: ``ok``, or ``failed`` where the loss is not finite."""
    record = PairRecord(pair_index=int(pair_index), slice_indices=[int(z) for z in slice_indices], matrix=matrix,
                        final_loss=final_loss, num_steps_taken=num_steps_taken, steps_per_level=steps_per_level or [],
                        status=PairStatus.OK if math.isfinite(final_loss) else PairStatus.FAILED,
                        finest_factor=float(finest_factor), ncc_before=ncc_before, ncc_after=ncc_after)
    if mask_kept is not None:
        record["mask_kept"] = mask_kept
    return record



def in_stack(record: PairRecord, pair_index: int, slice_indices: tuple[int, int] | list[int]) -> PairRecord:
    """A block's record (positions only) as the stack's pair ``pair_index`` of slices ``slice_indices``.

    >>> r = in_stack(fitted_pair(0, (), [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], final_loss=0.1), 7, (6, 8))
    >>> r["pair_index"], r["slice_indices"]
    (7, [6, 8])
    """
    return {"pair_index": pair_index, "slice_indices": list(slice_indices),
            **{k: v for k, v in record.items() if k not in ("pair_index", "slice_indices")}}

#: A pair whose NCC after fitting is below this is marked ``low_correlation``, never ``ok``: its slices share too
#: little structure for the transform to mean anything (consecutive real ssTEM sections: 0.2-0.4; FIB-SEM: ~0.9).
MIN_TRUSTED_NCC = 0.1


def mark_untrusted(log: list[PairRecord]) -> None:
    """Set ``status: low_correlation`` on fitted pairs whose NCC after fitting is below :data:`MIN_TRUSTED_NCC`
    (or not finite): a result that cannot be trusted is never marked ``ok``."""
    for e in log:
        if e.get("status") != PairStatus.OK:
            continue
        ncc = e.get("ncc_after")
        if ncc is not None and not (math.isfinite(ncc) and ncc >= MIN_TRUSTED_NCC):
            e["status"] = PairStatus.LOW_CORRELATION


#: Fewest pairs for the along-the-stack QC: a median and MAD of fewer say nothing about outliers.
QC_MIN_PAIRS = 5


#: The spread below which differences in final loss are not outliers: this fraction of the median loss.
QC_MIN_SPREAD = 0.05


def flag_outliers(log: list[PairRecord], threshold: float = 3.5) -> list[PairRecord]:
    """Mark pairs whose final loss is an outlier along the stack (robust z-score above ``threshold``).

    ``z = 0.6745 (loss - median) / max(MAD, QC_MIN_SPREAD * median)`` over the registered pairs; only high
    losses (poor matches) count. The floor keeps near-identical pairs (all losses within a few percent, as on
    a short or very regular stack) from being flagged for differences that mean nothing. Sets ``qc`` (``"ok"``,
    ``"outlier"``, or ``"not_assessed"`` with fewer than :data:`QC_MIN_PAIRS` pairs) and ``qc_z`` on every
    registered entry; returns the outliers.
    """
    entries = [e for e in log if e.get("final_loss") is not None and math.isfinite(e["final_loss"])]
    if len(entries) < QC_MIN_PAIRS:
        for e in entries:
            e["qc"], e["qc_z"] = "not_assessed", None
        return []
    losses = np.array([e["final_loss"] for e in entries])
    med = float(np.median(losses))
    mad = float(np.median(np.abs(losses - med)))
    scale = max(mad, QC_MIN_SPREAD * abs(med), 1e-12)
    out = []
    for e, x in zip(entries, losses):
        z = 0.6745 * (x - med) / scale
        e["qc_z"] = round(float(z), 3)
        e["qc"] = "outlier" if z > threshold else "ok"
        if z > threshold:
            out.append(e)
    return out
