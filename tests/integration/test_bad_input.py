"""Broken and odd inputs for both commands: each either works correctly or stops with one line that names the
input (exit code 2 from scripts/*.py), never a traceback, never a partial output, never a changed input.

Every input is generated here. Most kinds fail before any model loads, so they go through
`stylekit.{train,inpaint}.run.run(cfg)` in this process with model loading forbidden; a few real subprocesses pin
what a user sees on the command line (exit code, one stderr line, no "Traceback"). The inputs that must work
(EXIF rotation, CMYK, 16-bit, palettes, grey and full masks, unicode paths...) run through the tiny models once
per module: one inpaint batch and one short training run.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stylekit.data.dataset import IMAGE_EXTENSIONS
from stylekit.errors import UsageError
from stylekit.inpaint import run as inpaint_run
from stylekit.models.base import ModelFamily
from stylekit.train.lora_io import WEIGHT_NAME
from stylekit.train.run import run as train_run

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
W, H = 128, 96
UNICODE_DIR = "dir with spaces ✓ ünïcödé"


# ---- generated inputs -----------------------------------------------------------------------------------------


def _pixels(width: int = W, height: int = H, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full(x.shape, 90.0)], axis=-1)
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)


def _encoded(fmt: str, image: Image.Image | None = None, **params: Any) -> bytes:
    buffer = io.BytesIO()
    (image or Image.fromarray(_pixels())).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def _png_1bit(side: int, rows: bytes | None = None) -> bytes:
    """A 1-bit grey PNG of side x side built by hand: a real 20000^2 one is 48 kB and takes a second."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    if rows is None:
        row = b"\x00" * (1 + (side + 7) // 8)
        compressor = zlib.compressobj(9)
        rows = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _corrupt_png() -> bytes:
    """A PNG whose header and CRCs are right but whose compressed pixels are garbage."""
    data = _encoded("PNG")
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    garbage = bytes(np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8))
    return data[:start] + _chunk(b"IDAT", garbage) + data[start + 12 + length :]


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _save(make: Callable[[], Image.Image], **params: Any) -> Callable[[Path], None]:
    return lambda path: make().save(path, **params)


