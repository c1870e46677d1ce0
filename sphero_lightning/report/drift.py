"""Drift along z in the composed transforms: a trend (the registration's own drift, or the sample's), told from jitter,
and the one-line warning the run and its page give about it. numpy only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.frames import pixel_centre


def accumulation(tmats: np.ndarray, shape: tuple[int, int], box: list[int]) -> dict[str, float]:
    """How far the composed transforms (``(Z, 3, 3)`` pixel matrices, slice 0's first) travel along z: per quantity
    (rotation in degrees, the slice centre's x and y in pixels) the change of its straight-line trend from the first
    slice to the last (``*_trend``) and the scatter around that trend (``*_scatter``); ``area_kept`` the crop box's
    share of the slice."""
    t = np.asarray(tmats, dtype=np.float64)
    h, w = shape
    c = np.array([*pixel_centre(shape), 1.0])
    moved = t @ c
    series = {"rotation": np.degrees(np.arctan2(t[:, 1, 0], t[:, 0, 0])), "x": moved[:, 0] - c[0], "y": moved[:, 1] - c[1]}
    z = np.arange(len(t), dtype=np.float64)
    out = {"area_kept": (box[1] - box[0]) * (box[3] - box[2]) / float(h * w), "slices": float(len(t))}
    for name, q in series.items():
        if len(q) < 3:
            out[f"{name}_trend"], out[f"{name}_scatter"] = float(q[-1] - q[0]), 0.0
            continue
        slope, icpt = np.polyfit(z, q, 1)
        out[f"{name}_trend"] = float(slope * (len(q) - 1))
        out[f"{name}_scatter"] = float(np.std(q - (slope * z + icpt)))
    return out


def accumulation_warning(tmats: np.ndarray, shape: tuple[int, int], box: list[int],
                         used: Mapping[str, Any] | None = None) -> str | None:
    """One line when the composed transforms drift along z more than their scatter explains (a trend, not jitter:
    at least 1 deg or 10 px and 3 times the scatter), or the crop keeps under half the slice; else None.

    ``used``: what the run already did about it (``reference``, ``detrend``, ``highpass``, ``crop_borders``), so that the
    advice names only what is left to try; with a reference slice other than 0 the drift is given on each side of it.
    """
    used = dict(used or {})
    a = accumulation(tmats, shape, box)
    turn = abs(a["rotation_trend"]) >= max(1.0, 3 * a["rotation_scatter"])
    shift = math.hypot(a["x_trend"], a["y_trend"])
    move = shift >= max(10.0, 3 * math.hypot(a["x_scatter"], a["y_scatter"]))
    if not (turn or move or a["area_kept"] < 0.5):
        return None
    ref = int(used.get("reference") or 0)
    t = np.asarray(tmats, dtype=np.float64)
    if 0 < ref < len(t) - 1:  # the drift runs both ways from the reference: each side's own trend
        sides = [(name, accumulation(part, shape, box)) for name, part in (("before", t[ref::-1]), ("after", t[ref:]))]
        seen = "; ".join(f"from slice {ref} to the {'first' if name == 'before' else 'last'} slice they turn by "
                         f"{b['rotation_trend']:.1f} deg and move by {math.hypot(b['x_trend'], b['y_trend']):.0f} px"
                         for name, b in sides)
        seen = f"with slice {ref} as the reference, {seen} (a trend along z, not jitter)"
    else:
        seen = (f"the aligned slices turn by {a['rotation_trend']:.1f} deg and move by {shift:.0f} px from the first slice "
                "to the last (a trend along z, not jitter)")
    advice = []
    if used.get("detrend") is None and used.get("highpass") is None:
        advice.append("--solve.detrend 1 removes a linear trend")
    if not ref:
        advice.append("--solve.reference in the middle of the stack halves it and the area lost")
    if used.get("crop_borders", True):
        advice.append("--output.crop_borders false keeps the whole frame")
    tried = [f"--solve.{k} {used[k]}" for k in ("reference", "detrend", "highpass") if used.get(k)]
    left = (f": {', '.join(advice)}" if advice else ": every remedy is in use") + \
        (f" (this run already used {', '.join(tried)})" if tried else "")
    return (f"{seen}, and the crop keeps {100 * a['area_kept']:.0f} % of the slice area. If the stack was already aligned "
            f"or the sample does not drift, that is the registration's own drift{left} (README: Foreign slices and drift)")
