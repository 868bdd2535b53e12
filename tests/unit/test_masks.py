"""Mask geometry and the final composite (stylekit.inpaint.masks)."""

from __future__ import annotations

import numpy as np
import pytest

from stylekit.errors import UsageError
from stylekit.inpaint.masks import (
    CropPlan,
    bbox,
    binarize,
    composite,
    crop_box,
    feather,
    from_model,
    grow,
    native_size,
    parse_context,
    plan_crop,
    to_model,
)


def _random_mask(rng: np.random.Generator, max_side: int = 40, density: tuple[float, float] = (0.05, 0.6)):
    shape = (int(rng.integers(1, max_side)), int(rng.integers(1, max_side)))
    return rng.random(shape) < rng.uniform(*density)


def _dilate_brute(mask: np.ndarray, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask), strict=True):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius
    return out


def _distance_brute(mask: np.ndarray) -> np.ndarray:
    """Distance from each mask pixel to the nearest pixel outside it (inf if none)."""
    ys, xs = np.nonzero(~mask)
    dist = np.zeros(mask.shape)
    for y, x in zip(*np.nonzero(mask), strict=True):
        dist[y, x] = np.sqrt(((ys - y) ** 2 + (xs - x) ** 2).min()) if ys.size else np.inf
    return dist


# --- binarize, grow, feather, bbox -------------------------------------------------------------------------


def test_binarize_keeps_values_at_or_above_the_threshold() -> None:
    grey = np.array([0.0, 0.49, 0.5, 1.0], np.float32)
    assert binarize(grey, 0.5).tolist() == [False, False, True, True]
    assert binarize(grey, 1.0).tolist() == [False, False, False, True]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_binarize_rejects_thresholds_outside_unit_range(threshold: float) -> None:
    with pytest.raises(UsageError, match="inpaint.mask.threshold"):
        binarize(np.ones(3), threshold)


def test_grow_by_px_dilates_a_pixel_into_a_disc() -> None:
    mask = np.zeros((41, 41), bool)
    mask[20, 20] = True
    grown = grow(mask, 10)
    yy, xx = np.mgrid[0:41, 0:41]
    np.testing.assert_array_equal(grown, (yy - 20) ** 2 + (xx - 20) ** 2 <= 100)
    assert bbox(grown) == (10, 10, 31, 31)


def test_grow_matches_brute_force_disc_dilation() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        mask, radius = _random_mask(rng), int(rng.integers(1, 9))
        np.testing.assert_array_equal(grow(mask, radius), _dilate_brute(mask, radius))


def test_negative_grow_erodes_but_not_from_the_image_border() -> None:
    rng = np.random.default_rng(2)
    for _ in range(60):
        mask, radius = _random_mask(rng, density=(0.4, 0.95)), int(rng.integers(1, 9))
        # Outside the image counts as mask, so pad with True before eroding the brute-force way.
        padded = np.pad(mask, radius, constant_values=True)
        expected = ~_dilate_brute(~padded, radius)[radius:-radius, radius:-radius]
        np.testing.assert_array_equal(grow(mask, -radius), expected)


def test_shrinking_a_square_by_px_removes_px_from_each_side() -> None:
    mask = np.zeros((50, 50), bool)
    mask[10:40, 5:45] = True
    assert bbox(grow(mask, -4)) == (9, 14, 41, 36)
    assert bbox(grow(mask, 3)) == (2, 7, 48, 43)
    assert not grow(mask, -15).any()


def test_grow_zero_and_empty_masks_are_unchanged() -> None:
    mask = np.eye(5, dtype=bool)
    assert (grow(mask, 0) == mask).all() and grow(mask, 0) is not mask
    assert not grow(np.zeros((4, 4), bool), 3).any()


def test_feather_never_reaches_outside_the_mask_and_is_one_deep_inside() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        mask, px = _random_mask(rng, density=(0.3, 0.95)), int(rng.integers(1, 10))
        alpha = feather(mask, px)
        assert alpha.dtype == np.float32
        assert (alpha[~mask] == 0.0).all()
        assert (alpha[mask] > 0).all()
        assert (alpha[grow(mask, -(px + 1))] == 1.0).all()


