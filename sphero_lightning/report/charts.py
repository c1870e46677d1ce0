"""Line charts of values along the stack as self-contained SVG (numpy only).

The alignment page's curves are a few hundred points: drawing them by hand as SVG takes milliseconds, where a
plotting library took 0.3-0.7 s of every run's start-up (fonts loaded, each figure rasterised); the page stays one
file that opens offline, and the charts stay sharp at any zoom.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

import numpy as np

#: Colours of the series, in order (matplotlib's default cycle, which users know from other plots).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


@dataclass
class Series:
    """One line (``marker``: ``"o"``, ``"s"`` or ``""``), or with ``line=False`` only markers
    (``"x"`` or ``"^"`` too)."""

    x: np.ndarray
    y: np.ndarray
    label: str = ""
    color: str = COLORS[0]
    marker: str = ""
    line: bool = True


@dataclass
class Panel:
    """One plot area: series, a y label, the smallest y range shown (a flat line stays flat, not rounding noise
    blown up to the panel's height), and grey bands at some x (damaged slices)."""

    series: list[Series]
    ylabel: str = ""
    min_span: float = 0.0
    bands: list[float] = field(default_factory=list)
    legend: bool = False
    legend_below: bool = False  # the legend in the lower left corner (where the data leave room) instead of the upper


def nice_step(span: float, count: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about ``count`` intervals over ``span``."""
    raw = max(span, 1e-300) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * power >= raw * (1 - 1e-9):
            return m * power
    return 10.0 * power


def ticks(lo: float, hi: float, count: int, integer: bool = False) -> list[float]:
    """Round tick values within ``[lo, hi]``."""
    step = nice_step(hi - lo, count)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step > 0 and abs(step / 10 ** math.floor(math.log10(step)) - 2.5) < 1e-9:
        decimals += 1
    text = f"{value:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text


def _y_range(panel: Panel) -> tuple[float, float]:
    values = np.concatenate([np.asarray(s.y, dtype=float).ravel() for s in panel.series] or [np.zeros(1)])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi - lo < panel.min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - panel.min_span / 2, mid + panel.min_span / 2
    if hi - lo <= 0:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def _marker(kind: str, x: float, y: float, color: str) -> str:
    if kind == "o":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.4" fill="{color}"/>'
    if kind == "s":
        return f'<rect x="{x - 2.2:.1f}" y="{y - 2.2:.1f}" width="4.4" height="4.4" fill="{color}"/>'
    if kind == "x":
        return (f'<path d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" '
                f'stroke="{color}" stroke-width="2.2"/>')
    if kind == "^":
        return f'<path d="M{x:.1f},{y - 5.5:.1f}L{x + 5:.1f},{y + 3.5:.1f}L{x - 5:.1f},{y + 3.5:.1f}Z" fill="{color}"/>'
    return ""


def panels_svg(panels: list[Panel], *, width: int = 860, panel_height: int = 150, title: str = "",
               xlabel: str = "", x_range: tuple[float, float] | None = None) -> str:
    """Panels stacked vertically over one x axis (slice index, integer ticks) as an SVG document."""
    left, right, top, gap, bottom = 78, 14, 26 if title else 10, 14, 42
    height = top + len(panels) * panel_height + (len(panels) - 1) * gap + bottom
    plot_w = width - left - right
    xs = np.concatenate([np.asarray(s.x, dtype=float) for p in panels for s in p.series] or [np.zeros(1)])
    x0, x1 = x_range if x_range is not None else (float(np.nanmin(xs)) - 0.5, float(np.nanmax(xs)) + 0.5)
    x_ticks = ticks(x0, x1, 8, integer=True)
    esc = html.escape
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">'),
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="16" text-anchor="middle" font-size="12">{esc(title)}</text>')

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    for k, panel in enumerate(panels):
        py0 = top + k * (panel_height + gap)
        lo, hi = _y_range(panel)

        def sy(v: float, py0: float = py0, lo: float = lo, hi: float = hi) -> float:
            return py0 + (hi - v) / (hi - lo) * panel_height

        for b in panel.bands:
            a, c = sx(b - 0.5), sx(b + 0.5)
            out.append(f'<rect x="{a:.1f}" y="{py0}" width="{c - a:.1f}" height="{panel_height}" fill="#d0d0d0"/>')
        y_ticks = ticks(lo, hi, 4)
        step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else nice_step(hi - lo, 4)
        for t in y_ticks:
            y = sy(t)
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>')
            out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{tick_label(t, step)}</text>')
        for t in x_ticks:
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py0}" y2="{py0 + panel_height}" stroke="#e6e6e6"/>')
            if k == len(panels) - 1:
                out.append(f'<text x="{x:.1f}" y="{py0 + panel_height + 15}" text-anchor="middle">{round(t)}</text>')
        for s in panel.series:
            xv, yv = np.asarray(s.x, dtype=float), np.asarray(s.y, dtype=float)
            ok = np.isfinite(xv) & np.isfinite(yv)
            if s.line:  # one polyline per run of finite points: a NaN breaks the line
                runs: list[list[str]] = [[]]
                for xi, yi, good in zip(xv, yv, ok):
                    if good:
                        runs[-1].append(f"{sx(xi):.1f},{sy(yi):.1f}")
                    elif runs[-1]:
                        runs.append([])
                out += [f'<polyline points="{" ".join(r)}" fill="none" stroke="{s.color}" stroke-width="1.3"/>'
                        for r in runs if r]
            out += [_marker(s.marker, sx(xi), sy(yi), s.color) for xi, yi, good in zip(xv, yv, ok) if good and s.marker]
        out.append(f'<rect x="{left}" y="{py0}" width="{plot_w}" height="{panel_height}" fill="none" stroke="#444"/>')
        cy = py0 + panel_height / 2
        lines = panel.ylabel.split("\n")
        for j, line in enumerate(lines):
            xl = 14 + 13 * j
            out.append(f'<text transform="translate({xl},{cy:.1f}) rotate(-90)" text-anchor="middle">{esc(line)}</text>')
        if panel.legend:
            labelled = list({s.label: s for s in panel.series if s.label}.values())
            box_w = 16 + 7 * max((len(s.label) for s in labelled), default=0)
            box_h = 8 + 15 * len(labelled)
            by = py0 + panel_height - 6 - box_h if panel.legend_below else py0 + 6
            if labelled:
                out.append(f'<rect x="{left + 6}" y="{by}" width="{box_w + 22}" height="{box_h}" '
                           'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
            for j, s in enumerate(labelled):
                ly = by + 12 + 15 * j
                if s.line:
                    out.append(f'<line x1="{left + 12}" x2="{left + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s.color}" '
                               'stroke-width="1.3"/>')
                out.append(_marker(s.marker, left + 21, ly - 4, s.color))
                out.append(f'<text x="{left + 36}" y="{ly}">{esc(s.label)}</text>')
    if xlabel:
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_uri(svg: str) -> str:
    """An SVG document as a data URI for an ``<img>`` (the page stays one self-contained file)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
