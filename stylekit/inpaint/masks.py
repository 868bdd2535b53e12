"""Mask geometry: thresholding, growing, feathering, the crop around the mask, and the final composite.

Masks are HxW arrays: float32 grey values in [0, 1] as loaded, bool once binarised, float32 alpha once
feathered. Boxes are ``(x0, y0, x1, y1)`` with exclusive ends, as Pillow's ``crop`` takes them; sizes are
``(width, height)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stylekit.errors import UsageError

Box = tuple[int, int, int, int]
Size = tuple[int, int]

# A context factor above this is almost certainly meant as pixels ("64" for "64px").
MAX_CONTEXT_FACTOR = 4.0
_PX = re.compile(r"^\s*(\d+)\s*px\s*$", re.IGNORECASE)
# Below this bilinear coverage a model-space mask pixel is off; low, so that the region the model regenerates
# is never smaller than the region the composite pastes (a thin stroke must not vanish when downscaled).
_MODEL_MASK_COVERAGE = 1e-3


def binarize(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """True where the mask is at least ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"inpaint.mask.threshold={threshold} must be in (0, 1]; 0.5 suits black/white masks")
    return np.asarray(mask) >= threshold


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """Dilate (``px`` > 0) or erode (``px`` < 0) by a disc of radius ``|px|``: exact, O(pixels) for any px.

    The image border is not a mask edge: a mask touching it is not eroded from that side.
    """
    mask = np.asarray(mask, dtype=bool)
    px = int(px)
    if px == 0 or not mask.any():
        return mask.copy()
    if px > 0:
        # Only pixels within px of the mask's box can change.
        return _in_window(mask, _pad_box(bbox(mask), px, mask.shape), lambda m: _dilate(m, px))
    # Erosion is dilation of the outside; a 1 px ring of outside around the mask's box is enough outside,
    # because any outside pixel beyond it has a closer one on the ring.
    window = _pad_box(bbox(mask), 1, mask.shape)
    return _in_window(mask, window, lambda m: ~_dilate(~m, -px), fill=False)


def feather(mask: np.ndarray, px: int) -> np.ndarray:
    """Float32 alpha that ramps up inward from the mask's edge over ``px`` pixels, or over the local half-width
    where the mask is thinner than that.

    Exactly 0 outside the mask, so a feathered composite never reaches past it. A pixel at depth d (distance
    to the nearest outside pixel) gets (d - 0.5) / px where the mask is wide, and (d - 0.5) / max(t - 1.5,
    0.5) where it is thin; t is the half-width of the thickest part of the mask within reach: the largest
    whole r <= px + 1 such that some pixel at depth >= r lies within r - 1 of it (wide: t > px). So a wide
    region gets the plain ramp (1 from more than px + 0.5 deep), and the centre line of a stroke thinner than
    2 * px still reaches exactly 1: a 4 px wire is edited in full, not at 19%. The image border is not an
    edge. ``px`` = 0 gives the mask as 0/1.
    """
    mask = np.asarray(mask, dtype=bool)
    px = int(px)
    if px < 0:
        raise UsageError(f"inpaint.mask.feather={px} must be >= 0 (pixels of inward soft edge)")
    if px == 0 or not mask.any():
        return mask.astype(np.float32)
    x0, y0, x1, y1 = _pad_box(bbox(mask), 1, mask.shape)
    dist = _distance_to_outside(mask[y0:y1, x0:x1], cap=px + 1)
    half = _half_width(dist, px + 1)
    # Wide (a pixel px + 1 deep within px): the plain ramp. Thin: one and a half pixels less than the
    # half-width, since the depths along a slanted stroke's centre line vary by up to a pixel.
    ramp = np.where(half > px, px, np.clip(half - 1.5, 0.5, px))
    alpha = np.zeros(mask.shape, np.float32)
    alpha[y0:y1, x0:x1] = np.clip((dist - 0.5) / ramp, 0.0, 1.0)
    alpha[~mask] = 0.0
    return alpha


def _half_width(dist: np.ndarray, levels: int, tile: int = 256) -> np.ndarray:
    """Per pixel, the largest r in 1..levels with a pixel at depth >= r within r - 1 of it (0 outside).

    The top level (a wide region) is one dilation of the whole array; the pixels it misses (thin parts and
    corners) are settled level by level in the tiles that hold them, so a large mask costs about one dilation.
    """
    width = np.zeros(dist.shape, np.float32)
    todo = dist > 0
    _settle(dist, width, todo, (0, 0, dist.shape[1], dist.shape[0]), levels, levels)
    for y in range(0, dist.shape[0], tile):
        for x in range(0, dist.shape[1], tile):
            if todo[y : y + tile, x : x + tile].any():
                _settle(dist, width, todo, (x, y, x + tile, y + tile), levels - 1, 1)
    return width


