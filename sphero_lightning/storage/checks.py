"""Checks of a stack's shape and type and of an anchors file, with numpy only (no zarr): the data module's and the
command line's early checks (:mod:`~sphero_lightning.commands.precheck`) say the same in the same words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpheroError


def check_stack(shape: tuple[int, ...], dtype: Any, what: str) -> None:
    """A stack to register: ``(Z, Y, X)``, at least 2 slices of at least 16 x 16, integer or float grey values; else a
    one-line :class:`SpheroError` naming ``what`` (e.g. ``"array 'images/50-4-4'"`` or ``"stack"``)."""
    if len(shape) != 3:
        raise SpheroError(f"{what} has shape {tuple(shape)}; expected 3D (Z, Y, X)")
    if shape[0] < 2:
        raise SpheroError(f"{what} has {shape[0]} slice(s); registration needs at least 2")
    if min(shape[1:]) < 16:
        raise SpheroError(f"the slices of {what} are {shape[1]} x {shape[2]} px; need at least 16 x 16")
    dt = np.dtype(dtype)
    if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise SpheroError(f"{what} has dtype {dt}; expected an integer or float type")


def read_anchors(path: str) -> dict[int, np.ndarray]:
    """``--solve.anchors``: the JSON object of slice -> 3 x 3 pixel matrix, read and checked (one-line errors)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        out = {int(k): np.asarray(v, dtype=np.float64).reshape(3, 3) for k, v in doc.items()}
    except FileNotFoundError:
        raise SpheroError(f"--solve.anchors {path!r}: no such file") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise SpheroError(f"--solve.anchors {path!r}: expected a JSON object of slice -> 3 x 3 pixel matrix ({exc})") from None
    if not out:
        raise SpheroError(f"--solve.anchors {path!r} names no slice")
    return out
