"""Pre and post steps around the model: a registry of small functions named in ``inpaint.preprocess`` and
``inpaint.postprocess``.

Both kinds run at the crop's own resolution, so colour work is done on real pixels rather than resampled
ones: pre steps on the crop before it is resized to the model's size, post steps on the model's output after
it is resized back to the crop's size. Step order is the order of the list.

A pre step is ``fn(ctx) -> image``: it reads ``ctx.image`` (the crop as changed by earlier pre steps) and
returns the next image. A post step is ``fn(ctx, generated) -> image``. Steps may leave notes for later steps
in ``ctx.state``. Whatever a step returns, the runners keep every pixel outside ``ctx.mask`` as it was, and
the final composite copies those pixels from the original anyway.

Adding a step is one decorated function::

    @pre_step("invert")
    def invert(ctx: StepContext) -> np.ndarray:
        return 255 - ctx.image
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stylekit.errors import UsageError
from stylekit.inpaint.masks import bbox, grow

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """The crop a run is editing, in crop space (the crop's own resolution).

    ``image``: uint8 HxWx3, the current pre-step image. ``mask``: bool HxW, the pixels the model may change
    (a float alpha is taken as > 0). ``original``: the crop before any pre step (defaults to a copy of
    ``image``). ``state``: notes from pre steps to post steps.
    """

    image: np.ndarray
    mask: np.ndarray
    original: np.ndarray | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = _check_rgb(self.image, "StepContext.image")
        mask = np.asarray(self.mask)
        self.mask = mask if mask.dtype == bool else mask > 0
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"mask {self.mask.shape} and image {self.image.shape} differ in size")
        self.original = self.image.copy() if self.original is None else _check_rgb(self.original, "original")
        if self.original.shape != self.image.shape:
            raise ValueError(f"original {self.original.shape} and image {self.image.shape} differ in size")


PreStep = Callable[[StepContext], np.ndarray]
PostStep = Callable[[StepContext, np.ndarray], np.ndarray]

PRE_STEPS: dict[str, PreStep] = {}
POST_STEPS: dict[str, PostStep] = {}
# Post step -> the pre step it undoes, checked by resolve_steps before any model is loaded.
REQUIRES: dict[str, str] = {}
_KINDS = {"pre": (PRE_STEPS, "inpaint.preprocess"), "post": (POST_STEPS, "inpaint.postprocess")}


def _register(registry: dict[str, Any], name: str, fn: Callable[..., np.ndarray]) -> None:
    if name in registry and registry[name] is not fn:
        raise ValueError(
            f"step {name!r} is registered twice ({registry[name].__qualname__}, {fn.__qualname__})"
        )
    registry[name] = fn


def pre_step(name: str) -> Callable[[PreStep], PreStep]:
    """Register ``fn(ctx) -> image`` as the pre step ``name``."""

    def register(fn: PreStep) -> PreStep:
        _register(PRE_STEPS, name, fn)
        return fn

    return register


def post_step(name: str, requires: str | None = None) -> Callable[[PostStep], PostStep]:
    """Register ``fn(ctx, generated) -> image`` as the post step ``name``; ``requires`` names a pre step it
    needs (the one whose ``ctx.state`` notes it reads)."""

    def register(fn: PostStep) -> PostStep:
        _register(POST_STEPS, name, fn)
        if requires is not None:
            REQUIRES[name] = requires
        return fn

    return register


def get_steps(names: Sequence[str] | str | None, kind: str) -> list[tuple[str, Callable[..., np.ndarray]]]:
    """Look up step names of ``kind`` ("pre" or "post"); an unknown name is an error listing the known ones."""
    registry, key = _KINDS[kind]
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    steps = []
    for name in names:
        if name not in registry:
            other_kind = "post" if kind == "pre" else "pre"
            other, other_key = _KINDS[other_kind]
            hint = f"; it is a {other_kind} step, list it under {other_key}" if name in other else ""
            known = ", ".join(sorted(registry)) or "none"
            raise UsageError(f"{key} has unknown step {name!r} (known: {known}){hint}")
        steps.append((name, registry[name]))
    return steps


def resolve_steps(
    pre: Sequence[str] | str | None, post: Sequence[str] | str | None
) -> tuple[list[tuple[str, PreStep]], list[tuple[str, PostStep]]]:
    """``get_steps`` for both lists, checking that each post step's required pre step comes with it."""
    pre_steps, post_steps = get_steps(pre, "pre"), get_steps(post, "post")
    pre_names = {name for name, _ in pre_steps}
    for name, _ in post_steps:
        needed = REQUIRES.get(name)
        if needed is not None and needed not in pre_names:
            raise UsageError(
                f"inpaint.postprocess has {name}, which needs {needed} in inpaint.preprocess; "
                f"add {needed} there or drop {name}"
            )
    return pre_steps, post_steps


def run_pre_steps(ctx: StepContext, steps: Sequence[tuple[str, PreStep]]) -> np.ndarray:
    """Run pre steps in order, updating and returning ``ctx.image``."""
    for name, fn in steps:
        ctx.image = _inside_mask_only(name, ctx.image, fn(ctx), ctx.mask)
    return ctx.image


def run_post_steps(
    ctx: StepContext, generated: np.ndarray, steps: Sequence[tuple[str, PostStep]]
) -> np.ndarray:
    """Run post steps in order on ``generated`` (crop space) and return the result."""
    out = _check_rgb(generated, "generated image")
    if out.shape != ctx.image.shape:
        raise ValueError(
            f"generated image {out.shape} is not crop-sized {ctx.image.shape}; resize it back first"
        )
    for name, fn in steps:
        out = _inside_mask_only(name, out, fn(ctx, out), ctx.mask)
    return out


# --- colour science: sRGB (D65) <-> CIE L*a*b*, CIEDE2000 -------------------------------------------------

_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
# The matrix's own white rather than the rounded D65 constants, so that r = g = b gives a* = b* = 0 exactly.
_WHITE = _RGB_TO_XYZ.sum(axis=1)
_DELTA = 6.0 / 29.0


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (float64, ...x3) of sRGB colours: uint8, or floats in [0, 1]."""
    rgb = np.asarray(rgb)
    c = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (linear @ _RGB_TO_XYZ.T) / _WHITE
    f = np.where(t > _DELTA**3, np.cbrt(t), t / (3 * _DELTA**2) + 4.0 / 29.0)
    lab = np.empty(f.shape, np.float64)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_srgb(lab: np.ndarray, keep_lightness: bool = False) -> np.ndarray:
    """uint8 sRGB of CIE L*a*b* colours.

    Out-of-gamut colours are clipped per channel, or with ``keep_lightness`` brought into gamut by reducing
    their chroma (L* and hue kept), which is what colour put onto generated lightness needs.
    """
    lab = np.asarray(lab, dtype=np.float64)
    linear = _lab_to_linear(lab)
    if keep_lightness:
        outside = ((linear < -1e-9) | (linear > 1 + 1e-9)).any(axis=-1)
        if outside.any():
            linear[outside] = _reduce_chroma(lab[outside])
    linear = np.clip(linear, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.rint(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8)


def _lab_to_linear(lab: np.ndarray) -> np.ndarray:
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    t = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    return (t * _WHITE) @ _XYZ_TO_RGB.T


def _reduce_chroma(lab: np.ndarray, iterations: int = 16) -> np.ndarray:
    """Linear RGB of ``lab`` (N x 3) with a*, b* scaled down by bisection to the largest in-gamut factor."""
    lab = lab.copy()
    lab[:, 0] = np.clip(lab[:, 0], 0.0, 100.0)
    low, high = np.zeros(len(lab)), np.ones(len(lab))
    for _ in range(iterations):
        mid = (low + high) / 2
        trial = _lab_to_linear(np.column_stack([lab[:, 0], lab[:, 1:] * mid[:, None]]))
        fits = ((trial >= -1e-9) & (trial <= 1 + 1e-9)).all(axis=1)
        low, high = np.where(fits, mid, low), np.where(fits, high, mid)
    return _lab_to_linear(np.column_stack([lab[:, 0], lab[:, 1:] * low[:, None]]))


def delta_e_2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (kL = kC = kH = 1) between Lab arrays, elementwise over leading axes."""
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    (l1, a1, b1), (l2, a2, b2) = np.moveaxis(lab1, -1, 0), np.moveaxis(lab2, -1, 0)
    c_mean7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c_mean7 / (c_mean7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = c1p * c2p == 0
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0.0, dh)
    d_big_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    h_sum = h1p + h2p
    h_mean = np.where(
        np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, h_sum / 2 + 180, h_sum / 2 - 180)
    )
    h_mean = np.where(chroma_zero, h_sum, h_mean)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    l_mean50 = ((l1 + l2) / 2 - 50) ** 2
    cp_mean = (c1p + c2p) / 2
    s_l = 1 + 0.015 * l_mean50 / np.sqrt(20 + l_mean50)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_c = 2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7))
    r_t = -np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2)))) * r_c
    dl, dc, dh_term = (l2 - l1) / s_l, (c2p - c1p) / s_c, d_big_h / s_h
    return np.sqrt(dl**2 + dc**2 + dh_term**2 + r_t * dc * dh_term)


