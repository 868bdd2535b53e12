"""`data.hf_dataset`: training images from a Hugging Face `datasets` dataset instead of a folder.

Where the rows come from: a local path when one exists (a `save_to_disk` folder, a parquet or arrow file, a
folder of them, or an imagefolder with metadata.jsonl), else a hub id, loaded with
`datasets.load_dataset(id, data.subset, split=data.split, revision=data.revision)`. A path-like value that does not exist
(`./x`, `/x`, `~/x`, `a/b/c`, `x.parquet`) is an error, never a hub lookup.

Each row becomes an ImageRecord, so captions, `[trigger]`, buckets, tiles, repeats, caption dropout, the encoding
cache and the resume identity behave as for a folder. Image bytes stored in the dataset are written once to a
content-addressed file, `<stylekit cache>/images/<sha256[:2]>/<sha256[:32]><ext>` (temp file + rename, so
concurrent jobs share it safely); an image the dataset only references by local path (an imagefolder) is read in
place. Rows are read one at a time: decoded pixels of the whole dataset never sit in memory.

Captions: `data.caption_column`; when null, the `text` column if the dataset has one. A row with no caption there
takes `data.instance_prompt`. Pairs for edit models take their source image from `data.control_column`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylekit.data.dataset import (
    HASH_CHARS,
    IMAGE_EXTENSIONS,
    ImageRecord,
    ScanStats,
    SizeCheck,
    UnreadableImageError,
    apply_trigger,
    check_image,
    file_hash,
    get_option,
    load_rgb,
    nothing_usable,
    warn_control_ratio,
)
from stylekit.errors import UsageError
from stylekit.io import atomic_write_bytes

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk leaves in its folder
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_CAPTION_COLUMN = "text"
MATERIALIZED_DIR = "images"


def materialized_root() -> Path:
    from stylekit.paths import cache_root

    return cache_root() / MATERIALIZED_DIR


@dataclass(frozen=True)
class HubOptions:
    """The `data` keys that name a dataset and its columns."""

    source: str
    split: str = "train"
    revision: str | None = None
    subset: str | None = None
    image_column: str = "image"
    caption_column: str | None = None
    control_column: str | None = None

    @classmethod
    def from_cfg(cls, data: Any) -> HubOptions:
        return cls(
            source=str(get_option(data, "hf_dataset")),
            split=str(get_option(data, "split", "train")),
            revision=_optional_str(get_option(data, "revision")),
            subset=_optional_str(get_option(data, "subset")),
            image_column=str(get_option(data, "image_column", "image")),
            caption_column=_optional_str(get_option(data, "caption_column")),
            control_column=_optional_str(get_option(data, "control_column")),
        )

    @property
    def where(self) -> str:
        return f"data.hf_dataset={self.source}"


def _optional_str(value: Any) -> str | None:
    return None if value is None or str(value) == "" else str(value)


# --------------------------------------------------------------------------- loading


def load_rows(opts: HubOptions) -> datasets.Dataset:
    """The split's rows, from a local path when it exists, else from the hub. UsageError on any problem."""
    import datasets
    import pyarrow

    _check_split_syntax(opts)
    local = Path(opts.source).expanduser()
    if local.exists():
        if opts.revision:
            log.info("data.revision=%s is for hub ids; not used for the local %s", opts.revision, local)
        try:
            return _load_local(local, opts)
        except (OSError, ValueError, datasets.exceptions.DatasetsError, pyarrow.ArrowException) as error:
            raise UsageError(
                f"{opts.where}: cannot read {local} as a dataset ({_first_line(error)}); fix or re-save it "
                "(Dataset.save_to_disk, to_parquet)"
            ) from None
    if _looks_like_path(opts.source):
        raise UsageError(
            f"{opts.where}: {local.absolute()} does not exist; point data.hf_dataset at a save_to_disk folder, "
            "parquet/arrow file(s), an imagefolder, or a hub id like user/name"
        )
    return _load_hub(opts)


def _check_split_syntax(opts: HubOptions) -> None:
    import datasets

    try:
        datasets.ReadInstruction.from_spec(opts.split)
    except (ValueError, AssertionError) as error:
        raise UsageError(
            f"data.split={opts.split}: not a split name or slice ({_first_line(error)}); use e.g. train, "
            "train[:100] or train[:10%]"
        ) from None


