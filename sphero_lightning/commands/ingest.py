"""``sphero ingest``: TIFF or PNG slices into the Zarr array ``sphero fit`` reads, one slice at a time.

    sphero ingest stack.tif --root stack.zarr --spacing 50 4 4
    sphero ingest slices/ --root stack.zarr --spacing 50 4 4 --array images/50-4-4
    sphero ingest folder/ --root stack.zarr --spacing 50 4 4 --include 'slice_*.png'   # other files beside the slices

``SRC`` is a multi-page TIFF, or a folder of single-page TIFFs (``.tif``/``.tiff``) or of PNG slices (grey, 8 or
16 bit; grey with alpha, or stored as equal colour channels, gives the grey channel), taken in natural
name order (``s2.tif`` before ``s10.tif``). Slices are read and written one by one (memory: a few
slices), into a temporary array renamed into place when complete. The array gets ``spacing`` and a
``processing`` entry naming the source.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from .._version import __version__
from ..core.settings import DATA
from ..errors import SpheroError
from ..storage.store import (
    check_writable,
    create_array,
    move_into_place,
    node_exists,
    open_group,
    spacing_name,
    store_format,
    utc_now,
    write_ome,
)
from ..storage.tasks import run_tasks
from .fit_help import plain

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)

#: Said where a folder holds other files beside the slices.
_PICK_HINT = "; if the folder holds other files too, pick the slices with --include 'PATTERN' (e.g. 'slice_*.png')"
#: Pillow modes of grey-value PNG slices and the dtype they hold (colour modes count when R = G = B).
_PNG_DTYPES = {"L": np.uint8, "LA": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
               "I;16L": np.uint16, "I": np.int32, "F": np.float32}


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _pick(folder: Path, suffixes: tuple[str, ...], include: str | None) -> list[Path]:
    """The slice files of ``folder`` with one of ``suffixes`` (and whose name matches the glob ``include``), in natural
    name order."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()
                   and (include is None or fnmatch.fnmatch(p.name, include))), key=lambda p: _natural_key(p.name))


def tiff_slices(src: str | Path, include: str | None = None
                ) -> tuple[int, tuple[int, int], np.dtype, Callable[[int], np.ndarray], list[str]]:
    """Describe a TIFF stack without reading its pixels: ``(n, (Y, X), dtype, read(i), names)``. In a folder, only the
    files whose name matches the glob ``include`` (e.g. ``slice_*.png``) where it is given."""
    import tifffile

    path = Path(src)
    if not path.exists():
        raise SpheroError(f"{str(src)!r} does not exist; give a multi-page TIFF or a folder of TIFF or PNG slices")
    if include is not None and not path.is_dir():
        raise SpheroError(f"--include picks slices in a folder; {str(src)!r} is a file")
    if path.is_dir():
        files = _pick(path, TIFF_SUFFIXES, include)
        if not files:
            pngs = _pick(path, PNG_SUFFIXES, include)
            if pngs:
                return png_slices(path, pngs)
            what = f" matching --include {include!r}" if include is not None else ""
            raise SpheroError(f"folder {str(src)!r} holds no .tif/.tiff or .png files{what}")
        shapes = {}
        for f in files:
            try:
                with tifffile.TiffFile(f) as tif:
                    page = tif.pages[0]
                    shapes[f.name] = (tuple(page.shape), np.dtype(page.dtype), len(tif.pages))
            except Exception as exc:  # noqa: BLE001 - reported with the file's name
                raise SpheroError(f"cannot read {f.name!r} in {str(src)!r} as TIFF ({type(exc).__name__}: {exc})") from None
        first_shape, first_dtype, _ = shapes[files[0].name]
        for name, (shape, dtype, pages) in shapes.items():
            if len(shape) != 2:
                raise SpheroError(f"{name!r} is not a single 2D slice (shape {shape}); use single-channel slices")
            if (shape, dtype) != (first_shape, first_dtype):
                raise SpheroError(f"{name!r} is {shape} {dtype}, but {files[0].name!r} is {first_shape} {first_dtype}; "
                                  f"every slice must have the same size and type{_PICK_HINT}")
            if pages > 1:
                raise SpheroError(f"{name!r} has {pages} pages; a folder must hold single-page TIFFs (or give the file itself)")
        return len(files), first_shape, first_dtype, lambda i: tifffile.imread(files[i]), [f.name for f in files]
    try:
        tif = tifffile.TiffFile(path)  # stays open while the pages are read (released with the reader)
        pages = list(tif.pages)
        shape, dtype = tuple(pages[0].shape), np.dtype(pages[0].dtype)
        n = len(pages)
        odd = next((i for i, p in enumerate(pages) if tuple(p.shape) != shape or np.dtype(p.dtype) != dtype), None)
    except Exception as exc:  # noqa: BLE001
        raise SpheroError(f"cannot read {str(src)!r} as TIFF ({type(exc).__name__}: {exc})") from None
    if len(shape) != 2:
        raise SpheroError(f"pages of {str(src)!r} have shape {shape}; expected single-channel 2D slices")
    if odd is not None:
        raise SpheroError(f"page {odd} of {str(src)!r} differs in size or type from page 0; every slice must match")

    def read(i: int) -> np.ndarray:
        return pages[i].asarray()

    return n, shape, dtype, read, [f"{path.name}[{i}]" for i in range(n)]