def _gif(path: Path) -> None:
    frames = [Image.fromarray(np.roll(_pixels(), 20 * i, axis=1)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)


def _exif_rotated(path: Path) -> None:
    """Stored sideways with EXIF orientation 6: upright it is H wide, W tall, red on top, blue below."""
    upright = np.zeros((W, H, 3), np.uint8)
    upright[: W // 2] = (230, 20, 20)
    upright[W // 2 :] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(np.rot90(upright, k=1).copy()).save(path, exif=exif, quality=95)


def _i16() -> Image.Image:
    values = (np.linspace(0, 65535, W)[None, :] * np.ones((H, 1))).astype(np.uint16)
    return Image.fromarray(values)


def _float_tiff() -> Image.Image:
    return Image.fromarray((np.indices((H, W)).sum(axis=0) / (H + W)).astype(np.float32))


def _rgba() -> Image.Image:
    rgba = np.dstack([_pixels(), np.full((H, W), 255, np.uint8)])
    rgba[:, : W // 4, 3] = 0  # a transparent stripe: its colour stays, the alpha is dropped
    return Image.fromarray(rgba)


# name -> (file name, maker). Each of these cannot be used and must be refused with one line naming it.
BROKEN: dict[str, tuple[str, Callable[[Path], None]]] = {
    "zero_byte": ("zero.png", _write(b"")),
    "truncated_png": ("truncated_png.png", _write(_encoded("PNG")[:300])),
    "truncated_jpeg": ("truncated_jpeg.jpg", _write(_encoded("JPEG")[:600])),
    "truncated_gif": ("truncated_gif.gif", _write(_encoded("GIF")[:40])),
    "corrupt_png_pixels": ("corrupt.png", _write(_corrupt_png())),
    "text_named_png": ("notes.png", _write(b"this is not an image, just a text file\n")),
    "bomb_declared_100000px": ("bomb_header.png", _write(_png_1bit(100_000, zlib.compress(b"\0" * 64)))),
    "bomb_real_20000px_1bit": ("bomb.png", lambda path: path.write_bytes(_png_1bit(20_000))),
    "directory_named_png": ("folder.png", lambda path: path.mkdir()),
    "dangling_symlink": ("link.png", lambda path: path.symlink_to(path.parent / "gone.png")),
}
# name -> (file name, maker, upright (width, height)). Odd but valid: must work.
ODD: dict[str, tuple[str, Callable[[Path], None], tuple[int, int]]] = {
    "one_pixel": ("one_pixel.png", _save(lambda: Image.new("RGB", (1, 1), (200, 30, 30))), (1, 1)),
    "animated_gif": ("animated.gif", _gif, (W, H)),
    "palette_p": ("palette.png", _save(lambda: Image.fromarray(_pixels()).convert("P")), (W, H)),
    "grey_alpha_la": ("grey_alpha.png", _save(lambda: Image.fromarray(_pixels()).convert("LA")), (W, H)),
    "grey_16bit": ("grey16.png", _save(_i16), (W, H)),
    "float_tiff": ("float.tif", _save(_float_tiff), (W, H)),
    "cmyk_jpeg": ("cmyk.jpg", _save(lambda: Image.fromarray(_pixels()).convert("CMYK"), quality=95), (W, H)),
    "exif_rotated_jpeg": ("rotated.jpg", _exif_rotated, (H, W)),
    "rgba_transparent": ("transparent.png", _save(_rgba), (W, H)),
    "png_named_jpg": ("really_png.jpg", _write(_encoded("PNG")), (W, H)),
    "unicode_and_spaces_name": (
        "café photo 写真 ü.png",
        _save(lambda: Image.fromarray(_pixels(seed=5))),
        (W, H),
    ),
}


def listed(name: str) -> bool:
    """Whether folder scans pick the file up (both commands list the same extensions; GIF is not one)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _box_mask(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : max(1, 3 * height // 4), width // 4 : max(1, 3 * width // 4)] = 255
    return mask


def _grey_mask() -> Image.Image:
    return Image.fromarray((np.linspace(0, 255, W)[None, :] * np.ones((H, 1))).round().astype(np.uint8))


def _alpha_mask() -> Image.Image:
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[20:70, 30:100] = (255, 0, 0, 255)  # painted in red on a transparent layer
    return Image.fromarray(rgba)


def _mask_16bit() -> Image.Image:
    return Image.fromarray(_box_mask((W, H)).astype(np.uint16) * 257)


# Masks (for a W x H photo) that must work: name -> (maker, the region that may change).
ODD_MASKS: dict[str, tuple[Callable[[], Image.Image], np.ndarray]] = {
    "full_mask": (lambda: Image.new("L", (W, H), 255), np.ones((H, W), bool)),
    "grey_mask": (_grey_mask, np.asarray(_grey_mask()) >= 128),  # inpaint.mask.threshold=0.5
    "alpha_painted_mask": (_alpha_mask, np.asarray(_alpha_mask())[..., 3] > 0),
    "one_bit_mask": (lambda: Image.fromarray(_box_mask((W, H))).convert("1"), _box_mask((W, H)) > 0),
    "sixteen_bit_mask": (_mask_16bit, _box_mask((W, H)) > 0),
}


def replicate(source: Path, target: Path) -> None:
    """Copy one generated input: a file's bytes, an empty folder, or a link to nothing."""
    if source.is_symlink():
        target.symlink_to(target.parent / "gone.png")
    elif source.is_dir():
        target.mkdir()
    else:
        target.write_bytes(source.read_bytes())


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) by relative path -> sha256 of its bytes."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_symlink() or path.is_dir():
            found[str(path.relative_to(folder))] = "link" if path.is_symlink() else "dir"
    return found


@dataclass(frozen=True)
class Inputs:
    root: Path
    photo: Path  # a good W x H photo
    mask: Path  # and its good mask
    broken: Path  # BROKEN files, one each
    odd: Path  # ODD images, one each (in a folder whose name has spaces and unicode)
    odd_masks: Path  # a mask for each ODD image, by stem
    mask_photos: Path  # one good photo per ODD_MASKS entry
    mask_kinds: Path  # the ODD_MASKS masks, by stem
    a_file: Path  # a regular file, for paths that go "through" it


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("bad-input")
    folders = {n: root / n for n in ("broken", "odd_masks", "mask_photos", "mask_kinds")}
    folders["odd"] = root / UNICODE_DIR / "odd images"
    for folder in folders.values():
        folder.mkdir(parents=True)
    Image.fromarray(_pixels(seed=1)).save(root / "photo.png")
    Image.fromarray(_box_mask((W, H))).save(root / "mask.png")
    for name, make in BROKEN.values():
        make(folders["broken"] / name)
    for name, make, size in ODD.values():
        make(folders["odd"] / name)
        Image.fromarray(_box_mask(size)).save(folders["odd_masks"] / f"{Path(name).stem}.png")
    for seed, (kind, (make, _)) in enumerate(ODD_MASKS.items()):
        Image.fromarray(_pixels(seed=10 + seed)).save(folders["mask_photos"] / f"{kind}.png")
        make().save(folders["mask_kinds"] / f"{kind}.png")
    (root / "a_file").write_text("a regular file, not a folder")
    return Inputs(root, root / "photo.png", root / "mask.png", a_file=root / "a_file", **folders)


@pytest.fixture(scope="module")
def untouched(inputs: Inputs) -> Iterator[None]:
    """The generated inputs hash the same after every test of the module."""
    before = digest(inputs.root)
    yield
    assert digest(inputs.root) == before, "an input file was changed, added or removed"


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch, untouched: None) -> None:
    """Any model load fails the test: these inputs must be refused before that."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the bad input was reported")

    inpaint_run.clear_pipeline_cache()
    for method in ("runtime", "load_pipeline", "load_encoders", "load_denoiser"):
        monkeypatch.setattr(ModelFamily, method, refuse)


# ---- running --------------------------------------------------------------------------------------------------


def inpaint_cfg(out: Path, *overrides: str, image: Path | None = None, mask: Path | None = None) -> Any:
    # Quoted: Hydra's override grammar refuses symbols like ✓ in unquoted values (users quote them too).
    args = ["model=tiny_flux", "prompt=a red cat", f"output_dir='{out}'"]
    args += [f"image='{image}'"] if image is not None else []
    args += [f"mask='{mask}'"] if mask is not None else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="inpaint", overrides=[*args, *overrides])


def train_cfg(tmp: Path, dataset: Path, *overrides: str) -> Any:
    args = [
        "model=tiny_flux",
        "logger=none",
        f"data.dataset_dir='{dataset}'",
        f"output_dir={tmp / 'run'}",
        f"trainer.checkpoint_root={tmp / 'checkpoints'}",
        f"trainer.cache_dir={tmp / 'cache'}",
        "trainer.max_steps=2",
        "lora.rank=4",
        "lora.alpha=4",
        "data.instance_prompt=a photo of a cat",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=[*args, *overrides])


def refused(run: Callable[[Any], Any], cfg: Any, *fragments: str) -> str:
    """`run(cfg)` raises a UsageError of one line holding every fragment; returns the line."""
    with pytest.raises(UsageError) as caught:
        run(cfg)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def assert_no_outputs(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))


def assert_no_training_outputs(tmp: Path) -> None:
    for name in ("run", "checkpoints", "cache"):
        assert_no_outputs(tmp / name)


class Warnings:
    """stylekit's WARNING messages while the block runs (caplog misses module-scoped fixtures)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> list[str]:
        logging.getLogger("stylekit").addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("stylekit").removeHandler(self.handler)


# ---- inpaint: broken files, refused before any model loads ----------------------------------------------------


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("role", ["image", "mask"])
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_inpaint_refuses_a_broken_file_with_one_line_naming_it(
    kind: str, role: str, inputs: Inputs, tmp_path: Path
) -> None:
    broken = inputs.broken / BROKEN[kind][0]
    files = {"image": inputs.photo, "mask": inputs.mask, role: broken}
    out = tmp_path / "out"
    refused(inpaint_run.run, inpaint_cfg(out, **files), str(broken))
    assert_no_outputs(out)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("make_mask", "overrides", "fragments"),
    [
        (lambda: np.zeros((H, W), np.uint8), [], ["selects no pixels"]),
        (lambda: _box_mask((W // 2, H // 2)), [], ["is 64x48 but image", "inpaint.mask.resize=true"]),
        (lambda: _box_mask((W, W)), ["inpaint.mask.resize=true"], ["a different aspect ratio"]),
        (lambda: np.full((H, W), 100, np.uint8), [], ["selects no pixels"]),  # grey below the threshold
        (lambda: _box_mask((W, H)), ["inpaint.mask.grow=-40"], ["selects no pixels"]),  # shrunk to nothing
    ],
    ids=["empty", "size_mismatch", "other_aspect_with_resize", "grey_below_threshold", "shrunk_away"],
)
def test_inpaint_refuses_an_unusable_mask_with_one_line_naming_it(
    make_mask: Callable[[], np.ndarray],
    overrides: list[str],
    fragments: list[str],
    inputs: Inputs,
    tmp_path: Path,
) -> None:
    mask = tmp_path / "mask.png"
    Image.fromarray(make_mask()).save(mask)
    out = tmp_path / "out"
    refused(
        inpaint_run.run, inpaint_cfg(out, *overrides, image=inputs.photo, mask=mask), str(mask), *fragments
    )
    assert_no_outputs(out)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("where", "fragments"),
    [
        (lambda i: {"image": i.root / "missing.png", "mask": i.mask}, ["missing.png does not exist"]),
        (lambda i: {"image": i.photo, "mask": i.photo}, ["is also the image"]),
        (lambda i: {"image": i.odd_masks, "mask": i.odd_masks}, ["are the same folder"]),
        (lambda i: {"image": i.root / UNICODE_DIR, "mask": i.mask}, ["holds no images", UNICODE_DIR]),
        (lambda i: {"image": i.photo, "mask": i.mask, "out": i.a_file / "sub"}, ["cannot be created"]),
        (lambda i: {"image": i.photo, "mask": i.mask, "out": i.a_file}, ["cannot be created"]),
        (lambda i: {"image": i.odd, "mask": i.mask_kinds}, ["have no mask of the same stem"]),
    ],
    ids=[
        "missing_image",
        "mask_is_the_image",
        "same_folder",
        "folder_without_images",
        "output_dir_under_a_file",
        "output_dir_is_a_file",
        "no_matching_masks",
    ],
)
def test_inpaint_refuses_bad_paths_with_one_line(
    where: Callable[[Inputs], dict[str, Path]], fragments: list[str], inputs: Inputs, tmp_path: Path
) -> None:
    paths = where(inputs)
    out = paths.pop("out", tmp_path / "out")
    refused(inpaint_run.run, inpaint_cfg(out, **paths), *fragments)
    assert_no_outputs(tmp_path / "out")


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("num_inference_steps=-3", "num_inference_steps=-3 must be"),
        (
            "inpaint.mask.threshold=0",
            "inpaint.mask.threshold=0 must be a number in (0, 1]",
        ),  # once, not per image
        ("inpaint.mask.threshold=2", "inpaint.mask.threshold=2 must be a number in (0, 1]"),
        ("inpaint.mask.grow=1.5", "inpaint.mask.grow=1.5 must be a whole number"),
        ("inpaint.context=-1", "inpaint.context=-1 must be >= 0"),
        ("inpaint.context=wide", "inpaint.context='wide' must be a factor"),
        ("seed=abc", "seed='abc' must be a whole number"),
        ("guidance_scale=high", "guidance_scale='high' must be a number"),
        ("strength=abc", "strength='abc' must be a number in (0, 1]"),
        ("prompt=null", "prompt is required"),
        ("model.dtype=fp8", "model.dtype='fp8' must be one of: auto, bf16, fp16, fp32"),
        ("lora_weights=['style.safetensors:nan']", "has scale nan"),
    ],
)
def test_inpaint_refuses_a_bad_setting_with_one_line_naming_the_key(
    override: str, fragment: str, inputs: Inputs, tmp_path: Path
) -> None:
    if "lora_weights" in override:
        (tmp_path / "style.safetensors").write_bytes(b"x")
        override = override.replace("style.safetensors", str(tmp_path / "style.safetensors"))
    out = tmp_path / "out"
    refused(inpaint_run.run, inpaint_cfg(out, override, image=inputs.photo, mask=inputs.mask), fragment)
    assert_no_outputs(out)


def test_inpaint_reports_every_broken_file_of_a_batch_at_once_one_line_each(
    no_model_load: None, inputs: Inputs, tmp_path: Path
) -> None:
    images = [inputs.broken / name for name, _ in BROKEN.values() if (inputs.broken / name).is_file()]
    images = [image for image in images if listed(image.name)]
    with pytest.raises(UsageError) as caught:
        inpaint_run.run(inpaint_cfg(tmp_path / "out", image=inputs.broken, mask=inputs.mask))
    lines = str(caught.value).splitlines()
    # The folder listing skips what is not an image file (the folder, the dangling link, the GIF); every image
    # file is named.
    assert len(lines) == len(images)
    assert all(any(str(image) in line for line in lines) for image in images), lines
    assert_no_outputs(tmp_path / "out")


# ---- inpaint: odd inputs that must work -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_edits(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory, untouched: None) -> dict[str, Path]:
    """Every ODD image and every ODD_MASKS mask edited in two batch runs; kind -> output file."""
    inpaint_run.clear_pipeline_cache()
    out = tmp_path_factory.mktemp("odd edits") / UNICODE_DIR
    inpaint_run.run(inpaint_cfg(out, "inpaint.mask.feather=0", image=inputs.odd, mask=inputs.odd_masks))
    for name, _, _ in ODD.values():  # not picked up from a folder, but fine as image=FILE
        if not listed(name):
            mask = inputs.odd_masks / f"{Path(name).stem}.png"
            inpaint_run.run(inpaint_cfg(out, "inpaint.mask.feather=0", image=inputs.odd / name, mask=mask))
    inpaint_run.run(
        inpaint_cfg(out, "inpaint.mask.feather=0", image=inputs.mask_photos, mask=inputs.mask_kinds)
    )
    outputs = {kind: out / f"{Path(name).stem}_edited.png" for kind, (name, _, _) in ODD.items()}
    return outputs | {kind: out / f"{kind}_edited.png" for kind in ODD_MASKS}


def _reference(kind: str, path: Path) -> np.ndarray:
    """The input as 8-bit upright RGB, computed independently of stylekit's loader."""
    if kind == "grey_16bit":
        grey = np.rint(np.asarray(Image.open(path)).astype(np.float64) * 255 / 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    with Image.open(path) as image:
        if kind == "exif_rotated_jpeg":
            return np.rot90(np.asarray(image.convert("RGB")), k=-1)
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("kind", sorted(ODD))
def test_inpaint_edits_an_odd_image_upright_and_keeps_everything_outside_the_mask(
    kind: str, odd_edits: dict[str, Path], inputs: Inputs
) -> None:
    name, _, (width, height) = ODD[kind]
    with Image.open(odd_edits[kind]) as output:
        output.load()
        assert output.size == (width, height) and output.mode == "RGB"
        result = np.asarray(output)
    outside = _box_mask((width, height)) == 0
    if kind == "float_tiff":  # floats: compare with stylekit's own conversion (scaling rules in its docs)
        from stylekit.inpaint.images import load_image

        expected = np.asarray(load_image(inputs.odd / name))
    else:
        expected = _reference(kind, inputs.odd / name)
    np.testing.assert_array_equal(result[outside], expected[outside])
    if kind == "exif_rotated_jpeg":
        assert result[5, 5, 0] > 180 > result[5, 5, 2]  # red on top once upright
        assert result[-5, 5, 2] > 180 > result[-5, 5, 0]
    if kind != "one_pixel":
        assert np.abs(result[~outside].astype(int) - expected[~outside]).mean() > 2  # the model did edit


@pytest.mark.parametrize("kind", sorted(ODD_MASKS))
def test_inpaint_with_an_odd_mask_changes_only_the_region_it_selects(
    kind: str, odd_edits: dict[str, Path], inputs: Inputs
) -> None:
    region = ODD_MASKS[kind][1]
    before = np.asarray(Image.open(inputs.mask_photos / f"{kind}.png").convert("RGB"))
    with Image.open(odd_edits[kind]) as output:
        after = np.asarray(output.convert("RGB"))
    np.testing.assert_array_equal(after[~region], before[~region])
    assert np.abs(after[region].astype(int) - before[region]).mean() > 2


def test_inpaint_with_a_lora_file_that_is_not_a_lora_stops_with_one_line(
    odd_edits: dict[str, Path], inputs: Inputs, tmp_path: Path, untouched: None
) -> None:
    # After the model loads (odd_edits left the pipeline cached): the file is only read then.
    out = tmp_path / "out"
    for name, data in [("zero.safetensors", b""), ("text.safetensors", b"not a safetensors file")]:
        lora = tmp_path / name
        lora.write_bytes(data)
        cfg = inpaint_cfg(out, f"lora_weights={lora}", image=inputs.photo, mask=inputs.mask)
        refused(inpaint_run.run, cfg, f"lora_weights entry '{lora}' does not load", "is it a LoRA")
    assert_no_outputs(out)


# ---- train: broken files and settings, refused before any model loads ------------------------------------------


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("kind", [*sorted(BROKEN), "one_pixel"])
def test_train_skips_a_broken_file_with_a_warning_naming_it_and_one_line_when_none_is_left(
    kind: str, inputs: Inputs, tmp_path: Path
) -> None:
    name, folder = (BROKEN[kind][0], inputs.broken) if kind in BROKEN else (ODD[kind][0], inputs.odd)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    replicate(folder / name, dataset / name)
    with Warnings() as warnings:
        message = refused(train_run, train_cfg(tmp_path, dataset), f"no usable training images in {dataset}")
    if kind in ("directory_named_png", "dangling_symlink") or not listed(name):  # never listed as images
        assert "0 image files found" in message
    else:
        named = [w for w in warnings if str(dataset / name) in w]
        assert len(named) == 1 and named[0].startswith(f"skipping {dataset / name}: "), warnings
        assert ("1 too small" if kind == "one_pixel" else "1 unreadable") in message
    assert_no_training_outputs(tmp_path)


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.max_steps=-5", "trainer.max_steps=-5 must be a whole number >= 1"),
        ("optimizer.lr=-0.001", "optimizer.lr=-0.001 must be a number > 0"),
        ("optimizer.lr=fast", "optimizer.lr='fast' must be a number"),
        ("lora.rank=-2", "lora.rank=-2 must be a whole number >= 1"),
        ("lora.alpha=big", "lora.alpha='big' must be a number"),
        ("seed=abc", "seed='abc' must be a whole number"),
        ("trainer.batch_size=0", "trainer.batch_size=0 must be a whole number >= 1"),
        ("data.resolution=0", "data.resolution=0 must be a whole number >= 1"),
        ("data.caption_dropout=2", "data.caption_dropout=2 must be a number in [0, 1]"),
        ("model.dtype=fp8", "model.dtype='fp8' must be one of"),
        (
            "trainer.resume=/nonexistent/checkpoint-00000010",
            "trainer.resume=/nonexistent/checkpoint-00000010",
        ),
        ("output_dir=A_FILE/sub", "output_dir=A_FILE/sub cannot be created"),
        ("trainer.checkpoint_root=A_FILE/sub", "trainer.checkpoint_root=A_FILE/sub cannot be created"),
        ("trainer.cache_dir=A_FILE/sub", "trainer.cache_dir=A_FILE/sub cannot be created"),
        ("data.dataset_dir=A_FILE", "is a file, not a folder"),
    ],
)
def test_train_refuses_a_bad_setting_with_one_line_naming_the_key(
    override: str, fragment: str, inputs: Inputs, tmp_path: Path
) -> None:
    override, fragment = (text.replace("A_FILE", str(inputs.a_file)) for text in (override, fragment))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    Image.fromarray(_pixels()).save(dataset / "photo.png")
    refused(train_run, train_cfg(tmp_path, dataset, override), fragment)
    assert_no_training_outputs(tmp_path)