def _looks_like_path(source: str) -> bool:
    # A hub id is `name` or `owner/name`; anything else that does not exist locally is a mistyped path.
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in FILE_BUILDERS
    )


def _load_local(path: Path, opts: HubOptions) -> datasets.Dataset:
    import datasets

    if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            return _saved_split(saved, opts)
        if opts.split != "train":
            log.info(
                "%s holds a single split (saved with save_to_disk); data.split=%s is not used",
                path,
                opts.split,
            )
        return saved
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            kinds = "/".join(sorted(FILE_BUILDERS))
            raise UsageError(
                f"{opts.where}: {path} is not a {kinds} file; point data.hf_dataset at a dataset file or folder"
            )
        return _load_split(opts, builder, data_files=str(path))
    return _load_split(opts, _folder_builder(path, opts), data_dir=str(path))


def _saved_split(saved: datasets.DatasetDict, opts: HubOptions) -> datasets.Dataset:
    """data.split of a saved DatasetDict, with the slices load_dataset accepts (`train[:100]`, `train+test`)."""
    import datasets

    instruction = datasets.ReadInstruction.from_spec(opts.split)  # its syntax is checked in load_rows
    try:
        parts = instruction.to_absolute({name: len(rows) for name, rows in saved.items()})
    except ValueError:
        raise UsageError(_unknown_split(opts, list(saved))) from None
    pieces = [saved[part.splitname].select(range(part.from_, part.to)) for part in parts]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def _folder_builder(path: Path, opts: HubOptions) -> str:
    suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")}
    for suffix, builder in FILE_BUILDERS.items():
        if suffix in suffixes:
            return builder
    if suffixes & IMAGE_EXTENSIONS:
        return "imagefolder"
    raise UsageError(
        f"{opts.where}: {path} holds no dataset (no save_to_disk files, parquet/arrow files or images); "
        "point data.hf_dataset at one, or use data.dataset_dir for a plain folder of images"
    )


def _load_hub(opts: HubOptions) -> datasets.Dataset:
    import datasets
    from huggingface_hub import constants

    try:
        subset = {"name": opts.subset} if opts.subset else {}
        return _load_split(opts, opts.source, revision=opts.revision, **subset)
    except ConnectionError as error:
        if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
            raise UsageError(
                f"{opts.where} is not a local path and is not in the Hugging Face datasets cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to download it, or point "
                "data.hf_dataset at a local copy (save_to_disk folder, parquet files or imagefolder)"
            ) from None
        raise UsageError(
            f"{opts.where}: cannot reach the Hugging Face hub ({_first_line(error)}): check the network, or "
            "download the dataset where there is one and set HF_HUB_OFFLINE=1"
        ) from None
    except FileNotFoundError as error:  # datasets' DatasetNotFoundError: missing, gated, or a bad revision
        raise UsageError(_hub_not_found(opts, error)) from None