# --- the steps ----------------------------------------------------------------------------------------------

# revert_grayscale: the local mean of |L*(generated) - L*(model input)| (3x3-smoothed) below which a pixel
# counts as unchanged (VAE and resampling noise stay under it) and above which as changed; linear between.
REVERT_SAME_L = 4.0
REVERT_CHANGED_L = 12.0
REVERT_WINDOW_RADIUS = 3
# revert_grayscale: a changed pixel takes the mean a*/b* of the source pixels within this many L* of its own.
REVERT_L_WINDOW = 2.0
# color_match: ring width as a fraction of the mask box's longer side, and its floor in pixels.
RING_FRACTION = 0.05
RING_MIN_PX = 4


@pre_step("grayscale")
def grayscale(ctx: StepContext) -> np.ndarray:
    """Masked pixels become the neutral grey of their CIE L* (a* = b* = 0); notes what revert_grayscale needs."""
    lab = srgb_to_lab(ctx.image)
    lab[..., 1:] = 0.0
    grey = np.where(ctx.mask[..., None], lab_to_srgb(lab), ctx.image)
    ctx.state["grayscale"] = {"source": ctx.image.copy(), "input_l": srgb_to_lab(grey)[..., 0]}
    return grey


@post_step("revert_grayscale", requires="grayscale")
def revert_grayscale(ctx: StepContext, generated: np.ndarray) -> np.ndarray:
    """Put colour back on the generated greys inside the mask.

    Where the generated L* matches what the model was given (locally averaged, see REVERT_*), the structure is
    unchanged: the source's a*/b* return, and its L* too, less the generated deviation. Where it changed, a*/b*
    come from the source region's own colours at that lightness (``_ab_by_lightness``): a red stripe moved
    over white comes back red and white, never the pink a blend of the two would invent. Between the two
    thresholds the results are mixed linearly.
    """
    notes = ctx.state.get("grayscale")
    if notes is None:
        raise UsageError(
            "inpaint.postprocess has revert_grayscale without grayscale in inpaint.preprocess; "
            "add grayscale there or drop revert_grayscale"
        )
    source = srgb_to_lab(notes["source"])
    gen = srgb_to_lab(generated)
    # Smoothing the signed difference first drops pixel noise and the finest texture, which resizing to and
    # from model resolution loses anyway; the mean |difference| around a pixel then measures new structure.
    diff = np.abs(_masked_box_mean(gen[..., 0] - notes["input_l"], ctx.mask, 1))
    local = _masked_box_mean(diff, ctx.mask, REVERT_WINDOW_RADIUS)
    same = np.clip((REVERT_CHANGED_L - local) / (REVERT_CHANGED_L - REVERT_SAME_L), 0.0, 1.0)[..., None]
    fitted = _ab_by_lightness(source, ctx.mask, gen[..., 0])
    out = np.empty_like(gen)
    out[..., 0] = gen[..., 0] + same[..., 0] * (source[..., 0] - notes["input_l"])
    out[..., 1:] = same * source[..., 1:] + (1 - same) * fitted
    # Unchanged pixels clip like any colour (their L* and colour are the source's); changed ones give up chroma
    # rather than the model's lightness when the statistics' colour does not fit the gamut at that L*.
    rgb = np.where(same > 0.5, lab_to_srgb(out), lab_to_srgb(out, keep_lightness=True))
    return np.where(ctx.mask[..., None], rgb, generated)


