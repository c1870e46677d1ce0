"""The store layer: opening Zarr (v2 or v3) stores, creating arrays in the store's own format, OME-NGFF
metadata, atomic renames, the lock that keeps two runs off one output. Imports neither torch nor Lightning.

The output follows the format of the store it goes into (an existing output store keeps its format; a new
one takes the source's): Zarr v3 arrays get zstd, ``dimension_names`` and OME-NGFF 0.5 (``ome`` attribute);
Zarr v2 arrays get numcodecs' Zstd and OME-NGFF 0.4 (``multiscales`` attribute). Sharding needs v3.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..core.settings import OUTPUT
from ..errors import SpheroError

#: Axis names of every array we write (OME-NGFF 0.5 requires them as the arrays' ``dimension_names``).
AXES = ("z", "y", "x")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def _list_arrays(group: zarr.Group, prefix: str = "") -> list[str]:
    out = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            out.append(path)
        else:
            out.extend(_list_arrays(member, path + "/"))
    return out


def open_source(root: str, array: str, root_option: str = "--data.root", array_option: str = "--data.array") -> zarr.Array:
    """Open an array read-only (any store zarr opens: v2 or v3, a directory, a zip file, a URL with fsspec),
    with a clear error for each way it can be missing, naming the options that set the store and the array."""
    if not is_url(root) and not Path(root).exists():
        raise SpheroError(f"store {str(root)!r} does not exist; check {root_option} (a .zarr directory)")
    store: Any = root
    if not is_url(root) and Path(root).is_file() and str(root).lower().endswith(".zip"):
        from zarr.storage import ZipStore

        store = ZipStore(str(root), mode="r")  # a zipped store (read-only; the output goes to a directory store)
    try:
        group = zarr.open_group(store, mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a zarr store"
        raise SpheroError(f"{str(root)!r} is not a Zarr store ({type(exc).__name__}); point {root_option} at a .zarr directory") from None
    try:
        arr = zarr.open_array(group.store, path=array, mode="r", zarr_format=group.metadata.zarr_format)
    except Exception:  # noqa: BLE001 - listed with the arrays that do exist
        try:
            arrays = _list_arrays(group)
        except Exception:  # noqa: BLE001
            arrays = []
        listing = ", ".join(arrays) if arrays else "none"
        raise SpheroError(f"array {array!r} not found in {str(root)!r} (arrays there: {listing}); set {array_option}") from None
    return arr


def open_registration(root: str, path: str) -> tuple[zarr.Array, zarr.Array]:
    """A finished ``sphero fit`` output and the array it was registered from, or a clear error.

    The source is looked up in the same store, or in the store the registration names (``source_root``)
    when the output was written into another store (``--data.output_root``)."""
    reg = open_source(root, path)
    missing = [k for k in ("composed_transforms", "crop_box", "inputs") if k not in reg.attrs]
    if missing:
        raise SpheroError(f"{path!r} is not a sphero registration output (no {', '.join(missing)}); "
                          "point --transforms at e.g. images/registered/50-4-4")
    src_root = reg.attrs.get("source_root") or root
    return reg, open_source(src_root, reg.attrs["inputs"][0])


def zarr_format(node: zarr.Array | zarr.Group) -> int:
    return int(node.metadata.zarr_format)


def store_format(root: str | Path) -> int | None:
    """The Zarr format of an existing store's root group (None where there is none yet)."""
    p = Path(root)
    if (p / "zarr.json").exists():
        return 3
    if (p / ".zgroup").exists() or (p / ".zarray").exists():
        return 2
    return None


def node_exists(root: str | Path, path: str) -> bool:
    """Whether an array or group exists at ``path`` in the local store ``root`` (either format)."""
    d = Path(root) / path.strip("/")
    return any((d / f).exists() for f in ("zarr.json", ".zarray", ".zgroup"))


def spacing_name(spacing: list[float]) -> str:
    """``[50, 4, 4]`` -> ``"50-4-4"`` (the naming convention of the arrays)."""
    return "-".join(f"{s:g}" for s in spacing)


