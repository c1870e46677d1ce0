"""Coordinate frames, and the one type that converts between them: :class:`Affine`, a matrix that knows its
:class:`Frame` and slice shape (numpy arrays and torch tensors alike; ``sphero export`` imports no torch, so torch is
imported only for a tensor).

* **normalized**: torch's ``affine_grid`` convention (``align_corners=False``): x and y run over ``[-1, 1]`` across the
  slice, pixel centres at ``(2 i + 1) / n - 1`` (:func:`normalized_coords`). ``(..., 2, 3)`` matrices that map an output
  position to the position sampled; what the fit, the warp and the output attributes use.
* **centred**: pixels from the slice centre, ``u = x_pixel - (W - 1) / 2`` (:func:`pixel_centre`); isotropic, so a
  rotation is a true rotation when ``H != W``, and a residual is a displacement in pixels: where the parameters and the
  volume solve live. ``(..., 2, 3)``.
* **pixel**: pixel indices, ``x = (W x_n + W - 1) / 2`` (:func:`pixel_coords`): pystackreg's ``tmats``, ``(..., 3, 3)``.

Two composed transforms (slices 1 and 2, normalized) as the pixel tmats users export (slice 0: the identity), and
what one of them does:

>>> tm = pixel_matrices([[[1, 0, 0.1], [0, 1, 0]], [[1, 0, 0.2], [0, 1, 0]]], (100, 200))
>>> tm.shape, tm[2, 0].tolist()
((3, 3, 3), [1.0, 0.0, 20.0])
>>> decompose(tm[1], (100, 200))
{'dx_px': 10.0, 'dy_px': 0.0, 'rotation_deg': 0.0, 'scale_x': 1.0, 'scale_y': 1.0, 'shear': 0.0}
>>> Affine(np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]), Frame.NORMALIZED, (100, 200)).to(Frame.CENTRED).matrix[0].tolist()
[1.0, 0.0, 10.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

#: Where a registration whose output takes another slice's frame (``--solve.reference``) keeps slice 0's transform.
FIRST_KEY = "composed_transform_slice0"


def pixel_centre(shape: tuple[int, int]) -> tuple[float, float]:
    """``(x, y)`` pixel-index position of the centre of an ``(H, W)`` slice: the centred frame's origin.

    >>> pixel_centre((100, 200))
    (99.5, 49.5)
    """
    h, w = shape
    return (w - 1) / 2, (h - 1) / 2


def pixel_coords(xn: Any, size: int) -> Any:
    """Normalized positions (any array, tensor or float) along an axis of ``size`` pixels to pixel indices.

    >>> pixel_coords(-1.0, 4), pixel_coords(0.75, 4)  # the slice's left edge, the last pixel's centre
    (-0.5, 3.0)
    """
    return ((xn + 1) * size - 1) / 2


def normalized_coords(xp: Any, size: int) -> Any:
    """Pixel indices (any array, tensor or float) along an axis of ``size`` pixels to normalized positions.

    >>> normalized_coords(0, 4), normalized_coords(3, 4)
    (-0.75, 0.75)
    """
    return (2 * xp + 1) / size - 1


class Frame(Enum):
    """A matrix's coordinate frame (see the module docstring): ``NORMALIZED`` and ``CENTRED`` hold ``(..., 2, 3)``
    matrices, ``PIXEL`` ``(..., 3, 3)``.

    >>> Frame.PIXEL.rows, Frame("centred") is Frame.CENTRED
    (3, True)
    """

    NORMALIZED = "normalized"
    CENTRED = "centred"
    PIXEL = "pixel"

    @property
    def rows(self) -> int:
        """Rows of this frame's matrices: 3 for pixel tmats, 2 otherwise."""
        return 3 if self is Frame.PIXEL else 2


def _is_tensor(m: Any) -> bool:
    return type(m).__module__.split(".")[0] == "torch"


def homogeneous(a: Any) -> Any:
    """``(..., 2, 3)`` to ``(..., 3, 3)`` by appending ``[0, 0, 1]`` (a torch tensor or a numpy array, as given).

    >>> homogeneous(np.zeros((2, 3)))[2].tolist()
    [0.0, 0.0, 1.0]
    """
    if not _is_tensor(a):
        a = np.asarray(a)
        return np.concatenate([a, np.broadcast_to(np.array([0, 0, 1.0], dtype=a.dtype), (*a.shape[:-2], 1, 3))], -2)
    import torch

    last = torch.zeros(*a.shape[:-2], 1, 3, dtype=a.dtype, device=a.device)
    last[..., 0, 2] = 1
    return torch.cat([a, last], -2)