def _hub_not_found(opts: HubOptions, error: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError

    page = f"https://huggingface.co/datasets/{opts.source}"
    message = str(error)
    if isinstance(error.__cause__, GatedRepoError) or "gated" in message:
        return (
            f"{opts.where} is gated: accept its terms at {page} with your account, then `hf auth login` or set "
            "HF_TOKEN"
        )
    if opts.revision and "Revision" in message:
        return f"data.revision={opts.revision} does not exist in {page}: use a branch, tag or commit of it"
    return (
        f"{opts.where} is neither a local path nor a dataset on the Hugging Face hub: check the id or path "
        "(private datasets need HF_TOKEN)"
    )


def _load_split(opts: HubOptions, source: str, **kwargs: Any) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(source, split=opts.split, **kwargs)
    except ValueError as error:
        subsets = _subsets(str(error))
        if subsets is not None:
            what = (
                f"data.subset={opts.subset} is not one of its subsets"
                if opts.subset
                else "it has several subsets"
            )
            raise UsageError(
                f"{opts.where}: {what}; pick one with data.subset=NAME: {', '.join(subsets)}"
            ) from None
        if "Unknown split" not in str(error):
            raise
        names = _split_names(source, **kwargs)
        raise UsageError(_unknown_split(opts, names)) from None


def _subsets(message: str) -> list[str] | None:
    """The subsets (datasets' configurations) a 'Config name is missing' / 'BuilderConfig not found' error
    lists, or None for other errors."""
    import ast
    import re

    if "Config name is missing" not in message and "BuilderConfig" not in message:
        return None
    listed = re.search(r"(?:available configs|Available):\s*(\[[^\]]*\])", message)
    try:
        return [str(name) for name in ast.literal_eval(listed[1])] if listed else []
    except (ValueError, SyntaxError):
        return []


def _split_names(source: str, **kwargs: Any) -> list[str]:
    import datasets

    builder = datasets.load_dataset_builder(source, **kwargs)
    names = builder.config.data_files or builder.info.splits or {}
    return [str(split) for split in names]


def _unknown_split(opts: HubOptions, names: list[str]) -> str:
    listed = ", ".join(names) if names else "none"
    return f"data.split={opts.split}: {opts.where} has no such split; its splits are {listed}"


def _first_line(error: Exception) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- columns


def check_columns(rows: datasets.Dataset, opts: HubOptions) -> str | None:
    """Check the image, caption and control columns; return the caption column in use (None: no captions)."""
    import datasets

    features = rows.features
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    for key, column in (
        ("data.image_column", opts.image_column),
        ("data.control_column", opts.control_column),
    ):
        if column is None:
            continue
        _require_column(key, column, features, opts)
        if not isinstance(features[column], datasets.Image):
            found = ", ".join(images) if images else "none"
            raise UsageError(
                f"{key}={column}: column {column!r} of {opts.where} holds {_describe(features[column])}, not "
                f"images; its image columns are {found}"
            )
    caption = opts.caption_column
    if caption is None:
        default = features.get(DEFAULT_CAPTION_COLUMN)
        return DEFAULT_CAPTION_COLUMN if _is_text(default) else None
    _require_column("data.caption_column", caption, features, opts)
    if not _is_text(features[caption]):
        texts = ", ".join(name for name, feature in features.items() if _is_text(feature)) or "none"
        raise UsageError(
            f"data.caption_column={caption}: column {caption!r} of {opts.where} holds "
            f"{_describe(features[caption])}, not text; its text columns are {texts}"
        )
    return caption


def _require_column(key: str, column: str, features: Any, opts: HubOptions) -> None:
    if column not in features:
        raise UsageError(
            f"{key}={column}: {opts.where} has no column {column!r}; its columns are {', '.join(features)}"
        )


def _is_text(feature: Any) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _describe(feature: Any) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    if isinstance(feature, dict):
        return "nested fields"
    return f"{type(feature).__name__} values"


# --------------------------------------------------------------------------- rows -> records


def materialize(value: dict[str, Any] | None, root: Path) -> tuple[Path, str] | None:
    """(file, content hash) for one undecoded Image value; None when the row has no image to read.

    Bytes go to a content-addressed file written once; a value that only names a local file is used in place.
    """
    if not value:
        return None
    data, named = value.get("bytes"), value.get("path")
    if data:
        digest = hashlib.sha256(data).hexdigest()
        # Named by content alone, so the same bytes get the same file (and dataset hash) from any dataset.
        target = root / digest[:2] / f"{digest[:32]}{_suffix(data)}"
        if not target.is_file():
            try:
                _write_atomically(target, data)
            except OSError as error:
                raise UsageError(
                    f"cannot write dataset images to {root} ({error.strerror or error}); set STYLEKIT_CACHE_DIR "
                    "to a writable folder with free space"
                ) from None
        return target, digest[:HASH_CHARS]
    if named and Path(named).is_file():
        return Path(named), file_hash(Path(named))
    return None


def _suffix(data: bytes) -> str:
    """The extension of the image format in the header, so the cached file opens in any viewer."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            kind = (img.format or "").lower()
    except Exception:  # undecodable bytes: load_rgb says why when the row is checked
        return ""
    suffix = {"jpeg": ".jpg", "tiff": ".tif"}.get(kind, f".{kind}")
    return suffix if suffix in IMAGE_EXTENSIONS else ""


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)


@dataclass
class _RowContext:
    opts: HubOptions
    caption_column: str | None
    instance_prompt: str
    trigger: str
    size_check: SizeCheck | None
    root: Path
    stats: ScanStats = field(default_factory=ScanStats)


def scan_hf_dataset(
    data: Any, *, size_check: SizeCheck | None = None, root: Path | None = None
) -> list[ImageRecord]:
    """Every usable row of `data.hf_dataset` as a record; unusable rows are skipped with one warning each.

    UsageError (before any model loads) for a missing path, an unreachable or unknown hub id, an unknown split,
    a missing or mistyped column, or a dataset with no usable row.
    """
    import datasets

    opts = HubOptions.from_cfg(data)
    rows = load_rows(opts)
    caption_column = check_columns(rows, opts)
    ctx = _RowContext(
        opts=opts,
        caption_column=caption_column,
        instance_prompt=str(get_option(data, "instance_prompt", "") or ""),
        trigger=str(get_option(data, "trigger", "") or ""),
        size_check=size_check,
        root=root or materialized_root(),
    )
    columns = [c for c in (opts.image_column, caption_column, opts.control_column) if c is not None]
    rows = rows.select_columns(list(dict.fromkeys(columns)))
    for column in (opts.image_column, opts.control_column):
        if column is not None:
            rows = rows.cast_column(column, datasets.Image(decode=False))
    records = [r for index, row in enumerate(rows) if (r := _record(index, row, ctx)) is not None]
    if not records:
        where = f"{opts.where} (split {opts.split}, {len(rows)} rows)"
        raise UsageError(nothing_usable(where, ctx.stats, control_key="data.control_column"))
    if ctx.stats.uncaptioned:
        where = f"nothing in column {caption_column!r}" if caption_column else "no caption column"
        log.warning(
            "%d of %d rows of %s have no caption (%s, empty data.instance_prompt); they train unconditioned; "
            "set data.caption_column or data.instance_prompt",
            ctx.stats.uncaptioned, len(records), opts.where, where,
        )  # fmt: skip
    return records


def _record(index: int, row: dict[str, Any], ctx: _RowContext) -> ImageRecord | None:
    opts, stats = ctx.opts, ctx.stats
    name = f"{opts.where} row {index}"
    stats.checked += 1
    image = materialize(row[opts.image_column], ctx.root)
    if image is None:
        stats.unreadable += 1
        log.warning("skipping %s: no image in column %r", name, opts.image_column)
        return None
    size = check_image(image[0], ctx.size_check, stats, name=name)
    if size is None:
        return None
    control: tuple[Path, str] | None = None
    if opts.control_column is not None:
        control = _control(name, row[opts.control_column], size, ctx)
        if control is None:
            stats.no_control += 1
            return None
    caption, source = _caption(index, row, ctx)
    if caption is None:
        stats.uncaptioned += 1
    caption = apply_trigger(caption or "", ctx.trigger, source)
    return ImageRecord(
        image[0],
        caption,
        size,
        image[1],
        control_path=control[0] if control else None,
        control_hash=control[1] if control else None,
    )


def _control(name: str, value: Any, size: tuple[int, int], ctx: _RowContext) -> tuple[Path, str] | None:
    column = ctx.opts.control_column
    control = materialize(value, ctx.root)
    if control is None:
        log.warning("skipping %s: no control image in column %r", name, column)
        return None
    try:
        control_size = load_rgb(control[0]).size
    except UnreadableImageError as exc:
        log.warning("skipping %s: its control image (column %r) is unreadable (%s)", name, column, exc.reason)
        return None
    warn_control_ratio(name, f"column {column!r}", control_size, size)
    return control


def _caption(index: int, row: dict[str, Any], ctx: _RowContext) -> tuple[str | None, str]:
    column = ctx.caption_column
    text = row.get(column) if column else None
    if isinstance(text, str) and text.strip():
        return text.strip(), f"{ctx.opts.where} row {index} column {column!r}"
    if ctx.instance_prompt.strip():
        return ctx.instance_prompt.strip(), "data.instance_prompt"
    return None, ""
