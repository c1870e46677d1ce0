"""``sphero report``: the alignment page of a finished registration, on demand.

    sphero report --root stack.zarr --array images/registered/50-4-4                 # -> alignment-images-registered-50-4-4.html
    sphero report --root stack.zarr --array images/registered/50-4-4 --position-y 100 --position-x 300 --out page.html

One self-contained HTML page (pictures embedded, no network, no server): XZ and YZ reslices through the middle of
the stack (and the chosen output row/column), before and after, with the spacing's aspect ratio; how straight they
are; NCC per pair and the drift per slice along the stack with QC outliers and damaged slices marked; the flagged
pairs as before/after overlays; the run's settings. ``sphero fit`` writes the same page beside its logs.

The source ("before") is the array the registration names (its ``inputs`` in its ``source_root`` store);
``--source-root`` / ``--source-array`` point elsewhere (a copy of the source). Imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import zarr

from ..errors import SpheroError
from ..report.visual import build_report
from ..storage.store import open_source
from .fit_help import plain

#: The attributes every ``sphero fit`` output has, and the report needs.
REQUIRED = ("composed_transforms", "crop_box", "inputs", "registration_log")


def _open(root: str, array: str, root_flag: str, array_flag: str) -> zarr.Array:
    """:func:`open_source` with this command's option names in its messages."""
    try:
        return open_source(root, array)
    except SpheroError as exc:
        raise SpheroError(str(exc).replace("--data.root", root_flag).replace("--data.array", array_flag)) from None


def open_pair(root: str, array: str, source_root: str | None = None, source_array: str | None = None) -> tuple[zarr.Array, zarr.Array]:
    """The registration output and its source, or a one-line :class:`SpheroError` naming the fix."""
    out = _open(root, array, "--root", "--array")
    missing = [k for k in REQUIRED if k not in out.attrs]
    if missing:
        raise SpheroError(f"{array!r} is not a sphero registration output (no {', '.join(missing)}); point --array at the "
                          "array sphero fit wrote, e.g. images/registered/50-4-4")
    src_root = source_root or out.attrs.get("source_root") or root
    src = _open(src_root, source_array or out.attrs["inputs"][0], "--source-root", "--source-array")
    up, down, left, right = (int(v) for v in out.attrs["crop_box"])
    if len(src.shape) != 3 or src.shape[0] < out.shape[0] or src.shape[1] < down or src.shape[2] < right:
        raise SpheroError(f"source {src_root}/{src.path} has shape {tuple(src.shape)}, which cannot hold the registration "
                          f"({out.shape[0]} slices, crop box {[up, down, left, right]}); give the array it was registered "
                          "from with --source-root / --source-array")
    return out, src


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="sphero report", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the Zarr store that holds the registration")
    ap.add_argument("--array", "--transforms", dest="array", required=True,
                    help="the registration sphero fit wrote, e.g. images/registered/50-4-4")
    ap.add_argument("--source-root", default=None, help="the source's store (default: the one the registration names)")
    ap.add_argument("--source-array", default=None, help="the source array (default: the registration's input)")
    ap.add_argument("--position-y", type=int, default=None, help="also an XZ reslice at this output row")
    ap.add_argument("--position-x", type=int, default=None, help="also a YZ reslice at this output column")
    ap.add_argument("--out", default=None, help="the page to write (default: alignment-<array>.html here)")
    a = ap.parse_args(argv)
    path = Path(a.out or f"alignment-{a.array.strip('/').replace('/', '-')}.html")
    if not path.resolve().parent.is_dir():
        raise SpheroError(f"--out {path}: folder {str(path.parent)!r} does not exist; create it first, or give a path in "
                          "an existing folder")
    t0 = time.perf_counter()
    out, src = open_pair(a.root, a.array, a.source_root, a.source_array)
    page = build_report(out, src, output_name=f"{a.root}/{a.array}", source_name=f"{a.source_root or out.attrs.get('source_root') or a.root}/{src.path}",
                        position_y=a.position_y, position_x=a.position_x)
    path.write_text(page.html, encoding="utf-8")
    figures = "; ".join(f"{axis.upper()} {b:.4f} -> {af:.4f}" for axis, (b, af) in page.straightness.items())
    print(f"sphero: report {path} ({time.perf_counter() - t0:.2f} s; straightness before -> after: {figures})", file=sys.stderr)
    return str(path)
