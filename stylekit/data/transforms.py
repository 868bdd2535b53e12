"""ImageRecords -> training Samples: aspect-ratio buckets (`data=resize`) or edge-to-edge tiles (`data=tile`).

A Sample holds only geometry (a crop box in source pixels, an output size, a flip) and a caption; pixels
are decoded when asked for, so a large folder never sits in memory and the latent cache can key on it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from stylekit.data.dataset import ImageRecord, get_option, load_rgb
from stylekit.errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # left, top, right, bottom in source pixels (PIL's convention)
Size = tuple[int, int]  # width, height
RngLike = np.random.Generator | int | None

CROPS = ("center", "random")


class ImageTooSmallError(ValueError):
    """The image would need more upscaling than allowed (resize) or is smaller than one tile (tile)."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class DataOptions:
    """The `data` keys this module reads, validated. tile_size None means `resolution`."""

    mode: str = "resize"
    resolution: int = 1024
    crop: str = "center"
    random_flip: float = 0.0
    max_upscale: float = 2.0
    tile_size: int | None = None
    tile_overlap: float = 0.25  # fraction of tile_size shared by neighbouring tiles
    uniform_threshold: float = 0.02
    repeats: int = 1
    caption_dropout: float = 0.0

    @classmethod
    def from_cfg(cls, cfg: Any) -> DataOptions:
        if isinstance(cfg, DataOptions):
            return cfg
        from stylekit import schema

        raw = {f.name: get_option(cfg, f.name, f.default) for f in fields(cls)}
        # The same checks and messages as the run's config (stylekit.schema.Data), for callers that pass a
        # mapping of data keys of their own.
        checked = schema.section(schema.Data, raw, "data")
        return cls(**{f.name: getattr(checked, f.name) for f in fields(cls)})

    def tile_px(self, multiple: int) -> tuple[int, int]:
        """(tile side, overlap) in pixels; the side must be a multiple of the model's granularity."""
        tile = self.tile_size or self.resolution
        if tile % multiple:
            fix = max(multiple, tile // multiple * multiple)
            raise UsageError(
                f"data.tile_size={tile} is not a multiple of {multiple} for this model; use {fix}"
            )
        return tile, round(tile * self.tile_overlap)


# --------------------------------------------------------------------------- buckets


@lru_cache(maxsize=32)
def _buckets(
    resolution: int, multiple: int, min_ratio: float, max_ratio: float, step: int
) -> tuple[Size, ...]:
    area = resolution * resolution
    side = resolution // multiple * multiple
    limit = max(max_ratio, 1.0 / min_ratio)
    wide: list[Size] = []
    width = side
    while True:
        # Floor, not round: no bucket costs more memory than the square one.
        height = min(width, area // width // multiple * multiple)
        if height < multiple or width / height > limit:
            break
        wide.append((width, height))
        width += step
    kept = {(w, h) for w, h in wide if w / h <= max_ratio}
    kept |= {(h, w) for w, h in wide if h / w >= min_ratio}
    return tuple(sorted(kept, key=lambda s: (s[0] / s[1], s[0])))


def make_buckets(
    resolution: int, multiple: int, min_ratio: float = 0.25, max_ratio: float = 4.0, step: int | None = None
) -> list[Size]:
    """(w, h) buckets of at most (and about) resolution**2 pixels, sides multiples of `multiple`, tall to wide.

    step is how much the width grows from one bucket to the next; by default about resolution/16 (64 px
    at 1024) rounded up to `multiple`, which keeps the count of buckets (and half-empty batches) low.
    """
    if multiple < 1 or resolution < multiple:
        raise ValueError(f"resolution {resolution} must be at least multiple {multiple} (>= 1)")
    step = step or multiple * math.ceil(resolution / 16 / multiple)
    if step % multiple:
        raise ValueError(f"step {step} must be a multiple of {multiple}")
    return list(_buckets(resolution, multiple, float(min_ratio), float(max_ratio), step))


def assign_bucket(w: int, h: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to w/h (in log space, so tall and wide count alike)."""
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def upscale_needed(w: int, h: int, bucket: Size) -> float:
    """The scale at which a w x h image just covers the bucket."""
    return max(bucket[0] / w, bucket[1] / h)


def bucket_crop_box(
    w: int, h: int, bucket: Size, crop: str = "center", rng: np.random.Generator | None = None
) -> Box:
    """The region of a w x h image that, scaled to cover the bucket, is the bucket; center or random."""
    scale = upscale_needed(w, h, bucket)
    cw, ch = min(w, round(bucket[0] / scale)), min(h, round(bucket[1] / scale))
    if crop == "center":
        left, top = (w - cw) // 2, (h - ch) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return left, top, left + cw, top + ch


def render(img: Image.Image, box: Box, size: Size, flip: bool = False) -> Image.Image:
    """Crop `box` out of img, resize it to `size` (in one resampling step) and optionally mirror it."""
    if (box[2] - box[0], box[3] - box[1]) == tuple(size):
        out = img.crop(box)
    else:
        out = img.resize(tuple(size), Image.Resampling.LANCZOS, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def resize_to_bucket(
    img: Image.Image,
    bucket: Size,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    flip_prob: float = 0.0,
    max_upscale: float = 2.0,
) -> Image.Image:
    """Scale img to cover the bucket, crop to it and maybe flip; ImageTooSmallError past max_upscale."""
    scale = upscale_needed(*img.size, bucket)
    if scale > max_upscale + 1e-9:
        raise ImageTooSmallError(f"{img.size[0]}x{img.size[1]} needs {scale:.2f}x to cover {bucket}")
    box = bucket_crop_box(*img.size, bucket, crop, rng)
    flip = False
    if flip_prob > 0:
        if rng is None:
            raise ValueError("a random flip needs an rng")
        flip = bool(rng.random() < flip_prob)
    return render(img, box, bucket, flip)


def size_problem(
    w: int, h: int, opts: DataOptions, multiple: int, buckets: Sequence[Size] | None = None
) -> str | None:
    """Why a w x h image can't make a sample in this mode (for the scanner's warning), or None."""
    if opts.mode == "tile":
        tile, _ = opts.tile_px(multiple)
        if min(w, h) < tile:
            return f"{w}x{h} is smaller than data.tile_size={tile} on its short side"
        return None
    bucket = assign_bucket(w, h, buckets or make_buckets(opts.resolution, multiple))
    scale = upscale_needed(w, h, bucket)
    if scale > opts.max_upscale + 1e-9:
        return (
            f"{w}x{h} needs {scale:.2f}x upscaling to fill its {bucket[0]}x{bucket[1]} bucket, "
            f"over data.max_upscale={opts.max_upscale:g}"
        )
    return None


# --------------------------------------------------------------------------- tiles


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # snap the last tile to the border so the edge is covered
    return starts


def tile_boxes(w: int, h: int, tile_size: int, overlap: int = 0) -> list[Box]:
    """Row-major tile_size squares covering a w x h image edge to edge, none crossing its border.

    Neighbours share `overlap` px (more in the last row/column, which is snapped to the border).
    ImageTooSmallError if the image is smaller than one tile.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap {overlap} must be in [0, tile_size={tile_size})")
    if w < tile_size or h < tile_size:
        raise ImageTooSmallError(f"{w}x{h} is smaller than one {tile_size}px tile")
    stride = tile_size - overlap
    xs, ys = _tile_starts(w, tile_size, stride), _tile_starts(h, tile_size, stride)
    return [(x, y, x + tile_size, y + tile_size) for y in ys for x in xs]


def luminance(img: Image.Image) -> np.ndarray:
    """Luma in [0, 1], h x w float32."""
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def is_near_uniform(luma: np.ndarray, box: Box, threshold: float) -> bool:
    """True when the box's luminance std (0-1 scale) is below threshold: flat backdrop, nothing to learn."""
    left, top, right, bottom = box
    return float(luma[top:bottom, left:right].std()) < threshold


# --------------------------------------------------------------------------- samples


@lru_cache(maxsize=2)
def _decoded(path: str, content_hash: str | None) -> Image.Image:
    # Consecutive tiles of one big image would otherwise decode it once per tile. The content hash is part of the
    # key: a file replaced under the same name (new photos, a new class image) must not come back as the old one.
    return load_rgb(path)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 CHW tensor in [-1, 1]."""
    # Imported here so that checking a dataset (prepare_samples) doesn't pay for importing torch.
    import torch

    array = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


@dataclass(frozen=True)
class Sample:
    """One training example: `box` of the record's (upright) image, resized to `size`, maybe mirrored."""

    record: ImageRecord
    box: Box
    size: Size
    caption: str
    flip: bool = False

    @property
    def is_prior(self) -> bool:
        return self.record.is_prior

    def pixels(self) -> torch.Tensor:
        """float32 (3, h, w) in [-1, 1], decoded now."""
        return to_tensor(
            render(_decoded(str(self.record.path), self.record.content_hash), self.box, self.size, self.flip)
        )

    def control_pixels(self, size: Size | None = None) -> torch.Tensor | None:
        """The control image with the same crop and flip (after resizing it to the record's size), rendered at
        `size` (default the sample's), or None."""
        if self.record.control_path is None:
            return None
        control = _decoded(str(self.record.control_path), self.record.control_hash)
        if control.size != self.record.size:
            control = control.resize(self.record.size, Image.Resampling.LANCZOS)
        return to_tensor(render(control, self.box, tuple(size or self.size), self.flip))

    @property
    def original_size(self) -> Size:
        """(w, h) of the whole upright image the sample was cut from."""
        return self.record.size

    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the image scaled so the crop is the output size (mirrored first when
        flipped): SDXL's crop conditioning, as diffusers' reference trainer computes it."""
        left, top, right, bottom = self.box
        scale = max(self.size[0] / (right - left), self.size[1] / (bottom - top))
        if self.flip:
            left = self.record.size[0] - right
        return round(top * scale), round(left * scale)


def cache_key(
    sample: Sample, model_id: str, size: Size | None = None, control_size: Size | None = None
) -> str:
    """Filename-safe key for the latent cache: content hash(es), the image's original size, crop box, output
    size, flip, model and the size the control is encoded at. Entries hold the size and crop conditioning too."""
    w, h = size or sample.size
    ow, oh = sample.original_size
    left, top, right, bottom = sample.box
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)
    content = sample.record.content_hash
    if sample.record.control_hash:
        cw, ch = control_size or (w, h)
        content += f"+{sample.record.control_hash}@{cw}x{ch}"
    flip = "flip" if sample.flip else "noflip"
    return f"{model}__{content}__{ow}x{oh}__{left}_{top}_{right}_{bottom}__{w}x{h}__{flip}"


def build_samples(
    records: Sequence[ImageRecord], mode_cfg: Any, multiple: int, rng: RngLike = None
) -> list[Sample]:
    """Every record as samples: one per repeat (resize) or one per kept tile per repeat (tile).

    Crops, flips and caption dropout are drawn here from rng, from independent streams so changing one
    probability doesn't reshuffle the others. Call again with another seed for fresh draws each epoch;
    keep one set while latents are cached.
    """
    opts = DataOptions.from_cfg(mode_cfg)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    crop_rng, flip_rng, drop_rng = rng.spawn(3)
    tiles = _tile_layouts(records, opts, multiple) if opts.mode == "tile" else None
    buckets = make_buckets(opts.resolution, multiple)
    samples = []
    for index, record in enumerate(records):
        bucket = None if tiles is not None else _fitting_bucket(record, opts, multiple, buckets)
        if tiles is None and bucket is None:
            continue
        for _ in range(opts.repeats):
            if bucket is not None:
                layouts = [(bucket_crop_box(*record.size, bucket, opts.crop, crop_rng), bucket)]
            else:
                layouts = tiles[index]
            for box, size in layouts:
                flip = bool(flip_rng.random() < opts.random_flip)
                dropped = bool(drop_rng.random() < opts.caption_dropout)
                samples.append(Sample(record, box, size, "" if dropped else record.caption, flip))
    return samples


def _fitting_bucket(
    record: ImageRecord, opts: DataOptions, multiple: int, buckets: Sequence[Size]
) -> Size | None:
    problem = size_problem(*record.size, opts, multiple, buckets)
    if problem:
        log.warning("skipping %s: too small (%s)", record.path, problem)
        return None
    return assign_bucket(*record.size, buckets)


def _tile_layouts(
    records: Sequence[ImageRecord], opts: DataOptions, multiple: int
) -> list[list[tuple[Box, Size]]]:
    tile, overlap = opts.tile_px(multiple)
    layouts, total, dropped = [], 0, 0
    for record in records:
        try:
            boxes = tile_boxes(*record.size, tile, overlap)
        except ImageTooSmallError as exc:
            log.warning("skipping %s: too small (%s)", record.path, exc)
            boxes = []
        total += len(boxes)
        if boxes and opts.uniform_threshold > 0:
            luma = luminance(_decoded(str(record.path), record.content_hash))
            kept = [b for b in boxes if not is_near_uniform(luma, b, opts.uniform_threshold)]
            dropped += len(boxes) - len(kept)
            boxes = kept
        layouts.append([(box, (tile, tile)) for box in boxes])
    if dropped:
        log.info(
            "dropped %d of %d tiles as near-uniform (luminance std < data.uniform_threshold=%g)",
            dropped, total, opts.uniform_threshold,
        )  # fmt: skip
    return layouts


# --------------------------------------------------------------------------- batching


def group_by_size(samples: Sequence[Sample]) -> dict[Size, list[Sample]]:
    """Samples by output size, in first-seen order, so each batch can be one tensor shape."""
    groups: dict[Size, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample.size), []).append(sample)
    return groups


class BucketBatchSampler:
    """Batches of indices into `samples` that share one size; shuffled per (seed, epoch), reproducibly.

    Pass it as a DataLoader's batch_sampler. Call set_epoch(n) before each epoch for a new order. With
    drop_last, each size's last short batch is dropped; otherwise it is yielded short. It implements the
    Sampler protocol rather than subclassing torch's, to keep torch out of the dataset check.
    """

    def __init__(
        self, samples: Sequence[Sample], batch_size: int, seed: int = 0, drop_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups: dict[Size, list[int]] = {}
        for index, sample in enumerate(samples):
            groups.setdefault(tuple(sample.size), []).append(index)
        self.groups = [groups[size] for size in sorted(groups)]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for indices in self.groups:
            order = rng.permutation(indices).tolist()
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        for position in rng.permutation(len(batches)).tolist():
            yield batches[position]

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self.groups)
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)