# ---- train: odd images work, broken ones are skipped ----------------------------------------------------------


def test_train_on_odd_images_beside_broken_ones_trains_on_the_odd_ones_upright_and_skips_the_rest(
    inputs: Inputs, tmp_path: Path, untouched: None
) -> None:
    from stylekit.data.dataset import prepare_samples

    dataset = tmp_path / UNICODE_DIR
    dataset.mkdir()
    for folder in (inputs.odd, inputs.broken):
        for path in folder.iterdir():
            replicate(path, dataset / path.name)
    before = digest(dataset)
    cfg = train_cfg(tmp_path, dataset, "trainer.max_steps=1")

    usable = {sample.record.path.name: sample.record for sample in prepare_samples(cfg, multiple=16, seed=0)}
    assert sorted(usable) == sorted(
        name for kind, (name, _, _) in ODD.items() if kind != "one_pixel" and listed(name)
    )
    assert usable["rotated.jpg"].size == (H, W)  # EXIF orientation applied
    with Warnings() as warnings:
        loss = train_run(cfg)

    assert np.isfinite(loss)
    assert (tmp_path / "run" / "lora" / WEIGHT_NAME).is_file()
    skipped = sorted(w.split(":")[0].removeprefix("skipping ") for w in warnings if w.startswith("skipping "))
    files = [name for name, _ in BROKEN.values() if (inputs.broken / name).is_file() and listed(name)]
    assert skipped == sorted(str(dataset / name) for name in [*files, ODD["one_pixel"][0]])
    assert digest(dataset) == before


