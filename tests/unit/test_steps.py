"""Pre/post step registry, colour conversions and the colour steps (stylekit.inpaint.steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stylekit.errors import UsageError
from stylekit.inpaint import steps
from stylekit.inpaint.steps import (
    StepContext,
    delta_e_2000,
    get_steps,
    lab_to_srgb,
    post_step,
    pre_step,
    resolve_steps,
    run_post_steps,
    run_pre_steps,
    srgb_to_lab,
)


def _colourful(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A natural-ish test image: smooth gradients, texture noise and saturated patches across the gamut."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [
            127 + 120 * np.sin(xx * 0.07 + yy * 0.03),
            255 * yy / height,
            255 * (1 - xx / width) * (0.6 + 0.4 * np.cos(yy * 0.11)),
        ],
        axis=-1,
    )
    image = base + rng.normal(0, 14, base.shape)
    patches = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
        (224, 172, 140),
        (20, 12, 30),
        (255, 255, 255),
    ]
    for i, colour in enumerate(patches):
        image[8:20, 6 + 16 * i : 18 + 16 * i] = colour
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _blob_mask(height: int = 96, width: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((yy - 40) / 34) ** 2 + ((xx - 64) / 52) ** 2 <= 1


# --- registry -----------------------------------------------------------------------------------------------


def test_unknown_step_error_names_the_key_and_lists_known_steps() -> None:
    with pytest.raises(UsageError) as err:
        get_steps(["grayscale", "sepia"], "pre")
    message = str(err.value)
    assert message.startswith("inpaint.preprocess has unknown step 'sepia'")
    assert "grayscale" in message

    with pytest.raises(UsageError, match=r"inpaint.postprocess .*known: .*color_match.*revert_grayscale"):
        get_steps("nope", "post")


def test_a_step_listed_under_the_wrong_kind_says_where_it_belongs() -> None:
    with pytest.raises(UsageError, match="post step, list it under inpaint.postprocess"):
        get_steps(["revert_grayscale"], "pre")


def test_step_lists_accept_none_a_string_or_a_list() -> None:
    assert get_steps(None, "pre") == []
    assert [name for name, _ in get_steps("grayscale", "pre")] == ["grayscale"]
    assert [name for name, _ in get_steps(("color_match", "revert_grayscale"), "post")] == [
        "color_match",
        "revert_grayscale",
    ]


def test_revert_grayscale_needs_grayscale_before_any_model_runs() -> None:
    with pytest.raises(UsageError, match="needs grayscale in inpaint.preprocess"):
        resolve_steps([], ["revert_grayscale"])
    pre, post = resolve_steps(["grayscale"], ["revert_grayscale"])
    assert [n for n, _ in pre] == ["grayscale"] and [n for n, _ in post] == ["revert_grayscale"]


@pytest.fixture
def scratch_registry():
    """Steps a test registers disappear after it."""
    registries = (steps.PRE_STEPS, steps.POST_STEPS, steps.REQUIRES)
    saved = [dict(r) for r in registries]
    yield
    for registry, before in zip(registries, saved, strict=True):
        registry.clear()
        registry.update(before)


@pytest.mark.usefixtures("scratch_registry")
def test_adding_a_step_is_one_decorated_function() -> None:
    @pre_step("invert")
    def invert(ctx: StepContext) -> np.ndarray:
        return 255 - ctx.image

    image = _colourful(16, 16)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    ctx = StepContext(image=image, mask=mask)
    out = run_pre_steps(ctx, get_steps(["invert"], "pre"))

    np.testing.assert_array_equal(out[mask], 255 - image[mask])
    np.testing.assert_array_equal(out[~mask], image[~mask])
    with pytest.raises(ValueError, match="registered twice"):
        pre_step("invert")(lambda ctx: ctx.image)
    assert "invert" in steps.PRE_STEPS


@pytest.mark.usefixtures("scratch_registry")
def test_runners_never_touch_pixels_outside_the_mask() -> None:
    post_step("paint_everything")(lambda ctx, generated: np.zeros_like(generated))

    image, mask = _colourful(), _blob_mask()
    ctx = StepContext(image=image, mask=mask)
    run_pre_steps(ctx, get_steps(["grayscale"], "pre"))
    generated = _colourful(seed=1)
    out = run_post_steps(ctx, generated, get_steps(["paint_everything", "color_match"], "post"))

    assert np.array_equal(ctx.image[~mask], image[~mask])
    assert np.array_equal(out[~mask], generated[~mask])
    assert np.array_equal(ctx.original, image)


def test_registered_test_steps_are_gone_afterwards() -> None:
    assert "invert" not in steps.PRE_STEPS and "paint_everything" not in steps.POST_STEPS


def test_a_step_returning_the_wrong_type_is_named() -> None:
    ctx = StepContext(image=_colourful(8, 8), mask=np.ones((8, 8), bool))
    with pytest.raises(TypeError, match="step bad returned float64"):
        run_pre_steps(ctx, [("bad", lambda c: c.image / 255.0)])


# --- colour science -----------------------------------------------------------------------------------------


def test_srgb_lab_round_trip_is_exact_on_random_colours() -> None:
    colours = np.random.default_rng(8).integers(0, 256, (200_000, 3), dtype=np.uint8)
    np.testing.assert_array_equal(lab_to_srgb(srgb_to_lab(colours)), colours)


def test_lab_anchors_white_black_and_greys() -> None:
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255], np.uint8)), [100, 0, 0], atol=1e-9)
    np.testing.assert_allclose(srgb_to_lab(np.array([0, 0, 0], np.uint8)), [0, 0, 0], atol=1e-9)
    greys = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    assert np.abs(srgb_to_lab(greys)[:, 1:]).max() < 1e-9
    # A well-known value: sRGB red is L* 53.24, a* 80.09, b* 67.20.
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 0, 0], np.uint8)), [53.24, 80.09, 67.20], atol=0.02)


def test_out_of_gamut_colour_can_keep_its_lightness() -> None:
    bright_magenta = np.array([[98.0, 60.0, -40.0]])  # far outside sRGB at this lightness
    kept = srgb_to_lab(lab_to_srgb(bright_magenta, keep_lightness=True))[0]
    clipped = srgb_to_lab(lab_to_srgb(bright_magenta))[0]
    assert abs(kept[0] - 98.0) < 0.3 and abs(clipped[0] - 98.0) > 5
    assert kept[1] > 0 and kept[2] < 0  # same hue quadrant, less chroma


@pytest.mark.parametrize(
    ("lab1", "lab2", "expected"),
    [  # Sharma, Wu & Dalal (2005) CIEDE2000 test data
        ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
        ((50, 3.1571, -77.2803), (50, 0, -82.7485), 2.8615),
        ((50, 0, 0), (50, -1, 2), 2.3669),
        ((50, 2.5, 0), (73, 25, -18), 27.1492),
        ((50, 2.5, 0), (61, -5, 29), 22.8977),
        ((50, 2.5, 0), (56, -27, -3), 31.9030),
        ((50, 2.5, 0), (58, 24, 15), 19.4535),
        ((50, 2.5, 0), (50, 3.1736, 0.5854), 1.0000),
        ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
        ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ],
)
def test_delta_e_2000_matches_the_reference_data(lab1, lab2, expected: float) -> None:
    assert float(delta_e_2000(np.array(lab1), np.array(lab2))) == pytest.approx(expected, abs=1e-4)
    assert float(delta_e_2000(np.array(lab2), np.array(lab1))) == pytest.approx(expected, abs=1e-4)


# --- grayscale / revert_grayscale ---------------------------------------------------------------------------


def test_grayscale_turns_masked_pixels_into_neutral_greys_of_the_same_lightness() -> None:
    image, mask = _colourful(), _blob_mask()
    ctx = StepContext(image=image, mask=mask)

    grey = run_pre_steps(ctx, get_steps(["grayscale"], "pre"))

    inside = grey[mask].astype(int)
    assert (inside[:, 0] == inside[:, 1]).all() and (inside[:, 1] == inside[:, 2]).all()
    lightness_error = np.abs(srgb_to_lab(grey)[..., 0] - srgb_to_lab(image)[..., 0])[mask]
    assert lightness_error.max() < 0.5  # one 8-bit grey step
    assert np.array_equal(grey[~mask], image[~mask])


def test_grayscale_then_revert_on_an_unchanged_region_restores_colour_within_delta_e_2() -> None:
    image, mask = _colourful(), _blob_mask()
    ctx = StepContext(image=image, mask=mask)
    pre, post = resolve_steps(["grayscale"], ["revert_grayscale"])
    grey = run_pre_steps(ctx, pre)

    restored = run_post_steps(ctx, grey.copy(), post)  # the model changed nothing

    errors = delta_e_2000(srgb_to_lab(restored[mask]), srgb_to_lab(image[mask]))
    assert errors.max() < 2.0
    assert np.array_equal(restored[~mask], grey[~mask])


def test_revert_survives_small_model_noise() -> None:
    image, mask = _colourful(), _blob_mask()
    ctx = StepContext(image=image, mask=mask)
    grey = run_pre_steps(ctx, get_steps(["grayscale"], "pre"))
    noisy = np.clip(grey + np.random.default_rng(9).normal(0, 1.5, grey.shape), 0, 255).astype(np.uint8)

    restored = run_post_steps(ctx, noisy, get_steps(["revert_grayscale"], "post"))

    errors = delta_e_2000(srgb_to_lab(restored[mask]), srgb_to_lab(image[mask]))
    assert np.median(errors) < 0.5 and errors.max() < 2.0


def test_revert_colours_changed_structure_from_the_region_statistics() -> None:
    image, mask = _colourful(), _blob_mask()
    ctx = StepContext(image=image, mask=mask)
    grey = run_pre_steps(ctx, get_steps(["grayscale"], "pre"))
    generated = grey.copy()
    new_object = np.zeros_like(mask)
    new_object[30:50, 50:80] = True
    generated[new_object] = 250  # a bright new thing where there was texture

    restored = run_post_steps(ctx, generated, get_steps(["revert_grayscale"], "post"))

    source_ab = srgb_to_lab(image[mask])[:, 1:]
    low, high = source_ab.mean(0) - 2 * source_ab.std(0), source_ab.mean(0) + 2 * source_ab.std(0)
    core = np.zeros_like(mask)
    core[36:44, 56:74] = True  # away from the object's edge, where the local window is all "changed"
    new_ab = srgb_to_lab(restored[core])[:, 1:]
    assert ((new_ab >= low - 1.0) & (new_ab <= high + 1.0)).all()
    assert np.abs(srgb_to_lab(restored[core])[:, 0] - srgb_to_lab(generated[core])[:, 0]).max() < 3.0


def test_revert_puts_back_only_colours_the_region_had() -> None:
    """Red over white, and the model moved the red to where the white was, with a soft edge: the light new
    pixels must come back white. The old linear fit of a*/b* on L* painted them pink (chroma up to 29.5 at
    L* > 80, where the original had only red at L* 47 and white at 100)."""
    image = np.full((64, 64, 3), 255, np.uint8)
    image[:, :32] = (220, 30, 30)
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True
    ctx = StepContext(image=image, mask=mask)
    grey = run_pre_steps(ctx, get_steps(["grayscale"], "pre"))
    red_grey, white_grey = grey[20, 12].astype(float), grey[20, 50].astype(float)
    # Swapped halves and an 8 px soft edge between them, all of it new structure.
    weight = np.clip((np.arange(64) - 28) / 8.0, 0.0, 1.0)[None, :, None]
    generated = np.where(mask[..., None], np.rint(white_grey * (1 - weight) + red_grey * weight), grey)
    generated = generated.astype(np.uint8)

    restored = run_post_steps(ctx, generated, get_steps(["revert_grayscale"], "post"))

    lab, gen_l = srgb_to_lab(restored), srgb_to_lab(generated)[..., 0]
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    light = mask & (gen_l > 80)
    assert light.sum() > 300 and chroma[light].max() < 1.0, chroma[light].max()
    # Where the red went, it is red again: the original's hue, at the generated lightness.
    dark = mask & (gen_l < 55)
    red = srgb_to_lab(image[20, 12])
    hue = np.degrees(np.arctan2(lab[dark][:, 2], lab[dark][:, 1]))
    assert np.abs(hue - np.degrees(np.arctan2(red[2], red[1]))).max() < 3.0
    assert np.abs(lab[dark][:, 0] - gen_l[dark]).max() < 1.0


def test_revert_without_grayscale_state_is_a_usage_error() -> None:
    ctx = StepContext(image=_colourful(8, 8), mask=np.ones((8, 8), bool))
    with pytest.raises(UsageError, match="without grayscale"):
        run_post_steps(ctx, ctx.image.copy(), get_steps(["revert_grayscale"], "post"))


# --- color_match --------------------------------------------------------------------------------------------


def test_color_match_moves_the_region_mean_toward_the_ring() -> None:
    rng = np.random.default_rng(10)
    original = np.clip(rng.normal((40, 90, 200), 10, (96, 128, 3)), 0, 255).astype(np.uint8)  # blue scene
    mask = _blob_mask()
    generated = original.copy()
    generated[mask] = np.clip(rng.normal((220, 60, 40), 10, (int(mask.sum()), 3)), 0, 255).astype(np.uint8)
    ctx = StepContext(image=original, mask=mask)

    out = run_post_steps(ctx, generated, get_steps(["color_match"], "post"))

    ring = steps.grow(mask, 6) & ~mask
    target = srgb_to_lab(original[ring]).mean(0)
    before = np.linalg.norm(srgb_to_lab(generated[mask]).mean(0) - target)
    after = np.linalg.norm(srgb_to_lab(out[mask]).mean(0) - target)
    assert after < 0.2 * before
    assert np.array_equal(out[~mask], generated[~mask])


def test_color_match_without_room_for_a_ring_leaves_the_image(caplog: pytest.LogCaptureFixture) -> None:
    ctx = StepContext(image=_colourful(16, 16), mask=np.ones((16, 16), bool))
    generated = _colourful(16, 16, seed=3)
    out = run_post_steps(ctx, generated, get_steps(["color_match"], "post"))
    assert np.array_equal(out, generated)
    assert "inpaint.context" in caplog.text


def test_the_model_free_modules_import_without_torch_or_diffusers() -> None:
    code = (
        "import sys\n"
        "import stylekit.inpaint.images, stylekit.inpaint.masks, stylekit.inpaint.steps\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