def _feather_brute(mask: np.ndarray, px: int) -> np.ndarray:
    """feather's definition, pixel by pixel: depth d (the border is no edge, depths beyond px + 1 do not
    matter), half-width t = the largest r with a pixel at depth >= r within r - 1, alpha = (d - 0.5) / px
    where t > px, else (d - 0.5) / max(t - 1.5, 0.5)."""
    margin = px + 2
    padded = np.pad(mask, margin, constant_values=True)
    depth = np.minimum(_distance_brute(padded)[margin:-margin, margin:-margin], px + 1)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    alpha = np.zeros(mask.shape)
    for y, x in zip(*np.nonzero(mask), strict=True):
        reach = np.floor(depth[mask]).astype(int)
        apart = (yy[mask] - y) ** 2 + (xx[mask] - x) ** 2
        half = reach[apart <= (reach - 1) ** 2].max()
        ramp = px if half > px else max(half - 1.5, 0.5)
        alpha[y, x] = np.clip((depth[y, x] - 0.5) / ramp, 0, 1)
    return alpha


def test_feather_ramps_with_distance_from_the_edge_or_the_half_width() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        mask, px = _random_mask(rng, max_side=30, density=(0.5, 0.95)), int(rng.integers(1, 8))
        np.testing.assert_allclose(feather(mask, px), _feather_brute(mask, px), atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 8, 10, 13, 15, 16])
@pytest.mark.parametrize("angle", [0, 10, 20, 30, 45, 60, 80])
def test_the_centre_of_a_thin_stroke_is_fully_edited(width: int, angle: int) -> None:
    """A wire or outline thinner than twice the feather: before, its centre got alpha (w/2 - 0.5) / 8, at
    most 0.19 for a 4 px stroke and 0.56 for 10 px, so a removed wire stayed 70-80% visible."""
    yy, xx = np.mgrid[0:120, 0:160].astype(float)
    theta = np.radians(angle)
    across = (xx - 80) * np.cos(theta) - (yy - 60) * np.sin(theta)  # signed distance from the centre line
    mask = (np.abs(across) < width / 2) & (np.abs(yy - 60) < 40)
    alpha = feather(mask, 8)
    # Along the middle of the stroke (away from its ends), the max across it is exactly 1: across means per
    # row for steep strokes, per column for flat ones.
    lines = alpha[40:80] if angle <= 45 else alpha[:, 60:100].T
    inside = mask[40:80] if angle <= 45 else mask[:, 60:100].T
    for line, on in zip(lines, inside, strict=True):
        assert line[on].max() == 1.0, line[on]
    assert (alpha[~mask] == 0).all()


def test_feather_of_a_wide_region_is_the_plain_ramp_at_any_size() -> None:
    mask = np.zeros((300, 400), bool)
    mask[40:260, 60:340] = True
    alpha = feather(mask, 8)
    np.testing.assert_allclose(alpha[150, 60:70], (np.arange(1, 11) - 0.5).clip(max=8.0) / 8.0, atol=1e-6)


def test_feather_of_a_band_across_a_big_mask() -> None:
    mask = np.zeros((60, 200), bool)
    mask[10:50, 20:180] = True
    alpha = feather(mask, 8)
    row = alpha[30, 20:40]
    assert row[0] == pytest.approx(0.5 / 8) and (np.diff(row[:9]) > 0).all() and (row[8:] == 1).all()


def test_feather_zero_is_the_mask_and_negative_is_an_error() -> None:
    mask = np.eye(4, dtype=bool)
    np.testing.assert_array_equal(feather(mask, 0), mask.astype(np.float32))
    with pytest.raises(UsageError, match="inpaint.mask.feather"):
        feather(mask, -1)


def test_bbox_is_exclusive_at_the_far_end() -> None:
    mask = np.zeros((10, 20), bool)
    mask[2:5, 7:9] = True
    assert bbox(mask) == (7, 2, 9, 5)


def test_empty_mask_error_names_the_mask_file() -> None:
    with pytest.raises(UsageError, match=r"mask data/masks/photo\.png selects no pixels"):
        bbox(np.zeros((8, 8), bool), source="data/masks/photo.png")


# --- context, crop and native size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "parsed"),
    [
        (0.5, ("factor", 0.5)),
        (0, ("factor", 0.0)),
        (1, ("factor", 1.0)),
        ("0.25", ("factor", 0.25)),
        ("64px", ("px", 64.0)),
        (" 8 PX ", ("px", 8.0)),
    ],
)
def test_context_is_a_factor_or_pixels(context, parsed) -> None:
    assert parse_context(context) == parsed


