"""Reading images and masks, writing outputs, and pairing images with masks (stylekit.inpaint.images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylekit.errors import UsageError
from stylekit.inpaint import images
from stylekit.inpaint.images import find_pairs, load_image, load_mask, output_path, save_png_atomic


def _rgb(width: int = 32, height: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _touch_images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        _rgb(8, 8).save(folder / name)


# --- load_image ---------------------------------------------------------------------------------------------


def test_exif_rotated_jpeg_loads_upright(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)

    im = load_image(tmp_path / "photo.jpg")

    assert im.size == (20, 40)
    top, bottom = np.asarray(im)[5, 10].astype(int), np.asarray(im)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the red half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_16bit_grey_png_is_scaled_to_8bit_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 32768]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")

    im = load_image(tmp_path / "deep.png")

    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im)[0, :, 0], [0, 100, 255, 128])
    np.testing.assert_array_equal(np.asarray(im)[..., 0], np.asarray(im)[..., 2])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 1000, 65535]], np.int32), [0, 4, 255]),  # I within 16 bits: 16-bit scale
        (np.array([[-10, 0, 10]], np.int32), [0, 128, 255]),  # I outside 16 bits: stretched
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # F in [0, 1]
        (np.array([[100.0, 300.0, 500.0]], np.float32), [0, 128, 255]),  # F otherwise: stretched
    ],
)
def test_32bit_int_and_float_tiffs_are_scaled(
    tmp_path: Path, values: np.ndarray, expected: list[int]
) -> None:
    Image.fromarray(values).save(tmp_path / "deep.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.tif"))[0, :, 1], expected)


@pytest.mark.parametrize(
    ("mode", "ext"),
    [
        ("CMYK", "jpg"),
        ("CMYK", "tif"),
        ("P", "png"),
        ("P", "gif"),
        ("LA", "png"),
        ("L", "png"),
        ("1", "png"),
        ("RGBA", "png"),
        ("RGBA", "webp"),
        ("RGB", "bmp"),
    ],
)
def test_every_common_mode_loads_as_8bit_rgb(tmp_path: Path, mode: str, ext: str) -> None:
    path = tmp_path / f"x.{ext}"
    _rgb().convert(mode).save(path)

    im = load_image(path)

    assert im.mode == "RGB" and im.size == (32, 24)
    assert np.asarray(im).dtype == np.uint8


def test_rgba_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (200, 10, 20, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [200, 10, 20]


def test_palette_with_transparency_loads_without_warning(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 0, 0]
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    pixel = np.asarray(load_image(tmp_path / "anim.gif"))[0, 0]
    assert pixel[0] > 200 and pixel[1] < 50


def _truncated_png(path: Path) -> None:
    _rgb(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("this is not an image\n"), "not an image"),
        (_truncated_png, "truncated or corrupt"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: None, "does not exist"),
    ],
    ids=["zero-byte", "text-named-png", "truncated", "directory", "missing"],
)
def test_unreadable_files_are_usage_errors_naming_the_file(tmp_path: Path, make, words: str) -> None:
    path = tmp_path / "broken.png"
    make(path)
    for loader in (load_image, load_mask):
        with pytest.raises(UsageError) as err:
            loader(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert "\n" not in str(err.value)


def test_images_over_the_pixel_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rgb(20, 20).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 399)
    with pytest.raises(UsageError, match="big.png has more than 399 pixels"):
        load_image(tmp_path / "big.png")


def test_pillow_decompression_bomb_warning_becomes_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rgb(20, 20).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: Pillow warns, which must not pass
    with pytest.raises(UsageError, match="bomb.png"):
        load_image(tmp_path / "bomb.png")


def test_the_pixel_policy_allows_16k_square_images() -> None:
    assert images.MAX_PIXELS == 16384 * 16384
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= images.MAX_PIXELS


# --- load_mask ----------------------------------------------------------------------------------------------


def test_grey_mask_values_come_back_unthresholded(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == np.float32
    np.testing.assert_allclose(mask[0], [0, 128 / 255, 1])


def test_rgb_mask_is_read_as_luma(tmp_path: Path) -> None:
    pixels = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8)
    Image.fromarray(pixels).save(tmp_path / "m.png")
    np.testing.assert_allclose(load_mask(tmp_path / "m.png")[0], [1.0, 0.0, 76 / 255], atol=1 / 255)


def test_rgba_mask_painted_on_transparency_is_read_from_alpha(tmp_path: Path) -> None:
    # Painted in black on a transparent layer whose hidden colour is white (as some editors export it):
    # only the alpha tells what was painted.
    pixels = np.zeros((4, 6, 4), np.uint8)
    pixels[..., :3] = 255
    pixels[1:3, 2:4] = (0, 0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "m.png")

    mask = load_mask(tmp_path / "m.png")

    expected = np.zeros((4, 6), np.float32)
    expected[1:3, 2:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_opaque_rgba_and_la_masks_are_read_as_luma(tmp_path: Path) -> None:
    grey = np.array([[0, 255], [255, 0]], np.uint8)
    Image.fromarray(grey).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), grey / 255.0)


def test_16bit_mask_is_scaled_to_unit_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(tmp_path / "m.png")
    np.testing.assert_allclose(load_mask(tmp_path / "m.png")[0], [0, 0.5, 1], atol=1e-4)


def test_mask_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (40, 20), 255).save(tmp_path / "m.png", exif=exif)
    assert load_mask(tmp_path / "m.png").shape == (40, 20)


def test_mask_of_another_size_is_an_error_naming_both_files(tmp_path: Path) -> None:
    Image.new("L", (50, 40), 255).save(tmp_path / "m.png")
    with pytest.raises(UsageError) as err:
        load_mask(tmp_path / "m.png", size=(100, 80), image_path="photo.jpg")
    message = str(err.value)
    assert "m.png is 50x40" in message and "photo.jpg is 100x80" in message
    assert "inpaint.mask.resize=true" in message


def test_mask_resize_scales_and_thresholds(tmp_path: Path) -> None:
    small = np.zeros((40, 50), np.uint8)
    small[10:30, 10:20] = 255
    Image.fromarray(small).save(tmp_path / "m.png")

    mask = load_mask(tmp_path / "m.png", size=(100, 80), resize=True)

    assert mask.shape == (80, 100)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert mask[40, 30] == 1 and mask[5, 5] == 0 and mask[40, 60] == 0
    assert abs(mask.sum() - 4 * 200) <= 2 * (40 + 20) + 4  # the area scales by 4, up to a pixel at the edges


def test_mask_resize_refuses_another_aspect_ratio(tmp_path: Path) -> None:
    Image.new("L", (50, 50), 255).save(tmp_path / "m.png")
    with pytest.raises(UsageError, match="aspect ratio"):
        load_mask(tmp_path / "m.png", size=(100, 50), resize=True)


# --- save_png_atomic ----------------------------------------------------------------------------------------


def test_png_metadata_is_written_and_read_back(tmp_path: Path) -> None:
    text = {"prompt": "a red dress", "unicode": "robe à fleurs — 花", "config": "x: 1\n" * 400}
    path = save_png_atomic(np.asarray(_rgb()), tmp_path / "out" / "a_edited.png", text=text)

    with Image.open(path) as im:
        im.load()
        assert im.text == text
        assert im.size == (32, 24)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a_edited.png"]


def test_output_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a_edited.png"
    path.write_bytes(b"old")
    save_png_atomic(_rgb(), path)
    assert Image.open(path).size == (32, 24)


def test_refuses_to_overwrite_a_protected_input(tmp_path: Path) -> None:
    source = tmp_path / "in" / "photo.png"
    _touch_images(source.parent, "photo.png")
    before = source.read_bytes()

    with pytest.raises(UsageError, match="input"):
        save_png_atomic(_rgb(), tmp_path / "in" / ".." / "in" / "photo.png", protected={source})
    assert source.read_bytes() == before


def test_refuses_an_input_reached_through_a_symlink(tmp_path: Path) -> None:
    _touch_images(tmp_path, "photo.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "photo.png")
    with pytest.raises(UsageError, match="link.png"):
        save_png_atomic(_rgb(), tmp_path / "link.png", protected=[str(tmp_path / "photo.png")])


def test_failed_write_leaves_no_partial_or_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a_edited.png"
    target.write_bytes(b"previous output")

    def fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(UsageError, match="a_edited.png.*No space left"):
        save_png_atomic(np.zeros((4, 4, 3), np.uint8), target)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_edited.png"]
    assert target.read_bytes() == b"previous output"


def test_non_os_errors_also_remove_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_png_atomic(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    monkeypatch.setattr(images.os, "access", lambda *a, **k: False)
    with pytest.raises(UsageError, match=f"{out} is not writable"):
        save_png_atomic(_rgb(), out / "x.png")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_directory_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            save_png_atomic(_rgb(), out / "x.png")
    finally:
        out.chmod(0o700)


def test_output_path_names() -> None:
    assert output_path("out", "photo") == Path("out/photo_edited.png")
    assert output_path("out", "photo", seed=7) == Path("out/photo_edited_s7.png")
    assert output_path("out", "photo", seed=0, suffix="comparison") == Path("out/photo_comparison_s0.png")


# --- find_pairs ---------------------------------------------------------------------------------------------


def test_folders_are_matched_by_stem_sorted(tmp_path: Path) -> None:
    _touch_images(tmp_path / "img", "b.jpg", "a.PNG", "c.webp")
    _touch_images(tmp_path / "msk", "c.png", "a.png", "b_mask.png")

    pairs = find_pairs(tmp_path / "img", tmp_path / "msk")

    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.PNG", "a.png"),
        ("b.jpg", "b_mask.png"),
        ("c.webp", "c.png"),
    ]


def test_folder_matching_ignores_hidden_files_our_outputs_and_non_images(tmp_path: Path) -> None:
    _touch_images(
        tmp_path / "img", "a.png", ".hidden.png", "a_edited.png", "a_edited_s3.png", "a_comparison.png"
    )
    (tmp_path / "img" / "notes.txt").write_text("x")
    (tmp_path / "img" / "sub").mkdir()
    _touch_images(tmp_path / "msk", "a.png", ".a.png")

    pairs = find_pairs(tmp_path / "img", tmp_path / "msk")

    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png")]


def test_an_exact_stem_beats_the_mask_suffix(tmp_path: Path) -> None:
    _touch_images(tmp_path / "img", "a.png")
    _touch_images(tmp_path / "msk", "a.png", "a_mask.png")
    assert find_pairs(tmp_path / "img", tmp_path / "msk")[0][1].name == "a.png"


def test_two_masks_with_one_stem_are_ambiguous(tmp_path: Path) -> None:
    _touch_images(tmp_path / "img", "a.png")
    _touch_images(tmp_path / "msk", "a.png", "a.jpg")
    with pytest.raises(UsageError, match="several masks"):
        find_pairs(tmp_path / "img", tmp_path / "msk")


def test_image_folder_with_one_mask_file_uses_it_for_all(tmp_path: Path) -> None:
    _touch_images(tmp_path / "img", "a.png", "b.png")
    _touch_images(tmp_path, "shared.png")
    pairs = find_pairs(tmp_path / "img", tmp_path / "shared.png")
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "shared.png"), ("b.png", "shared.png")]


def test_image_file_with_mask_folder_takes_the_same_stem(tmp_path: Path) -> None:
    _touch_images(tmp_path, "photo.jpg")
    _touch_images(tmp_path / "msk", "other.png", "photo.png")
    assert find_pairs(tmp_path / "photo.jpg", tmp_path / "msk") == [
        (tmp_path / "photo.jpg", tmp_path / "msk/photo.png")
    ]


def test_image_file_and_mask_file_are_one_pair(tmp_path: Path) -> None:
    _touch_images(tmp_path, "photo.jpg", "whatever.png")
    assert find_pairs(str(tmp_path / "photo.jpg"), str(tmp_path / "whatever.png")) == [
        (tmp_path / "photo.jpg", tmp_path / "whatever.png")
    ]


def test_missing_masks_are_counted_and_the_first_named(tmp_path: Path) -> None:
    _touch_images(tmp_path / "img", "a.png", "b.png", "c.png", "d.png", "e.png")
    _touch_images(tmp_path / "msk", "c.png")

    with pytest.raises(UsageError) as err:
        find_pairs(tmp_path / "img", tmp_path / "msk")

    message = str(err.value)
    assert "4 of 5 images" in message and "a.png, b.png, d.png, ..." in message and "e.png" not in message
    assert str(tmp_path / "msk") in message


def test_image_file_without_a_matching_mask_is_an_error(tmp_path: Path) -> None:
    _touch_images(tmp_path, "photo.jpg")
    _touch_images(tmp_path / "msk", "other.png")
    with pytest.raises(UsageError, match="1 of 1 images.*photo.jpg"):
        find_pairs(tmp_path / "photo.jpg", tmp_path / "msk")


def test_defaults_are_the_data_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch_images(tmp_path / "data/base_images", "x.png")
    _touch_images(tmp_path / "data/masks", "x.png")
    monkeypatch.chdir(tmp_path)
    assert find_pairs(None, "") == [(Path("data/base_images/x.png"), Path("data/masks/x.png"))]


def test_missing_paths_and_empty_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="image=.*nope.png does not exist"):
        find_pairs(tmp_path / "nope.png", tmp_path)
    with pytest.raises(UsageError, match="default mask folder"):
        find_pairs(tmp_path, None, default_masks=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        find_pairs(tmp_path / "empty", tmp_path)


def test_image_and_mask_must_differ(tmp_path: Path) -> None:
    _touch_images(tmp_path / "both", "a.png")
    with pytest.raises(UsageError, match="same folder"):
        find_pairs(tmp_path / "both", tmp_path / "both")
    with pytest.raises(UsageError, match="also the image"):
        find_pairs(tmp_path / "both/a.png", tmp_path / "both/a.png")


def _icc(space: bytes = b"RGB ") -> bytes:
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[16:20] = space  # the header's data colour space
    return bytes(profile)


def test_an_rgb_colour_profile_stays_with_the_pixels_and_goes_into_the_png(tmp_path: Path) -> None:
    icc = _icc()
    _rgb().save(tmp_path / "p3.jpg", quality=95, icc_profile=icc)
    loaded = load_image(tmp_path / "p3.jpg")
    assert loaded.info.get("icc_profile") == icc
    plain = np.asarray(Image.open(tmp_path / "p3.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(loaded), plain)  # carried, not converted: pixels untouched
    save_png_atomic(np.asarray(loaded), tmp_path / "out.png", icc_profile=icc)
    assert Image.open(tmp_path / "out.png").info.get("icc_profile") == icc
    save_png_atomic(np.asarray(loaded), tmp_path / "bare.png")
    assert "icc_profile" not in Image.open(tmp_path / "bare.png").info


def test_a_profile_that_cannot_describe_rgb_pixels_is_not_carried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An RGB output must not carry a CMYK or grey profile; one that does not fit its image is dropped with
    a warning naming the file."""
    _rgb().convert("L").save(tmp_path / "grey.png", icc_profile=_icc(b"CMYK"))
    with caplog.at_level("WARNING", logger="stylekit.inpaint.images"):
        loaded = load_image(tmp_path / "grey.png")
    assert loaded.mode == "RGB" and "icc_profile" not in loaded.info
    assert any("grey.png" in r.getMessage() and "CMYK" in r.getMessage() for r in caplog.records)
