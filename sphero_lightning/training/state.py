"""The enumerated options of the module; the fit's state (levels, the block being fitted) lives in :mod:`..core.fit`."""

from __future__ import annotations

from typing import Literal

from ..core.fit import MAX_STEP_PX, NEWTON_MIN_NCC, NEWTON_TRUST_NCC, BlockState, Level  # noqa: F401 - their home is core.fit

Optimizer = Literal["bfgs", "adam"]
InitTranslation = Literal["phase", "none"]
#: BFGS curvature model at the start of a level (see RegistrationModule).
Curvature = Literal["gauss_newton", "carried"]
