"""``sphero apply``: put another array of the same stack (labels, another channel) through a finished registration.

    sphero apply --root stack.zarr --array labels/50-4-4 --transforms images/registered/50-4-4

Uses the registration's ``composed_transforms`` and ``crop_box``, so the result overlays the registered
image pixel for pixel. Integer label arrays (a ``labels`` group in the path, or an ``image-label``
attribute) are resampled by nearest neighbour, which keeps every label value and invents none; other
arrays with the registration's own interpolation, so applying it to the registration's source
reproduces the registered image. Default output: ``<parent of array>/registered/<name>``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import zarr

from .._version import __version__
from ..core.frames import composed_of_all
from ..core.settings import DATA, OUTPUT
from ..errors import SpheroError
from ..storage.partial import prepare_output, resumed_line
from ..storage.pyramid import default_levels, place_levels
from ..storage.store import (
    check_writable,
    move_into_place,
    node_exists,
    open_group,
    open_registration,
    open_source,
    remove_node,
    utc_now,
    write_ome,
    zarr_format,
)
from ..storage.tasks import check_scheduler, is_distributed
from ..storage.writing import ArrayRef, level_arrays, warp_stack
from .fit_help import plain

MODES = ("auto", "nearest", "bspline", "bicubic", "bilinear")


def _is_labels(path: str, arr: zarr.Array) -> bool:
    return np.issubdtype(np.dtype(arr.dtype), np.integer) and ("labels" in path.split("/") or "image-label" in arr.attrs)


def apply_registration(root: str, array: str, transforms: str, dst: str | None = None, interpolation: str = "auto",
                       overwrite: bool = DATA.overwrite, progress: bool = True, num_workers: int = OUTPUT.num_workers,
                       scheduler: str = OUTPUT.scheduler,
                       levels: int | None = None) -> str:
    """Warp and crop ``array`` with the registration at ``transforms``; returns the output path. ``scheduler`` and
    ``num_workers``: as ``--output.scheduler`` / ``--output.num_workers`` of ``sphero fit``. An interrupted run of the
    same command resumes, writing only the chunks not yet written."""
    check_scheduler(scheduler, "--scheduler")
    if levels is not None and levels < 1:
        raise SpheroError(f"--levels must be >= 1 (1: the full resolution only), got {levels}")
    if num_workers < 1:
        raise SpheroError(f"--num-workers must be >= 1, got {num_workers}")
    if interpolation not in MODES:
        raise SpheroError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(MODES)}")
    reg, ref = open_registration(root, transforms)
    src = open_source(root, array)
    composed = torch.tensor(composed_of_all(reg.attrs), dtype=torch.float64)  # every slice's, slice 0's first
    box = [int(v) for v in reg.attrs["crop_box"]]
    n = len(composed)
    if src.ndim != 3 or tuple(src.shape) != tuple(ref.shape):
        raise SpheroError(f"{array!r} has shape {tuple(src.shape)} but the registration was made on {reg.attrs['inputs'][0]!r} "
                          f"of shape {tuple(ref.shape)}; apply it only to arrays of the same stack and size")
    mode = interpolation
    if mode == "auto":
        params = next((p.get("parameters", {}) for p in reg.attrs.get("processing", []) if p.get("step_name") == "registration"), {})
        # the writer's interpolation (older outputs stored it as "interpolation")
        mode = "nearest" if _is_labels(array, src) else params.get("output_interpolation", params.get("interpolation", "bspline"))
    parent, name = array.rsplit("/", 1) if "/" in array else ("", array)
    dst = (dst or (f"{parent}/registered/{name}" if parent else f"registered/{name}")).strip("/")
    if dst == array.strip("/") or dst == transforms.strip("/"):
        raise SpheroError(f"--dst {dst!r} would replace an input; choose another path")
    if node_exists(root, dst) and not overwrite:
        raise SpheroError(f"{dst!r} already exists in {root!r}; pass --overwrite to replace it, or choose --dst")
    check_writable(root, "apply writes into the store that holds the registration: copy it to writable storage first")

    group_path, out_name = dst.rsplit("/", 1) if "/" in dst else ("", dst)
    group = open_group(root, group_path, zarr_format(src))
    up, down, left, right = box
    out_shape = (n, down - up, right - left)
    tmp = f"tmp-{out_name}-partial"
    chunks = (1, *(min(c, s) for c, s in zip(src.chunks[1:], out_shape[1:])))
    n_levels = levels if levels is not None else default_levels(out_shape[1:])
    tmp_levels = level_arrays(tmp, out_shape, chunks, tuple(src.shape[1:]), n_levels)  # None: written in a second pass
    nearest = mode == "nearest"
    units, resumed = prepare_output(group, tmp, shape=out_shape, chunks=chunks, shards=None, dtype=src.dtype, compression_level=3,
                                    full_shape=tuple(src.shape[1:]), levels=tmp_levels, nearest=nearest,
                                    source=[str(root), array], composed=composed.tolist(), box=box, mode=mode,
                                    zarr_format=zarr_format(src))
    if resumed:
        print(resumed_line("apply", resumed, units), file=sys.stderr)
    prefix = f"{group_path}/" if group_path else ""
    out_ref, written = ArrayRef(str(root), prefix + tmp), ArrayRef(str(root), prefix + f"{tmp}-written")
    warp_stack(ArrayRef(str(root), array) if is_distributed(scheduler) else src, out_ref, composed, box, mode, written=written,
               device="cuda" if torch.cuda.is_available() else "cpu", progress=progress, num_workers=num_workers,
               scheduler=scheduler, levels=[ArrayRef(str(root), prefix + n) for n, _, _ in tmp_levels or []], nearest=nearest)
    out = out_ref.open("r+")
    spacing = list(src.attrs.get("spacing", reg.attrs.get("spacing", [])))
    processing = list(src.attrs.get("processing", []))
    processing.append({"step_name": "apply_registration", "version": __version__,
                       "timestamp": utc_now(),
                       "parameters": {"transforms": transforms, "interpolation": mode, "crop_box": box}})
    out.attrs.update({"spacing": spacing, "inputs": [array, transforms], "processing": processing,
                      "composed_transforms": reg.attrs["composed_transforms"], "crop_box": box})
    for key in ("image-label",):
        if key in src.attrs:
            out.attrs[key] = src.attrs[key]
    move_into_place(root, group_path, tmp, out_name)
    remove_node(root, prefix + f"{tmp}-written")
    place_levels(root, group_path, out_name, n_levels, tmp_levels, nearest=nearest, num_workers=num_workers,
                 progress=progress)
    if group_path:
        write_ome(root, group_path)
    return dst


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="sphero apply", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="the Zarr store")
    ap.add_argument("--array", required=True, help="the array to transform, e.g. labels/50-4-4")
    ap.add_argument("--transforms", required=True, help="a finished registration, e.g. images/registered/50-4-4")
    ap.add_argument("--dst", default=None, help="output path (default <parent of array>/registered/<name>)")
    ap.add_argument("--interpolation", default="auto", choices=MODES,
                    help="auto: nearest for integer labels, else the registration's own (default)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--num-workers", type=int, default=4, help="threads warping and writing on this machine (default 4)")
    ap.add_argument("--scheduler", default="threads",
                    help="threads (default), synchronous, or a dask scheduler's address (tcp://host:8786) to warp on a cluster")
    ap.add_argument("--levels", type=int, default=None,
                    help="resolution levels written, the output and each half the previous in y and x (OME-NGFF "
                         "multiscales); default by size: halved until the larger side is at most 1024 px")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    dst = apply_registration(a.root, a.array, a.transforms, a.dst, a.interpolation, a.overwrite, not a.no_progress,
                             a.num_workers, a.scheduler, a.levels)
    arr = zarr.open_array(a.root, path=dst, mode="r")
    print(f"sphero: wrote {a.root}/{dst} shape {arr.shape} {arr.dtype}", file=sys.stderr)
    return dst