def _settle(dist: np.ndarray, width: np.ndarray, todo: np.ndarray, box: Box, top: int, bottom: int) -> None:
    """Levels ``top`` down to ``bottom`` of ``_half_width`` for the undecided pixels in ``box``."""
    x0, y0, x1, y1 = box
    for r in range(top, bottom - 1, -1):
        # Depths within r - 1 of the box decide its pixels at level r.
        px0, py0, px1, py1 = _pad_box(box, r - 1, dist.shape)
        deep = dist[py0:py1, px0:px1] >= r
        if not deep.any():
            continue
        reached = (_dilate(deep, r - 1) if r > 1 else deep)[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
        reached &= todo[y0:y1, x0:x1]
        width[y0:y1, x0:x1][reached] = r
        todo[y0:y1, x0:x1] &= ~reached


def bbox(mask: np.ndarray, source: str | Path | None = None) -> Box:
    """The smallest box holding every True pixel; an empty mask is an error that names ``source``."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        name = f"mask {source}" if source is not None else "the mask"
        raise UsageError(
            f"{name} selects no pixels (after inpaint.mask.threshold and inpaint.mask.grow); "
            "paint the region to edit in white"
        )
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def parse_context(context: float | int | str) -> tuple[str, float]:
    """``inpaint.context`` as ("factor", f) for a number, or ("px", n) for a string like "64px"."""
    if isinstance(context, bool):
        raise UsageError(f"inpaint.context={context} must be a factor like 0.5 or pixels like 64px")
    if isinstance(context, str):
        match = _PX.match(context)
        if match:
            return "px", float(match.group(1))
        try:
            context = float(context)
        except ValueError:
            raise UsageError(
                f"inpaint.context={context!r} must be a factor like 0.5 or pixels like 64px"
            ) from None
    factor = float(context)
    if not math.isfinite(factor) or factor < 0.0:
        raise UsageError(f"inpaint.context={context} must be >= 0: a factor like 0.5 or pixels like 64px")
    if factor > MAX_CONTEXT_FACTOR:
        raise UsageError(
            f"inpaint.context={context} is a factor of the mask's box and must be at most "
            f"{MAX_CONTEXT_FACTOR:g}; for pixels write inpaint.context={int(factor)}px"
        )
    return "factor", factor


def crop_box(
    box: Box,
    image_size: Size,
    context: float | int | str,
    multiple: int = 8,
    *,
    min_side: int = 0,
    max_aspect: float = 4.0,
) -> Box:
    """The region to edit around the mask's ``box``, inside the image.

    ``context`` (see ``parse_context``) is added on each side: a factor of the box's width horizontally and
    of its height vertically, or a number of pixels. Sides are then raised to ``min_side``, the short side
    raised until the aspect is at most ``max_aspect`` (models handle extreme strips badly), and both rounded
    up to ``multiple``. The crop is centred on the box and shifted, not cut, where it would leave the image,
    so the context lost at one edge is gained at the other; only a crop larger than the image is clamped.
    """
    kind, amount = parse_context(context)
    bx0, by0, bx1, by1 = box
    img_w, img_h = image_size
    box_w, box_h = bx1 - bx0, by1 - by0
    pad_x, pad_y = (amount, amount) if kind == "px" else (amount * box_w, amount * box_h)
    width = max(box_w + 2 * math.ceil(pad_x), min_side)
    height = max(box_h + 2 * math.ceil(pad_y), min_side)
    width, height = max(width, math.ceil(height / max_aspect)), max(height, math.ceil(width / max_aspect))
    width = min(_round_up(width, multiple), img_w)
    height = min(_round_up(height, multiple), img_h)
    x0 = min(max(bx0 - (width - box_w + 1) // 2, 0), img_w - width)
    y0 = min(max(by0 - (height - box_h + 1) // 2, 0), img_h - height)
    return x0, y0, x0 + width, y0 + height


def native_size(crop_w: int, crop_h: int, target_area: int, multiple: int) -> Size:
    """The (width, height) the model runs at: the crop's aspect scaled to about ``target_area`` pixels.

    Scaling goes up as well as down, so a small region of a large photo is edited at full model resolution.
    Sides are rounded to ``multiple`` (the model's latent granularity) and are at least ``multiple``.
    """
    if crop_w <= 0 or crop_h <= 0 or target_area <= 0 or multiple <= 0:
        raise ValueError(
            f"native_size needs positive sizes, got {crop_w}x{crop_h}, {target_area}, {multiple}"
        )
    scale = math.sqrt(target_area / (crop_w * crop_h))
    return _round_to(crop_w * scale, multiple), _round_to(crop_h * scale, multiple)


def min_crop_side(target_area: int, max_upscale: float) -> int:
    """The smallest crop side that ``target_area`` pixels enlarge by at most ``max_upscale`` per side."""
    return math.ceil(math.sqrt(target_area) / max_upscale)


@dataclass(frozen=True)
class CropPlan:
    """Where the edit happens: ``box`` in the full image, and the ``native_size`` the model sees it at."""

    box: Box
    native_size: Size

    @property
    def crop_size(self) -> Size:
        x0, y0, x1, y1 = self.box
        return x1 - x0, y1 - y0


def plan_crop(
    mask: np.ndarray,
    context: float | int | str,
    target_area: int,
    multiple: int,
    *,
    source: str | Path | None = None,
    min_side: int = 0,
    max_aspect: float = 4.0,
    size_rule: Callable[[int, int], Size] | None = None,
) -> CropPlan:
    """``crop_box`` around a binary full-image mask plus its ``native_size``; ``source`` names the mask file.

    ``size_rule(crop_w, crop_h)`` replaces ``native_size`` for families whose pipelines insist on their own
    sizes (``ModelFamily.native_size``).
    """
    height, width = mask.shape
    box = crop_box(
        bbox(mask, source), (width, height), context, multiple, min_side=min_side, max_aspect=max_aspect
    )
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    size = size_rule(crop_w, crop_h) if size_rule else native_size(crop_w, crop_h, target_area, multiple)
    return CropPlan(box, size)


def cover_cells(mask: np.ndarray, cell: int) -> np.ndarray:
    """The bool mask grown to whole ``cell`` x ``cell`` blocks (from the top-left): a block is on when any of
    its pixels is.

    Pipelines shrink the mask to latent cells by nearest sampling, which can miss a thin stroke entirely or
    shift a box edge by up to ``cell`` - 1 px; given whole blocks, any sample of a block is the max-pool.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), bool)
    padded[:height, :width] = mask
    blocks = padded.reshape(rows, cell, cols, cell).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, cell, axis=0), cell, axis=1)[:height, :width]


