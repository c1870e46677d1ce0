"""``sphero fit``'s commonest mistakes answered before Python loads torch and Lightning (seconds): a misspelt option
(with the closest one), a value of the wrong type or a choice the option does not take, a store that does not exist or
is a TIFF file, an array that is not in it or is no stack (2D, one slice, not numbers), a missing ``spacing``, a mask
array that is missing or of the wrong shape, an output that exists already. Only what the command line says is checked
here (with a ``--config`` file, the checks that its values could change are left to the full parser); the full parser
and the data module check everything again, so this only answers sooner, never differently.

Plain Python and numpy (json, pathlib, ast through :mod:`~sphero_lightning.options`): no torch, Lightning, jsonargparse
or zarr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpheroError
from ..options import BOUNDS, LINKED, closest, fit_options, is_null, known
from ..storage.checks import check_stack, read_anchors

#: The enumerated options and their values, as the options' own ``Literal`` s declare them.
CHOICES: dict[str, tuple[str, ...]] = {f"--{k}": o.choices for k, o in fit_options().items() if o.choices is not None}
_TIFF = (".tif", ".tiff", ".btf", ".tf8")
#: On/off options that may be given bare, as the plain commands' flags are (``sphero ingest --overwrite``): true.
SWITCHES = tuple(f"--{k}" for k, o in fit_options().items() if o.kind == "bool" and not o.optional)


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
    """The Zarr metadata of the node at ``path`` (v3 ``zarr.json``, v2 ``.zarray`` / ``.zgroup`` with ``.zattrs``):
    ``node_type``, and for an array its ``shape``, ``dtype`` (numpy's name or v2 type string) and ``attributes``; or
    None where there is no node."""
    for name, kind in (("zarr.json", None), (".zarray", "array"), (".zgroup", "group")):
        f = path / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text())
                attrs = doc.get("attributes", {}) if kind is None else \
                    (json.loads((path / ".zattrs").read_text()) if (path / ".zattrs").is_file() else {})
            except (OSError, ValueError):
                return {}
            return {"node_type": doc.get("node_type", kind) if kind is None else kind, "shape": doc.get("shape"),
                    "dtype": doc.get("data_type", doc.get("dtype")), "attributes": attrs}
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


def _keys(argv: list[str]) -> list[str]:
    """The options ``argv`` names (``--a.b value``, ``--a.b=value``, ``--a.b+=value``), without dashes."""
    return [a[2:].split("=", 1)[0].rstrip("+") for a in argv if a.startswith("--") and len(a) > 2]


def check_option_names(argv: list[str]) -> None:
    """Every option in ``argv`` is one of ``sphero fit``'s; else one line naming the closest (``neighbors``: the US
    spelling of ``neighbours``)."""
    for key in _keys(argv):
        if key in LINKED:
            source = "solve" if key.startswith("data.") else "data"
            raise SpheroError(f"--{key} is set from --{source}.{key.split('.', 1)[1]}; give that instead")
        if not known(key):
            near = closest(key)
            hint = f"; did you mean --{near}?" if near else ""
            raise SpheroError(f"unknown option --{key}{hint} (see: sphero fit --help)")


def check_option_values(values: dict[str, str]) -> None:
    """Each value given on the command line is of its option's type, or one of its choices, and in its range
    (:data:`~sphero_lightning.options.BOUNDS`; a per-level list item by item)."""
    options = fit_options()
    for flag, text in values.items():
        option = options.get(flag[2:])
        if option is None:
            continue
        if option.kind == "other":
            value = _literal(text)  # a list of numbers (per level), or a number, or what the full parser reads
        else:
            try:
                value = option.parse(text)
            except ValueError as exc:
                if option.kind == "choice":
                    raise SpheroError(f"invalid value {text!r} for {option.key} (choose one of: {', '.join(option.choices or ())})") from None
                raise SpheroError(f"invalid value {text!r} for --{option.key} (expected {exc})") from None
        bound = BOUNDS.get(option.key)
        if bound is not None and not bound.holds(value):
            raise SpheroError(bound.message(option.key, value))


def _literal(text: str) -> Any:
    """``text`` as JSON (``[4, 2, 1]``, ``2``), or None where it is not."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _check_array(store: Path, root: str, array: str, values: dict[str, str], config: bool) -> None:
    """The array is a stack to register, with a spacing; its mask array exists and fits; its output is free."""
    meta = _node(store / array.strip("/"))
    if meta is None or meta.get("node_type") != "array":
        listing = ", ".join(_arrays(store)) or "none"
        raise SpheroError(f"array {array!r} not found in {root!r} (arrays there: {listing}); set --data.array")
    shape, what = meta.get("shape"), f"array {array!r}"
    dtype = meta.get("dtype")
    try:
        dtype = np.dtype(dtype) if isinstance(dtype, str) else np.dtype("float32")  # an extension type: the full check's
    except TypeError:
        dtype = np.dtype("float32")
    if isinstance(shape, list):  # the data module's own check, in its words
        check_stack(tuple(shape), dtype, what)
    if config:  # a config file may set the options the rest depends on
        return
    spacing = meta.get("attributes", {}).get("spacing")
    if "--data.spacing" not in values and spacing is None:
        raise SpheroError(f"array {array!r} has no 'spacing' attribute; give it as --data.spacing [z,y,x] (nm)")
    mask = values.get("--data.mask_array")
    if mask is not None and isinstance(shape, list):
        found = _node(store / mask.strip("/")) or _node(Path(mask))
        if found is None or found.get("node_type") != "array":
            listing = ", ".join(_arrays(store)) or "none"
            raise SpheroError(f"array {mask!r} not found in {root!r} (arrays there: {listing}); set --data.mask_array "
                              "(an array in the store, or a Zarr array's own path)")
        m = found.get("shape")
        if isinstance(m, list) and tuple(m) not in (tuple(shape), tuple(shape[1:])):
            raise SpheroError(f"--data.mask_array {mask!r} has shape {tuple(m)}; it must be the stack's {tuple(shape)} or one "
                              f"slice's {tuple(shape[1:])} (non-zero = use)")
    if isinstance(shape, list):  # the slices the options name are registered ones
        max_pairs = values.get("--data.max_pairs", "")
        n = min(shape[0], int(max_pairs) + 1) if max_pairs.isdigit() else shape[0]
        reference, anchors = values.get("--solve.reference"), values.get("--solve.anchors")
        if reference is not None and reference.lstrip("-").isdigit() and int(reference) >= n:
            raise SpheroError(f"--solve.reference {reference} is not a slice of this stack ({n} slices: 0..{n - 1})")
        outside = [z for z in read_anchors(anchors) if not 0 <= z < n] if _given(anchors) else []
        if outside:
            raise SpheroError(f"--solve.anchors names slice(s) {outside} outside this stack ({n} slices: 0..{n - 1})")
    _check_output(store, root, values, spacing)


