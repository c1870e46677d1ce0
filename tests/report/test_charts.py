"""The alignment page's SVG line charts: round ticks, lines broken at NaN, flat series kept flat, valid SVG."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from sphero_lightning.report.charts import Panel, Series, nice_step, panels_svg, svg_uri, tick_label, ticks

NS = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("span,count,step", [(10, 4, 2.5), (1, 4, 0.25), (0.003, 4, 0.001), (37, 8, 5), (2e-3, 4, 5e-4)])
def test_nice_steps(span, count, step):
    assert nice_step(span, count) == pytest.approx(step)


def test_ticks_are_round_and_inside():
    t = ticks(-0.013, 0.351, 4)
    assert t[0] >= -0.013 and t[-1] <= 0.351 and len(t) >= 3
    assert [tick_label(v, t[1] - t[0]) for v in t] == ["0", "0.1", "0.2", "0.3"]
    assert ticks(-0.5, 29.5, 8, integer=True) == [0, 5, 10, 15, 20, 25]
    assert tick_label(0.9995, 0.0005) == "0.9995" and tick_label(-2.5, 2.5) == "-2.5"


def _svg(panels, **kw):
    return ET.fromstring(panels_svg(panels, **kw))


def test_lines_break_at_nan_and_markers_are_drawn():
    x = np.arange(8.0)
    y = np.array([0.3, 0.31, np.nan, 0.33, 0.32, 0.35, np.nan, 0.34])
    root = _svg([Panel([Series(x, y, "NCC", marker="o")], "NCC", legend=True)], title="t", xlabel="slice (z)")
    lines = root.findall(f"{NS}polyline")
    assert [len(p.get("points").split()) for p in lines] == [2, 3, 1]
    assert len(root.findall(f"{NS}circle")) == 6 + 1  # the finite points and the legend's sample
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "t" in texts and "slice (z)" in texts and "NCC" in texts


def test_a_flat_series_stays_flat_within_its_minimum_span():
    z = np.arange(5.0)
    root = _svg([Panel([Series(z, 1 + 1e-9 * z)], "scale", min_span=2e-3)])
    ys = {float(p.split(",")[1]) for p in root.find(f"{NS}polyline").get("points").split()}
    assert max(ys) - min(ys) < 0.5  # less than a pixel: rounding noise is not blown up to the panel's height
    assert "1.000" in [t.text for t in root.iter(f"{NS}text")]


def test_svg_uri_round_trips():
    svg = panels_svg([Panel([Series(np.arange(3.0), np.arange(3.0))])])
    uri = svg_uri(svg)
    assert uri.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == svg