def crop_array(array: np.ndarray, box: Box) -> np.ndarray:
    """The ``box`` region of an HxW or HxWxC array (a copy)."""
    x0, y0, x1, y1 = box
    return np.array(array[y0:y1, x0:x1])


def resize_array(array: np.ndarray, size: Size, mask_threshold: float = 0.5) -> np.ndarray:
    """Resize to (width, height): uint8 RGB with Lanczos, a bool mask bilinearly then ``>= mask_threshold``,
    a float mask bilinearly."""
    size = (int(size[0]), int(size[1]))
    if array.dtype == np.uint8:
        if (array.shape[1], array.shape[0]) == size:
            return array.copy()
        return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))
    if array.ndim != 2:
        raise TypeError(f"resize_array takes uint8 images or HxW masks, got {array.dtype} {array.shape}")
    grey = Image.fromarray(np.asarray(array, dtype=np.float32))
    scaled = np.asarray(grey.resize(size, Image.Resampling.BILINEAR))
    if array.dtype == bool:
        return scaled >= mask_threshold
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def to_model(array: np.ndarray, plan: CropPlan, *, cropped: bool = False) -> np.ndarray:
    """Crop a full-image array to ``plan.box`` (unless already ``cropped``) and resize it to the native size.

    A bool mask counts any coverage, so the model never regenerates less than the composite pastes.
    """
    crop = array if cropped else crop_array(array, plan.box)
    return resize_array(crop, plan.native_size, mask_threshold=_MODEL_MASK_COVERAGE)


def from_model(result: np.ndarray, plan: CropPlan) -> np.ndarray:
    """Resize a model-space result back to the crop's size (Lanczos for images, bilinear for masks)."""
    return resize_array(result, plan.crop_size)