@dataclass(frozen=True, eq=False)
class Affine:
    """Affine matrices ``matrix`` (``(..., 2, 3)``, or ``(..., 3, 3)`` in the pixel frame; a numpy array, anything
    numpy reads, or a torch tensor) in ``frame`` for slices of ``shape`` ``(H, W)``. :meth:`to` converts (the result
    as the input: numpy float64 or a tensor of its dtype and device), :meth:`is_identity` tests.

    A shift of 0.1 normalized units is 10 px on a 200 px wide slice in the centred and pixel frames alike:

    >>> a = Affine([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]], Frame.NORMALIZED, (100, 200))
    >>> a.to(Frame.PIXEL).matrix.tolist()
    [[1.0, 0.0, 10.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    >>> bool(np.allclose(a.to(Frame.PIXEL).to(Frame.NORMALIZED).matrix, a.matrix)), a.is_identity(), a.is_identity(tol=0.1)
    (True, False, True)
    >>> import torch
    >>> t = Affine(torch.tensor([[[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]]], dtype=torch.float64), Frame.NORMALIZED, (100, 200))
    >>> t.to(Frame.CENTRED).matrix[0, 0].tolist(), t.to(Frame.PIXEL).matrix.shape
    ([1.0, 0.0, 10.0], torch.Size([1, 3, 3]))
    """

    matrix: Any
    frame: Frame
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        m = self.matrix if _is_tensor(self.matrix) or isinstance(self.matrix, np.ndarray) else \
            np.asarray(self.matrix, dtype=np.float64)
        if tuple(m.shape[-2:]) != (self.frame.rows, 3):
            raise ValueError(f"a {self.frame.value} matrix is (..., {self.frame.rows}, 3), not {tuple(m.shape)}")
        object.__setattr__(self, "matrix", m)
        object.__setattr__(self, "frame", Frame(self.frame))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    def to(self, frame: Frame) -> Affine:
        """The same transforms in ``frame``."""
        frame = Frame(frame)
        if frame is self.frame:
            return self
        convert = _torch_convert if _is_tensor(self.matrix) else _numpy_convert
        return Affine(convert(self.matrix, self.frame, frame, self.shape), frame, self.shape)

    def is_identity(self, tol: float = 0.0) -> bool:
        """Whether every matrix is the identity: exactly (``tol`` 0), or to ``tol`` in every entry."""
        m = self.matrix
        if _is_tensor(m):
            import torch

            eye = torch.eye(3, dtype=m.dtype, device=m.device)[:self.frame.rows].expand_as(m)
            return bool(torch.equal(m, eye)) if tol == 0 else bool(m.numel() == 0 or (m - eye).abs().max() <= tol)
        eye = np.broadcast_to(np.eye(3)[:self.frame.rows], m.shape)
        return bool(np.array_equal(m, eye)) if tol == 0 else bool(m.size == 0 or np.abs(m - eye).max() <= tol)


def _numpy_convert(m: np.ndarray, src: Frame, dst: Frame, shape: tuple[int, int]) -> np.ndarray:
    """The numpy conversions: normalized <-> centred by scaling the entries, to and from pixels by conjugation."""
    h, w = shape
    if {src, dst} == {Frame.NORMALIZED, Frame.CENTRED}:
        d = np.array([2.0 / w, 2.0 / h])
        out = np.array(m, dtype=np.float64, copy=True)
        if dst is Frame.CENTRED:
            out[..., :2] = out[..., :2] * d[None, :] / d[:, None]  # D^-1 L D
            out[..., 2] = out[..., 2] / d
        else:
            out[..., :2] = out[..., :2] * d[:, None] / d[None, :]
            out[..., 2] = out[..., 2] * d
        return out
    cx, cy = pixel_centre(shape)
    # pixel = g @ [x, y, 1] of the other frame
    g = np.array([[w / 2, 0, cx], [0, h / 2, cy], [0, 0, 1.0]]) if Frame.NORMALIZED in (src, dst) else \
        np.array([[1.0, 0, cx], [0, 1.0, cy], [0, 0, 1.0]])
    m = np.asarray(m, dtype=np.float64)
    if dst is Frame.PIXEL:
        return g @ homogeneous(m) @ np.linalg.inv(g)
    return (np.linalg.inv(g) @ m @ g)[..., :2, :]


def _torch_convert(m: Any, src: Frame, dst: Frame, shape: tuple[int, int]) -> Any:
    """The torch conversions, in closed form (the fit converts small batches at every step): normalized <-> centred by
    ``D = diag(2/W, 2/H)`` (``D^-1 L D`` and ``D^-1 t``, entry by entry), centred <-> pixel by the shift ``c`` to the
    pixel centre (the linear part kept, ``t' = t + c - L c`` and back), normalized <-> pixel through the centred
    frame."""
    import torch

    h, w = shape
    if Frame.PIXEL in (src, dst):
        c = torch.tensor(pixel_centre(shape), dtype=m.dtype, device=m.device)
        if src is Frame.PIXEL:
            lin = m[..., :2, :2]
            centred = torch.cat([lin, (m[..., :2, 2] + (lin @ c.unsqueeze(-1)).squeeze(-1) - c).unsqueeze(-1)], -1)
            return centred if dst is Frame.CENTRED else _torch_convert(centred, Frame.CENTRED, dst, shape)
        centred = m if src is Frame.CENTRED else _torch_convert(m, src, Frame.CENTRED, shape)
        lin = centred[..., :2]
        t = centred[..., 2] + c - (lin @ c.unsqueeze(-1)).squeeze(-1)
        return homogeneous(torch.cat([lin, t.unsqueeze(-1)], -1))
    dx, dy = 2.0 / w, 2.0 / h
    if dst is Frame.CENTRED:  # [[1, dy/dx, 1/dx], [dx/dy, 1, 1/dy]]
        scale = [[1.0, dy / dx, 1.0 / dx], [dx / dy, 1.0, 1.0 / dy]]
    else:
        scale = [[1.0, dx / dy, dx], [dy / dx, 1.0, dy]]
    return m * torch.tensor(scale, dtype=m.dtype, device=m.device)


