"""A folder of images plus captions -> ImageRecords, checked before any model is loaded.

Captions, first match wins: `<stem>.txt` next to the image, the image's `text` in the folder's
`metadata.jsonl` (the Hugging Face imagefolder layout), then `data.instance_prompt`. `[trigger]` in any
of them becomes `data.trigger`. Paired edit data takes its source image from `data.control_dir` (same
stem) or from `control_file_name` in metadata.jsonl.

When `data.hf_dataset` is set, the records come from that `datasets` dataset instead (stylekit.data.hub) and
`data.dataset_dir` is not read; `prepare_samples` turns either kind of record into samples the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from stylekit.errors import UsageError

if TYPE_CHECKING:
    from stylekit.data.transforms import Sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# The pixel limit of stylekit.inpaint.images: larger files are decompression bombs, not photos. Checked here
# because Pillow's own limit is global state (importing the inpaint module raises it past a 20000^2 bomb).
MAX_PIXELS = 16384 * 16384
METADATA_FILE = "metadata.jsonl"
TRIGGER_TOKEN = "[trigger]"
HASH_CHARS = 16
# Any multiple of 32 is also one of 8 and 16, so this default suits every family when none is passed in.
DEFAULT_MULTIPLE = 32

SizeCheck = Callable[[int, int], "str | None"]


class UnreadableImageError(Exception):
    """A file with an image extension that cannot be decoded into an RGB image."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image. `size` is (w, h) after EXIF orientation."""

    path: Path
    caption: str
    size: tuple[int, int]
    content_hash: str
    control_path: Path | None = None
    control_hash: str | None = None
    is_prior: bool = False


@dataclass(frozen=True)
class MetadataEntry:
    line: int
    text: str | None = None
    control_file_name: str | None = None


# --------------------------------------------------------------------------- config access


