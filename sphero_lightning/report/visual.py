"""The alignment report: one self-contained HTML page that shows a registration across the slices.

What a microscopist looks at to judge an alignment, from a finished output array and its source:

* XZ and YZ reslices through the middle of the stack (and any chosen rows/columns), before and after, with the
  spacing's aspect ratio (:mod:`.reslice`);
* how straight they are: the mean absolute difference between neighbouring rows, before and after;
* curves along the stack: NCC before and after per pair, the composed translation, rotation, scale and shear per
  slice, with QC outliers, barely correlated pairs and damaged slices marked;
* before/after overlays of the flagged pairs (or of a few representative ones where none is flagged);
* the run's settings and timing.

Every picture is embedded as a ``data:`` URI (images as PNG, the curves as SVG drawn by :mod:`.charts`): the page
needs no network, no server and no script. It reads only what the pictures need (one row or column band per slice
for a reslice, four slices per overlay).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..core.frames import decompose, pixel_matrices
from ..core.records import UNTRUSTED, PairRecord, PairStatus
from ..errors import SpheroError
from .charts import COLORS, Panel, Series, panels_svg, svg_uri
from .drift import accumulation_warning
from .reslice import (
    Reslice,
    intensity_window,
    pair_overlays,
    png_uri,
    read_reslices,
    reslice_picture,
    scaled_steps,
    straightness,
)

#: Narrow reslice pictures are shown enlarged by the whole factor that brings them nearest this width (the PNG keeps
#: its size).
MIN_SHOWN = 480

#: At most this many flagged pairs get overlays (the rest are listed).
MAX_PAIRS_SHOWN = 8

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-family: monospace; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
.row.pair { flex-wrap: nowrap; } .row.pair > figure { flex: 0 1 auto; min-width: 0; }
figure { margin: 0.4em 0; } figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
img { max-width: 100%; height: auto; } img.px { image-rendering: pixelated; }
.flag { color: #b00; } .note { color: #555; font-size: 0.9em; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em; }
.warnings { background: #fff3cd; border: 1px solid #e0b000; padding: 0.3em 0.8em; }
.warnings li { margin: 0.3em 0; }
.pic { position: relative; display: inline-block; line-height: 0; max-width: 100%; }
.mark { position: absolute; left: -10px; width: 8px; height: 3px; margin-top: -1px; background: #d00; }
.mark:target { left: -14px; width: 12px; height: 5px; margin-top: -2px; }
"""


@dataclass
class AlignmentReport:
    """A built page and what it measured.

    ``straightness`` maps ``"xz"``/``"yz"`` to ``(before, after)`` at the middle of the stack; ``pictures`` holds
    the middle reslices (``"xz_before"`` ...) as uint8 ``(H, W)`` pictures, for TensorBoard.
    """

    html: str
    straightness: dict[str, tuple[float, float]]
    pictures: dict[str, np.ndarray] = field(default_factory=dict)


def _esc(value: Any) -> str:
    return html.escape(str(value))


def damaged_slices(log: list[PairRecord]) -> dict[int, str]:
    """The slices left out as damaged, with the reason, from a ``registration_log``."""
    out: dict[int, str] = {}
    for e in log:
        out.update({int(z): str(why) for z, why in (e.get("damaged_slices") or {}).items()})
    return out


def flagged_pairs(log: list[PairRecord]) -> list[tuple[PairRecord, str]]:
    """The pairs to look at first, with why: QC outliers, barely correlated pairs (``low_correlation``), failed
    pairs. Damaged slices are shown in the curves, not here."""
    out = []
    for e in log:
        why = [w for w, hit in (("QC outlier", e.get("qc") == "outlier"),
                                ("low correlation", e.get("status") == PairStatus.LOW_CORRELATION),
                                ("failed", e.get("status") == PairStatus.FAILED),
                                ("next to a slice no neighbour agrees with", e.get("status") == PairStatus.UNREGISTERED),
                                ("no true answer (cycle check)", e.get("status") == PairStatus.NO_TRUE_ANSWER)) if hit]
        if why:
            out.append((e, ", ".join(why)))
    return out


