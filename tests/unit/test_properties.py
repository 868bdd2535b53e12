"""Properties of the mask operations and the composite, for any mask hypothesis can think of
(stylekit.inpaint.masks). The example-based tests are in test_masks.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stylekit.errors import UsageError
from stylekit.inpaint.masks import bbox, composite, crop_box, feather, grow, plan_crop

# database=None: no .hypothesis/ folder in the checkout; failures print their example instead.
FAST = settings(max_examples=80, deadline=None, database=None)

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
masks = shapes.flatmap(lambda shape: arrays(bool, shape))
nonempty_masks = masks.filter(lambda m: m.any())
radii = st.integers(0, 6)


def _distance_to(targets: np.ndarray) -> np.ndarray:
    """Brute force: Euclidean distance from every pixel to the nearest True pixel of `targets` (inf if none)."""
    ys, xs = np.nonzero(targets)
    yy, xx = np.mgrid[0 : targets.shape[0], 0 : targets.shape[1]]
    if ys.size == 0:
        return np.full(targets.shape, np.inf)
    return np.sqrt(((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(axis=-1))


# ---- grow / shrink ------------------------------------------------------------------------------------------


@FAST
@given(masks, radii, radii)
def test_growing_more_never_selects_less_and_shrinking_more_never_selects_more(
    mask: np.ndarray, a: int, b: int
) -> None:
    small, large = sorted((a, b))
    assert not (grow(mask, small) & ~grow(mask, large)).any()
    assert not (grow(mask, -large) & ~grow(mask, -small)).any()
    # Shrinking keeps a subset of the mask, growing a superset.
    assert not (grow(mask, -large) & ~mask).any()
    assert not (mask & ~grow(mask, large)).any()


@FAST
@given(masks, radii)
def test_grow_reaches_exactly_px_from_the_mask_and_shrink_keeps_what_is_more_than_px_inside(
    mask: np.ndarray, px: int
) -> None:
    grown = grow(mask, px)
    np.testing.assert_array_equal(grown, _distance_to(mask) <= px)
    # The image border is not an edge: only pixels within px of an outside pixel are removed.
    shrunk = grow(mask, -px)
    np.testing.assert_array_equal(shrunk, mask & (_distance_to(~mask) > px))


@FAST
@given(nonempty_masks, st.integers(1, 6))
def test_grown_mask_stays_within_px_of_the_original_box(mask: np.ndarray, px: int) -> None:
    x0, y0, x1, y1 = bbox(mask)
    gx0, gy0, gx1, gy1 = bbox(grow(mask, px))
    assert gx0 >= max(0, x0 - px) and gy0 >= max(0, y0 - px)
    assert gx1 <= min(mask.shape[1], x1 + px) and gy1 <= min(mask.shape[0], y1 + px)


@FAST
@given(masks, radii)
def test_opening_never_adds_and_closing_never_removes(mask: np.ndarray, px: int) -> None:
    assert not (grow(grow(mask, -px), px) & ~mask).any()
    assert not (mask & ~grow(grow(mask, px), -px)).any()


# ---- feather ------------------------------------------------------------------------------------------------


@FAST
@given(masks, radii)
def test_feather_is_zero_outside_positive_inside_and_one_deep_inside(mask: np.ndarray, px: int) -> None:
    alpha = feather(mask, px)
    assert alpha.dtype == np.float32 and alpha.shape == mask.shape
    assert float(alpha.min(initial=0.0)) >= 0.0 and float(alpha.max(initial=0.0)) <= 1.0
    np.testing.assert_array_equal(alpha > 0, mask)  # never past the mask, never a hole in it
    depth = _distance_to(~mask)  # inf where the whole image is mask: the border is not an edge
    assert (alpha[mask & (depth > px + 0.5)] == 1.0).all()


@FAST
@given(masks, st.integers(1, 6))
def test_feather_is_at_least_the_inward_ramp_and_every_stroke_centre_reaches_one(
    mask: np.ndarray, px: int
) -> None:
    alpha = feather(mask, px)
    depth = _distance_to(~mask)
    ramp = np.clip((np.minimum(depth, 1e6) - 0.5) / px, 0.0, 1.0)
    assert (alpha[mask] >= ramp[mask] - 1e-6).all()
    # A pixel at least as deep as every mask pixel within px of it is the centre line of a stroke (or the
    # deep inside of a wide region): fully edited, however thin the stroke.
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    for y, x in zip(*np.nonzero(mask), strict=True):
        near = mask & ((yy - y) ** 2 + (xx - x) ** 2 <= px * px)
        if depth[y, x] >= depth[near].max():
            assert alpha[y, x] == 1.0, (y, x, depth[y, x])


# ---- bbox and crop ------------------------------------------------------------------------------------------


@FAST
@given(nonempty_masks)
def test_bbox_contains_every_mask_pixel_and_touches_it_on_every_side(mask: np.ndarray) -> None:
    x0, y0, x1, y1 = bbox(mask)
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = True
    assert not (mask & ~inside).any()
    assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


@FAST
@given(masks.filter(lambda m: not m.any()))
def test_an_empty_mask_has_no_box(mask: np.ndarray) -> None:
    with pytest.raises(UsageError, match="selects no pixels"):
        bbox(mask)


@FAST
@given(
    nonempty_masks,
    st.one_of(st.floats(0, 4), st.integers(0, 40).map(lambda n: f"{n}px")),
    st.sampled_from([1, 8, 16]),
)
def test_crop_holds_the_mask_box_inside_the_image(
    mask: np.ndarray, context: float | str, multiple: int
) -> None:
    height, width = mask.shape
    x0, y0, x1, y1 = bbox(mask)
    cx0, cy0, cx1, cy1 = crop_box((x0, y0, x1, y1), (width, height), context, multiple)
    assert 0 <= cx0 <= x0 and 0 <= cy0 <= y0 and x1 <= cx1 <= width and y1 <= cy1 <= height
    plan = plan_crop(mask, context, 4096, 16)
    assert plan.native_size[0] % 16 == 0 and plan.native_size[1] % 16 == 0


# ---- composite ----------------------------------------------------------------------------------------------


@st.composite
def composites(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Any original and edit, and any alpha in [0, 1] that is zero outside some box."""
    height, width = draw(shapes)
    original = draw(arrays(np.uint8, (height, width, 3)))
    x0, x1 = sorted(draw(st.lists(st.integers(0, width), min_size=2, max_size=2)))
    y0, y1 = sorted(draw(st.lists(st.integers(0, height), min_size=2, max_size=2)))
    edited = draw(arrays(np.uint8, (y1 - y0, x1 - x0, 3)))
    region = draw(
        arrays(
            np.float32,
            (y1 - y0, x1 - x0),
            elements=st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1, width=32)),
        )
    )
    alpha = np.zeros((height, width), np.float32)
    alpha[y0:y1, x0:x1] = region
    return original, edited, alpha, (x0, y0, x1, y1)


@settings(max_examples=100, deadline=None, database=None)
@given(composites())
def test_composite_keeps_every_pixel_where_alpha_is_zero_bit_for_bit(case) -> None:
    original, edited, alpha, box = case
    before = original.copy()
    out = composite(original, edited, alpha, box)
    assert out.dtype == np.uint8 and out.shape == original.shape
    np.testing.assert_array_equal(out[alpha == 0], original[alpha == 0])
    np.testing.assert_array_equal(original, before)  # the input array is never written to
    x0, y0, x1, y1 = box
    full = alpha[y0:y1, x0:x1] == 1
    np.testing.assert_array_equal(out[y0:y1, x0:x1][full], edited[full])
    # Between: each channel lies between the original's and the edit's value.
    low = np.minimum(original[y0:y1, x0:x1], edited)
    high = np.maximum(original[y0:y1, x0:x1], edited)
    region = out[y0:y1, x0:x1]
    assert ((region >= low) & (region <= high)).all()
