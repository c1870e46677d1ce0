"""``sphero fit``'s commonest mistakes answered before Python loads torch and Lightning (seconds): a store that does not
exist or is a TIFF file, an array that is not in it, an enumerated option with a value it does not take. Only what
the command line says is checked here (a ``--config`` file's values are checked by the full parser after it); the
full parser checks everything again, so this only answers sooner, never differently.

Plain Python (json, pathlib): no torch, Lightning, jsonargparse or zarr.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpheroError

#: The enumerated options and their values (``tests/test_cli.py`` checks they equal the options' own ``Literal``s).
CHOICES: dict[str, tuple[str, ...]] = {
    "--model.transformation": ("translation", "rigid", "similarity", "affine"),
    "--model.loss": ("ncc", "mse", "mae", "ssim"),
    "--model.optimizer": ("bfgs", "adam"),
    "--model.init_translation": ("phase", "none"),
    "--model.interpolation": ("bspline", "bspline2x", "bicubic"),
    "--model.curvature": ("gauss_newton", "carried"),
    "--output.interpolation": ("bspline", "bicubic", "bilinear"),
    "--data.destripe": ("none", "vertical", "horizontal", "both"),
}
_TIFF = (".tif", ".tiff", ".btf", ".tf8")
#: On/off options that may be given bare, as the plain commands' flags are (``sphero ingest --overwrite``): true.
SWITCHES = ("--data.overwrite", "--data.resume", "--data.check_slices", "--output.crop_borders", "--model.scaling",
            "--model.shear", "--early_stopping.enabled")


def bare_switches(argv: list[str]) -> list[str]:
    """``argv`` with every bare switch followed by ``true``.

    >>> bare_switches(["--data.root", "s.zarr", "--data.overwrite", "--data.array", "a"])
    ['--data.root', 's.zarr', '--data.overwrite', 'true', '--data.array', 'a']
    >>> bare_switches(["--data.overwrite", "false"])
    ['--data.overwrite', 'false']
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in SWITCHES and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def _values(argv: list[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of ``argv`` (the last one wins, as for the parser)."""
    out: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[arg] = argv[i + 1]
    return out


def _node(path: Path) -> dict | None:
    """The Zarr metadata of the node at ``path`` (v3 ``zarr.json``, v2 ``.zarray`` / ``.zgroup``), or None."""
    for name, kind in (("zarr.json", None), (".zarray", "array"), (".zgroup", "group")):
        f = path / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
            return {"node_type": doc.get("node_type", kind) if kind is None else kind}
    return None


def _arrays(root: Path, limit: int = 20) -> list[str]:
    """Array paths in the store (breadth first, at most ``limit``)."""
    found, queue = [], [root]
    while queue and len(found) < limit:
        here = queue.pop(0)
        for child in sorted(p for p in here.iterdir() if p.is_dir()):
            meta = _node(child)
            if meta is None:
                continue
            if meta.get("node_type") == "array":
                found.append(child.relative_to(root).as_posix())
            else:
                queue.append(child)
    return found


def check_fit_arguments(argv: list[str]) -> None:
    """Raise :class:`SpheroError` (one line, the fix) for the mistakes above in ``sphero fit``'s ``argv``."""
    values = _values(argv)
    for key, choices in CHOICES.items():
        if key in values and values[key] not in choices:
            raise SpheroError(f"invalid value {values[key]!r} for {key[2:]} (choose one of: {', '.join(choices)})")
    root = values.get("--data.root")
    if root is None or "://" in root or root.lower().endswith(".zip"):
        return  # from a config file, a URL or a zipped store: the full parser's
    store = Path(root)
    if store.is_file() and store.suffix.lower() in _TIFF:
        raise SpheroError(f"--data.root {root!r} is a TIFF file, not a Zarr store; convert it first: sphero ingest "
                          f"{root} --root STACK.zarr --spacing Z Y X, then --data.root STACK.zarr")
    if not store.exists():
        raise SpheroError(f"store {root!r} does not exist; check --data.root (a .zarr directory)")
    if store.is_dir() and _node(store) is None:
        tiffs = sorted(p.name for p in store.iterdir() if p.suffix.lower() in _TIFF)[:1]
        hint = (f"; it holds TIFF files ({tiffs[0]} ...): sphero ingest {root} --root STACK.zarr --spacing Z Y X"
                if tiffs else "; point --data.root at a .zarr directory")
        raise SpheroError(f"{root!r} is not a Zarr store{hint}")
    array = values.get("--data.array")
    if array is not None and store.is_dir():
        meta = _node(store / array.strip("/"))
        if meta is None or meta.get("node_type") != "array":
            listing = ", ".join(_arrays(store)) or "none"
            raise SpheroError(f"array {array!r} not found in {root!r} (arrays there: {listing}); set --data.array")