def _check_output(store: Path, root: str, values: dict[str, str], spacing: Any) -> None:
    """No output at the path the run would write, unless ``--data.overwrite``."""
    if values.get("--data.overwrite", "false").lower() in ("true", "yes", "on", "1") or "--data.output_root" in values:
        return
    try:
        given = values.get("--data.spacing")
        zyx = json.loads(given) if given is not None else spacing
        name = "-".join(f"{float(v):g}" for v in zyx)
    except (TypeError, ValueError):
        return  # a bad spacing: the full parser says so
    if not (isinstance(zyx, list) and len(zyx) == 3):
        return
    path = f"{values.get('--data.dst_group', 'images/registered').strip('/')}/{name}"
    if _node(store / path) is not None:
        raise SpheroError(f"output {path!r} already exists in {root!r}; pass --data.overwrite true to replace it, or "
                          "choose another --data.dst_group")


def _given(value: str | None) -> bool:
    return value is not None and not is_null(value)


def check_fit_arguments(argv: list[str]) -> None:
    """Raise :class:`SpheroError` (one line, the fix) for the mistakes above in ``sphero fit``'s ``argv``."""
    check_option_names(argv)
    values = _values(argv)
    check_option_values(values)
    anchors = values.get("--solve.anchors")
    if _given(anchors):
        read_anchors(anchors)  # there, and a JSON object of slice -> 3 x 3 matrix
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
        _check_array(store, root, array, values, config=any(k in ("config", "c") for k in _keys(argv)) or "-c" in argv)