def png_slices(folder: Path, files: list[Path]) -> tuple[int, tuple[int, int], np.dtype, Callable[[int], np.ndarray], list[str]]:
    """A folder of single-slice PNGs (Pillow reads the headers only, here): grey values, 8 or 16 bit. Grey stored
    with an alpha channel (``LA``) or as equal colour channels (``RGB``/``RGBA``, R = G = B) gives channel 0; a
    colour image is refused when it is read."""
    from PIL import Image

    heads = {}
    for f in files:
        try:
            with Image.open(f) as im:
                heads[f.name] = (im.size[::-1], im.mode)
        except Exception as exc:  # noqa: BLE001 - reported with the file's name
            raise SpheroError(f"cannot read {f.name!r} in {str(folder)!r} as PNG ({type(exc).__name__}: {exc})") from None
    first_shape, first_mode = heads[files[0].name]
    for name, (shape, mode) in heads.items():
        if mode not in _PNG_DTYPES:
            raise SpheroError(f"{name!r} is a PNG of mode {mode}; expected grey values (8 or 16 bit){_PICK_HINT}")
        if shape != first_shape or _PNG_DTYPES[mode] != _PNG_DTYPES[first_mode]:
            raise SpheroError(f"{name!r} is {shape} {mode}, but {files[0].name!r} is {first_shape} {first_mode}; "
                              f"every slice must have the same size and bit depth{_PICK_HINT}")

    def read(i: int) -> np.ndarray:
        with Image.open(files[i]) as im:
            a = np.asarray(im)
        if a.ndim == 3:
            if a.shape[2] >= 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
                raise SpheroError(f"{files[i].name!r} is a colour image (R, G and B differ); convert the slices to grey first")
            a = a[..., 0]
        return np.ascontiguousarray(a, dtype=_PNG_DTYPES[first_mode])

    return len(files), first_shape, np.dtype(_PNG_DTYPES[first_mode]), read, [f.name for f in files]


