"""What the loss leaves out, and patterns that do not move with the sample.

A mask is given per slice, in that slice's own pixel grid (1 = use, 0 = leave out): where a pixel of the fixed slice is
masked, or the warped moving slice samples a masked pixel of its own slice, the pair's loss does not count it. So a
mask fixed in the detector frame (the same mask for every slice: a dark frame, detector dirt) and one that moves with
the sample (zero padding of slices shifted earlier, labels painted per slice) are handled alike; the moving slice's
mask is warped with it.

Slices travel to the device compactly (:func:`to_tensor`) and are normalized there. The images the loss sees are blurred and B-spline-interpolated, so a masked pixel's value reaches a few pixels
around it: :func:`level_mask` erodes each level's mask by that reach. Curtaining (stripes along the milling
direction, the same in every slice) is taken out of the images the loss sees by :func:`destripe`, never out of the
output. :func:`static_patterns` looks for what is identical across slices and names the option that handles it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .frames import normalized_coords
from .interpolation import downscale
from .settings import Destripe, StaticMode

#: Pixels of each level a mask is eroded by beyond the smoothing's reach (the B-spline prefilter's tail).
MARGIN = 2
def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    """Binary erosion of ``(N, 1, h, w)`` by a ``(2r + 1)`` square; the image border counts as inside."""
    return m if r <= 0 else -F.max_pool2d(-m, 2 * r + 1, stride=1, padding=r)


def level_mask(mask: torch.Tensor, factor: float, smoothing: float) -> torch.Tensor:
    """The mask of one pyramid level: ``mask`` (``(N, 1, H, W)`` floats in [0, 1], at the block's resolution)
    downscaled by ``factor``, a pixel kept only where every pixel it is made of is, then eroded by the reach of the
    level's smoothing and interpolation (``3 smoothing + MARGIN`` pixels of the level)."""
    m = (downscale(mask, factor) > 0.999).to(mask.dtype)
    return _erode(m, math.ceil(3 * smoothing) + MARGIN)


def loss_images(slices: Iterable[torch.Tensor], factor: float, masks: torch.Tensor | None, direction: Destripe
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's slices as the loss sees them, and their masks: ``slices`` (``(1, 1, H, W)`` each, grey values
    normalized to the stack's range [0, 1]) downscaled by ``factor`` one at a time (a large slice never exists twice
    as floats) and destriped (:func:`destripe`); ``masks``: ``(N, H, W)`` (1 = use) or None.

    Returned masks: ``(N, 2, h, w)``, channel 0 the given masks (eroded per level by :func:`level_mask`), channel 1
    a soft weight: with ``direction``, pixels at 0 or 1 (clipped by the detector; a strong stripe saturates) count
    as the fraction of the level's pixel that is not clipped, so they neither form a static pattern of their own nor
    cost their neighbours (scattered over a slice, erosion would leave nothing). None without either."""
    imgs, hard, soft = [], [], []
    for k, s in enumerate(slices):
        imgs.append(downscale(s, factor))
        hard.append(downscale(masks[k][None, None].float(), factor) if masks is not None else None)
        if direction != "none":
            soft.append(downscale(((s > 0) & (s < 1)).float(), factor))
    images = torch.cat(imgs)
    if masks is None and not soft:
        return images, None
    ones = torch.ones_like(images)
    block = torch.cat([torch.cat(hard) if masks is not None else ones, torch.cat(soft) if soft else ones], 1)
    if direction != "none":
        images = destripe(images, direction, (block[:, :1] > 0.999).float())
    return images, block


def block_images(slices: Iterable[torch.Tensor], offset: Any, scale: Any, factor: float, masks: torch.Tensor | None,
                 direction: Destripe) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`loss_images` of a block's slices as read (``(H, W)`` each, from :func:`to_tensor`: compact values with
    their ``offset`` and ``scale``): grey values to about [0, 1] by the stack's own range, one slice at a time."""
    offset, scale = torch.as_tensor(offset).float(), torch.as_tensor(scale).float()
    return loss_images(((s[None, None].float() - offset) / scale for s in slices), factor, masks, direction)


def pair_masks(block_masks: torch.Tensor | None, factor: float, smoothing: float, fixed: torch.Tensor,
               moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One level's masks of a block's slices ``block_masks`` (:func:`loss_images`; None: no masks), as
    ``(fixed_masks, moving_masks)`` (``(P, 1, h, w)``) of the pairs whose slices sit at positions ``fixed`` and
    ``moving``: the given masks by :func:`level_mask` times the soft weight downscaled."""
    if block_masks is None:
        return None
    m = level_mask(block_masks[:, :1], factor, smoothing) * downscale(block_masks[:, 1:], factor)
    return m[fixed], m[moving]


def kept_fraction(p: torch.Tensor, fixed: torch.Tensor, coeffs: torch.Tensor,
                  masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(B,)`` the fraction of each fixed slice its mask leaves to the loss (1 without masks); the signature of the
    objective's per-pair functions, so the module evaluates it like them."""
    if masks is None:
        return torch.ones(len(fixed), dtype=torch.float64, device=fixed.device)
    return masks[0].mean((1, 2, 3)).double()


def sample_mask(mask: torch.Tensor, px: torch.Tensor, py: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear value and x, y derivatives of ``mask`` (``(B, h, w)``) at pixel positions ``px, py`` (``(B, r, c)``),
    the border replicated (outside the slice the inside weight decides). Piecewise linear, so the derivatives are
    exact where they exist; they are nonzero only on the mask's one-pixel boundary."""
    b, h, w = mask.shape
    x0f, y0f = torch.floor(px), torch.floor(py)
    fx, fy = px - x0f, py - y0f
    x0 = x0f.long().clamp_(0, w - 1)
    y0 = y0f.long().clamp_(0, h - 1)
    x1 = (x0f.long() + 1).clamp_(0, w - 1)
    y1 = (y0f.long() + 1).clamp_(0, h - 1)
    flat = mask.reshape(b, h * w)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, (yy * w + xx).reshape(b, -1)).view_as(px)

    m00, m01, m10, m11 = at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)
    top, bottom = torch.lerp(m00, m01, fx), torch.lerp(m10, m11, fx)
    value = torch.lerp(top, bottom, fy)
    dx = torch.lerp(m01 - m00, m11 - m10, fy)
    dy = bottom - top
    return value, dx, dy


def sample_mask_autograd(mask: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """:func:`sample_mask`'s value through ``grid_sample`` (differentiable in the positions, for the autograd losses)."""
    h, w = mask.shape[-2:]
    grid = torch.stack([normalized_coords(px, w), normalized_coords(py, h)], -1).to(mask.dtype)
    return F.grid_sample(mask.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def destripe(images: torch.Tensor, direction: Destripe, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``images`` (``(N, 1, h, w)``) without their stripes: ``vertical`` subtracts each column's mean (over the pixels
    the mask keeps) less the slice's mean, ``horizontal`` each row's, ``both`` both. Curtaining adds a constant to
    each column of the detector frame; this removes it exactly, along with the content's own column means (which
    move with the content, so they do not pull a pair towards the identity).

    >>> img = torch.arange(12.0).view(1, 1, 3, 4) % 4 * 10 + torch.tensor([0.0, 1, 2]).view(1, 1, 3, 1)
    >>> destripe(img, "vertical")[0, 0].tolist()  # columns 0, 10, 20, 30 apart: only the rows' change is left
    [[15.0, 15.0, 15.0, 15.0], [16.0, 16.0, 16.0, 16.0], [17.0, 17.0, 17.0, 17.0]]
    """
    if direction == "none":
        return images
    out = images
    w = mask if mask is not None else torch.ones_like(images)
    for axis, on in ((-2, direction in ("vertical", "both")), (-1, direction in ("horizontal", "both"))):
        if not on:
            continue
        ws = w.sum(axis, keepdim=True)
        prof = (out * w).sum(axis, keepdim=True) / ws.clamp_min(1e-6)
        total = (out * w).sum((-2, -1), keepdim=True) / w.sum((-2, -1), keepdim=True).clamp_min(1e-6)
        # lines the mask leaves out entirely keep their values (they are not counted anyway)
        out = out - torch.where(ws > 0, prof - total, torch.zeros_like(prof))
    return out


@dataclass
class StaticPatterns:
    """What is identical at the same place in every slice of a sample of the stack (:func:`find_static_patterns`).

    Attributes
    ----------
    region : ``(h, w)`` bool or None
        At the sample's resolution: the pixels that hold one grey value ``value`` in every sampled slice (a dark frame,
        a band, padding, detector dirt), where they cover ``fraction`` (> 1 %) of the slice.
    stripes : tuple of str
        ``"vertical"`` / ``"horizontal"``: line profiles at the same place in every slice (curtaining), each with its
        correlation between the first and last slice sampled in ``correlation``.
    """

    region: np.ndarray | None = None
    value: float | None = None
    fraction: float = 0.0
    stripes: tuple[str, ...] = ()
    correlation: dict[str, float] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.region is not None or bool(self.stripes)

    @property
    def shown_value(self) -> float | int | None:
        v = self.value
        return None if v is None else int(v) if float(v).is_integer() else float(v)

    def describe(self) -> list[str]:
        """One phrase per pattern."""
        out = []
        if self.region is not None:
            out.append(f"{100 * self.fraction:.0f} % of every slice is the value {self.shown_value} at the same place "
                       "(a static frame, band or padding)")
        out += [f"{d} stripes at the same place in every slice (curtaining or a detector pattern, correlation "
                f"{self.correlation[d]:.2f} between the first and last slice sampled)" for d in self.stripes]
        return out

    def lines(self, mode: StaticMode) -> list[str]:
        """What a run says of them: left out (one line), or kept (a warning per pattern naming its option)."""
        what = self.describe()
        if not what:
            return []
        if mode == "leave_out":
            return [(f"left out of the loss, fixed in every slice (it would pull pairs towards the identity): {'; '.join(what)}; "
                     "--data.static_patterns keep uses it")]
        return [f"warning: {w}: it pulls pairs towards the identity; pass {o} (or --data.static_patterns leave_out)"
                for w, o in zip(what, self.options(), strict=True)]

    def record(self, mode: StaticMode) -> dict[str, object] | None:
        """What the output's record says of them (None where nothing was found)."""
        if not self.found:
            return None
        return {"left_out": mode == "leave_out", "found": self.describe(),
                **({"value": self.shown_value, "fraction": round(self.fraction, 4)} if self.region is not None else {}),
                **({"stripes": list(self.stripes)} if self.stripes else {})}

    def mask(self, step: int, shape: tuple[int, int]) -> np.ndarray | None:
        """``(Y, X)`` uint8 (1 = use) at full resolution, 0 over the static region found on a sample taken every
        ``step`` px (each sampled pixel stands for a ``step`` square; widened by a pixel so none is missed)."""
        if self.region is None:
            return None
        region = self.region
        if step > 1:
            h, w = shape
            region = np.repeat(np.repeat(region, step, 0), step, 1)[:h, :w]
            region = region | np.roll(region, 1, 0) | np.roll(region, -1, 0) | np.roll(region, 1, 1) | np.roll(region, -1, 1)
        return (~region).astype(np.uint8)

    def options(self) -> list[str]:
        """The options that handle each pattern by hand, in the order of :meth:`describe`."""
        return ([f"--data.ignore_value {self.shown_value}"] if self.region is not None else []) + \
            [f"--data.destripe {d}" for d in self.stripes]


def find_static_patterns(slices: np.ndarray, ignore_value: float | None, destriped: str) -> StaticPatterns:
    """What is identical across ``slices`` (``(n, H, W)``, a sample of the stack, n >= 3) at the same place: a value
    covering the same pixels of every slice (a dark frame, padding, detector dirt) and stripes along columns or rows
    (curtaining). Content moves from slice to slice; these do not, so in the loss they only pull pairs towards the
    identity. ``ignore_value`` (already left out) is not looked for; nor are stripes along ``destriped``."""
    n = len(slices)
    found = StaticPatterns()
    if n < 3:
        return found
    # in float64 less the median, so that grey values around 1e9 or 1e12 keep their differences (in float32 at 1e9
    # neighbouring values 64 apart look the same)
    s = slices.astype(np.float64)
    finite = np.isfinite(s)
    if not finite.all():  # NaN or inf patches: a grey of the slices' own (equal in every slice only where all are)
        s = np.where(finite, s, np.median(s[finite]) if finite.any() else 0.0)
    same = (s == s[:1]).all(0)
    if ignore_value is None and same.mean() > 0.01:
        values, counts = np.unique(s[0][same], return_counts=True)
        v = values[counts.argmax()]
        frac = counts.max() / same.size
        if frac > 0.01:
            found.region, found.value, found.fraction = same & (s[0] == v), float(v), float(frac)
    s -= np.median(s)
    keep = ~same  # a static frame would itself look like a stripe
    # stripes are told from content only where the content changed between the first and last slice sampled (a few
    # consecutive FIB-SEM slices 5 nm apart look alike, stripes or not): their correlation without line means
    ends = s[[0, -1]]
    use = keep & (ends > s.min()).all(0) & (ends < s.max()).all(0)  # clipped pixels of a strong stripe stay put too
    ends = (ends - ends.mean(1, keepdims=True) - ends.mean(2, keepdims=True)) * use
    ends = (ends - ends.sum((1, 2), keepdims=True) / max(use.sum(), 1)) * use
    if (ends[0] * ends[1]).sum() / (np.linalg.norm(ends[0]) * np.linalg.norm(ends[1]) + 1e-9) > 0.3:
        return found
    stripes = []
    for axis, name in ((1, "vertical"), (2, "horizontal")):
        if destriped in (name, "both"):
            continue
        cover = keep.sum(axis - 1)
        prof = (s * keep).sum(axis) / np.maximum(cover, 1)  # (n, W) column means for vertical stripes
        prof = np.where(cover > 0, prof, prof.mean(1, keepdims=True))
        hp = prof - _smooth(prof, 8.0)
        hp = hp - hp.mean(1, keepdims=True)
        norm = np.linalg.norm(hp, axis=1) + 1e-9
        c = (hp[:-1] * hp[1:]).sum(1) / (norm[:-1] * norm[1:])
        # static stripes correlate from slice to slice at any distance, best where they are (lag 0); content's
        # profiles only while it overlaps, best where it moved to
        lags = [(hp[0][max(0, d):len(hp[0]) + min(0, d)] * hp[-1][max(0, -d):len(hp[0]) - max(0, d)]).sum()
                for d in range(-8, 9)]
        far = lags[8] / (norm[0] * norm[-1])
        if np.median(c) > 0.5 and far > 0.5 and lags[8] >= max(lags):
            stripes.append(name)
            found.correlation[name] = float(far)
    found.stripes = tuple(stripes)
    return found


def static_patterns(slices: np.ndarray, ignore_value: float | None, destriped: str) -> list[str]:
    """:func:`find_static_patterns` as one line of advice per pattern, naming the option that handles it."""
    found = find_static_patterns(slices, ignore_value, destriped)
    return [f"{what}: it pulls pairs towards the identity; pass {option}"
            for what, option in zip(found.describe(), found.options(), strict=True)]


def combined_destripe(given: str, found: Iterable[str]) -> Destripe:
    """The destripe direction that covers ``given`` (an option's value) and the directions ``found``."""
    dirs = {"vertical": {"vertical"}, "horizontal": {"horizontal"}, "both": {"vertical", "horizontal"}}.get(given, set())
    dirs |= set(found)
    return "both" if len(dirs) == 2 else next(iter(dirs)) if dirs else "none"


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``(n, L)`` along its last axis (reflected ends)."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    xp = np.pad(x, ((0, 0), (r, r)), mode="reflect")
    return np.stack([np.convolve(row, k, mode="valid") for row in xp])


#: Integer types whose every value float32 holds exactly (sent as they are; normalized on the device).
_COMPACT = (np.uint8, np.int8, np.uint16, np.int16)


def to_tensor(block: np.ndarray, low: float, high: float) -> tuple[torch.Tensor, float, float]:
    """A compact tensor for transfer and ``(offset, scale)`` with ``(t - offset) / scale`` in about ``[0, 1]``.

    The range is the stack's own grey-value range (not the dtype's): an int32 stack holding 12-bit data, or
    floats around 1e-3 or 1e9, register exactly like uint8. 8- and 16-bit integers travel as they are; wider
    integers and floats are normalized here in float64 (an offset of 1e12 leaves their variation intact); NaN and inf
    become 0.5 (the masks of :func:`~sphero_lightning.storage.slices.slice_masks` leave them out of the loss).
    """
    scale = (high - low) if high > low else 1.0
    if block.dtype.type in _COMPACT:
        return torch.from_numpy(np.ascontiguousarray(block)), float(low), float(scale)
    out = ((block.astype(np.float64) - low) / scale).astype(np.float32)
    if np.issubdtype(block.dtype, np.floating):  # NaN and inf (left out of the loss by the masks): a grey in between
        out = np.nan_to_num(out, nan=0.5, posinf=0.5, neginf=0.5)
    return torch.from_numpy(out), 0.0, 1.0
