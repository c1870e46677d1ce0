"""The Python API: register a stack held in memory (numpy), in Zarr or in dask, and warp it, from a notebook.

>>> from sphero_lightning import register_stack, warp_stack
>>> from sphero_lightning.core.synthetic import em_like_image, make_stack
>>> stack = make_stack(em_like_image(256, seed=0), 4, (128, 128), seed=0).stack  # (Z, Y, X) uint8
>>> reg = register_stack(stack, transformation="rigid")
>>> reg.tmats.shape                                # pystackreg's convention, one per slice
(4, 3, 3)
>>> warp_stack(stack, reg).shape[0]                # cropped to the box valid in every slice
4

Both run the same code as ``sphero fit`` (the same objective, solvers, pyramid, stopping rules, composition, crop
and warping; a test checks the transforms agree to 1e-6 px), in this process and in memory: no temporary store, no
command line, no file written, without logger or progress bar unless asked. For stacks in a Zarr store on disk,
``sphero fit`` writes the output next to the source and can resume an interrupted run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core.records import PairRecord
from .core.settings import MODEL, OUTPUT
from .errors import SpheroError
from .storage.checks import check_stack


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
    log: list[PairRecord]
    shape: tuple[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    first: np.ndarray = field(default_factory=lambda: np.eye(3)[:2].copy())
    solve: dict[str, Any] | None = None


def _check_stack(stack: Any) -> Any:
    if not hasattr(stack, "shape") or not hasattr(stack, "dtype"):
        stack = np.asarray(stack)
    check_stack(tuple(stack.shape), stack.dtype, "stack")
    return stack


def _device(device: Any) -> tuple[str, Any]:
    """``(accelerator, devices)`` for the Trainer from a torch device (default the CPU)."""
    if device is None:
        return "cpu", 1
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu", 1
    return {"cuda": "gpu"}.get(dev.type, dev.type), [dev.index or 0]


def register_stack(stack: Any, *, transformation: str = MODEL.transformation, device: Any = None, progress: bool = False,
                   options: Mapping[str, Any] | None = None, mask: Any = None) -> Registration:
    """Register every slice of ``stack`` to the one before it and chain the transforms to slice 0.

    In this process and in memory: the same components as ``sphero fit`` (module, data module, callbacks,
    composition and crop), without its command line; nothing is written to disk.

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
        "pyramid.levels": 3, "early_stopping.step_tol_px": 0.001, "data.ignore_value": 0}``. ``trainer.*`` options are
        checked as ``sphero fit`` checks them (none that would change the result, no logger); ``trainer.callbacks``
        run beside the fit's own.
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
    from .core.frames import FIRST_KEY, composed_of_all
    from .training.memory import fit_array

    stack = _check_stack(stack)
    accelerator, devices = _device(device)
    attrs = fit_array(stack, transformation, accelerator, devices, progress, options, mask)
    every = composed_of_all(attrs)
    shape = (int(stack.shape[1]), int(stack.shape[2]))
    return Registration(pairwise=np.asarray(attrs["pairwise_transforms"], dtype=np.float64), composed=every[1:],
                        tmats=np.asarray(attrs["composed_transforms_pixel"], dtype=np.float64), crop_box=list(attrs["crop_box"]),
                        log=list(attrs["registration_log"]), shape=shape, settings=attrs["settings"],
                        first=every[0] if FIRST_KEY in attrs else np.eye(3)[:2].copy(), solve=attrs.get("volume_solve"))


def warp_stack(stack: Any, registration: Registration, *, crop: bool = OUTPUT.crop_borders, interpolation: str = OUTPUT.interpolation,
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
        n = len(registration.composed) + 1
        hint = f" (the first {n} were registered: pass stack[:{n}])" if stack.shape[0] > n and \
            tuple(stack.shape[1:]) == tuple(registration.shape) else ""
        raise SpheroError(f"stack has shape {tuple(stack.shape)}; the registration is for {n} slices of "
                          f"{registration.shape[0]} x {registration.shape[1]}{hint}")
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
