"""Affine transforms: parameters, matrices, unit conversions, composition.

Pure functions over batched tensors. Three coordinate frames appear, each defined, and converted between, in
:mod:`~sphero_lightning.core.frames` (:class:`~.frames.Affine`; the ``*_to_*`` functions here are its torch
shorthands, for ``(B, 2, 3)`` / ``(B, 3, 3)`` tensors):

* **normalized** (torch's ``affine_grid``, ``align_corners=False``): the image spans ``[-1, 1]`` edge to edge. A
  ``(2, 3)`` matrix maps an output position to the position sampled in the moving slice; stored in the output.
* **centered pixels**: isotropic, so a rotation here is a true rotation even when ``H != W``. The parameters are
  built in this frame.
* **pixel index** (Fiji/TurboReg/pystackreg style): ``x_p`` in ``0..W-1``; ``(3, 3)`` matrices.

Parameters are the deviation from identity, ``q = [tx, ty, theta, dsx, dsy, k]``:
translation in units of ``L = max(H, W) / 2`` pixels, rotation in radians, per-axis scale
deviation (scale = 1 + ds) and horizontal shear. All are dimensionless and move the image edge by
about the same amount per unit, which keeps the optimisation well conditioned and the values
independent of the pyramid level.

A shift of 0.1 in normalized units is 10 pixels on a 200 px wide slice, in the pixel-index and centred frames
alike (no rotation); chained pairwise transforms add up:

>>> theta = params_to_normalized(torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64), (100, 200))
>>> theta[0].tolist()
[[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]
>>> normalized_to_pixel(theta, (100, 200))[0, 0].tolist(), normalized_to_centered(theta, (100, 200))[0, 0].tolist()
([1.0, 0.0, 10.0], [1.0, 0.0, 10.0])
>>> torch.allclose(pixel_to_normalized(normalized_to_pixel(theta, (100, 200)), (100, 200)), theta)
True
>>> compose(torch.cat([theta, theta]))[:, 0, 2].tolist()  # slice 2 sampled 0.2 to the right of slice 0
[0.1, 0.2]
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SpheroError
from .frames import Affine, Frame, decompose, fill_between, homogeneous, pixel_centre
from .records import PairRecord, PairStatus
from .settings import MODEL

#: Names of the six full parameters, in order.
PARAM_NAMES = ("tx", "ty", "theta", "dsx", "dsy", "shear")

#: Transformation families and the free parameters of each. A free parameter is a row that maps
#: onto the full vector; ``similarity`` ties both scale deviations to one isotropic value.
FAMILIES = ("translation", "rigid", "similarity", "affine")


def family_basis(transformation: str, scaling: bool = MODEL.scaling, shear: bool = MODEL.shear) -> torch.Tensor:
    """Linear map from the free parameters of a family to the full 6-vector.

    Parameters
    ----------
    transformation : {"translation", "rigid", "similarity", "affine"}
    scaling, shear : bool
        For ``affine`` only: whether per-axis scale and shear are free.

    Returns
    -------
    torch.Tensor
        ``(n_free, 6)`` float64; ``q = p @ basis``.
    """
    if transformation not in FAMILIES:
        raise SpheroError(f"unknown transformation {transformation!r}; choose one of {', '.join(FAMILIES)}")
    rows = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    if transformation != "translation":
        rows.append([0, 0, 1, 0, 0, 0])
    if transformation == "similarity":
        rows.append([0, 0, 0, 1, 1, 0])
    if transformation == "affine":
        if scaling:
            rows += [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
        if shear:
            rows.append([0, 0, 0, 0, 0, 1])
    return torch.tensor(rows, dtype=torch.float64)


def half_size(shape: tuple[int, int]) -> float:
    """The length unit ``L`` of the translation parameters, in pixels: ``max(H, W) / 2``."""
    return max(shape) / 2.0


def params_to_centered(q: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Full parameters to affine matrices in centered pixel coordinates.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, 6)`` parameters ``[tx, ty, theta, dsx, dsy, k]`` (see module docstring).
    shape : (H, W)
        Slice shape in pixels at full resolution.

    Returns
    -------
    torch.Tensor
        ``(B, 2, 3)``: ``u_moving = A @ [u_out, 1]`` in centered pixels.
        ``A = Rotate(theta) @ Shear(k) @ Scale(1 + dsx, 1 + dsy)``, plus translation.
    """
    tx, ty, th, dsx, dsy, k = q.unbind(-1)
    c, s = torch.cos(th), torch.sin(th)
    sx, sy = 1 + dsx, 1 + dsy
    # R @ [[1, k], [0, 1]] @ diag(sx, sy)
    a00 = c * sx
    a01 = (c * k - s) * sy
    a10 = s * sx
    a11 = (s * k + c) * sy
    length = half_size(shape)
    row0 = torch.stack([a00, a01, tx * length], -1)
    row1 = torch.stack([a10, a11, ty * length], -1)
    return torch.stack([row0, row1], -2)