def parse_spacing(value: Any, where: str) -> list[float]:
    """Three positive numbers ``[z, y, x]`` from an attribute or option, else a one-line error naming ``where``."""
    try:
        sp = [float(s) for s in value]
        if isinstance(value, (str, bytes)):
            raise TypeError
    except (TypeError, ValueError):
        raise SpheroError(f"{where} is {value!r} ({type(value).__name__}); expected three numbers [z, y, x] in nm: "
                          "fix the attribute, or give --data.spacing [z,y,x]") from None
    if len(sp) != 3 or any(not (s > 0 and np.isfinite(s)) for s in sp):
        raise SpheroError(f"{where} is {value!r}; expected three positive numbers [z, y, x] in nm")
    return sp


def create_array(group: zarr.Group, name: str, *, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
                 compression_level: int = OUTPUT.compression_level, shards: tuple[int, ...] | None = None) -> zarr.Array:
    """A new (overwritten) zstd-compressed array in ``group``'s own Zarr format."""
    if zarr_format(group) == 2:
        if shards is not None:
            raise SpheroError("output.shards needs a Zarr v3 store; this store is Zarr v2 (drop --output.shards, "
                              "or write into a v3 store with --data.output_root)")
        import numcodecs

        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=numcodecs.Zstd(level=compression_level),
                                  overwrite=True, fill_value=0)
    from zarr.codecs import ZstdCodec

    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, overwrite=True, fill_value=0,
                              compressors=ZstdCodec(level=compression_level), dimension_names=AXES)


def open_group(root: str | Path, path: str = "", fmt: int | None = None) -> zarr.Group:
    """The group at ``path`` of the local store ``root`` for writing, created (in format ``fmt``) where missing."""
    top = zarr.open_group(str(root), mode="a", zarr_format=store_format(root) or fmt or 3)
    return top.require_group(path) if path.strip("/") else top


def multiscales(group: zarr.Group, name: str) -> dict[str, Any]:
    """One OME-NGFF ``multiscales`` entry listing every (Z, Y, X) array of ``group`` with its scale.

    Arrays are ordered from finest to coarsest (y * x spacing), as the specification requires. A ``translation``
    places a cropped array where it lies in the source's frame.
    """
    datasets = []
    for arr_name, arr in group.arrays():
        if "spacing" not in arr.attrs or arr_name.startswith("tmp-") or arr.ndim != len(AXES):
            continue
        try:
            sp = [float(s) for s in arr.attrs["spacing"]]
        except (TypeError, ValueError):
            continue
        up, _, left, _ = arr.attrs.get("crop_box", [0, 0, 0, 0])
        transforms = [{"type": "scale", "scale": sp}]
        if "translation_nm" in arr.attrs:  # a downsampled level (storage/pyramid.py) says where its pixels lie
            transforms.append({"type": "translation", "translation": [float(t) for t in arr.attrs["translation_nm"]]})
        elif up or left:
            transforms.append({"type": "translation", "translation": [0.0, up * sp[1], left * sp[2]]})
        datasets.append((sp[1] * sp[2], {"path": arr_name, "coordinateTransformations": transforms}))
    datasets.sort(key=lambda d: d[0])
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in AXES]
    return {"name": name, "axes": axes, "datasets": [d for _, d in datasets]}


def ome_multiscales(group: zarr.Group, name: str) -> dict[str, Any]:
    """OME-NGFF 0.5 ``ome`` attribute of a v3 group (the arrays have ``dimension_names``, which 0.5 requires)."""
    return {"version": "0.5", "multiscales": [multiscales(group, name)]}


def write_ome(root: str | Path, group_path: str) -> None:
    """(Re)write the OME-NGFF metadata of ``group_path``: 0.5 (``ome``) in a v3 store, 0.4 (``multiscales``) in v2;
    then the store's root listing of its images (:func:`write_root_listing`)."""
    group = open_group(root, group_path)
    if zarr_format(group) == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **multiscales(group, group_path)}]
    else:
        group.attrs["ome"] = ome_multiscales(group, group_path)
    if group_path.strip("/"):
        write_root_listing(root)


#: Root attribute marking a root listing written by sphero (rewritten as images are added; someone else's is left alone).
LISTING_MARK = "sphero_root_listing"


def _image_groups(group: zarr.Group, prefix: str = "", depth: int = 4) -> list[str]:
    """Paths of the groups under ``group`` that hold OME-NGFF multiscales (not ``OME``, not temporary ones)."""
    found = []
    for name, child in sorted(group.groups()):
        if name == "OME" or name.startswith("tmp-"):
            continue
        path = f"{prefix}{name}"
        attrs = dict(child.attrs)
        if "multiscales" in attrs or "multiscales" in attrs.get("ome", {}):
            found.append(path)
        if depth > 1:
            found += _image_groups(child, f"{path}/", depth - 1)
    return found