def composite(original: np.ndarray, edited_region: np.ndarray, alpha: np.ndarray, box: Box) -> np.ndarray:
    """Blend ``edited_region`` (the crop at ``box``) into ``original`` with the full-image ``alpha``.

    Always the last step. Where alpha is 0 the output is the original bit for bit (selected with np.where,
    not blended); where it is 1 it is the edit exactly; between, round(edit * a + original * (1 - a)).
    """
    x0, y0, x1, y1 = box
    if original.dtype != np.uint8 or original.ndim != 3 or alpha.shape != original.shape[:2]:
        raise ValueError(
            f"composite needs a uint8 HxWx3 original and an HxW alpha, got {original.dtype} "
            f"{original.shape} and {alpha.shape}"
        )
    if edited_region.dtype != np.uint8 or edited_region.shape != (y1 - y0, x1 - x0, original.shape[2]):
        raise ValueError(
            f"edited region is {edited_region.dtype} {edited_region.shape}, box {box} needs uint8 "
            f"{(y1 - y0, x1 - x0, original.shape[2])}"
        )
    a = alpha[y0:y1, x0:x1]
    if np.count_nonzero(alpha > 0) != np.count_nonzero(a > 0):
        raise ValueError(f"alpha is non-zero outside the crop box {box}; the edit does not cover it")
    if a.size and (float(a.min()) < 0.0 or float(a.max()) > 1.0):
        raise ValueError("alpha must lie in [0, 1]")
    out = original.copy()
    base = original[y0:y1, x0:x1]
    a3 = a.astype(np.float32)[..., None]
    blend = np.rint(edited_region * a3 + base * (1.0 - a3))
    out[y0:y1, x0:x1] = np.where(a3 > 0, np.clip(blend, 0, 255).astype(np.uint8), base)
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Exact dilation by the digital disc dx^2 + dy^2 <= radius^2.

    Each True pixel's column distance g gives it a horizontal reach of isqrt(r^2 - g^2) in its row; a pixel is
    covered iff some reach in its row spans it, which two running max/min scans along the rows decide.
    """
    height, width = mask.shape
    g = _column_distance(mask, radius)
    reach_table = np.array([math.isqrt(radius * radius - k * k) for k in range(radius + 1)] + [-1], np.int32)
    reach = reach_table[g]
    cols = np.arange(width, dtype=np.int32)
    far = np.int32(2 * width + 2)
    right = np.maximum.accumulate(np.where(reach >= 0, cols + reach, -far), axis=1)
    left = np.minimum.accumulate(np.where(reach >= 0, cols - reach, far)[:, ::-1], axis=1)[:, ::-1]
    return (right >= cols) | (left <= cols)


def _column_distance(mask: np.ndarray, cap: int) -> np.ndarray:
    """Per pixel, the vertical distance to the nearest True pixel in its column, at most ``cap`` + 1."""
    height = mask.shape[0]
    rows = np.arange(height, dtype=np.int32)[:, None]
    far = np.int32(height + cap + 2)
    above = _scan_down(np.where(mask, rows, -far), np.maximum)
    below = _scan_down(np.where(mask, rows, far), np.minimum, reverse=True)
    dist = np.minimum(rows - above, below - rows)
    return np.minimum(dist, cap + 1, out=dist)


def _scan_down(values: np.ndarray, op: np.ufunc, reverse: bool = False) -> np.ndarray:
    """Running ``op`` along axis 0, in place. A loop over rows is ~10x faster than ``op.accumulate(axis=0)``,
    which walks each column with a strided inner loop."""
    if reverse:
        for y in range(values.shape[0] - 2, -1, -1):
            op(values[y + 1], values[y], out=values[y])
    else:
        for y in range(1, values.shape[0]):
            op(values[y - 1], values[y], out=values[y])
    return values


def _distance_to_outside(mask: np.ndarray, cap: int) -> np.ndarray:
    """Euclidean distance from each pixel to the nearest False pixel, capped at ``cap`` (0 on False pixels).

    Column distances are combined along rows over offsets |dx| <= cap only: O(cap * pixels), fine for feather
    radii. Rows go in blocks of ~128k pixels so the 2 * cap passes over each block stay in cache (2-4x).
    """
    g = _column_distance(~mask, cap)
    height, width = mask.shape
    out = np.empty(mask.shape, np.float32)
    block = max(1, 131072 // width)
    for r0 in range(0, height, block):
        squared = g[r0 : r0 + block] ** 2
        best = squared.copy()
        for dx in range(1, min(cap, width - 1) + 1):
            np.minimum(best[:, dx:], squared[:, :-dx] + dx * dx, out=best[:, dx:])
            np.minimum(best[:, :-dx], squared[:, dx:] + dx * dx, out=best[:, :-dx])
        out[r0 : r0 + block] = np.sqrt(np.minimum(best, cap * cap))
    return out


def _in_window(mask: np.ndarray, window: Box, op, fill: bool = False) -> np.ndarray:
    """Apply ``op`` to the ``window`` of ``mask``; pixels outside the window become ``fill``."""
    x0, y0, x1, y1 = window
    out = np.full(mask.shape, fill, dtype=bool)
    out[y0:y1, x0:x1] = op(mask[y0:y1, x0:x1])
    return out


def _pad_box(box: Box, pad: int, shape: tuple[int, ...]) -> Box:
    x0, y0, x1, y1 = box
    return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, shape[1]), min(y1 + pad, shape[0])


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
