"""The tiny pipeline folders load through the real diffusers pipelines offline and are reproducible."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stylekit.errors import UsageError
from stylekit.models import tiny

SIZE = 64
# The Qwen-Image-Edit pipelines resize inputs to these areas (~1 MP for the VAE, 384^2 for the vision
# tower); shrinking them keeps a tiny call well under a second instead of tens of seconds.
QWEN_RESIZE_AREAS = (1024 * 1024, 384 * 384)
QWEN_MODULES = ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_plus", "pipeline_qwenimage_edit_inpaint")


@pytest.fixture(scope="module", autouse=True)
def offline_single_thread() -> Iterator[None]:
    import huggingface_hub.constants
    import torch

    # Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they make a 0.1 s call
    # take over a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds each name's folder once per module, on first request."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny.build(name, tmp_path_factory.mktemp("tiny") / name)
        return built[name]

    return get


@pytest.fixture
def small_qwen_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    for module_name in QWEN_MODULES:
        module = importlib.import_module(f"diffusers.pipelines.qwenimage.{module_name}")
        original = module.calculate_dimensions

        def shrunk(target_area: float, ratio: float, original: Any = original) -> Any:
            return original(SIZE * SIZE if target_area in QWEN_RESIZE_AREAS else target_area, ratio)

        monkeypatch.setattr(module, "calculate_dimensions", shrunk)


def _image() -> Any:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask() -> Any:
    from PIL import Image

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))
    return mask


def _generate(pipeline_class_name: str, folder: Path, **inputs: Any) -> np.ndarray:
    import diffusers
    import torch

    pipeline = getattr(diffusers, pipeline_class_name).from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline(
        prompt="a photo of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **inputs,
    )
    return result.images


def _assert_image(images: np.ndarray) -> None:
    assert images.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize(
    ("pipeline_class_name", "needs"),
    [("FluxPipeline", ()), ("FluxImg2ImgPipeline", ("image",)), ("FluxInpaintPipeline", ("image", "mask"))],
)
def test_flux_folder_runs_in_text_image_and_inpaint_pipelines(
    tiny_folder: Callable[[str], Path], pipeline_class_name: str, needs: tuple[str, ...]
) -> None:
    inputs: dict[str, Any] = {"height": SIZE, "width": SIZE, "max_sequence_length": 32}
    if "image" in needs:
        inputs.update(image=_image(), strength=0.9)
    if "mask" in needs:
        inputs["mask_image"] = _mask()
    _assert_image(_generate(pipeline_class_name, tiny_folder("flux"), **inputs))


def test_flux_fill_folder_runs_in_flux_fill_pipeline(tiny_folder: Callable[[str], Path]) -> None:
    images = _generate(
        "FluxFillPipeline",
        tiny_folder("flux_fill"),
        image=_image(),
        mask_image=_mask(),
        height=SIZE,
        width=SIZE,
        max_sequence_length=32,
    )
    _assert_image(images)


def test_flux_fill_transformer_takes_latents_masked_latents_and_packed_mask(
    tiny_folder: Callable[[str], Path],
) -> None:
    import json

    config = json.loads((tiny_folder("flux_fill") / "transformer" / "config.json").read_text())
    # Same as FLUX.1-Fill-dev: 64 packed latents + 64 packed masked-image latents + 8*8*4 mask values.
    assert (config["in_channels"], config["out_channels"]) == (384, 64)


def test_sdxl_folder_runs_in_text_to_image_pipeline(tiny_folder: Callable[[str], Path]) -> None:
    _assert_image(_generate("StableDiffusionXLPipeline", tiny_folder("sdxl"), height=SIZE, width=SIZE))


@pytest.mark.parametrize("name", ["sdxl", "sdxl_inpaint"])
def test_sdxl_folders_run_in_sdxl_inpaint_pipeline(tiny_folder: Callable[[str], Path], name: str) -> None:
    images = _generate(
        "StableDiffusionXLInpaintPipeline",
        tiny_folder(name),
        image=_image(),
        mask_image=_mask(),
        height=SIZE,
        width=SIZE,
        strength=0.99,
    )
    _assert_image(images)


@pytest.mark.usefixtures("small_qwen_resize")
@pytest.mark.parametrize(
    ("pipeline_class_name", "extra"),
    [
        ("QwenImageEditPlusPipeline", {"height": SIZE, "width": SIZE}),
        ("QwenImageEditPipeline", {}),
        ("QwenImageEditInpaintPipeline", {"mask_image": "mask", "strength": 0.9}),
    ],
)
def test_qwen_edit_folder_runs_in_edit_pipelines(
    tiny_folder: Callable[[str], Path], pipeline_class_name: str, extra: dict[str, Any]
) -> None:
    inputs = {**extra, "image": _image(), "negative_prompt": "blurry", "true_cfg_scale": 2.0}
    if inputs.get("mask_image") == "mask":
        inputs["mask_image"] = _mask()
    _assert_image(_generate(pipeline_class_name, tiny_folder("qwen_edit"), **inputs))


def test_qwen_vision_token_ids_match_the_tokenizer(tiny_folder: Callable[[str], Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_folder("qwen_edit")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    config = AutoConfig.from_pretrained(folder / "text_encoder")
    expected = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for key, token in expected.items():
        assert getattr(config, key) == tokenizer.convert_tokens_to_ids(token), key
    assert config.text_config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize(
    ("system_prompt", "dropped"),
    [
        (
            "Describe the key features of the input image (color, shape, size, texture, objects, background), "
            "then explain how the user's text instruction should alter or modify the image. Generate a new "
            "image that meets the user's requirements while maintaining consistency with the original input "
            "where appropriate.",
            64,
        ),
        (
            "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
            "relationships of the objects and background:",
            34,
        ),
    ],
)
def test_qwen_template_prefix_is_as_long_as_the_pipelines_drop(
    tiny_folder: Callable[[str], Path], system_prompt: str, dropped: int
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder("qwen_edit") / "tokenizer")
    prefix = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
    assert len(tokenizer(prefix).input_ids) == dropped


@pytest.mark.parametrize("name", tiny.TINY_NAMES)
def test_folder_names_only_diffusers_and_transformers_classes(
    tiny_folder: Callable[[str], Path], name: str
) -> None:
    import json

    index = json.loads((tiny_folder(name) / "model_index.json").read_text())
    libraries = {
        value[0] for key, value in index.items() if not key.startswith("_") and isinstance(value, list)
    }
    assert libraries <= {"diffusers", "transformers", None}
    assert "stylekit" not in "".join(path.read_text() for path in tiny_folder(name).rglob("*.json"))


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(file).items():
            tensors[f"{file.relative_to(folder)}:{key}"] = value
    return tensors


@pytest.mark.parametrize("name", tiny.TINY_NAMES)
def test_same_seed_builds_identical_weights(
    tiny_folder: Callable[[str], Path], tmp_path: Path, name: str
) -> None:
    import torch

    first = _tensors(tiny_folder(name))
    second = _tensors(tiny.build(name, tmp_path / name, seed=0))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_different_seed_builds_different_weights(tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    import torch

    first = _tensors(tiny_folder("flux"))
    other = _tensors(tiny.build("flux", tmp_path / "flux", seed=1))
    assert first.keys() == other.keys()
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_build_replaces_an_earlier_folder_but_not_other_directories(tmp_path: Path) -> None:
    target = tiny.build("flux", tmp_path / "flux")
    (target / "stale.txt").write_text("old")
    assert tiny.build("flux", target) == target
    assert not (target / "stale.txt").exists()

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    with pytest.raises(UsageError):
        tiny.build("flux", unrelated)
    assert (unrelated / "keep.txt").read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_cli_writes_the_folder_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: a subprocess would spend most of its time importing torch and diffusers.
    assert tiny.main(["flux", str(tmp_path / "out"), "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str((tmp_path / "out").resolve())
    assert (Path(printed) / "model_index.json").is_file()


def test_cli_unknown_name_exits_2_with_one_line_listing_valid_names(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stylekit.models.tiny", "sd15", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert all(name in lines[0] for name in tiny.TINY_NAMES)
    assert not (tmp_path / "out").exists()


def test_importing_the_module_does_not_import_torch_or_diffusers() -> None:
    code = "import sys, stylekit.models.tiny; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_tiny_path_builds_once_under_the_configured_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "cache"))
    first = tiny.tiny_path("flux")
    assert first.parent == tmp_path / "cache" / "tiny"
    assert first.name.startswith("flux-")
    stamp = (first / "model_index.json").stat().st_mtime_ns

    def fail_build(*_args: Any) -> None:
        raise AssertionError("cached folder was rebuilt")

    monkeypatch.setattr(tiny, "_write_pipeline", fail_build)
    assert tiny.tiny_path("flux") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp


def test_tiny_path_key_depends_on_name_and_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        tiny, "_write_pipeline", lambda name, folder, seed: (folder / "model_index.json").touch()
    )
    paths = {tiny.tiny_path(name, seed) for name in ("flux", "sdxl") for seed in (0, 1)}
    assert len(paths) == 4


def test_tiny_path_keeps_the_folder_another_process_published_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))

    def racing_write(name: str, folder: Path, seed: int) -> None:
        # While this build runs, a rival process finishes and publishes the same target.
        (folder / "model_index.json").write_text("ours")
        rival = tmp_path / "tiny" / f"{name}-{tiny._cache_key(name, seed)}"
        rival.mkdir()
        (rival / "model_index.json").write_text("theirs")

    monkeypatch.setattr(tiny, "_write_pipeline", racing_write)
    path = tiny.tiny_path("flux")
    assert (path / "model_index.json").read_text() == "theirs"
    assert [child.name for child in (tmp_path / "tiny").iterdir()] == [path.name]


def test_unknown_name_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="valid names: flux, flux_fill"):
        tiny.build("nope", tmp_path / "x")


def test_a_rank_of_a_running_process_group_builds_a_complete_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `accelerate launch` the first run may build the tiny folder inside a rank > 0, where transformers
    saves nothing: the published folder must still hold every component's weights."""
    import torch

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = tiny.build("flux", tmp_path / "flux")
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        assert list((folder / component).glob("*.safetensors")), f"{component} has no weights"
