"""The Python API: register a stack held in memory (numpy), in Zarr or in dask, and warp it, from a notebook.

>>> from sphero_lightning import register_stack, warp_stack
>>> reg = register_stack(stack, transformation="rigid")        # stack: (Z, Y, X)
>>> reg.tmats.shape                                            # pystackreg's convention, one per slice
(Z, 3, 3)
>>> aligned = warp_stack(stack, reg)                           # cropped to the box valid in every slice

Both run the same code as ``sphero fit`` (the same objective, solvers, pyramid, stopping rules, composition, crop
and writer; a test checks the transforms agree to 1e-6 px): the stack is copied into a temporary Zarr store and
fitted there by the same LightningCLI, without logger or progress bar unless asked. For stacks already in a Zarr
store on disk, ``sphero fit`` avoids the copy and writes the output next to the source.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SpheroError
from .storage.store import check_stack

#: Where register_stack puts the copy of the stack inside its temporary store.
_ARRAY = "stack"


@dataclass
class Registration:
    """The result of :func:`register_stack`.

    Attributes
    ----------
    pairwise : np.ndarray
        ``(Z - 1, 2, 3)`` normalized matrices; entry ``i`` maps slice ``i + 1``'s output frame into slice ``i + 1``
        given slice ``i``'s frame (torch ``affine_grid`` convention, ``align_corners=False``).
    composed : np.ndarray
        ``(Z - 1, 2, 3)`` normalized matrices of slices ``1..Z-1`` to slice 0's frame (slice 0: the identity).
    tmats : np.ndarray
        ``(Z, 3, 3)`` the composed transforms in pixels, slice 0 the identity: pystackreg's ``tmats`` convention
        (``StackReg.transform_stack(stack, tmats=reg.tmats)`` reproduces the alignment before cropping).
    crop_box : list of int
        ``[y0, y1, x0, x1]``: the largest box whose every pixel lies inside every warped slice.
    log : list of dict
        One entry per pair: status, NCC before and after, final loss, evaluations per level (as ``sphero fit``'s
        ``registration_log``).
    shape : (int, int)
        Slice shape (Y, X).
    settings : dict
        Every setting of the fit, as ``sphero fit`` records them (the output's ``processing`` record).
    first : np.ndarray
        ``(2, 3)`` slice 0's normalized transform: the identity, unless the output takes another slice's frame
        (``options={"solve.reference": k}``).
    solve : dict or None
        The robust solve's record (``sphero fit``'s ``volume_solve``: weights, residuals, unregistered slices,
        overruled pairs), or None for the plain chain.
    """

    pairwise: np.ndarray
    composed: np.ndarray
    tmats: np.ndarray
    crop_box: list[int]
    log: list[dict[str, Any]]
    shape: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    first: np.ndarray = field(default_factory=lambda: np.eye(3)[:2].copy())
    solve: dict[str, Any] | None = None


def _check_stack(stack: Any) -> Any:
    if not hasattr(stack, "shape") or not hasattr(stack, "dtype"):
        stack = np.asarray(stack)
    check_stack(tuple(stack.shape), stack.dtype, "stack")
    return stack


def _copy_into(stack: Any, root: Path) -> None:
    """The stack as the array ``stack`` of a new local Zarr store, slice by slice (a dask or zarr array is read one
    slice at a time)."""
    import zarr

    group = zarr.open_group(str(root), mode="w")
    arr = group.create_array(_ARRAY, shape=tuple(stack.shape), dtype=np.dtype(stack.dtype),
                             chunks=(1, *stack.shape[1:]), compressors=None)
    arr.attrs["spacing"] = [1.0, 1.0, 1.0]
    for z in range(stack.shape[0]):
        arr[z] = np.asarray(stack[z])


def _option(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_option(v) for v in value) + "]"
    return str(value)


def _device_options(device: Any) -> list[str]:
    if device is None:
        return ["--trainer.accelerator", "cpu"]
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return ["--trainer.accelerator", "cpu"]
    accel = {"cuda": "gpu"}.get(dev.type, dev.type)
    return ["--trainer.accelerator", accel, "--trainer.devices", f"[{dev.index or 0}]"]


def register_stack(stack: Any, *, transformation: str = "rigid", device: Any = None, progress: bool = False,
                   options: Mapping[str, Any] | None = None, workdir: str | Path | None = None,
                   mask: Any = None) -> Registration:
    """Register every slice of ``stack`` to the one before it and chain the transforms to slice 0.

    Parameters
    ----------
    stack : array-like
        ``(Z, Y, X)`` numpy, Zarr or dask array; integer or float grey values.
    transformation : {"translation", "rigid", "similarity", "affine"}
        The transform family (``--model.transformation``).
    device : str or torch.device, optional
        Where to fit: ``"cpu"`` (default) or ``"cuda"`` / ``"cuda:1"`` (one GPU).
    progress : bool
        Show ``sphero fit``'s progress bar (pairs per second, time left).
    options : mapping, optional
        Any other ``sphero fit`` option by its name without the dashes, e.g. ``{"model.loss": "mse",
        "pyramid.levels": 3, "early_stopping.step_tol_px": 0.001}``.
    workdir : path, optional
        Folder for the temporary Zarr copy of the stack (default: the system's temporary folder).
    mask : array-like, optional
        What the loss may use (non-zero = use): ``(Z, Y, X)`` like the stack, or ``(Y, X)`` for every slice
        (``--data.mask_array``). Pixels of one grey value: ``options={"data.ignore_value": 0}``; curtaining:
        ``options={"data.destripe": "vertical"}``.

    Returns
    -------
    Registration
        Pairwise and composed transforms (normalized), pixel ``tmats``, crop box, per-pair log, settings.

    Raises
    ------
    SpheroError
        Bad input or settings, with the one-line message ``sphero fit`` prints.
    """
    import zarr

    from .core.frames import FIRST_KEY, composed_of_all
    from .training.cli import fit_in_process

    stack = _check_stack(stack)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="sphero-api-") as tmp:
        root = Path(tmp) / "stack.zarr"
        _copy_into(stack, root)
        masked = []
        if mask is not None:
            m = np.asarray(mask)
            if m.shape not in (tuple(stack.shape), tuple(stack.shape[1:])):
                raise SpheroError(f"mask has shape {m.shape}; it must be the stack's {tuple(stack.shape)} or one "
                                  f"slice's {tuple(stack.shape[1:])} (non-zero = use)")
            zarr.open_group(str(root), mode="a").create_array("mask", data=(m != 0).astype(np.uint8))
            masked = ["--data.mask_array", "mask"]
        argv = ["fit", "--data.root", str(root), "--data.array", _ARRAY, "--model.transformation", transformation,
                "--trainer.logger", "false", "--trainer.enable_progress_bar", _option(progress), *_device_options(device), *masked]
        for key, value in (options or {}).items():
            argv += [f"--{key.lstrip('-')}", _option(value)]
        if progress:
            cli = fit_in_process(argv)
        else:  # sphero fit's lines, less the three about the temporary store (the QC warnings stay)
            buf = io.StringIO()
            try:
                with contextlib.redirect_stderr(buf):
                    cli = fit_in_process(argv)
            finally:
                for line in buf.getvalue().splitlines():
                    if not line.startswith(("sphero: wrote ", "sphero: time: ", "sphero: report ")):
                        print(line, file=sys.stderr)
        out = zarr.open_array(str(root), path=cli.datamodule.output_path, mode="r")
        attrs = dict(out.attrs)
    every = composed_of_all(attrs)
    shape = (int(stack.shape[1]), int(stack.shape[2]))
    record = next((p for p in attrs.get("processing", []) if p.get("step_name") == "registration"), {})
    return Registration(pairwise=np.asarray(attrs["pairwise_transforms"], dtype=np.float64), composed=every[1:],
                        tmats=np.asarray(attrs["composed_transforms_pixel"], dtype=np.float64), crop_box=list(attrs["crop_box"]),
                        log=list(attrs["registration_log"]), shape=shape, settings=dict(record.get("parameters", {})),
                        first=every[0] if FIRST_KEY in attrs else np.eye(3)[:2].copy(), solve=attrs.get("volume_solve"))


def warp_stack(stack: Any, registration: Registration, *, crop: bool = True, interpolation: str = "bspline",
               device: Any = None) -> np.ndarray:
    """``stack`` aligned by ``registration``: every slice warped once into slice 0's frame, as ``sphero fit`` writes it.

    Parameters
    ----------
    stack : array-like
        ``(Z, Y, X)`` numpy, Zarr or dask array: the registered stack, or another channel or label image of it
        (use ``interpolation="nearest"`` for labels).
    registration : Registration
        From :func:`register_stack`.
    crop : bool
        Crop to ``registration.crop_box`` (the largest box valid in every slice); else the full slice frame.
    interpolation : {"bspline", "bicubic", "bilinear", "nearest"}
        How slices are resampled (``nearest`` keeps integer labels exact).
    device : str or torch.device, optional
        Where to warp (default CPU).

    Returns
    -------
    np.ndarray
        ``(Z, y, x)`` in ``stack``'s dtype (integers rounded and clipped).
    """
    import torch
    import zarr

    from .storage.writing import warp_stack as warp_all

    stack = _check_stack(stack)
    if tuple(stack.shape[1:]) != tuple(registration.shape) or stack.shape[0] != len(registration.composed) + 1:
        raise SpheroError(f"stack has shape {tuple(stack.shape)}; the registration is for {len(registration.composed) + 1} "
                          f"slices of {registration.shape[0]} x {registration.shape[1]}")
    if interpolation not in ("bspline", "bicubic", "bilinear", "nearest"):
        raise SpheroError(f"unknown interpolation {interpolation!r}; choose bspline, bicubic, bilinear or nearest")
    shape = registration.shape
    box = list(registration.crop_box) if crop else [0, shape[0], 0, shape[1]]
    src = zarr.create_array(store={}, shape=tuple(stack.shape), dtype=np.dtype(stack.dtype), chunks=(1, *shape))
    for z in range(stack.shape[0]):
        src[z] = np.asarray(stack[z])
    out_shape = (stack.shape[0], box[1] - box[0], box[3] - box[2])
    out = zarr.create_array(store={}, shape=out_shape, dtype=np.dtype(stack.dtype), chunks=(1, *out_shape[1:]))
    every = np.concatenate([np.asarray(registration.first, dtype=np.float64).reshape(1, 2, 3),
                            np.asarray(registration.composed, dtype=np.float64)])
    warp_all(src, out, torch.from_numpy(every), box, interpolation, device=torch.device(device or "cpu"))
    return np.asarray(out[:])
