"""Records -> samples: buckets, crops, tiles, caption dropout, repeats, batching and pixel tensors."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylekit.data.dataset import ImageRecord, scan_images
from stylekit.data.transforms import (
    BucketBatchSampler,
    DataOptions,
    ImageTooSmallError,
    Sample,
    assign_bucket,
    bucket_crop_box,
    build_samples,
    cache_key,
    group_by_size,
    make_buckets,
    resize_to_bucket,
    tile_boxes,
)
from stylekit.errors import UsageError


def record(
    path: Path = Path("x.png"), size: tuple[int, int] = (100, 100), caption: str = "a cat"
) -> ImageRecord:
    return ImageRecord(path=path, caption=caption, size=size, content_hash="0123456789abcdef")


def gradient_image(path: Path, size: tuple[int, int]) -> Path:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    pixels = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.zeros((h, w, 1))], 2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------- tiles


def test_tiles_cover_every_pixel_edge_to_edge() -> None:
    sides = [64, 65, 100, 127, 128, 200, 301]
    for (w, h), tile, overlap in itertools.product(itertools.product(sides, sides), [64, 96], [0, 9, 63]):
        if w < tile or h < tile:
            continue
        covered = np.zeros((h, w), dtype=bool)
        for left, top, right, bottom in tile_boxes(w, h, tile, overlap):
            assert min(left, top) >= 0 and right <= w and bottom <= h, (w, h, tile, overlap)
            assert (right - left, bottom - top) == (tile, tile)
            covered[top:bottom, left:right] = True
        assert covered.all(), (w, h, tile, overlap)


def test_tiles_step_by_tile_minus_overlap() -> None:
    boxes = tile_boxes(256, 128, 128, overlap=64)
    assert [b[0] for b in boxes if b[1] == 0] == [0, 64, 128]
    assert tile_boxes(128, 128, 128, overlap=32) == [(0, 0, 128, 128)]


def test_image_smaller_than_a_tile_is_too_small() -> None:
    with pytest.raises(ImageTooSmallError):
        tile_boxes(127, 500, 128, 0)


def test_near_uniform_tiles_are_dropped_with_one_summary_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Left half flat white, right half noise: with 64px tiles and no overlap, 2 of 4 tiles are flat.
    pixels = np.full((128, 128, 3), 255, dtype=np.uint8)
    pixels[:, 64:] = np.random.default_rng(0).integers(0, 256, (128, 64, 3), dtype=np.uint8)
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    cfg = {"mode": "tile", "resolution": 64, "tile_size": 64, "tile_overlap": 0.0, "uniform_threshold": 0.02}

    with caplog.at_level(logging.INFO, logger="stylekit.data.transforms"):
        samples = build_samples(scan_images(tmp_path), cfg, multiple=16, rng=0)

    assert sorted(s.box for s in samples) == [(64, 0, 128, 64), (64, 64, 128, 128)]
    summaries = [r.getMessage() for r in caplog.records if "near-uniform" in r.getMessage()]
    assert len(summaries) == 1 and "2 of 4" in summaries[0]


def test_each_tile_keeps_its_caption_and_the_control_tile_at_the_same_box(tmp_path: Path) -> None:
    gradient_image(tmp_path / "img" / "a.png", (96, 64))
    gradient_image(tmp_path / "ctl" / "a.png", (96, 64))
    records = scan_images(tmp_path / "img", control_dir=tmp_path / "ctl", instance_prompt="fabric")
    cfg = {"mode": "tile", "resolution": 64, "tile_size": 64, "tile_overlap": 0.0, "uniform_threshold": 0.0}

    samples = build_samples(records, cfg, multiple=16, rng=0)

    assert [s.box for s in samples] == [(0, 0, 64, 64), (32, 0, 96, 64)]
    for sample in samples:
        assert sample.caption == "fabric"
        assert sample.pixels().shape == (3, 64, 64)
        assert np.allclose(sample.pixels().numpy(), sample.control_pixels().numpy())


# --------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("resolution", "multiple"), [(512, 8), (768, 16), (1024, 16), (1024, 32), (1328, 16)]
)
def test_buckets_have_area_about_resolution_squared_and_sides_on_the_grid(
    resolution: int, multiple: int
) -> None:
    buckets = make_buckets(resolution, multiple)
    assert len(buckets) > 5
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert 0.9 * resolution**2 <= w * h <= resolution**2


def test_buckets_run_from_tall_to_wide_within_the_ratio_limits() -> None:
    buckets = make_buckets(1024, 16, min_ratio=0.25, max_ratio=4.0)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert ratios[0] == pytest.approx(0.25, abs=0.02) and ratios[-1] == pytest.approx(4.0, abs=0.1)
    assert (1024, 1024) in buckets
    assert {(h, w) for w, h in buckets} == set(buckets)


@pytest.mark.parametrize(
    "size", [(1000, 1000), (1920, 1080), (1080, 1920), (3000, 700), (640, 2560), (1234, 987)]
)
def test_assign_bucket_picks_the_closest_aspect_ratio(size: tuple[int, int]) -> None:
    buckets = make_buckets(1024, 16)
    w, h = size
    chosen = assign_bucket(w, h, buckets)
    distance = [abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in buckets]
    assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == pytest.approx(min(distance))


def test_random_crop_stays_in_bounds_and_is_deterministic_with_a_seed() -> None:
    for (w, h), bucket in itertools.product(
        [(300, 200), (200, 300), (257, 1021), (64, 64)], [(64, 64), (96, 48)]
    ):
        first = [bucket_crop_box(w, h, bucket, "random", np.random.default_rng(7)) for _ in range(3)]
        assert len(set(first)) == 1  # same seed, same box
        rng = np.random.default_rng(1)
        for _ in range(50):
            left, top, right, bottom = bucket_crop_box(w, h, bucket, "random", rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            assert (right - left) / (bottom - top) == pytest.approx(bucket[0] / bucket[1], rel=0.02)
    boxes = {bucket_crop_box(300, 200, (64, 64), "random", np.random.default_rng(s)) for s in range(20)}
    assert len(boxes) > 1


def test_center_crop_is_centered() -> None:
    assert bucket_crop_box(300, 100, (64, 64), "center") == (100, 0, 200, 100)


def test_resize_to_bucket_covers_crops_and_flips() -> None:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 100))  # white left half
    plain = resize_to_bucket(img, (64, 32))
    mirrored = resize_to_bucket(img, (64, 32), rng=np.random.default_rng(0), flip_prob=1.0)
    assert plain.size == mirrored.size == (64, 32)
    assert plain.getpixel((2, 16))[0] > 200 and mirrored.getpixel((61, 16))[0] > 200


def test_no_silent_upscale_beyond_max_upscale() -> None:
    img = Image.new("RGB", (40, 40))
    assert resize_to_bucket(img, (64, 64), max_upscale=2.0).size == (64, 64)
    with pytest.raises(ImageTooSmallError):
        resize_to_bucket(img, (128, 128), max_upscale=2.0)


# --------------------------------------------------------------------------- samples


def test_pixel_tensors_are_float32_in_minus_one_to_one_with_the_bucket_shape(tmp_path: Path) -> None:
    gradient_image(tmp_path / "wide.png", (160, 90))
    samples = build_samples(scan_images(tmp_path), {"resolution": 64, "random_flip": 0.5}, multiple=16, rng=0)
    (sample,) = samples
    pixels = sample.pixels()
    w, h = sample.size
    assert w > h and w * h <= 64 * 64
    assert pixels.shape == (3, h, w) and str(pixels.dtype) == "torch.float32"
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.9 and pixels.max() > 0.9


def test_caption_dropout_rate_matches_p_and_is_deterministic_with_a_seed() -> None:
    records = [record(Path(f"{i}.png")) for i in range(20)]
    cfg = {"resolution": 64, "caption_dropout": 0.3, "repeats": 50}

    first = [s.caption for s in build_samples(records, cfg, multiple=16, rng=123)]
    again = [s.caption for s in build_samples(records, cfg, multiple=16, rng=123)]
    other = [s.caption for s in build_samples(records, cfg, multiple=16, rng=124)]

    assert first == again and first != other
    assert first.count("") / len(first) == pytest.approx(0.3, abs=0.04)
    assert set(first) == {"", "a cat"}


def test_changing_flip_probability_does_not_reshuffle_random_crops() -> None:
    records = [record(size=(300, 100))] * 5
    crops = [
        [s.box for s in build_samples(records, {"resolution": 64, "crop": "random", "random_flip": p}, 16, 9)]
        for p in (0.0, 0.5)
    ]
    assert crops[0] == crops[1]


def test_repeats_make_each_record_appear_n_times() -> None:
    records = [record(Path("a.png")), record(Path("b.png"))]
    samples = build_samples(records, {"resolution": 64, "repeats": 3}, multiple=16, rng=0)
    assert [s.record.path.name for s in samples] == ["a.png"] * 3 + ["b.png"] * 3


def test_group_by_size_puts_one_size_per_group() -> None:
    records = [record(size=(100, 100)), record(size=(200, 100)), record(size=(100, 100))]
    groups = group_by_size(build_samples(records, {"resolution": 64}, multiple=16, rng=0))
    assert len(groups) == 2
    assert all(s.size == size for size, members in groups.items() for s in members)
    assert len(groups[(64, 64)]) == 2


def test_bucket_batch_sampler_yields_equal_size_batches_deterministically() -> None:
    sizes = [(100, 100)] * 7 + [(200, 100)] * 5 + [(100, 200)] * 3
    samples = build_samples([record(size=s) for s in sizes], {"resolution": 64}, multiple=16, rng=0)

    sampler = BucketBatchSampler(samples, batch_size=2, seed=5)
    epoch0 = list(sampler)
    assert list(BucketBatchSampler(samples, batch_size=2, seed=5)) == epoch0
    assert len(epoch0) == len(sampler) == 4 + 3 + 2
    assert sorted(i for batch in epoch0 for i in batch) == list(range(len(samples)))
    for batch in epoch0:
        assert len({samples[i].size for i in batch}) == 1
    sampler.set_epoch(1)
    assert list(sampler) != epoch0

    dropping = BucketBatchSampler(samples, batch_size=2, seed=5, drop_last=True)
    assert all(len(b) == 2 for b in dropping) and len(list(dropping)) == len(dropping) == 3 + 2 + 1


def test_cache_key_is_stable_filename_safe_and_tracks_geometry_and_model() -> None:
    base = Sample(record(), box=(0, 0, 100, 100), size=(64, 64), caption="a cat")
    key = cache_key(base, "black-forest-labs/FLUX.1-dev")
    assert key == cache_key(
        Sample(record(), (0, 0, 100, 100), (64, 64), "dropped caption"), "black-forest-labs/FLUX.1-dev"
    )
    assert "/" not in key and "0123456789abcdef" in key
    variants = [
        cache_key(Sample(record(), (1, 0, 101, 100), (64, 64), "a cat"), "black-forest-labs/FLUX.1-dev"),
        cache_key(
            Sample(record(), (0, 0, 100, 100), (64, 64), "a cat", flip=True), "black-forest-labs/FLUX.1-dev"
        ),
        cache_key(base, "black-forest-labs/FLUX.1-dev", size=(32, 32)),
        cache_key(base, "stabilityai/stable-diffusion-xl-base-1.0"),
    ]
    assert len({key, *variants}) == 5


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", "stretch"),
        ("crop", "middle"),
        ("random_flip", 1.5),
        ("caption_dropout", -0.1),
        ("repeats", 0),
        ("max_upscale", 0.5),
        ("tile_overlap", 64),
    ],
)
def test_bad_option_is_a_one_line_usage_error_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(UsageError, match=rf"data\.{key}") as info:
        DataOptions.from_cfg({key: value})
    assert "\n" not in str(info.value)


def test_tile_size_off_the_model_grid_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"data\.tile_size=100 .* use 96"):
        build_samples([record(size=(300, 300))], {"mode": "tile", "tile_size": 100}, multiple=16, rng=0)


def test_a_boolean_random_flip_means_half_the_samples() -> None:
    assert DataOptions.from_cfg({"random_flip": True}).random_flip == 0.5
    assert DataOptions.from_cfg({"random_flip": False}).random_flip == 0.0


# --------------------------------------------------------------------------- what the encodings carry


def test_crop_top_left_is_in_the_scaled_photo_and_mirrored_with_a_flip() -> None:
    photo = record(size=(150, 100))
    bucket = (128, 128)
    box = bucket_crop_box(150, 100, bucket, "center")  # 100x100 at x=25, scaled by 1.28
    assert Sample(photo, box, bucket, "a cat").crop_top_left() == (0, 32)
    # Flipped, the crop is taken from the mirrored photo: a box ending 10 px from the right edge starts 10 px in.
    assert Sample(photo, (40, 0, 140, 100), bucket, "a cat", flip=True).crop_top_left() == (
        0,
        round(10 * 1.28),
    )
    assert Sample(photo, (40, 0, 140, 100), bucket, "a cat").original_size == (150, 100)
    # A tile is not scaled: its offset in the photo is the crop.
    assert Sample(record(size=(300, 200)), (128, 64, 192, 128), (64, 64), "a cat").crop_top_left() == (
        64,
        128,
    )


def test_cache_key_tracks_the_original_size_and_the_size_the_control_is_encoded_at() -> None:
    base = Sample(record(size=(100, 100)), (0, 0, 100, 100), (64, 64), "a cat")
    other_photo = Sample(record(size=(100, 120)), (0, 0, 100, 100), (64, 64), "a cat")
    assert cache_key(base, "m") != cache_key(other_photo, "m")
    paired = ImageRecord(
        Path("x.png"), "a cat", (100, 100), "0123456789abcdef", Path("c.png"), "fedcba9876543210"
    )
    sample = Sample(paired, (0, 0, 100, 100), (64, 64), "a cat")
    assert cache_key(sample, "m", control_size=(64, 64)) == cache_key(sample, "m")
    assert cache_key(sample, "m", control_size=(128, 128)) != cache_key(sample, "m")


def test_a_photo_replaced_under_the_same_name_is_decoded_anew(tmp_path: Path) -> None:
    from stylekit.data.dataset import file_hash

    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    first = Sample(ImageRecord(path, "", (64, 64), file_hash(path)), (0, 0, 64, 64), (64, 64), "")
    assert float(first.pixels()[0].mean()) > 0.5
    Image.new("RGB", (64, 64), (10, 10, 200)).save(path)
    again = Sample(ImageRecord(path, "", (64, 64), file_hash(path)), (0, 0, 64, 64), (64, 64), "")
    assert float(again.pixels()[0].mean()) < -0.5


def test_sdxl_trains_on_a_64_px_grid_and_qwen_encodes_controls_at_its_condition_area() -> None:
    from stylekit.models.qwen_edit import QwenEditFamily
    from stylekit.models.sdxl import SDXLFamily

    sdxl = SDXLFamily(pretrained="tiny:sdxl")
    assert sdxl.bucket_multiple == 64 and sdxl.resolution_multiple == 8  # inpainting crops keep 8 px
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in make_buckets(1024, sdxl.bucket_multiple))
    qwen = QwenEditFamily(pretrained="tiny:qwen_edit", condition_area=1024 * 1024)
    assert qwen.bucket_multiple == 32
    assert qwen.control_size((512, 512)) == (1024, 1024)
    assert qwen.control_size((640, 384)) == (1312, 800)  # ~1 MP at 5:3, sides on a 32 px grid