def params_jacobian(p: torch.Tensor, basis: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(B, 6, n)``: the derivatives of the normalized matrices ``params_to_normalized(p @ basis)`` (entries row by
    row) with respect to the free parameters ``p`` (``(B, n)``), in closed form (what autograd through the matrices
    gave, without a graph at every evaluation). The frame conversion is linear, so it converts each derivative."""
    q = p @ basis.to(p)
    tx, th, dsx, dsy, k = q[:, 0], q[:, 2], q[:, 3], q[:, 4], q[:, 5]
    c, s = torch.cos(th), torch.sin(th)
    sx, sy = 1 + dsx, 1 + dsy
    jac = torch.zeros(len(q), 6, 2, 3, dtype=q.dtype, device=q.device)  # [b, q_k, row, col] of the centred matrix
    jac[:, 0, 0, 2] = jac[:, 1, 1, 2] = half_size(shape) * torch.ones_like(tx)
    jac[:, 2, 0, 0], jac[:, 2, 0, 1], jac[:, 2, 1, 0], jac[:, 2, 1, 1] = -s * sx, -(s * k + c) * sy, c * sx, (c * k - s) * sy
    jac[:, 3, 0, 0], jac[:, 3, 1, 0] = c, s
    jac[:, 4, 0, 1], jac[:, 4, 1, 1] = c * k - s, s * k + c
    jac[:, 5, 0, 1], jac[:, 5, 1, 1] = c * sy, s * sy
    normalized = centered_to_normalized(jac.reshape(-1, 2, 3), shape).reshape(len(q), 6, 6)
    return normalized.transpose(1, 2) @ basis.to(p).T


def centered_to_normalized(a: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(B, 2, 3)`` centered-pixel matrices to normalized ``affine_grid`` matrices (:class:`~.frames.Affine`)."""
    return Affine(a, Frame.CENTRED, shape).to(Frame.NORMALIZED).matrix


def normalized_to_centered(theta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`centered_to_normalized`."""
    return Affine(theta, Frame.NORMALIZED, shape).to(Frame.CENTRED).matrix


def params_to_normalized(q: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(B, 6)`` parameters to ``(B, 2, 3)`` normalized matrices (see :func:`params_to_centered`)."""
    return centered_to_normalized(params_to_centered(q, shape), shape)


def compose(pairwise: torch.Tensor) -> torch.Tensor:
    """Chain pairwise transforms into transforms to slice 0.

    Parameters
    ----------
    pairwise : torch.Tensor
        ``(N, 2, 3)``; ``pairwise[i]`` maps slice ``i``'s frame to positions in slice ``i + 1``.

    Returns
    -------
    torch.Tensor
        ``(N, 2, 3)``; entry ``k - 1`` maps the output (slice 0) frame to positions in slice ``k``:
        ``C_k = A_k @ C_(k-1)``, ``C_0 = I``. Any of the three conventions, as long as it is one.
    """
    out = []
    acc = torch.eye(3, dtype=pairwise.dtype, device=pairwise.device)
    for a in homogeneous(pairwise):
        acc = a @ acc
        out.append(acc[:2])
    if not out:
        return pairwise.new_zeros(0, 2, 3)
    return torch.stack(out)


def normalized_to_pixel(theta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Normalized ``(B, 2, 3)`` to pixel-index ``(B, 3, 3)`` matrices (``p_moving = M @ p_out``; :class:`~.frames.Affine`)."""
    return Affine(theta, Frame.NORMALIZED, shape).to(Frame.PIXEL).matrix


def pixel_to_normalized(m: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`normalized_to_pixel`."""
    return Affine(m, Frame.PIXEL, shape).to(Frame.NORMALIZED).matrix


def corner_displacement(theta_a: torch.Tensor, theta_b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Largest distance, in pixels, between where two transforms send the slice's corners.

    For affine maps the largest displacement over a rectangle is reached at a corner, so this is
    the exact maximum over the whole slice. ``(B, 2, 3)`` normalized inputs, ``(B,)`` output.
    """
    return centred_corner_displacement(normalized_to_centered(theta_a - theta_b, shape), shape)  # linear in theta


def centred_corner_displacement(diff: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`corner_displacement` of the difference ``diff`` (``(B, 2, 3)``) of two centred-pixel matrices."""
    cx, cy = pixel_centre(shape)
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [-cx, cy, 1], [cx, cy, 1]], dtype=diff.dtype, device=diff.device)
    moved = torch.einsum("bij,cj->bci", diff, corners)
    return moved.norm(dim=-1).amax(-1)


def mean_displacement(theta_a: torch.Tensor, theta_b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Mean distance in pixels over every pixel centre of the slice between two transforms.

    ``(B, 2, 3)`` normalized inputs, ``(B,)`` output. Evaluated on the full pixel grid (float64), in bands of rows
    (memory bounded whatever the slice size).
    """
    h, w = shape
    diff = normalized_to_centered((theta_a - theta_b).double(), shape)
    cx, cy = pixel_centre(shape)
    xs = torch.arange(w, dtype=torch.float64, device=diff.device) - cx
    total = torch.zeros(diff.shape[0], dtype=torch.float64, device=diff.device)
    rows = max(1, (1 << 20) // w)
    for r0 in range(0, h, rows):
        ys = torch.arange(r0, min(r0 + rows, h), dtype=torch.float64, device=diff.device) - cy
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([gx.flatten(), gy.flatten(), torch.ones(gx.numel(), dtype=torch.float64, device=diff.device)], -1)
        total += torch.einsum("bij,nj->bni", diff, pts).norm(dim=-1).sum(-1)
    return total / (h * w)


def rotation_degrees(theta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rotation angle in degrees of normalized ``(B, 2, 3)`` matrices (from the centered frame)."""
    a = normalized_to_centered(theta, shape)
    return torch.rad2deg(torch.atan2(a[..., 1, 0], a[..., 0, 0]))


def describe(theta: torch.Tensor, shape: tuple[int, int]) -> list[dict[str, float]]:
    """Centre displacement (pixels), rotation (degrees), scales and shear of normalized matrices, for humans
    (:func:`~sphero_lightning.core.frames.decompose` of each one's pixel matrix)."""
    return [decompose(m, shape) for m in normalized_to_pixel(theta.double(), shape).numpy()]


def chain_with_gaps(n_slices: int, fitted: list[PairRecord], damaged: dict[int, str]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Transforms to slice 0 of every slice, pairwise transforms of consecutive slices, the log.

    ``fitted`` are the registered pairs in order, consecutive slices except across damaged ones; each
    ``matrix`` maps slice ``slice_indices[0]``'s frame to positions in slice ``slice_indices[1]``
    (the convention of :func:`~sphero_lightning.core.transforms.compose`). A damaged slice gets the
    transform interpolated (per matrix entry, by slice position) between its nearest registered
    neighbours, or the nearest one's at either end of the stack. The pairwise transform of a pair
    next to a damaged slice follows from the composed ones, so the chain stays consistent.

    Returns
    -------
    composed : ``(n_slices, 2, 3)`` float64, entry 0 the identity (or what slice 0 inherits).
    pairwise : ``(n_slices - 1, 2, 3)``; entry ``i`` is the transform of pair ``(i, i + 1)``.
    log : one entry per consecutive pair ``(i, i + 1)``, with ``status``.
    """
    eye = torch.eye(3, dtype=torch.float64)[:2]
    known: dict[int, torch.Tensor] = {}
    good = [r["slice_indices"][0] for r in fitted] + ([fitted[-1]["slice_indices"][1]] if fitted else [])
    if not good:
        good = [min(set(range(n_slices)) - set(damaged))]
    known[good[0]] = eye
    acc = torch.eye(3, dtype=torch.float64)
    for r in fitted:
        a = homogeneous(torch.tensor(r["matrix"], dtype=torch.float64)[None])[0]
        acc = a @ acc
        known[r["slice_indices"][1]] = acc[:2].clone()
    composed = torch.from_numpy(fill_between({z: known[z].numpy() for z in good}, n_slices, eye.numpy()))
    by_pair = {tuple(r["slice_indices"]): r for r in fitted}
    hom = homogeneous(composed)
    pairwise = torch.zeros(max(0, n_slices - 1), 2, 3, dtype=torch.float64)
    log: list[PairRecord] = []
    for i in range(n_slices - 1):
        r = by_pair.get((i, i + 1))
        if r is not None:
            pairwise[i] = torch.tensor(r["matrix"], dtype=torch.float64)
            log.append({k: v for k, v in r.items() if k != "matrix"} | {"pair_index": i})
            continue
        # C_(i+1) = A_i @ C_i  ->  A_i = C_(i+1) @ C_i^-1
        pairwise[i] = (hom[i + 1] @ torch.linalg.inv(hom[i]))[:2]
        bad = [z for z in (i, i + 1) if z in damaged]
        bridge = next((r for r in fitted if r["slice_indices"][0] <= i and r["slice_indices"][1] >= i + 1), None)
        entry: PairRecord = {"pair_index": i, "slice_indices": [i, i + 1], "status": PairStatus.DAMAGED_SLICE,
                                 "damaged_slices": {str(z): damaged[z] for z in bad}, "final_loss": None,
                                 "num_steps_taken": 0, "steps_per_level": [], "ncc_before": None, "ncc_after": None}
        if bridge is not None:
            entry["bridged_by"] = {k: v for k, v in bridge.items() if k not in ("matrix", "pair_index")}
        log.append(entry)
    return composed, pairwise, log
