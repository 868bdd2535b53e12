"""Reading, validating and writing the files of an inpainting run: images, masks and edited outputs.

Every failure a user can cause (a missing, truncated or oversized file, a mask of the wrong size, an output
over an input) is a one-line ``UsageError`` that names the path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import uuid
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from stylekit.errors import UsageError

log = logging.getLogger(__name__)

# Up to 16k x 16k (a 268-megapixel scan still loads); beyond that a file is far more likely a decompression
# bomb than a photo. Pillow's own default (89 MP) would reject ordinary 100 MP camera files, so raise it.
MAX_PIXELS = 16384 * 16384
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# Our own outputs (<stem>_edited.png, <stem>_comparison_s3.png, ...) must never become inputs of a rerun.
_OUTPUT_STEM = re.compile(r"_(edited|comparison)(_s\d+)?$")
# A mask whose aspect differs from its image's by more than this is a different picture, not a rescale.
_ASPECT_TOLERANCE = 0.02
# Pillow raises a zoo of exception types on corrupt data, depending on the codec.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

Size = tuple[int, int]


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, upright (EXIF orientation applied), alpha dropped.

    High-bit-depth greyscale is scaled, not clipped, to 8 bits: ``I;16`` by 255/65535; ``I`` the same when
    its values fit 16 bits, else stretched min..max; ``F`` as is when in [0, 1], else stretched min..max.
    An animated file gives its first frame.

    An embedded RGB colour profile (Display P3 from phones, Adobe RGB from cameras) stays in
    ``.info["icc_profile"]`` with the pixels untouched, for the output to carry (see ``save_png_atomic``).
    A profile of another colour space (CMYK, grey) cannot describe RGB pixels: such an image is converted to
    sRGB through its profile instead, and the profile dropped.
    """
    path = Path(path)
    im = _open(path, "image")
    profile = im.info.get("icc_profile")
    if profile and profile[16:20] != b"RGB ":
        converted = _to_srgb(im, profile, path) if im.mode in ("L", "CMYK", "RGB") else None
        if converted is not None:
            return converted
        im.info.pop("icc_profile", None)
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.rint(_unit_float(im) * 255.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("P", "PA"):
        # Through RGBA, so palette transparency is dropped quietly instead of with a Pillow warning.
        im = im.convert("RGBA")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise UsageError(
            f"image {path} has colour mode {im.mode}, which cannot be read as RGB ({e}); "
            "convert it to an RGB PNG or JPEG"
        ) from None


def _to_srgb(im: Image.Image, profile: bytes, path: Path) -> Image.Image | None:
    """``im`` converted from its embedded (non-RGB) profile to sRGB without a profile attached, or None
    (with a warning) when the profile does not apply to it."""
    import io

    from PIL import ImageCms

    space = profile[16:20].decode("latin-1").strip() or "unknown"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        converted = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        log.warning("image %s: its %s colour profile does not apply (%s); read as sRGB", path, space, error)
        return None
    log.info("image %s: converted from its embedded %s colour profile to sRGB", path, space)
    converted.info.pop("icc_profile", None)
    return converted


def load_mask(
    path: str | Path,
    size: Size | None = None,
    resize: bool = False,
    threshold: float = 0.5,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Read a mask as float32 HxW grey values in [0, 1] (1 = edit), EXIF orientation applied.

    With an alpha channel that is not fully opaque the mask is the alpha (a region painted in any colour on a
    transparent layer); otherwise it is the luma. ``size`` is the image's (width, height): a mask of another
    size is an error unless ``resize``, which scales it bilinearly and thresholds at ``threshold`` (the greys
    that bilinear scaling makes at the edges are interpolation, not intent). ``image_path`` only names the
    image in that error. Binarising an unresized mask is left to ``masks.binarize``.
    """
    path = Path(path)
    grey = _mask_values(_open(path, "mask"))
    if size is None or (grey.shape[1], grey.shape[0]) == tuple(size):
        return grey
    width, height = grey.shape[1], grey.shape[0]
    image = f"image {image_path}" if image_path is not None else "the image"
    if not resize:
        raise UsageError(
            f"mask {path} is {width}x{height} but {image} is {size[0]}x{size[1]}; "
            "pass inpaint.mask.resize=true to scale it"
        )
    if abs((width / height) / (size[0] / size[1]) - 1.0) > _ASPECT_TOLERANCE:
        raise UsageError(
            f"mask {path} is {width}x{height} but {image} is {size[0]}x{size[1]}, a different "
            "aspect ratio, so scaling would misplace it; redraw the mask at the image's size"
        )
    scaled = Image.fromarray(grey).resize(tuple(size), Image.Resampling.BILINEAR)
    return (np.asarray(scaled) >= threshold).astype(np.float32)


def save_png_atomic(
    image: Image.Image | np.ndarray,
    path: str | Path,
    text: dict[str, str] | None = None,
    protected: Iterable[str | Path] = (),
    icc_profile: bytes | None = None,
) -> Path:
    """Write ``image`` as a PNG at ``path`` with ``text`` as tEXt/zTXt/iTXt chunks, all or nothing.

    ``icc_profile`` (the input's, from ``load_image``) is embedded, so the pixels copied from the input look
    the same as in it.

    The PNG goes to a hidden temp file in the same directory and is renamed over ``path`` (atomic on one
    file system), so a crash or a full disk never leaves a half-written output; the temp file is removed on
    any failure. Refuses to write over any of ``protected`` (the run's inputs).
    """
    path = Path(path)
    if any(_same_file(path, Path(p)) for p in protected):
        raise UsageError(f"refusing to write {path}: it is one of the input files; set output_dir elsewhere")
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"output directory {directory} cannot be created ({e.strerror or e}); "
            "set output_dir to a writable folder"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable; set output_dir to a writable folder")
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    info = _png_info(text or {})
    tmp = directory / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        # os.open with 0o666 lets the umask decide the final permissions, as for any other new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UsageError(
            f"output directory {directory} is not writable ({e.strerror or e}); "
            "set output_dir to a writable folder"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            pil.save(f, format="PNG", pnginfo=info, **({"icc_profile": icc_profile} if icc_profile else {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UsageError(
                f"could not write {path} ({e.strerror or e}); check free space and permissions in {directory}"
            ) from e
        raise
    return path


def find_pairs(
    image_arg: str | Path | None,
    mask_arg: str | Path | None,
    default_images: str | Path = "data/base_images",
    default_masks: str | Path = "data/masks",
) -> list[tuple[Path, Path]]:
    """Resolve the ``image=`` and ``mask=`` arguments into sorted (image, mask) pairs.

    Either argument may be a file or a folder, and an unset one falls back to its default folder. File +
    file is one pair; a folder of images + one mask file uses that mask for all; images matched against a
    mask folder take the mask with the same stem (``photo.png`` or ``photo_mask.png`` for ``photo.jpg``).
    Hidden files and our own outputs (``*_edited.png``, ``*_comparison.png``) are ignored.
    """
    image_path = _existing(image_arg, default_images, "image")
    mask_path = _existing(mask_arg, default_masks, "mask")
    if image_path.is_dir():
        images = list_images(image_path)
        if not images:
            raise UsageError(
                f"image={image_path} holds no images ({_ext_list()}); add some or pass image=FILE"
            )
    else:
        images = [image_path]
    if not mask_path.is_dir():
        if any(_same_file(mask_path, img) for img in images):
            raise UsageError(f"mask={mask_path} is also the image; pass the mask file as mask=PATH")
        return [(img, mask_path) for img in images]
    if image_path.is_dir() and _same_file(image_path, mask_path):
        raise UsageError(
            f"image= and mask= are the same folder {image_path}; keep masks in a folder of their own"
        )
    masks = _masks_by_stem(mask_path)
    pairs, missing = [], []
    for img in images:
        mask = _match_mask(img, masks, mask_path)
        if mask is None:
            missing.append(img.name)
        else:
            pairs.append((img, mask))
    if missing:
        first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UsageError(
            f"{len(missing)} of {len(images)} images have no mask of the same stem in "
            f"mask={mask_path} (first: {first}); add them, or pass mask=FILE to use one mask for all"
        )
    return pairs


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name, without hidden files or our outputs."""
    return sorted((p for p in Path(folder).iterdir() if _is_input_image(p)), key=lambda p: p.name)


def output_path(output_dir: str | Path, stem: str, seed: int | None = None, suffix: str = "edited") -> Path:
    """``<output_dir>/<stem>_<suffix>.png``, or ``<stem>_<suffix>_s<seed>.png`` when a seed is given."""
    tail = f"_s{seed}" if seed is not None else ""
    return Path(output_dir) / f"{stem}_{suffix}{tail}.png"


def _open(path: Path, what: str) -> Image.Image:
    """Decode the first frame fully and apply EXIF orientation; every failure names the file."""
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file; pass the image file itself")
    if path.stat().st_size == 0:
        raise UsageError(f"{what} {path} is an empty (zero-byte) file; re-export it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as src:
                if src.width * src.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{src.width}x{src.height}")
                src.load()
                return ImageOps.exif_transpose(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(
            f"{what} {path} has more than {MAX_PIXELS} pixels (16384x16384); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise UsageError(f"{what} {path} is not an image Pillow can read; save it as PNG or JPEG") from None
    except PermissionError:
        raise UsageError(f"{what} {path} cannot be read (permission denied); fix its permissions") from None
    except _DECODE_ERRORS as e:
        raise UsageError(f"{what} {path} is truncated or corrupt ({e}); re-export it") from None


def _unit_float(im: Image.Image) -> np.ndarray:
    """A single-channel ``I;16*``, ``I`` or ``F`` image as float32 in [0, 1] (rules in ``load_image``)."""
    values = np.nan_to_num(np.asarray(im).astype(np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and high <= 65535):
        return (values / 65535.0).astype(np.float32)
    if im.mode == "F" and low >= 0 and high <= 1:
        return values.astype(np.float32)
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _mask_values(im: Image.Image) -> np.ndarray:
    """Grey values in [0, 1]: alpha when the mask has any transparency, else luma."""
    if im.mode in ("P", "PA") or "A" in im.getbands() or "a" in im.getbands():
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255.0
        im = rgba
    if im.mode.startswith("I") or im.mode == "F":
        return _unit_float(im)
    luma = im if im.mode == "L" else im.convert("RGB").convert("L")
    return np.asarray(luma).astype(np.float32) / 255.0


def _png_info(text: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in text.items():
        value = str(value)
        # Pillow stores latin-1 text as tEXt and anything else as iTXt; compress what is long (configs).
        info.add_text(key, value, zip=len(value) > 1024)
    return info


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _existing(arg: str | Path | None, default: str | Path, key: str) -> Path:
    given = arg is not None and str(arg) != ""
    path = Path(arg) if given else Path(default)
    if not path.exists():
        hint = f"pass {key}=PATH" if not given else "check the path"
        origin = f"{key}={path}" if given else f"the default {key} folder {path}"
        raise UsageError(f"{origin} does not exist; {hint}")
    return path


def _is_input_image(path: Path) -> bool:
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        return False
    return not (path.suffix.lower() == ".png" and _OUTPUT_STEM.search(path.stem))


def _masks_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Masks keyed by their stem and, for ``<stem>_mask``, by ``<stem>`` too (exact stems listed first)."""
    by_stem: dict[str, list[Path]] = {}
    masks = list_images(folder)
    for mask in masks:
        by_stem.setdefault(mask.stem, []).append(mask)
    for mask in masks:
        if mask.stem.endswith("_mask"):
            by_stem.setdefault(mask.stem[: -len("_mask")], []).append(mask)
    return by_stem


def _match_mask(image: Path, masks: dict[str, list[Path]], folder: Path) -> Path | None:
    candidates = masks.get(image.stem, [])
    exact = [m for m in candidates if m.stem == image.stem]
    chosen = exact or candidates
    if len(chosen) > 1:
        names = ", ".join(m.name for m in chosen)
        raise UsageError(f"image {image.name} matches several masks in mask={folder} ({names}); keep one")
    return chosen[0] if chosen else None


def _ext_list() -> str:
    return " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
