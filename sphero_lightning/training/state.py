"""The state a fit carries between Lightning hooks: pyramid levels and the block being fitted; the enumerated
options of the module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

#: A level starts from the Gauss-Newton model only for pairs matching at least this well (NCC); below it a pair barely
#: matches (``low_correlation`` in the output) and its slices' gradients say nothing about the loss's curvature.
NEWTON_MIN_NCC = 0.1
#: ... and its model is trusted before any step only for pairs matching at least this well (NCC at the level's first
#: evaluation): there it is the loss's Hessian to within ~20 %, so a short first step means the pair is at its optimum.
#: Below, the model can overestimate the curvature many times over (50x seen on ssTEM sections 100 nm apart), and a
#: short proposed step says nothing until a step has confirmed the model (solvers.BatchBFGS.confirmed).
NEWTON_TRUST_NCC = 0.8
#: Longest step (pixels of the level) below the coarsest pyramid level: the coarser level left the pair about that
#: close to the finer level's optimum, and a longer step on a weakly matching pair can jump into another basin of the
#: finer loss, so that when it ends would decide where it ends.
MAX_STEP_PX = 1.0
Optimizer = Literal["bfgs", "adam"]
InitTranslation = Literal["phase", "none"]
#: BFGS curvature model at the start of a level (see RegistrationModule).
Curvature = Literal["gauss_newton", "carried"]


@dataclass
class Level:
    """One pyramid level: downscale factor, step budget, learning rate (first step length for BFGS)."""

    factor: float
    steps: int
    lr: float


@dataclass
class BlockState:
    """What the module knows about the block it is fitting (identical on every rank)."""

    index: int
    pairs: list[int]  # global pair index of each row, -1 for an empty slot; length world * B
    valid: torch.Tensor  # (R,) bool
    level: int = -1
    level_steps: int = 0
    steps: torch.Tensor | None = None  # (R,) evaluations while active, all levels
    done: bool = False
    level_counts: list[torch.Tensor] = field(default_factory=list)  # (R,) evaluations per level
    accepted: torch.Tensor | None = None  # (R,) bool: rows whose last evaluation the solver accepted