# ---- what a user sees: real processes ---------------------------------------------------------------------------


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("bomb_image", ["bomb.png has more than", "downscale it first"]),
        ("truncated_mask", ["truncated_png.png is truncated or corrupt"]),
        ("threshold_zero", ["inpaint.mask.threshold=0 must be a number in (0, 1]"]),
        ("output_dir_under_a_file", ["a_file/sub cannot be created"]),
        ("missing_mask_at_unicode_path", [f"{UNICODE_DIR}/nope.png does not exist"]),
    ],
)
def test_inpaint_command_exits_2_with_one_line(
    case: str, fragments: list[str], inputs: Inputs, tmp_path: Path, untouched: None
) -> None:
    args = {"image": inputs.photo, "mask": inputs.mask, "output_dir": tmp_path / "out"}
    extra = []
    if case == "bomb_image":
        args["image"] = inputs.broken / "bomb.png"
    elif case == "truncated_mask":
        args["mask"] = inputs.broken / "truncated_png.png"
    elif case == "threshold_zero":
        extra = ["inpaint.mask.threshold=0"]
    elif case == "output_dir_under_a_file":
        args["output_dir"] = inputs.a_file / "sub"
    else:
        args.update(
            image=inputs.odd / ODD["unicode_and_spaces_name"][0], mask=inputs.root / UNICODE_DIR / "nope.png"
        )
    result = cli(
        "inpaint",
        "model=tiny_flux",
        "prompt=a cat",
        *[f"{key}='{value}'" for key, value in args.items()],
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
        cwd=tmp_path,
    )
    assert_one_error_line(result, *fragments)
    assert_no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("only_a_truncated_jpeg", ["no usable training images", "1 unreadable"]),
        ("dtype_fp8", ["model.dtype='fp8' must be one of"]),
        ("output_dir_under_a_file", ["output_dir=", "a_file/sub cannot be created"]),
    ],
)
def test_train_command_exits_2_with_one_line(
    case: str, fragments: list[str], inputs: Inputs, tmp_path: Path, untouched: None
) -> None:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    if case == "only_a_truncated_jpeg":
        (dataset / "photo.jpg").write_bytes((inputs.broken / "truncated_jpeg.jpg").read_bytes())
    else:
        Image.fromarray(_pixels()).save(dataset / "photo.png")
    extra = {"dtype_fp8": ["model.dtype=fp8"], "output_dir_under_a_file": [f"output_dir={inputs.a_file}/sub"]}
    result = cli(
        "train",
        "model=tiny_flux",
        "logger=none",
        f"data.dataset_dir={dataset}",
        f"trainer.checkpoint_root={tmp_path / 'checkpoints'}",
        f"trainer.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra.get(case, []),
        cwd=tmp_path,
    )
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run" / "lora").exists()