def get_option(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for dicts and DictConfigs, `cfg.key` for namespaces and dataclasses; None counts as unset."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def data_section(cfg_like: Any) -> Any:
    """The `data` section of a full run config, or the object itself when it already is that section."""
    section = get_option(cfg_like, "data")
    return section if isinstance(section, Mapping) or hasattr(section, "__dict__") else cfg_like


# --------------------------------------------------------------------------- images


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:HASH_CHARS]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as 8-bit RGB; UnreadableImageError if it can't be."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it once
            opened = Image.open(path)
        with opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise Image.DecompressionBombError(
                    f"{opened.width}x{opened.height} is more than {MAX_PIXELS} pixels (16384x16384)"
                )
            opened.load()
            img = ImageOps.exif_transpose(opened)
    # Pillow's decoders raise a zoo of types on corrupt input (OSError, SyntaxError, struct.error,
    # IndexError, DecompressionBombError...); all of them mean "this file can't be used".
    except Exception as exc:
        raise UnreadableImageError(path, _describe(exc)) from exc
    return _to_rgb8(img, path)


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb8(img: Image.Image, path: Path) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb8(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # The VAE only sees RGB. Dropping alpha keeps whatever colour sits under transparent pixels
        # (often black or junk), which the LoRA would learn as halos; white is the usual cut-out backdrop.
        rgba = img.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # P, L, 1, CMYK, YCbCr...
    except (ValueError, OSError) as exc:
        raise UnreadableImageError(path, f"unsupported image mode {mode}") from exc


def _high_depth_to_rgb8(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8 bits by scaling; Pillow's own convert clips everything above 255."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max(initial=0.0))
        # Float images are mostly 0..1; anything else is stretched so its brightest pixel is white.
        values = values * (255.0 if peak <= 1.0 else 255.0 / peak)
    else:
        # I;16* and I (how Pillow hands out 16-bit PNG/TIFF) hold 0..65535.
        values = values / 257.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def list_image_files(root: Path, recursive: bool = False, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under root by extension (any case), hidden files and folders left out, sorted."""
    excluded = [p.resolve() for p in exclude]
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = []
    for path in candidates:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not path.is_file() or any(path.resolve().is_relative_to(ex) for ex in excluded):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _existing_dir(path: str | Path, key: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UsageError(f"{key}: {root} {what}; point {key} at a folder of images")
    return root


# --------------------------------------------------------------------------- captions


def read_metadata(dataset_dir: Path) -> dict[str, MetadataEntry]:
    """`file_name` (posix, relative to the folder) -> entry, from dataset_dir/metadata.jsonl if there is one."""
    path = dataset_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    entries: dict[str, MetadataEntry] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, entry = _parse_metadata_line(line, path, lineno)
        if name in entries:
            first = entries[name].line
            raise UsageError(f"{path} line {lineno}: {name!r} already has an entry on line {first}; keep one")
        entries[name] = entry
    return entries


def _parse_metadata_line(line: str, path: Path, lineno: int) -> tuple[str, MetadataEntry]:
    where = f"{path} line {lineno}"
    example = '{"file_name": "a.png", "text": "a caption"}'
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{where}: not valid JSON ({exc.msg}); each line must be one object like {example}"
        ) from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object like {example}, got {type(obj).__name__}")
    name = obj.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f'{where}: missing the "file_name" string; each line must look like {example}')
    for key in ("text", "control_file_name"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise UsageError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
    entry = MetadataEntry(line=lineno, text=obj.get("text"), control_file_name=obj.get("control_file_name"))
    return _norm_rel(name), entry


def _norm_rel(name: str) -> str:
    # Written on Windows or with a leading "./", the same file must still match.
    return PurePosixPath(name.strip().replace("\\", "/")).as_posix().removeprefix("./")


def _read_sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc


def resolve_caption(
    image: Path, entry: MetadataEntry | None, metadata_path: Path, instance_prompt: str
) -> tuple[str | None, str]:
    """(caption, where it came from). A blank sidecar or text falls through to the next source."""
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        text = _read_sidecar(sidecar)
        if text:
            return text, str(sidecar)
    if entry is not None and entry.text and entry.text.strip():
        return entry.text.strip(), f"{metadata_path} line {entry.line}"
    if instance_prompt.strip():
        return instance_prompt.strip(), "data.instance_prompt"
    return None, ""


def apply_trigger(caption: str, trigger: str, source: str) -> str:
    if TRIGGER_TOKEN not in caption:
        return caption
    if not trigger.strip():
        raise UsageError(f"{source} uses {TRIGGER_TOKEN} but data.trigger is empty; set data.trigger=<token>")
    return caption.replace(TRIGGER_TOKEN, trigger.strip())


# --------------------------------------------------------------------------- scanning


@dataclass
class ScanStats:
    checked: int = 0
    unreadable: int = 0
    too_small: int = 0
    no_control: int = 0
    uncaptioned: int = 0


@dataclass
class _ScanContext:
    root: Path
    metadata: dict[str, MetadataEntry]
    instance_prompt: str
    trigger: str
    control_root: Path | None
    control_index: dict[str, list[Path]]
    require_control: bool
    size_check: SizeCheck | None
    stats: ScanStats = field(default_factory=ScanStats)


def scan_images(
    dataset_dir: str | Path,
    *,
    instance_prompt: str = "",
    trigger: str = "",
    control_dir: str | Path | None = None,
    require_control: bool | None = None,
    recursive: bool = False,
    size_check: SizeCheck | None = None,
    key: str = "data.dataset_dir",
) -> list[ImageRecord]:
    """Every usable image in dataset_dir as a record; unusable ones are skipped with one warning each.

    `size_check(w, h)` returns why an image is too small, or None. Controls are required when control_dir
    is set or metadata.jsonl names any control_file_name (override with require_control). UsageError when
    nothing is usable, so a bad folder fails before any model is loaded.
    """
    root = _existing_dir(dataset_dir, key)
    control_root = _existing_dir(control_dir, "data.control_dir") if control_dir else None
    metadata = read_metadata(root)
    if require_control is None:
        require_control = control_root is not None or any(e.control_file_name for e in metadata.values())
    ctx = _ScanContext(
        root=root,
        metadata=metadata,
        instance_prompt=instance_prompt or "",
        trigger=trigger or "",
        control_root=control_root,
        control_index=_index_by_stem(control_root, recursive) if control_root else {},
        require_control=require_control,
        size_check=size_check,
    )
    files = list_image_files(root, recursive, [control_root] if control_root else [])
    _warn_orphan_metadata(root, metadata, files)
    records = [r for p in files if (r := _scan_one(p, ctx)) is not None]
    if not records:
        raise UsageError(nothing_usable(root, ctx.stats))
    if ctx.stats.uncaptioned:
        log.warning(
            "%d of %d images in %s have no caption (no .txt sidecar, no %s text, empty instance prompt); "
            "they train unconditioned",
            ctx.stats.uncaptioned, len(records), root, METADATA_FILE,
        )  # fmt: skip
    return records


def _warn_orphan_metadata(root: Path, metadata: dict[str, MetadataEntry], files: list[Path]) -> None:
    # A typo in file_name would otherwise silently fall back to data.instance_prompt.
    listed = {p.relative_to(root).as_posix() for p in files}
    orphans = sorted(name for name in metadata if name not in listed)
    if orphans:
        log.warning(
            "%s names %d files that are not images in %s (first: %r, line %d); their entries are unused",
            root / METADATA_FILE, len(orphans), root, orphans[0], metadata[orphans[0]].line,
        )  # fmt: skip


def check_image(
    path: Path, size_check: SizeCheck | None, stats: ScanStats, name: str | None = None
) -> tuple[int, int] | None:
    """The image's (w, h), or None after one warning (and a count in stats) when it is unreadable or too small.

    name is what the warning calls the image (default: its path)."""
    try:
        size = load_rgb(path).size
    except UnreadableImageError as exc:
        stats.unreadable += 1
        log.warning("skipping %s: unreadable (%s)", name or path, exc.reason)
        return None
    problem = size_check(*size) if size_check else None
    if problem:
        stats.too_small += 1
        log.warning("skipping %s: too small (%s)", name or path, problem)
        return None
    return size


def _scan_one(path: Path, ctx: _ScanContext) -> ImageRecord | None:
    ctx.stats.checked += 1
    size = check_image(path, ctx.size_check, ctx.stats)
    if size is None:
        return None
    rel = path.relative_to(ctx.root).as_posix()
    entry = ctx.metadata.get(rel)
    control = _attach_control(path, rel, entry, size, ctx) if ctx.require_control else (None, None)
    if control is None:
        return None
    caption, source = resolve_caption(path, entry, ctx.root / METADATA_FILE, ctx.instance_prompt)
    if caption is None:
        ctx.stats.uncaptioned += 1
    caption = apply_trigger(caption or "", ctx.trigger, source)
    return ImageRecord(path, caption, size, file_hash(path), control_path=control[0], control_hash=control[1])


def _index_by_stem(root: Path, recursive: bool) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in list_image_files(root, recursive):
        index.setdefault(path.relative_to(root).with_suffix("").as_posix(), []).append(path)
    return index


def _find_control(image: Path, rel: str, entry: MetadataEntry | None, ctx: _ScanContext) -> Path | None:
    """The control image for `image`, or None after one warning saying what was looked for."""
    if entry is not None and entry.control_file_name:
        name = _norm_rel(entry.control_file_name)
        bases = [b for b in (ctx.root, ctx.control_root) if b is not None]
        for base in bases:
            if (base / name).is_file():
                return base / name
        where = " or ".join(str(b) for b in bases)
        log.warning(
            "skipping %s: control_file_name %r (%s line %d) is not in %s",
            image, name, METADATA_FILE, entry.line, where,
        )  # fmt: skip
        return None
    if ctx.control_root is None:
        log.warning("skipping %s: no control_file_name for it in %s", image, ctx.root / METADATA_FILE)
        return None
    stem = PurePosixPath(rel).with_suffix("").as_posix()
    matches = ctx.control_index.get(stem, [])
    if not matches:
        log.warning("skipping %s: no control image named %s.* in %s", image, stem, ctx.control_root)
        return None
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        log.warning("%s: several control images match (%s); using %s", image, names, matches[0].name)
    return matches[0]


def _attach_control(
    image: Path, rel: str, entry: MetadataEntry | None, size: tuple[int, int], ctx: _ScanContext
) -> tuple[Path, str] | None:
    control = _find_control(image, rel, entry, ctx)
    if control is not None:
        try:
            control_size = load_rgb(control).size
        except UnreadableImageError as exc:
            log.warning("skipping %s: its control image %s is unreadable (%s)", image, control, exc.reason)
            control = None
    if control is None:
        ctx.stats.no_control += 1
        return None
    warn_control_ratio(image, control, control_size, size)
    return control, file_hash(control)


def warn_control_ratio(
    image: object, control: object, control_size: tuple[int, int], size: tuple[int, int]
) -> None:
    # Samples resize the control to the image's size so the same crop box lands on the same content.
    ratio_gap = abs(np.log((control_size[0] / control_size[1]) / (size[0] / size[1])))
    if ratio_gap > 0.01:
        log.warning(
            "%s: control %s is %dx%d, a different aspect ratio from the image's %dx%d; it will be stretched",
            image, control, *control_size, *size,
        )  # fmt: skip


def nothing_usable(where: object, stats: ScanStats, control_key: str = "data.control_dir") -> str:
    """The one-line error for a source (folder or dataset) none of whose images can be used."""
    if stats.checked == 0:
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        return f"no usable training images in {where}: 0 image files found; add {exts} images there"
    counts = (
        f"{stats.checked} files checked, {stats.unreadable} unreadable, {stats.too_small} too small, "
        f"{stats.no_control} without a control image"
    )
    fixes = []
    if stats.unreadable:
        fixes.append("re-export or remove the unreadable files")
    if stats.too_small:
        fixes.append("use larger images, lower data.resolution/data.tile_size or raise data.max_upscale")
    if stats.no_control:
        if control_key == "data.control_dir":
            fixes.append("give every image a control image in data.control_dir with the same file name")
        else:
            fixes.append(f"give every row a source image in {control_key}")
    return (
        f"no usable training images in {where}: {counts}; {'; '.join(fixes)} (warnings above name each file)"
    )


# --------------------------------------------------------------------------- dataset-level helpers


def dataset_hash(records: Iterable[ImageRecord]) -> str:
    """Short sha256 over file names, content hashes and captions, for the LoRA's metadata.

    File names rather than full paths so the same data hashes the same on a laptop and on a cloud worker.
    """
    digest = hashlib.sha256()
    rows = sorted(
        (r.path.name, r.content_hash, r.caption, r.control_hash or "", str(r.is_prior)) for r in records
    )
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:HASH_CHARS]


def count_missing_class_images(class_dir: str | Path | None, num_class_images: int) -> int:
    """How many class images the trainer still has to generate into class_dir for prior preservation."""
    if not class_dir or num_class_images <= 0:
        return 0
    root = Path(class_dir).expanduser()
    present = len(list_image_files(root)) if root.is_dir() else 0
    return max(0, int(num_class_images) - present)


def prepare_samples(cfg_like: Any, *, multiple: int | None = None, seed: int | None = None) -> list[Sample]:
    """Scan `data.hf_dataset` (when set) or `data.dataset_dir` and build its training samples; meant to run
    before any model is loaded.

    cfg_like is the run config (with a `data` section) or the data section itself. multiple is the model
    family's pixel granularity (8 SDXL, 16 FLUX...); defaults to `data.multiple`, then 32.
    """
    # transforms imports ImageRecord and load_rgb from this module, so it's imported here, not at the top.
    from stylekit.data import transforms

    data = data_section(cfg_like)
    hf_dataset = get_option(data, "hf_dataset")
    dataset_dir = get_option(data, "dataset_dir")
    if not hf_dataset and not dataset_dir:
        raise UsageError(
            "data.dataset_dir is not set; point it at a folder of training images (or set data.hf_dataset)"
        )
    opts = transforms.DataOptions.from_cfg(data)
    multiple = int(multiple or get_option(data, "multiple", DEFAULT_MULTIPLE))
    if opts.mode == "tile":
        opts.tile_px(multiple)  # a tile_size off the model's grid is a config error: say so before scanning
    size_check = partial(transforms.size_problem, opts=opts, multiple=multiple)
    if hf_dataset:
        records, source = _hf_records(data, size_check), f"data.hf_dataset={hf_dataset}"
    else:
        source = dataset_dir
        records = scan_images(
            dataset_dir,
            instance_prompt=get_option(data, "instance_prompt", ""),
            trigger=get_option(data, "trigger", ""),
            control_dir=get_option(data, "control_dir"),
            recursive=bool(get_option(data, "recursive", False)),
            size_check=size_check,
        )
    samples = transforms.build_samples(records, opts, multiple, _seed(cfg_like, seed))
    if not samples:
        raise UsageError(
            f"no usable training samples in {source}: every tile of {len(records)} images is near-uniform; "
            f"lower data.uniform_threshold (now {opts.uniform_threshold:g})"
        )
    return samples


def _hf_records(data: Any, size_check: SizeCheck) -> list[ImageRecord]:
    """Records from data.hf_dataset, which replaces data.dataset_dir (ignored, with an info line)."""
    from stylekit.data import hub

    if get_option(data, "control_dir"):
        raise UsageError(
            "data.control_dir is for image folders; with data.hf_dataset name the dataset's source image column "
            "with data.control_column (and set data.control_dir=null)"
        )
    dataset_dir = get_option(data, "dataset_dir")
    if dataset_dir:
        log.info("data.hf_dataset is set: training on it; data.dataset_dir=%s is not read", dataset_dir)
    return hub.scan_hf_dataset(data, size_check=size_check)


def prepare_class_samples(
    cfg_like: Any, *, multiple: int | None = None, seed: int | None = None
) -> list[Sample]:
    """Samples from `data.class_dir` captioned with `data.class_prompt`, flagged is_prior; [] without one.

    Call after the trainer has generated count_missing_class_images(...) images. No repeats or caption
    dropout: the prior set only anchors what the class looked like before training.
    """
    from stylekit.data import transforms

    data = data_section(cfg_like)
    class_dir = get_option(data, "class_dir")
    if not class_dir:
        return []
    class_prompt = get_option(data, "class_prompt", "")
    if not str(class_prompt).strip():
        raise UsageError("data.class_dir is set but data.class_prompt is empty; set data.class_prompt")
    opts = replace(transforms.DataOptions.from_cfg(data), repeats=1, caption_dropout=0.0)
    multiple = int(multiple or get_option(data, "multiple", DEFAULT_MULTIPLE))
    records = scan_images(
        class_dir,
        instance_prompt=class_prompt,
        trigger=get_option(data, "trigger", ""),
        require_control=False,
        size_check=partial(transforms.size_problem, opts=opts, multiple=multiple),
        key="data.class_dir",
    )
    records = [replace(r, is_prior=True) for r in records]
    return transforms.build_samples(records, opts, multiple, _seed(cfg_like, seed))


def _seed(cfg_like: Any, seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    return int(get_option(cfg_like, "seed", 0))