#: The smallest y range of the drift panels (translation px, rotation deg, scale, shear): a rigid run's scale of
#: 1 +- 1e-7 shows as flat, not as rounding noise blown up to the panel's height.
MIN_SPANS = (2.0, 0.2, 2e-3, 2e-3)


def curves_figure(log: list[PairRecord], tmats: np.ndarray, shape: tuple[int, int],
                  solved: dict[str, Any] | None = None) -> str:
    """NCC per pair and the composed drift per slice along the stack, with the flagged pairs and damaged (and
    unregistered) slices marked; with the solve, each cycle's error and the threshold (SVG data URI)."""
    bands = sorted(set(damaged_slices(log)) | set((solved or {}).get("unregistered", [])))
    z_pair = np.array([e["slice_indices"][1] for e in log], dtype=float)
    ncc = [Series(z_pair, np.array([np.nan if e.get(key) is None else e[key] for e in log], dtype=float),
                  f"NCC {label}", COLORS[k], marker) for k, (key, label, marker) in
           enumerate((("ncc_before", "before", "o"), ("ncc_after", "after", "s")))]
    for status, marker, color, label in (("outlier", "x", "red", "QC outlier"),
                                         (PairStatus.LOW_CORRELATION, "^", "darkorange", "low_correlation"),
                                         (PairStatus.FAILED, "^", "darkorange", "failed")):
        hits = [e for e in log if (e.get("qc") if status == "outlier" else e.get("status")) == status]
        if hits:
            ncc.append(Series(np.array([e["slice_indices"][1] for e in hits], dtype=float),
                              np.array([e.get("ncc_after") or 0.0 for e in hits], dtype=float), label, color, marker, line=False))
    parts = [decompose(m, shape) for m in tmats]
    z = np.arange(len(tmats), dtype=float)

    def col(key: str) -> np.ndarray:
        return np.array([p[key] for p in parts], dtype=float)

    panels = [Panel(ncc, "NCC of pair\n(z-1, z)", bands=bands, legend=True, legend_below=True),
              Panel([Series(z, col("dx_px"), "x", COLORS[0]), Series(z, col("dy_px"), "y", COLORS[1])],
                    "translation (px)", MIN_SPANS[0], bands, legend=True),
              Panel([Series(z, col("rotation_deg"), color=COLORS[2])], "rotation (deg)", MIN_SPANS[1], bands),
              Panel([Series(z, col("scale_x"), "x", COLORS[0]), Series(z, col("scale_y"), "y", COLORS[1])], "scale",
                    MIN_SPANS[2], bands, legend=True),
              Panel([Series(z, col("shear"), color=COLORS[3])], "shear", MIN_SPANS[3], bands)]
    cycles = (solved or {}).get("cycle_errors_px") or {}
    if cycles:
        zc = np.array(sorted(int(k) for k in cycles), dtype=float)
        err = np.array([cycles[str(int(k))] for k in zc], dtype=float)
        threshold = np.full(len(zc), float(solved["cycle_threshold_px"]))
        panels.append(Panel([Series(zc, err, "cycle (z-1, z, z+1)", COLORS[0], "o"), Series(zc, threshold, "threshold", "red")],
                            "cycle error (px)", MIN_SPANS[0], bands, legend=True))
    return svg_uri(panels_svg(panels, width=860, panel_height=135, xlabel="slice (z)", x_range=(-0.5, len(tmats) - 0.5),
                              title="Along the stack: pairs (top) and each slice's composed transform to slice 0 (drift)"))