@pytest.mark.parametrize(
    ("script", "args", "first_line"),
    [
        (
            "train",
            ["model=nope"],
            "error: model=nope is not an option of model; pick one of: flux, qwen_edit,",
        ),
        ("inpaint", ["model=nope", "prompt=x"], "error: model=nope is not an option of model; pick one of:"),
        (
            "train",
            ["optimizer=sgd"],
            "error: optimizer=sgd is not an option of optimizer; pick one of: adamw",
        ),
        (
            "inpaint",
            ["inpaint/preprocess=nope", "prompt=x"],
            "error: inpaint/preprocess=nope is not an option of inpaint/preprocess; pick one of: grayscale, none",
        ),
        # Unquoted symbols in a value: Hydra's grammar wants image='...' (quoted, as the tests above pass it).
        (
            "inpaint",
            ["prompt=x", f"image=/tmp/{UNICODE_DIR}/photo.png"],
            "error: an override does not parse (",
        ),
    ],
    ids=["train_model", "inpaint_model", "train_optimizer", "inpaint_preprocess", "unquoted_symbol"],
)
def test_what_hydra_refuses_is_one_line_and_exit_2(
    script: str, args: list[str], first_line: str, tmp_path: Path
) -> None:
    result = cli(script, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    # Hydra stops before stylekit runs; its error is rewritten into one line with the options it knows.
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(first_line), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.guidance=abc", "trainer.guidance"),
        ("trainer.noise_offset=abc", "trainer.noise_offset"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("optimizer.betas=[2,3]", "optimizer.betas"),
        ("trainer.lora_format=nope", "trainer.lora_format"),
        ("lora.dropout=1.5", "lora.dropout"),
    ],
)
def test_more_bad_training_numbers_are_caught_before_any_model_loads(override: str, key: str) -> None:
    from hydra import compose, initialize_config_dir

    from stylekit import schema

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["model=tiny_flux", override])
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        schema.validate("train", cfg)