@pytest.mark.parametrize(
    ("context", "words"), [(64, "64px"), (-0.5, ">= 0"), ("abc", "64px"), (True, "factor")]
)
def test_bad_context_names_the_key(context, words: str) -> None:
    with pytest.raises(UsageError, match="inpaint.context") as err:
        parse_context(context)
    assert words in str(err.value)


def test_crop_adds_context_on_each_side_and_stays_centred() -> None:
    assert crop_box((100, 200, 200, 260), (1000, 1000), 0.5, multiple=1) == (50, 170, 250, 290)
    assert crop_box((100, 200, 200, 260), (1000, 1000), "16px", multiple=1) == (84, 184, 216, 276)
    assert crop_box((100, 200, 200, 260), (1000, 1000), 0, multiple=1) == (100, 200, 200, 260)


def test_crop_shifts_inside_the_image_instead_of_losing_context() -> None:
    box = crop_box((0, 0, 40, 40), (500, 300), 0.5, multiple=1)
    assert box == (0, 0, 80, 80)
    box = crop_box((460, 280, 500, 300), (500, 300), 0.5, multiple=1)
    assert box == (420, 260, 500, 300)


def test_crop_larger_than_the_image_is_clamped_to_it() -> None:
    assert crop_box((10, 10, 90, 50), (100, 60), 2.0, multiple=16) == (0, 0, 100, 60)


def test_crop_sides_round_up_to_the_multiple_and_respect_min_side_and_aspect() -> None:
    x0, y0, x1, y1 = crop_box((100, 100, 150, 137), (1000, 1000), 0.1, multiple=16)
    assert ((x1 - x0) % 16, (y1 - y0) % 16) == (0, 0)
    x0, y0, x1, y1 = crop_box((100, 100, 150, 137), (1000, 1000), 0, multiple=8, min_side=256)
    assert (x1 - x0, y1 - y0) == (256, 256)
    x0, y0, x1, y1 = crop_box((0, 500, 1000, 502), (1000, 1000), 0, multiple=8, max_aspect=4)
    assert (x1 - x0, y1 - y0) == (1000, 256)


def test_crop_always_holds_the_mask_box_inside_the_image() -> None:
    rng = np.random.default_rng(5)
    for _ in range(500):
        img_w, img_h = int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        x0, x1 = sorted(int(v) for v in rng.integers(0, img_w + 1, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, img_h + 1, 2))
        box = (x0, y0, max(x1, x0 + 1) if x0 < img_w else img_w, max(y1, y0 + 1) if y0 < img_h else img_h)
        if box[0] >= box[2] or box[1] >= box[3]:
            continue
        context = float(rng.uniform(0, 2)) if rng.random() < 0.5 else f"{int(rng.integers(0, 300))}px"
        c = crop_box(box, (img_w, img_h), context, int(rng.choice([8, 16, 32])))
        assert 0 <= c[0] <= box[0] and 0 <= c[1] <= box[1]
        assert box[2] <= c[2] <= img_w and box[3] <= c[3] <= img_h


def test_native_size_hits_the_area_in_multiples_up_or_down() -> None:
    for crop, multiple in [((300, 200), 16), ((4000, 3000), 8), ((77, 1234), 32), ((1024, 1024), 16)]:
        w, h = native_size(*crop, target_area=1024 * 1024, multiple=multiple)
        assert w % multiple == 0 and h % multiple == 0
        assert abs(w * h / (1024 * 1024) - 1) < 0.08
        assert abs((w / h) / (crop[0] / crop[1]) - 1) < 0.08
    assert native_size(1024, 1024, 1024 * 1024, 16) == (1024, 1024)
    assert native_size(10000, 10, 4096, 16) == (2016, 16)  # never below one multiple


def test_small_mask_on_a_large_image_is_cropped_tight_and_edited_at_model_resolution() -> None:
    mask = np.zeros((2048, 2048), bool)
    mask[900:1156, 700:956] = True

    plan = plan_crop(mask, context=0.5, target_area=1024 * 1024, multiple=16, source="m.png")

    assert plan.box == (572, 772, 1084, 1284)  # 256 + 2 * 128 on each axis, centred on the mask
    assert plan.crop_size == (512, 512)
    assert plan.native_size == (1024, 1024)


