"""What a fitted pair's record says of it: its status, the one set of values every module sets and reads.

The values are the output's (``registration_log[*].status`` in the Zarr attributes, ``sphero export``'s CSV): a
:class:`PairStatus` is a ``str`` and is written as its value, so records built with it and records read back from a
store compare equal.

>>> PairStatus.LOW_CORRELATION == "low_correlation", str(PairStatus.OK)
(True, 'ok')
>>> import json; json.dumps({"status": PairStatus.NO_TRUE_ANSWER})
'{"status": "no_true_answer"}'
>>> PairStatus.LOW_CORRELATION in UNTRUSTED, PairStatus.OK in UNTRUSTED
(True, False)
"""

from __future__ import annotations

from enum import StrEnum


class PairStatus(StrEnum):
    """A fitted pair's status."""

    #: Fitted, and matching well enough to trust (NCC after >= training.report.MIN_TRUSTED_NCC).
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