def write_root_listing(root: str | Path) -> list[str] | None:
    """Where the store's root has no OME-NGFF metadata of its own, list its images there as OME-NGFF's bioformats2raw
    layout does (``bioformats2raw.layout: 3`` on the root, the image groups' paths as ``series`` of an ``OME`` group),
    so that a viewer opening the store itself finds them. Returns the paths listed; None where the root is left alone
    (OME metadata of its own, or a layout someone else wrote)."""
    top = zarr.open_group(str(root), mode="a")
    v3 = zarr_format(top) == 3
    attrs = dict(top.attrs)
    ome = dict(attrs.get("ome", {})) if v3 else attrs
    if any(k in ome for k in ("multiscales", "plate", "well", "labels", "image-label")):
        return None
    if "bioformats2raw.layout" in ome and not attrs.get(LISTING_MARK):
        return None
    series = _image_groups(top)
    if not series:
        return None
    if v3:
        top.attrs.update({"ome": {**ome, "version": "0.5", "bioformats2raw.layout": 3}, LISTING_MARK: True})
    else:
        top.attrs.update({"bioformats2raw.layout": 3, LISTING_MARK: True})
    listing = top.require_group("OME")
    listing.attrs.update({"ome": {"version": "0.5", "series": series}} if v3 else {"series": series})
    return series


def move_into_place(root: str | Path, group_path: str, tmp_name: str, name: str) -> None:
    """Rename the finished temporary array to its final name (replacing an old one)."""
    base = Path(root) / group_path
    src, dst = base / tmp_name, base / name
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def remove_node(root: str | Path, path: str) -> None:
    """Delete the array or group at ``path`` in the local store ``root``, if there is one."""
    d = Path(root) / path.strip("/")
    if node_exists(root, path):
        shutil.rmtree(d)


def check_writable(root: str | Path, fix: str) -> None:
    """Fail now, not after the work, where the store ``root`` cannot be written (read-only store or file system,
    a remote URL): tries to create and remove a file there. ``fix`` ends the message (what to do instead)."""
    if is_url(root):
        raise SpheroError(f"cannot write into the remote store {str(root)!r}; {fix}")
    p = Path(root)
    if p.is_file():
        raise SpheroError(f"cannot write into {str(root)!r}: it is a file (a zipped store?), not a directory store; {fix}")
    probe_dir = p if p.exists() else p.parent
    if not probe_dir.exists():
        raise SpheroError(f"cannot create the store {str(root)!r}: folder {str(probe_dir)!r} does not exist")
    probe = probe_dir / f".sphero-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SpheroError(f"cannot write into {str(probe_dir)!r} ({exc.strerror or type(exc).__name__}); {fix}") from None


class OutputLock:
    """An exclusive lock on an output, held by one run (:func:`acquire_lock`); :meth:`release` gives it back."""

    def __init__(self, path: Path, fd: int, root: str | None) -> None:
        self.path, self._fd, self._root = path, fd, root

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock and remove its file, with the folders it alone needed (up to its ``root``); idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            d = self.path.parent
            stop = Path(self._root).resolve() if self._root is not None else None
            while stop is not None and d.resolve() != stop and d.is_relative_to(stop) and not any(d.iterdir()):
                d.rmdir()
                d = d.parent
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def acquire_lock(path: Path, what: str, root: str | Path | None = None) -> OutputLock:
    """Take an exclusive lock on ``path`` for the calling run (released by the returned lock's ``release``, or when
    the process exits, even by SIGKILL), or fail with one line naming who holds it: another process, or another run
    of this one (``flock`` locks belong to an open file, so two runs in one process exclude each other too). ``path``
    holds the owner's pid, host and start time; on release the file and the folders made for it (up to ``root``) are
    removed again."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                owner = {}
            os.close(fd)
            here = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
            who = ("another run in this process" if here else "another sphero run") + \
                f" (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')})"
            raise SpheroError(f"{what} is being written by {who}; wait for it to finish, "
                              "or write elsewhere (--data.dst_group, --data.output_root)") from None
        try:  # the holder before us may have removed the file between our open and our lock: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}).encode(), 0)
    return OutputLock(path, fd, None if root is None else str(root))