@post_step("color_match")
def color_match(ctx: StepContext, generated: np.ndarray) -> np.ndarray:
    """Match the masked region's per-channel L*a*b* mean and spread to a ring of original pixels around it.

    The ring is RING_FRACTION of the mask box's longer side wide, at least RING_MIN_PX, and lies in the crop
    (the crop's context). The spread ratio is held to [0.5, 2] so a flat region is not blown up into noise.
    """
    if not ctx.mask.any():
        return generated
    x0, y0, x1, y1 = bbox(ctx.mask)
    width = max(RING_MIN_PX, round(RING_FRACTION * max(x1 - x0, y1 - y0)))
    ring = grow(ctx.mask, width) & ~ctx.mask
    if np.count_nonzero(ring) < 16:
        log.warning("color_match: no pixels around the mask inside the crop; raise inpaint.context. Skipped.")
        return generated
    target = srgb_to_lab(ctx.original[ring])
    region = srgb_to_lab(generated[ctx.mask])
    spread = np.clip(target.std(axis=0) / np.maximum(region.std(axis=0), 1e-6), 0.5, 2.0)
    matched = (region - region.mean(axis=0)) * spread + target.mean(axis=0)
    out = generated.copy()
    out[ctx.mask] = lab_to_srgb(matched, keep_lightness=True)
    return out