def to_centered(theta: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(..., 2, 3)`` normalized matrices to centred-pixel ones, float64: ``Affine(theta, NORMALIZED, shape)`` in
    :attr:`Frame.CENTRED` (numpy).

    >>> to_centered([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]], (100, 200))[0].tolist()
    [1.0, 0.0, 10.0]
    """
    return Affine(np.asarray(theta), Frame.NORMALIZED, shape).to(Frame.CENTRED).matrix


def to_normalized(a: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(..., 2, 3)`` centred-pixel matrices to normalized ones, float64 (numpy; the inverse of :func:`to_centered`).

    >>> to_normalized([[1.0, 0.0, 10.0], [0.0, 1.0, 0.0]], (100, 200))[0].tolist()
    [1.0, 0.0, 0.1]
    """
    return Affine(np.asarray(a), Frame.CENTRED, shape).to(Frame.NORMALIZED).matrix


def composed_of_all(attrs: Any) -> np.ndarray:
    """``(Z, 2, 3)`` normalized transforms of every slice of a registration's output attributes: slice 0's (the
    identity, unless the output takes another slice's frame) and ``composed_transforms`` (slices 1..).

    >>> composed_of_all({"composed_transforms": [[[1, 0, 0.1], [0, 1, 0]]]})[:, 0, 2].tolist()
    [0.0, 0.1]
    """
    rest = np.asarray(attrs["composed_transforms"], dtype=np.float64).reshape(-1, 2, 3)
    first = np.asarray(attrs.get(FIRST_KEY, np.eye(3)[:2]), dtype=np.float64).reshape(1, 2, 3)
    return np.concatenate([first, rest])


def pixel_matrices(composed: np.ndarray | list, shape: tuple[int, int], first: np.ndarray | None = None) -> np.ndarray:
    """``(Z - 1, 2, 3)`` normalized composed transforms (slices 1..) to ``(Z, 3, 3)`` pixel tmats (slice 0 = I, or
    ``first``: slice 0's normalized transform where the output takes another slice's frame; see the module's example).
    numpy only: ``sphero export`` needs no torch."""
    comp = np.asarray(composed, dtype=np.float64).reshape(-1, 2, 3)
    if first is not None and Affine(np.asarray(first, dtype=np.float64).reshape(2, 3), Frame.NORMALIZED, shape).is_identity():
        first = None  # the output's own frame: slice 0 exactly the identity, as always
    if first is not None:
        comp = np.concatenate([np.asarray(first, dtype=np.float64).reshape(1, 2, 3), comp])
    px = Affine(comp, Frame.NORMALIZED, shape).to(Frame.PIXEL).matrix
    return px if first is not None else np.concatenate([np.eye(3)[None], px])


def decompose(m: np.ndarray, shape: tuple[int, int]) -> dict[str, float]:
    """Centre displacement, rotation, scale and shear of one ``(3, 3)`` pixel matrix (see the module's example).

    ``A = R(rotation) @ [[scale_x, shear * scale_y], [0, scale_y]]``; the displacement is where the slice
    centre is sampled minus the centre.
    """
    c = np.array([*pixel_centre(shape), 1.0])
    d = m @ c - c
    a = m[:2, :2]
    rot = math.atan2(a[1, 0], a[0, 0])
    r = np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])  # R^T
    u = r @ a
    return {"dx_px": float(d[0]), "dy_px": float(d[1]), "rotation_deg": math.degrees(rot),
            "scale_x": float(u[0, 0]), "scale_y": float(u[1, 1]), "shear": float(u[0, 1] / u[1, 1])}


def fill_between(known: dict[int, np.ndarray], n: int, default: np.ndarray) -> np.ndarray:
    """``(n, ...)``: ``known[z]`` where given; elsewhere interpolated entry-wise between the nearest known slices on
    either side (by slice position), or the nearest one's at either end (``default`` where none is known).

    >>> fill_between({0: np.zeros(1), 2: np.ones(1)}, 4, np.zeros(1))[:, 0].tolist()
    [0.0, 0.5, 1.0, 1.0]
    """
    order = sorted(known)
    out = np.zeros((n, *np.shape(default)))
    for z in range(n):
        if z in known:
            out[z] = known[z]
            continue
        before = [g for g in order if g < z]
        after = [g for g in order if g > z]
        if before and after:
            lo, hi = before[-1], after[0]
            t = (z - lo) / (hi - lo)
            out[z] = (1 - t) * known[lo] + t * known[hi]
        else:
            out[z] = known[before[-1]] if before else (known[after[0]] if after else default)
    return out