def straightness_figure(steps: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Per step z -> z+1 of the middle reslices, the mean absolute row difference before and after (one SVG data URI
    per reslice, side by side in the page)."""
    charts = []
    for axis, (before, after) in steps.items():
        z = np.arange(1, len(before) + 1, dtype=float)
        panel = Panel([Series(z, before, f"before (mean {straightness(before):.4f})", COLORS[1], "o"),
                       Series(z, after, f"after (mean {straightness(after):.4f})", COLORS[0], "s")],
                      "mean abs. difference\n(fraction of range)", legend=True)
        svg = panels_svg([panel], width=430, panel_height=170, xlabel="slice (z)",
                         title=f"{axis.upper()} reslice: |row z - row z-1|")
        charts.append(f'<img src="{svg_uri(svg)}" alt="straightness along the stack ({axis})">')
    return "".join(charts)


def _table(rows: list[tuple[str, Any]], ids: dict[str, str] | None = None) -> str:
    ids = ids or {}
    cells = []
    for key, value in rows:
        ident = f' id="{ids[key]}"' if key in ids else ""
        cells.append(f"<tr><th>{_esc(key)}</th><td{ident}>{_esc(value)}</td></tr>")
    return "<table>" + "".join(cells) + "</table>"


def _registration_params(attrs: dict[str, Any]) -> dict[str, Any]:
    record = next((p for p in reversed(attrs.get("processing", [])) if p.get("step_name") == "registration"), {})
    return record.get("parameters", {})


def _settings(attrs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The registration's settings (its ``processing`` entry), nested groups flattened to ``group.key``."""
    record = next((p for p in reversed(attrs.get("processing", [])) if p.get("step_name") == "registration"), {})
    rows: list[tuple[str, Any]] = [("version", record.get("version", "?")), ("timestamp", record.get("timestamp", "?"))]
    for key, value in record.get("parameters", {}).items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            rows.append((key, json.dumps(value) if isinstance(value, (list, tuple)) else value))
    return rows


#: Reslices of short stacks are drawn at least this tall (px) on the page.
MIN_SHOWN_HEIGHT = 96


def _reslice_block(r: Reslice, spacing: list[float], window: tuple[float, float], marked: Iterable[int] = (),
                   ids: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """The before and after pictures of ``r`` with their captions; ``marked`` slices get a red tick beside each picture
    (with ``ids``: anchors ``mark-<axis>-<before|after>-<z>`` the warning box links to)."""
    across = spacing[2] if r.axis == "xz" else spacing[1]
    pictures, figures = {}, []
    where = (f"output row y = {r.position} (source row {r.source_position})" if r.axis == "xz"
             else f"output column x = {r.position} (source column {r.source_position})")
    for tag, image in (("before", r.before), ("after", r.after)):
        pic, aspect = reslice_picture(image, window, spacing[0] / across, size=r.size)
        pictures[f"{r.axis}_{tag}"] = pic
        shown = "true aspect" if abs(aspect - 1) < 0.02 else f"z shown at {aspect:.2f} of its true extent"
        zoom = max(1, round(MIN_SHOWN / pic.shape[1]))  # a narrow picture is shown enlarged, pixels kept sharp
        # a short stack (8 slices at isotropic spacing: an 8 px sliver) is drawn taller, and says so
        tall = max(1, round(MIN_SHOWN_HEIGHT / (zoom * pic.shape[0])))
        if tall > 1:
            shown = (f"z drawn {tall}x taller than its true extent (a short stack)" if abs(aspect - 1) < 0.02
                     else f"{shown}, drawn {tall}x taller (a short stack)")
        nz = max(1, r.size[0])
        marks = "".join('<a class="mark"' + (f' id="mark-{r.axis}-{tag}-{z}"' if ids else "") + f' title="slice {z}" '
                        f'style="top: {100 * (z + 0.5) / nz:.3f}%"></a>' for z in sorted(set(marked)) if 0 <= z < nz)
        figures.append(
            f'<figure><div class="pic"><img class="px" src="{png_uri(pic)}" width="{zoom * pic.shape[1]}" '
            f'height="{zoom * tall * pic.shape[0]}" alt="{r.axis} reslice {tag}">{marks}</div><figcaption>{r.axis.upper()} {tag} ({"source" if tag == "before" else "registered"}),'
            f" {where}: {r.size[1]} px x {r.size[0]} slices; {shown} (z {spacing[0]:g}, in-plane {across:g});"
            " z runs down</figcaption></figure>")
    return '<div class="row pair">' + "".join(figures) + "</div>", pictures


_HEADER = ('<p class="note">source {source}; output {nz} x {ny} x {nx} (z, y, x), source slices {h} x {w}, spacing '
           "{spacing} (z, y, x), crop box {box} ([up, down, left, right] of the source slice); a viewer (napari, "
           'neuroglancer, BigDataViewer) opens <span id="viewer-path">{viewer}</span> (OME-NGFF multiscales)</p>')
_STRAIGHTNESS = ('<p class="note">Mean absolute difference between neighbouring rows (consecutive slices) of the middle '
                 "reslices, as a fraction of the stack's intensity range (0.5th to 99.5th percentile of the source "
                 "reslices, {lo:g} to {hi:g}); steps next to a damaged slice left out. Smaller is straighter: aligned "
                 "structure runs on from slice to slice.</p>")
_CURVES = ("<figcaption>Red crosses: QC outliers (final loss far above the stack's); orange triangles: low correlation "
           "or failed; grey bands: damaged slices (left out, bridged over) and slices no neighbour agrees with "
           "(unregistered). Drift: where each slice's centre is sampled relative to slice 0, and its rotation, scale and "
           "shear. With two or more neighbours, the cycle error of each three consecutive slices: above the red line a "
           "cycle is inconsistent (README: Foreign slices and drift).</figcaption>")
_NO_TIMING = ('<p class="note">timing: not recorded in the output (sphero fit prints it, and shows it in the page it '
              "writes at the end of the run)</p>")
_OVERLAYS = ('<p class="note">Overlays: fixed slice magenta, moving slice green; aligned structure turns grey. Before: the '
             "source inside the crop box; after: the registered output.</p>")


def _summary(log: list[PairRecord], damaged: dict[int, str], solved: dict[str, Any] | None = None,
             masks: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    ncc = {k: [e[k] for e in log if e.get(k) is not None] for k in ("ncc_before", "ncc_after")}
    volume = [] if solved is None else [
        ("slices no neighbour agrees with (unregistered)", ", ".join(map(str, solved.get("unregistered", []))) or "none"),
        ("pairs with no true answer", ", ".join(f"{i}->{j}" for i, j in solved.get("bad_pairs", [])) or "none"),
        ("pairs the stack had to hang on", ", ".join(f"{i}->{j}" for i, j in solved.get("kept_despite", [])) or "none"),
        ("cycle check", (f"{len(solved.get('cycle_errors_px', {}))} cycles, threshold {solved.get('cycle_threshold_px', 0):.2f} px, "
                        f"largest {max(solved.get('cycle_errors_px', {0: 0}).values()):.2f} px"))]
    return [("pairs", len(log)),
            ("mean NCC before", f"{np.mean(ncc['ncc_before']):.4f}" if ncc["ncc_before"] else "n/a"),
            ("mean NCC after", f"{np.mean(ncc['ncc_after']):.4f}" if ncc["ncc_after"] else "n/a"),
            ("QC outliers", sum(e.get("qc") == "outlier" for e in log)),
            ("low correlation / failed", sum(e.get("status") in UNTRUSTED for e in log)),
            ("damaged slices", ", ".join(f"{z} ({why})" for z, why in sorted(damaged.items())) or "none"),
            *_mask_rows(log, masks), *volume]


def _mask_rows(log: list[PairRecord], masks: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """What the loss left out (data.ignore_value, data.mask_array, data.destripe, static patterns the guard found) and
    how much of each slice it used."""
    masks = dict(masks or {})
    mode, static = masks.pop("static_patterns", None), masks.pop("static", None)
    used = {k: v for k, v in masks.items() if v not in (None, "none")}
    if static:
        used["static patterns"] = ("left out: " if static.get("left_out") else "kept (--data.static_patterns keep): ") + \
            "; ".join(static.get("found", []))
    elif mode == "keep":
        used["static patterns"] = "kept (--data.static_patterns keep), none found"
    kept = [e for e in log if e.get("mask_kept") is not None]
    if not used:
        return [("masks", "none (every pixel of the overlap counts)")]
    rows = [("masks", ", ".join(f"{k} {v}" for k, v in used.items()))]
    if kept:
        least = min(kept, key=lambda e: e["mask_kept"])
        i, j = least["slice_indices"]
        rows.append(("slice area the loss used", (f"mean {100 * np.mean([e['mask_kept'] for e in kept]):.0f} %, least "
                                                 f"{100 * least['mask_kept']:.0f} % (pair {i}->{j})")))
    return rows


def _straightness_table(measured: dict[str, tuple[float, float]]) -> str:
    """Before, after and their ratio per reslice; the cells carry ids (``straightness-xz-before`` ...)."""
    rows, ids = [], {}
    for axis, (before, after) in measured.items():
        for tag, value in (("before", before), ("after", after)):
            key = f"{axis.upper()} {tag}"
            rows.append((key, f"{value:.5f}"))
            ids[key] = f"straightness-{axis}-{tag}"
        rows.append((f"{axis.upper()} after / before", f"{after / before:.3f}" if before > 0 else "n/a"))
    return _table(rows, ids)


def _check_position(name: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise SpheroError(f"{name} {value} is outside the registered output (0 to {size - 1}); give a position inside it")


def build_report(out: zarr.Array, src: zarr.Array, *, output_name: str = "", source_name: str = "",
                 position_y: int | None = None, position_x: int | None = None, timing: str | None = None) -> AlignmentReport:
    """The alignment page of a finished registration.

    Parameters
    ----------
    out : zarr.Array
        The registered output (``sphero fit``'s array with its ``crop_box``, ``registration_log``, ... attributes).
    src : zarr.Array
        The array it was registered from.
    output_name, source_name : str
        How the page names them.
    position_y, position_x : int, optional
        An output row (XZ) and column (YZ) to reslice besides the middle ones.
    timing : str, optional
        The run's timing line.

    Returns
    -------
    AlignmentReport
    """
    attrs = dict(out.attrs)
    box = [int(v) for v in attrs["crop_box"]]
    log = list(attrs.get("registration_log", []))
    spacing = [float(s) for s in attrs.get("spacing", [1.0, 1.0, 1.0])]
    shape = (int(src.shape[1]), int(src.shape[2]))
    nz, ny, nx = (int(s) for s in out.shape)
    for name, value, size in (("--position-y", position_y, ny), ("--position-x", position_x, nx)):
        if value is not None:
            _check_position(name, value, size)
    tmats = np.asarray(attrs["composed_transforms_pixel"]) if "composed_transforms_pixel" in attrs \
        else pixel_matrices(attrs["composed_transforms"], shape)
    damaged = damaged_slices(log)

    chosen_at = [(axis, p) for axis, p in (("xz", position_y), ("yz", position_x)) if p is not None]
    read = read_reslices(out, src, box, [("xz", ny // 2), ("yz", nx // 2), *chosen_at])  # each array read once
    middle, chosen = {"xz": read[0], "yz": read[1]}, read[2:]
    window = intensity_window(np.concatenate([middle["xz"].sample, middle["yz"].sample]))
    steps = {axis: (scaled_steps(r.steps[0], window, damaged), scaled_steps(r.steps[1], window, damaged))
             for axis, r in middle.items()}
    measured = {axis: (straightness(b), straightness(a)) for axis, (b, a) in steps.items()}

    source = source_name or attrs.get("inputs", ["?"])[0]
    notes = attrs.get("warnings")
    if notes is None:  # an output of an earlier version: the drift warning, measured here
        params = _registration_params(attrs)
        used = {**(params.get("solve") or {}), "crop_borders": next(
            (p["parameters"].get("crop_borders", True) for p in attrs.get("processing", []) if p.get("step_name") == "border_crop"), True)}
        drift = accumulation_warning(tmats, shape, [int(v) for v in box], used)
        notes = [{"text": f"warning: {drift}", "slices": [], "kind": "accumulation"}] if drift else []
    marked = sorted({int(z) for n in notes for z in n.get("slices", [])})
    parts = [f"<h1>Alignment report: {_esc(output_name or out.path)}</h1>", _warning_box(notes, nz),
             _HEADER.format(source=_esc(source), nz=nz, ny=ny, nx=nx, h=shape[0], w=shape[1], spacing=_esc(spacing), box=_esc(box),
                           viewer=_esc((output_name or out.path).rstrip("/").rsplit("/", 1)[0])),
             "<h2>Summary</h2>", _table(_summary(log, damaged, attrs.get("volume_solve"), _registration_params(attrs).get("masks"))),
             "<h2>Straightness</h2>", _STRAIGHTNESS.format(lo=window[0], hi=window[1]), _straightness_table(measured),
             f'<figure>{straightness_figure(steps)}</figure>',
             "<h2>Reslices</h2>"]
    pictures: dict[str, np.ndarray] = {}
    for r in [middle["xz"], middle["yz"], *chosen]:
        block, pics = _reslice_block(r, spacing, window, marked, ids=r is middle[r.axis])
        if r is middle[r.axis]:
            pictures.update(pics)
        parts.append(block)
    parts += ["<h2>Along the stack</h2>",
              (f'<figure><img src="{curves_figure(log, tmats, shape, attrs.get("volume_solve"))}" alt="curves along the stack">'
              f'{_CURVES}</figure>'),
              _pairs_section(out, src, box, log, flagged_pairs(log)),
              "<h2>Run</h2>", f"<p>timing: {_esc(timing.removeprefix('time: '))}</p>" if timing else _NO_TIMING,
              _table(_settings(attrs))]
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>sphero alignment report</title>'
            f"<style>{_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    return AlignmentReport(html=page, straightness=measured, pictures=pictures)


def _warning_box(notes: list[dict[str, Any]], nz: int) -> str:
    """Every line the run printed about the data or the result (the output's ``warnings``), each with links to the
    slices it names where they show in the middle reslices (a red tick beside each picture)."""
    if not notes:
        return ""
    items = []
    for n in notes:
        slices = [int(z) for z in n.get("slices", []) if 0 <= int(z) < nz]
        links = ""
        if slices:
            shown = ", ".join(f'<a href="#mark-xz-after-{z}">{z}</a>' for z in slices[:40])
            links = f' <span class="note">(slices {shown}{" ..." if len(slices) > 40 else ""}: red ticks beside the reslices)</span>'
        anchor = f' id="{n["kind"]}-warning"' if n.get("kind") else ""
        items.append(f"<li{anchor}>{_esc(n['text'])}{links}</li>")
    return f'<div class="warnings" id="warnings"><b>What the run said about the data and the result</b><ul>{"".join(items)}</ul></div>'


def _pairs_section(out: zarr.Array, src: zarr.Array, box: list[int], log: list[PairRecord],
                   flagged: list[tuple[dict[str, Any], str]]) -> str:
    """Before/after overlays of the flagged pairs, or of the first, middle and last pair where none is flagged."""
    if flagged:
        head = f"<h2>Flagged pairs ({len(flagged)})</h2>"
        shown = flagged[:MAX_PAIRS_SHOWN]
    else:
        head = '<h2>Pairs</h2><p class="note">No pair is flagged; the first, middle and last pairs:</p>'
        picks = sorted({0, len(log) // 2, len(log) - 1}) if log else []
        shown = [(log[i], "representative") for i in picks]
    rows = [head, _OVERLAYS]
    for e, why in shown:
        a, b = (int(v) for v in e["slice_indices"])
        before, after = pair_overlays(out, src, box, a, b)
        numbers = ", ".join(f"{k} {e[k]:.3f}" for k in ("ncc_before", "ncc_after", "qc_z") if e.get(k) is not None)
        css = "" if why == "representative" else ' class="flag"'
        rows.append(f"<h3{css}>slices {a} -&gt; {b}: {_esc(why)} (status {_esc(e.get('status'))}; {_esc(numbers)})</h3>"
                    f'<div class="row pair"><figure><img src="{png_uri(before)}" alt="pair {a}-{b} before"><figcaption>before'
                    f'</figcaption></figure><figure><img src="{png_uri(after)}" alt="pair {a}-{b} after"><figcaption>after'
                    "</figcaption></figure></div>")
    if len(flagged) > MAX_PAIRS_SHOWN:
        rest = ", ".join(f"{e['slice_indices'][0]}->{e['slice_indices'][1]}" for e, _ in flagged[MAX_PAIRS_SHOWN:])
        rows.append(f'<p class="note">also flagged: {_esc(rest)}</p>')
    return "\n".join(rows)