def _ab_by_lightness(source: np.ndarray, mask: np.ndarray, lightness: np.ndarray) -> np.ndarray:
    """For each L* in ``lightness``, the mean a*/b* of the source's masked pixels within REVERT_L_WINDOW of it
    in L*, or of the source pixel nearest in L* where none is that close."""
    l_src, ab = source[..., 0][mask], source[..., 1:][mask]
    if l_src.size == 0:
        return np.zeros(lightness.shape + (2,))
    order = np.argsort(l_src, kind="stable")
    l_sorted, ab_sorted = l_src[order], ab[order]
    summed = np.concatenate([np.zeros((1, 2)), np.cumsum(ab_sorted, axis=0)])
    query = lightness.ravel()
    lo = np.searchsorted(l_sorted, query - REVERT_L_WINDOW, side="left")
    hi = np.searchsorted(l_sorted, query + REVERT_L_WINDOW, side="right")
    after = np.clip(np.searchsorted(l_sorted, query), 0, l_sorted.size - 1)
    before = np.maximum(after - 1, 0)
    nearest = np.where(np.abs(l_sorted[before] - query) <= np.abs(l_sorted[after] - query), before, after)
    empty = hi <= lo
    lo, hi = np.where(empty, nearest, lo), np.where(empty, nearest + 1, hi)
    mean = (summed[hi] - summed[lo]) / (hi - lo)[:, None]
    return mean.reshape(lightness.shape + (2,))


def _masked_box_mean(values: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """Mean of ``values`` over the mask pixels in each (2r+1)^2 window (0 where the window has none)."""
    total = _box_sum(np.where(mask, values, 0.0), radius)
    count = _box_sum(mask.astype(np.float64), radius)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum over each (2r+1)^2 window, zero-padded, via an integral image."""
    k = 2 * radius + 1
    # One extra leading zero row and column, so window sums are differences of integral entries.
    padded = np.pad(values, ((radius + 1, radius), (radius + 1, radius)))
    integral = padded.cumsum(axis=0).cumsum(axis=1)
    return integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]


def _inside_mask_only(name: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> np.ndarray:
    after = np.asarray(after)
    if after.shape != before.shape or after.dtype != np.uint8:
        raise TypeError(
            f"step {name} returned {after.dtype} {after.shape}; it must return uint8 {before.shape}"
        )
    return np.where(mask[..., None], after, before)


def _check_rgb(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(f"{what} must be uint8 HxWx3, got {array.dtype} {array.shape}")
    return array