def ingest(src: str | Path, root: str | Path, spacing: list[float], array: str | None = None,
           chunks: tuple[int, int] | None = None, overwrite: bool = DATA.overwrite, progress: bool = True,
           workers: int = 4, zarr_format: int | None = None, include: str | None = None) -> str:
    """Write TIFF slices to ``<root>/<array>``; returns the array path. See the module docstring.

    ``zarr_format``: 2 or 3 for a new store (default 3); an existing store keeps its own format. ``include``: in a
    folder, only the files whose name matches this glob.
    """
    if len(spacing) != 3 or any(not (s > 0) for s in spacing):
        raise SpheroError(f"--spacing needs three positive numbers Z Y X (nm), got {spacing}")
    existing = store_format(root)
    if existing is not None and zarr_format is not None and existing != zarr_format:
        raise SpheroError(f"{str(root)!r} is a Zarr v{existing} store; drop --zarr-format {zarr_format} "
                          "or write into a new store")
    array = (array or f"images/{spacing_name(spacing)}").strip("/")
    n, shape, dtype, read, names = tiff_slices(src, include)
    if n < 2:
        raise SpheroError(f"{str(src)!r} holds {n} slice; a stack to register needs at least 2")
    root = Path(root)
    if node_exists(root, array) and not overwrite:
        raise SpheroError(f"array {array!r} already exists in {str(root)!r}; pass --overwrite to replace it, or choose --array")
    check_writable(root, "give a --root on writable local storage")
    group_path, name = array.rsplit("/", 1) if "/" in array else ("", array)
    parent = open_group(root, group_path, existing or zarr_format or 3)
    tmp = f"tmp-{name}-partial"
    cy, cx = chunks or (min(shape[0], 4096), min(shape[1], 4096))
    arr = create_array(parent, tmp, shape=(n, *shape), dtype=dtype, chunks=(1, cy, cx))
    lock = threading.Lock()

    def copy(i: int) -> None:
        with lock:  # reads in order, one at a time (one TIFF file handle is not safe to share between threads)
            image = read(i)
        arr[i] = image  # compressing and writing run in parallel

    # dask's threaded scheduler runs the tasks in order, ``workers`` at a time: memory stays a few slices
    run_tasks(copy, [(i,) for i in range(n)], num_workers=max(1, workers), progress=progress, desc="ingesting", unit="slice")
    arr.attrs.update({"spacing": [float(s) for s in spacing], "processing": [{
        "step_name": "ingest", "version": __version__,
        "timestamp": utc_now(),
        "parameters": {"source": str(Path(src).resolve()), "first": names[0], "last": names[-1], "slices": n}}]})
    move_into_place(root, group_path, tmp, name)
    write_ome(root, group_path)  # viewers find the source, and the registered output has a frame to overlay on
    return array


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="sphero ingest", description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a multi-page TIFF, or a folder of single-page TIFFs or of PNG slices")
    ap.add_argument("--root", required=True, help="the Zarr store to write into (created if absent)")
    ap.add_argument("--spacing", required=True, type=float, nargs=3, metavar=("Z", "Y", "X"), help="voxel size in nm")
    ap.add_argument("--array", default=None, help="array path in the store (default images/<z>-<y>-<x>)")
    ap.add_argument("--chunks", type=int, nargs=2, default=None, metavar=("Y", "X"), help="chunk size per slice (default up to 4096 x 4096)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing array")
    ap.add_argument("--zarr-format", type=int, choices=(2, 3), default=None,
                    help="Zarr format of a new store (default 3; an existing store keeps its own)")
    ap.add_argument("--include", default=None, metavar="GLOB",
                    help="in a folder, only the files whose name matches this pattern (e.g. 'slice_*.png'; quote it)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    path = ingest(a.src, a.root, a.spacing, a.array, tuple(a.chunks) if a.chunks else None, a.overwrite, not a.no_progress,
                  zarr_format=a.zarr_format, include=a.include)
    arr = zarr.open_array(a.root, path=path, mode="r")
    print(f"sphero: wrote {a.root}/{path} shape {arr.shape} {arr.dtype}; next: {next_step(str(a.root), path, a.spacing)}",
          file=sys.stderr)
    return path


def next_step(root: str, path: str, spacing: list[float]) -> str:
    """What to run next on the ingested array: labels (and other arrays under a ``labels`` group) take a registration
    with ``sphero apply``; images are registered with ``sphero fit``."""
    if "labels" in path.split("/")[:-1]:
        return (f"register the images (sphero fit --data.root {root} --data.array images/{spacing_name(spacing)}), then "
                f"sphero apply --root {root} --array {path} --transforms images/registered/{spacing_name(spacing)}")
    return f"sphero fit --data.root {root} --data.array {path}"