def test_to_model_and_back_round_trips_sizes_and_keeps_thin_strokes() -> None:
    plan = CropPlan(box=(100, 50, 500, 350), native_size=(128, 96))
    image = np.random.default_rng(6).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    mask = np.zeros((400, 600), bool)
    mask[200, 150:450] = True  # a one-pixel line, thinner than a model pixel

    model_image, model_mask = to_model(image, plan), to_model(mask, plan)

    assert model_image.shape == (96, 128, 3) and model_image.dtype == np.uint8
    assert model_mask.shape == (96, 128) and model_mask.any(axis=1).sum() >= 1
    assert from_model(model_image, plan).shape == (300, 400, 3)
    assert from_model(model_mask, plan).shape == (300, 400)
    crop = image[50:350, 100:500]
    np.testing.assert_array_equal(to_model(crop, plan, cropped=True), model_image)


# --- composite ----------------------------------------------------------------------------------------------


def test_pixels_outside_the_mask_are_bit_identical_after_composite() -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        h, w = int(rng.integers(8, 96)), int(rng.integers(8, 96))
        original = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y : y + int(rng.integers(1, h)), x : x + int(rng.integers(1, w))] = True
        mask &= rng.random((h, w)) < 0.9
        if not mask.any():
            continue
        alpha = feather(grow(mask, int(rng.integers(-2, 3))), int(rng.integers(0, 6)))
        if not alpha.any():
            continue
        box = crop_box(bbox(alpha > 0), (w, h), float(rng.uniform(0, 1)), 8)
        edited = rng.integers(0, 256, (box[3] - box[1], box[2] - box[0], 3), dtype=np.uint8)

        out = composite(original, edited, alpha, box)

        outside = alpha == 0
        assert out.dtype == np.uint8
        assert np.array_equal(out[outside], original[outside])
        full = alpha == 1
        x0, y0 = box[:2]
        assert np.array_equal(out[full], np.pad(edited, ((y0, h - box[3]), (x0, w - box[2]), (0, 0)))[full])


def test_composite_blends_with_rounding_between_zero_and_one() -> None:
    original = np.full((2, 2, 3), 100, np.uint8)
    edited = np.full((2, 2, 3), 201, np.uint8)
    alpha = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    out = composite(original, edited, alpha, (0, 0, 2, 2))
    assert out[..., 0].tolist() == [[100, 150], [201, 125]]  # 150.5 rounds to even, 125.25 to 125


def test_composite_refuses_alpha_outside_the_box() -> None:
    alpha = np.zeros((10, 10), np.float32)
    alpha[0, 0] = 1
    with pytest.raises(ValueError, match="outside the crop box"):
        composite(np.zeros((10, 10, 3), np.uint8), np.zeros((5, 5, 3), np.uint8), alpha, (5, 5, 10, 10))


def test_a_small_mask_is_enlarged_at_most_max_upscale_times() -> None:
    """A 10x10 px mask on a large photo used to be cropped to 32x32 and blown up 32x to 1 MP; the crop now
    grows to a side of 256 so the model enlarges it 4x."""
    from stylekit.inpaint.masks import min_crop_side

    mask = np.zeros((1500, 2000), bool)
    mask[700:710, 900:910] = True
    side = min_crop_side(1024 * 1024, 4.0)
    plan = plan_crop(mask, 0.5, 1024 * 1024, 16, min_side=side)
    (crop_w, crop_h), (native_w, native_h) = plan.crop_size, plan.native_size
    assert side == 256 and (crop_w, crop_h) == (256, 256)
    assert native_w / crop_w <= 4.0 and native_h / crop_h <= 4.0
    x0, y0, x1, y1 = plan.box
    assert x0 <= 900 and x1 >= 910 and y0 <= 700 and y1 >= 710
    # Near the border the crop shifts instead of shrinking; an image smaller than that is used whole.
    small = np.zeros((100, 120), bool)
    small[2:6, 3:7] = True
    assert plan_crop(small, 0.5, 1024 * 1024, 16, min_side=side).box == (0, 0, 120, 100)


def test_cover_cells_turns_on_every_block_any_pixel_touches() -> None:
    from stylekit.inpaint.masks import cover_cells

    rng = np.random.default_rng(5)
    for _ in range(30):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < 0.02
        cell = int(rng.integers(1, 9))
        covered = cover_cells(mask, cell)
        assert covered.shape == mask.shape and not (mask & ~covered).any()
        for y in range(0, mask.shape[0], cell):
            for x in range(0, mask.shape[1], cell):
                block = covered[y : y + cell, x : x + cell]
                assert block.all() if mask[y : y + cell, x : x + cell].any() else not block.any()
