"""Folder + captions -> ImageRecords: discovery, captions, decoding, skipping and paired data."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from stylekit.data.dataset import (
    ImageRecord,
    UnreadableImageError,
    count_missing_class_images,
    dataset_hash,
    load_rgb,
    prepare_class_samples,
    prepare_samples,
    scan_images,
)
from stylekit.errors import UsageError

DATASET_LOGGER = "stylekit.data.dataset"


def make_image(
    path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def noisy_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_metadata(folder: Path, rows: list[dict] | list[str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path = folder / "metadata.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "skipping" in r.getMessage()
    ]


def data_cfg(folder: Path, **overrides: object) -> dict:
    cfg = {"mode": "resize", "dataset_dir": str(folder), "resolution": 64, "max_upscale": 2.0}
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------- discovery


def test_scan_finds_every_supported_extension_in_any_case_sorted_and_ignores_hidden(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "e.bmp", "f.TIF", "g.tiff", ".hidden.png"]:
        make_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "h.gif").write_bytes(b"GIF89a")

    records = scan_images(tmp_path)

    assert [r.path.name for r in records] == [
        "a.jpg",
        "b.PNG",
        "c.JPEG",
        "d.webp",
        "e.bmp",
        "f.TIF",
        "g.tiff",
    ]


def test_scan_ignores_subfolders_unless_recursive(tmp_path: Path) -> None:
    make_image(tmp_path / "top.png")
    make_image(tmp_path / "sub" / "deep.png")
    make_image(tmp_path / ".cache" / "hidden.png")

    assert [r.path.name for r in scan_images(tmp_path)] == ["top.png"]
    assert [r.path.name for r in scan_images(tmp_path, recursive=True)] == ["deep.png", "top.png"]


def test_missing_dataset_dir_error_names_the_key_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match=r"data\.dataset_dir") as info:
        prepare_samples(data_cfg(missing))
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_record_carries_size_and_sha256_content_hash(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.png", size=(40, 30))
    (record,) = scan_images(tmp_path)
    assert record.size == (40, 30)
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(record.content_hash)
    assert len(record.content_hash) >= 12


# --------------------------------------------------------------------------- captions


def test_sidecar_beats_metadata_which_beats_instance_prompt(tmp_path: Path) -> None:
    for name in ("both.png", "meta.png", "none.png"):
        make_image(tmp_path / name)
    (tmp_path / "both.txt").write_text("  from sidecar \n")
    write_metadata(
        tmp_path,
        [
            {"file_name": "both.png", "text": "from metadata"},
            {"file_name": "meta.png", "text": "from metadata"},
        ],
    )

    captions = {r.path.name: r.caption for r in scan_images(tmp_path, instance_prompt="from prompt")}

    assert captions == {"both.png": "from sidecar", "meta.png": "from metadata", "none.png": "from prompt"}


def test_blank_sidecar_falls_through_to_the_next_source(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("   \n")
    (record,) = scan_images(tmp_path, instance_prompt="fallback")
    assert record.caption == "fallback"


def test_trigger_placeholder_is_replaced_in_every_caption_source(tmp_path: Path) -> None:
    for name in ("side.png", "meta.png", "prompt.png"):
        make_image(tmp_path / name)
    (tmp_path / "side.txt").write_text("a [trigger] chair")
    write_metadata(tmp_path, [{"file_name": "meta.png", "text": "[trigger] style, lamp"}])

    records = scan_images(tmp_path, instance_prompt="photo of [trigger]", trigger="sks")

    captions = {r.path.name: r.caption for r in records}
    assert captions == {
        "side.png": "a sks chair",
        "meta.png": "sks style, lamp",
        "prompt.png": "photo of sks",
    }


def test_trigger_placeholder_without_a_trigger_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a [trigger] chair")
    with pytest.raises(UsageError, match=r"data\.trigger"):
        scan_images(tmp_path)


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"file_name": "b.png", "text": ',
        '["b.png", "text"]',
        '{"text": "no file name"}',
        '{"file_name": "b.png", "text": 3}',
    ],
)
def test_malformed_metadata_line_error_names_file_and_line_number(tmp_path: Path, bad_line: str) -> None:
    make_image(tmp_path / "a.png")
    metadata = write_metadata(tmp_path, [{"file_name": "a.png", "text": "ok"}, "", bad_line])
    with pytest.raises(UsageError) as info:
        scan_images(tmp_path)
    message = str(info.value)
    assert f"{metadata} line 3" in message
    assert "\n" not in message


def test_metadata_file_names_match_with_leading_dot_slash_and_in_subfolders(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "sub" / "b.png")
    write_metadata(
        tmp_path, [{"file_name": "./a.png", "text": "first"}, {"file_name": "sub/b.png", "text": "second"}]
    )
    captions = {r.path.name: r.caption for r in scan_images(tmp_path, recursive=True)}
    assert captions == {"a.png": "first", "b.png": "second"}


def test_metadata_entry_for_a_missing_file_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "a.png")
    write_metadata(
        tmp_path, [{"file_name": "a.png", "text": "ok"}, {"file_name": "typo.png", "text": "lost"}]
    )
    with caplog.at_level(logging.WARNING, logger=DATASET_LOGGER):
        scan_images(tmp_path)
    assert [r.getMessage() for r in caplog.records if "typo.png" in r.getMessage()] != []
    assert len(caplog.records) == 1


# --------------------------------------------------------------------------- decoding


def test_exif_rotated_image_loads_upright(tmp_path: Path) -> None:
    # Stored landscape with a red left half; orientation 6 means "rotate 90 degrees clockwise to view".
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)

    upright = load_rgb(path)

    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    assert bottom.max() < 60
    (record,) = scan_images(tmp_path)
    assert record.size == (20, 40)


def test_transparent_pixels_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)  # opaque blue left half, fully transparent black right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    Image.fromarray(rgba[..., [0, 3]].copy(), "LA").save(tmp_path / "gray_alpha.png")

    out = np.asarray(load_rgb(tmp_path / "cutout.png"))
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[0, 7]) == (255, 255, 255)
    assert tuple(np.asarray(load_rgb(tmp_path / "gray_alpha.png"))[0, 7]) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "pal.png", transparency=0)
    out = load_rgb(tmp_path / "pal.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("mode", "suffix"), [("P", ".png"), ("L", ".png"), ("CMYK", ".jpg"), ("CMYK", ".tif"), ("1", ".bmp")]
)
def test_other_modes_load_as_8bit_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.new("RGB", (16, 8), (120, 60, 30)).convert(mode).save(path)
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.size == (16, 8)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    out = np.asarray(load_rgb(tmp_path / "deep.png"))

    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert abs(int(out[8, 0, 0]) - 128) <= 2  # mid-grey stays mid-grey; a clipping convert makes it 255


def test_float_image_in_unit_range_is_scaled_to_8bit(tmp_path: Path) -> None:
    gray = np.full((4, 4), 0.5, dtype=np.float32)
    Image.fromarray(gray, "F").save(tmp_path / "float.tif")
    out = np.asarray(load_rgb(tmp_path / "float.tif"))
    assert out.shape == (4, 4, 3)
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_unreadable_file_raises_a_specific_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(path)
    assert info.value.path == path


def test_unreadable_files_are_skipped_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with caplog.at_level(logging.WARNING, logger=DATASET_LOGGER):
        records = scan_images(tmp_path)

    assert [r.path.name for r in records] == ["good.png"]
    warnings = skip_warnings(caplog)
    assert len(warnings) == 3
    for name in ("empty.png", "text.png", "truncated.jpg"):
        assert sum(name in w and "unreadable" in w for w in warnings) == 1


# --------------------------------------------------------------------------- skipping and the standalone check


def test_too_small_image_is_skipped_with_one_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "big.png", size=(64, 64))
    make_image(tmp_path / "tiny.png", size=(20, 20))  # would need 3.2x to fill a 64px bucket

    with caplog.at_level(logging.WARNING):
        samples = prepare_samples(data_cfg(tmp_path, max_upscale=2.0), multiple=16)

    assert {s.record.path.name for s in samples} == {"big.png"}
    warnings = skip_warnings(caplog)
    assert len(warnings) == 1
    assert "tiny.png" in warnings[0] and "too small" in warnings[0] and "max_upscale" in warnings[0]


def test_allowed_upscale_keeps_a_smaller_image(tmp_path: Path) -> None:
    make_image(tmp_path / "half.png", size=(32, 32))
    samples = prepare_samples(data_cfg(tmp_path, max_upscale=2.0), multiple=16)
    assert [s.size for s in samples] == [(64, 64)]


def test_no_usable_images_is_one_usage_error_with_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken.png").write_bytes(b"")
    make_image(tmp_path / "tiny.png", size=(8, 8))

    with caplog.at_level(logging.WARNING), pytest.raises(UsageError) as info:
        prepare_samples(data_cfg(tmp_path), multiple=16)

    message = str(info.value)
    assert "\n" not in message
    assert f"no usable training images in {tmp_path}" in message
    assert "2 files checked, 1 unreadable, 1 too small" in message


def test_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="0 image files"):
        prepare_samples(data_cfg(tmp_path), multiple=16)


def test_prepare_samples_reads_the_data_section_of_a_run_config(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", size=(64, 64))
    cfg = OmegaConf.create(
        {"seed": 1, "model": {"resolution": 64}, "data": data_cfg(tmp_path, resolution="${model.resolution}")}
    )
    samples = prepare_samples(cfg, multiple=16)
    assert [s.size for s in samples] == [(64, 64)]


# --------------------------------------------------------------------------- paired data


def test_control_image_is_matched_by_file_stem(tmp_path: Path) -> None:
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    make_image(targets / "one.png")
    make_image(targets / "two.jpg")
    make_image(controls / "one.jpg")
    make_image(controls / "two.png")

    records = scan_images(targets, control_dir=controls)

    assert [(r.path.name, r.control_path.name) for r in records] == [
        ("one.png", "one.jpg"),
        ("two.jpg", "two.png"),
    ]
    assert all(r.control_hash for r in records)


def test_control_file_name_from_metadata_pairs_images(tmp_path: Path) -> None:
    make_image(tmp_path / "after.png")
    make_image(tmp_path / "sources" / "before.png")
    write_metadata(
        tmp_path,
        [{"file_name": "after.png", "text": "make it red", "control_file_name": "sources/before.png"}],
    )

    (record,) = scan_images(tmp_path)

    assert record.control_path == tmp_path / "sources" / "before.png"
    assert record.caption == "make it red"


def test_image_without_control_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    make_image(targets / "paired.png")
    make_image(targets / "lonely.png")
    make_image(controls / "paired.png")

    with caplog.at_level(logging.WARNING, logger=DATASET_LOGGER):
        records = scan_images(targets, control_dir=controls)

    assert [r.path.name for r in records] == ["paired.png"]
    warnings = skip_warnings(caplog)
    assert len(warnings) == 1 and "lonely.png" in warnings[0] and "control" in warnings[0]


# --------------------------------------------------------------------------- hashes, prior preservation


def test_dataset_hash_changes_when_a_caption_changes_but_not_with_order(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", color=(0, 0, 0))
    records = scan_images(tmp_path, instance_prompt="a chair")
    before = dataset_hash(records)

    assert dataset_hash(list(reversed(records))) == before
    recaptioned = [ImageRecord(r.path, "a table", r.size, r.content_hash) for r in records]
    assert dataset_hash(recaptioned) != before


def test_count_missing_class_images(tmp_path: Path) -> None:
    class_dir = tmp_path / "class"
    assert count_missing_class_images(class_dir, 5) == 5
    for i in range(3):
        make_image(class_dir / f"{i}.png")
    assert count_missing_class_images(class_dir, 5) == 2
    assert count_missing_class_images(class_dir, 2) == 0
    assert count_missing_class_images(None, 5) == 0


def test_class_samples_use_the_class_prompt_and_are_flagged_prior(tmp_path: Path) -> None:
    make_image(tmp_path / "inst" / "a.png", size=(64, 64))
    make_image(tmp_path / "class" / "c.png", size=(64, 64))
    cfg = data_cfg(
        tmp_path / "inst", class_dir=str(tmp_path / "class"), class_prompt="a photo of a chair", repeats=3
    )

    class_samples = prepare_class_samples(cfg, multiple=16)

    assert [(s.caption, s.is_prior) for s in class_samples] == [("a photo of a chair", True)]
    assert not any(s.is_prior for s in prepare_samples(cfg, multiple=16))
