"""Inpainting end to end on the tiny models (CPU): only the masked region changes, for every family.

Runs go through `stylekit.inpaint.run.run(cfg)` with configs composed from the real conf/ tree; the pipeline
cache in that module loads each tiny pipeline once per family switch, and tests are ordered by family so a
module run loads each about once. Two tests run scripts/inpaint.py as a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stylekit.errors import UsageError
from stylekit.inpaint import run as inpaint_run
from stylekit.inpaint.images import load_image
from stylekit.models.base import ModelFamily

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
SIZE = (128, 96)  # width, height: not square and not a multiple of 32, to exercise the crop rounding
BOX = (40, 30, 90, 60)  # the mask rectangle, x0 y0 x1 y1

# (model, extra overrides): every family and every pipeline a family offers.
FAMILIES = [
    ("tiny_qwen_edit", []),
    ("tiny_qwen_edit", ["model.pipeline=edit_inpaint"]),
    ("tiny_sdxl", []),
    ("tiny_flux", []),
    ("tiny_flux", ["model.pipeline=inpaint"]),
]
FAMILY_IDS = ["qwen_edit_plus", "qwen_edit_inpaint", "sdxl", "flux_fill", "flux_inpaint"]


def _photo() -> np.ndarray:
    """A smooth colour gradient with texture: resampling it is never an identity by accident."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(7)
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], axis=-1)
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)


def _mask(box: tuple[int, int, int, int] | None = BOX, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
    return mask


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scene")
    Image.fromarray(_photo()).save(folder / "photo.png")
    Image.fromarray(_mask()).save(folder / "photo_mask.png")
    return {"image": folder / "photo.png", "mask": folder / "photo_mask.png"}


def compose_cfg(model: str, out: Path, *overrides: str, image: Path | None = None, mask: Path | None = None):
    args = [f"model={model}", "prompt=a red cat", f"output_dir={out}", *overrides]
    args += [f"image={image}"] if image is not None else []
    args += [f"mask={mask}"] if mask is not None else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="inpaint", overrides=args)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(load_image(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weight load fails the test: validation must stop the run first."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pipeline was loaded before validation finished")

    inpaint_run.clear_pipeline_cache()
    monkeypatch.setattr(ModelFamily, "load_pipeline", refuse)


# ---- the guarantee: outside the mask, the input bit for bit ---------------------------------------------------


@pytest.mark.parametrize("preprocess", ["none", "grayscale"])
@pytest.mark.parametrize(("model", "extra"), FAMILIES, ids=FAMILY_IDS)
def test_only_the_masked_region_changes(
    model: str, extra: list[str], preprocess: str, scene: dict[str, Path], tmp_path: Path
) -> None:
    cfg = compose_cfg(model, tmp_path, f"inpaint/preprocess={preprocess}", *extra, **scene)
    summary = inpaint_run.run(cfg)
    assert summary["outputs"] == [str(tmp_path / "photo_edited.png")]
    before, after = _photo(), pixels(tmp_path / "photo_edited.png")
    outside = _mask() == 0
    assert after.shape == before.shape
    assert np.array_equal(after[outside], before[outside])
    assert np.abs(after[~outside].astype(int) - before[~outside]).mean() > 5  # the model did edit


def test_qwen_edit_plus_with_a_full_mask_is_the_bare_pipeline_call(tmp_path: Path, monkeypatch) -> None:
    """The latent hold reuses the pipeline's own noise draw and its VAE encoding of the image, so with
    nothing to hold it changes nothing and costs no extra VAE pass."""
    import torch

    cfg = compose_cfg("tiny_qwen_edit", tmp_path)
    family = inpaint_run.build_family(cfg)
    pipe = inpaint_run.load_pipeline(family, cfg.model)
    encodes = []
    vae_encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: encodes.append(1) or vae_encode(*a, **k))
    image = Image.fromarray(_photo()[:64, :64])
    settings = inpaint_run.effective_settings(family, {k: cfg[k] for k in inpaint_run.SETTING_KEYS})
    held = family.edit(pipe, image, Image.new("L", (64, 64), 255), "a cat", settings, torch.manual_seed(3))
    assert len(encodes) == 1
    with family.call_context(pipe):
        bare = pipe(
            image=[image],
            prompt="a cat",
            negative_prompt=settings["negative_prompt"],
            true_cfg_scale=settings["true_cfg_scale"],
            height=64,
            width=64,
            num_inference_steps=settings["num_inference_steps"],
            generator=torch.manual_seed(3),
        ).images[0]
    assert np.array_equal(np.asarray(held), np.asarray(bare))


def test_qwen_edit_plus_latents_outside_the_mask_end_as_the_original(tmp_path: Path) -> None:
    import torch

    from stylekit.models.qwen_edit import _encode, _packed, held_to_mask

    cfg = compose_cfg("tiny_qwen_edit", tmp_path)
    family = inpaint_run.build_family(cfg)
    pipe = inpaint_run.load_pipeline(family, cfg.model)
    image, mask = Image.fromarray(_photo()[:64, :64]), Image.fromarray(_mask((16, 16, 40, 40))[:64, :64])
    device = pipe._execution_device
    original, _, region = _packed(pipe, _encode(pipe, image, device)[1], mask, torch.manual_seed(0), device)
    assert region.shape == (1, original.shape[1], 1) and 0 < region.sum() < region.numel()
    for strength in (1.0, 0.5):
        held, during = held_to_mask(pipe, image, mask, strength, 4, torch.manual_seed(0))
        kwargs = {
            "image": [image],
            "prompt": "a cat",
            "height": 64,
            "width": 64,
            "num_inference_steps": 4,
        } | held
        with family.call_context(pipe), during:
            final = pipe(output_type="latent", **kwargs).images
        keep = region[0, :, 0] == 0
        assert torch.equal(final[0, keep], original[0, keep].to(final.dtype))
        assert not torch.allclose(final[0, ~keep], original[0, ~keep], atol=1e-3)
        assert len(pipe.scheduler.timesteps) == (4 if strength == 1.0 else 2)


# ---- outputs: names, metadata, never over an input -----------------------------------------------------------


def test_seeds_name_the_outputs_and_metadata_records_the_settings(
    scene: dict[str, Path], tmp_path: Path
) -> None:
    cfg = compose_cfg(
        "tiny_qwen_edit", tmp_path, "num_images=2", "seed=5", "inpaint/preprocess=grayscale", **scene
    )
    inpaint_run.run(cfg)
    first, second = tmp_path / "photo_edited_s5.png", tmp_path / "photo_edited_s6.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name]
    assert not np.array_equal(pixels(first), pixels(second))
    text = Image.open(second).text
    assert text["prompt"] == "a red cat" and text["seed"] == "6"
    assert text["model"] == "qwen_edit" and text["pretrained"] == "tiny:qwen_edit"
    assert text["pipeline"] == "edit_plus" and json.loads(text["loras"]) == []
    assert json.loads(text["num_inference_steps"]) == 2 and json.loads(text["true_cfg_scale"]) == 4.0
    assert json.loads(text["strength"]) == 1.0 and text["negative_prompt"] == " "
    assert json.loads(text["preprocess"]) == ["grayscale"] and json.loads(text["postprocess"]) == [
        "revert_grayscale"
    ]
    assert text["stylekit_version"]


def test_batch_in_the_input_folder_never_touches_an_input(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    boxes = {"a": (10, 10, 40, 40), "b": (60, 20, 120, 50), "c": (0, 70, 30, 96)}
    for stem, box in boxes.items():
        Image.fromarray(np.roll(_photo(), len(stem) * 7, axis=1)).save(images / f"{stem}.png")
        Image.fromarray(_mask(box)).save(masks / f"{stem}.png")
    inputs = sorted(images.iterdir()) + sorted(masks.iterdir())
    hashes = {p: sha256(p) for p in inputs}
    cfg = compose_cfg("tiny_qwen_edit", images, image=images, mask=masks)
    for _ in range(2):  # a rerun must not take the outputs for inputs
        summary = inpaint_run.run(cfg)
        assert sorted(Path(p).name for p in summary["outputs"]) == [
            "a_edited.png",
            "b_edited.png",
            "c_edited.png",
        ]
    assert {p: sha256(p) for p in inputs} == hashes
    for stem, box in boxes.items():
        outside = _mask(box) == 0
        assert np.array_equal(
            pixels(images / f"{stem}_edited.png")[outside], pixels(images / f"{stem}.png")[outside]
        )


def test_skip_existing_skips_without_loading(scene: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg("tiny_qwen_edit", tmp_path, "skip_existing=true", **scene)
    inpaint_run.run(cfg)
    written = tmp_path / "photo_edited.png"
    stamp = written.stat().st_mtime_ns
    monkeypatch.setattr(ModelFamily, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    inpaint_run.clear_pipeline_cache()
    summary = inpaint_run.run(cfg)
    assert summary["outputs"] == [] and summary["skipped"] == 1
    assert written.stat().st_mtime_ns == stamp


def test_save_comparison_writes_input_beside_output(scene: dict[str, Path], tmp_path: Path) -> None:
    inpaint_run.run(compose_cfg("tiny_qwen_edit", tmp_path, "save_comparison=true", **scene))
    side = pixels(tmp_path / "photo_comparison.png")
    edited = pixels(tmp_path / "photo_edited.png")
    width = SIZE[0]
    assert side.shape[0] == SIZE[1] and side.shape[1] > 2 * width
    assert np.array_equal(side[:, :width], _photo())
    assert np.array_equal(side[:, -width:], edited)


def test_cuda_out_of_memory_names_the_settings_to_try(scene, tmp_path: Path, monkeypatch) -> None:
    import torch

    from stylekit.models.qwen_edit import QwenEditFamily

    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(QwenEditFamily, "edit", oom)
    with pytest.raises(UsageError, match="model.offload=model.*model.offload=sequential.*model.quantize=nf4"):
        inpaint_run.run(compose_cfg("tiny_qwen_edit", tmp_path, **scene))


# ---- validation before any weights load -----------------------------------------------------------------------


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_images=0"], "num_images=0 must be"),
        (["num_inference_steps=0"], "num_inference_steps=0 must be"),
        (["strength=0"], r"strength=0 must be a number in \(0, 1\]"),
        (["strength=1.5"], "strength=1.5 must be"),
        (["inpaint.preprocess=[sharpen]"], "unknown step 'sharpen'"),
        (["inpaint.postprocess=[revert_grayscale]"], "needs grayscale"),
        (["inpaint.mask.feather=-1"], "feather=-1 must be a whole number >= 0"),
        (["lora_weights=[/nonexistent/lora.safetensors]"], "lora_weights entry.*does not exist"),
        (["model.pipeline=nope"], "model.pipeline='nope' must be one of: edit_plus, edit_inpaint"),
    ],
)
def test_bad_settings_stop_before_the_model_loads(
    overrides: list[str], message: str, scene: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=message):
        inpaint_run.run(compose_cfg("tiny_qwen_edit", tmp_path, *overrides, **scene))
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.usefixtures("no_model_load")
def test_every_bad_pair_of_a_batch_is_reported_before_the_model_loads(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for stem in ("good", "small", "blank"):
        Image.fromarray(_photo()).save(images / f"{stem}.png")
    Image.fromarray(_mask()).save(masks / "good.png")
    Image.fromarray(_mask(size=(64, 48))).save(masks / "small.png")
    Image.fromarray(_mask(None)).save(masks / "blank.png")
    with pytest.raises(UsageError) as caught:
        inpaint_run.run(compose_cfg("tiny_flux", tmp_path / "out", image=images, mask=masks))
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any("blank.png selects no pixels" in line for line in lines)
    assert any(
        "small.png is 64x48 but image" in line and "inpaint.mask.resize=true" in line for line in lines
    )


@pytest.mark.usefixtures("no_model_load")
def test_an_output_that_would_overwrite_an_input_is_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    Image.fromarray(_mask()).save(tmp_path / "photo_edited.png")  # a mask named like the output
    cfg = compose_cfg(
        "tiny_sdxl", scene["image"].parent, image=scene["image"], mask=tmp_path / "photo_edited.png"
    )
    cfg.output_dir = str(tmp_path)
    with pytest.raises(UsageError, match="would overwrite an input"):
        inpaint_run.run(cfg)


@pytest.mark.usefixtures("no_model_load")
def test_two_images_of_one_stem_are_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_photo()).save(images / "a.png")
    Image.fromarray(_photo()).save(images / "a.jpg")
    Image.fromarray(_mask()).save(tmp_path / "mask.png")
    with pytest.raises(UsageError, match="a.jpg and a.png would both write a_edited.png"):
        inpaint_run.run(compose_cfg("tiny_sdxl", tmp_path / "out", image=images, mask=tmp_path / "mask.png"))


@pytest.mark.usefixtures("no_model_load")
def test_output_dir_must_be_given_outside_the_hydra_app(scene: dict[str, Path]) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "inpaint", [f"image={scene['image']}", f"mask={scene['mask']}", "prompt=x", "model=tiny_sdxl"]
        )
    with pytest.raises(UsageError, match="pass output_dir=PATH"):
        inpaint_run.run(cfg)


def test_lora_weights_parse_paths_scales_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "run:1"
    folder.mkdir()
    (folder / inpaint_run.LORA_WEIGHT_NAME).write_bytes(b"x")
    single = tmp_path / "style.safetensors"
    single.write_bytes(b"x")
    loras = inpaint_run.parse_loras([f"{folder}:0.5", str(single), f"{folder}"])
    assert [(x.file, x.scale) for x in loras] == [
        (folder / inpaint_run.LORA_WEIGHT_NAME, 0.5),
        (single, 1.0),
        (folder / inpaint_run.LORA_WEIGHT_NAME, 1.0),  # "run:1" names an existing folder: not a scale
    ]
    assert [x.scale for x in inpaint_run.parse_loras(f"{single}:-0.25")] == [-0.25]
    with pytest.raises(UsageError, match="has no pytorch_lora_weights.safetensors"):
        inpaint_run.parse_loras([str(tmp_path)])


# ---- LoRAs change the edit; at scale 0 they do not ----------------------------------------------------------


def _make_lora(model: str, out: Path) -> Path:
    """A random rank-4 LoRA on the tiny denoiser's attention projections, saved as diffusers would."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = inpaint_run.build_family(compose_cfg(model, out))
    pipe = family.load_pipeline("inpaint")  # a private copy: the cached one must stay LoRA-free
    denoiser = getattr(pipe, family.denoiser_name)
    denoiser.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 4.0)
    state = get_peft_model_state_dict(denoiser)
    if family.denoiser_name == "unet":
        state = convert_state_dict_to_diffusers(state)
    type(pipe).save_lora_weights(out, **{f"{family.denoiser_name}_lora_layers": state})
    return out


@pytest.mark.parametrize("model", ["tiny_qwen_edit", "tiny_sdxl", "tiny_flux"])
def test_a_lora_changes_the_edit_and_scale_zero_does_not(
    model: str, scene: dict[str, Path], tmp_path: Path
) -> None:
    lora = _make_lora(model, tmp_path / "lora")
    results = {}
    for name, entry in [("none", None), ("one", f"{lora}:1.0"), ("zero", f"{lora}:0.0")]:
        extra = [f"lora_weights=['{entry}']"] if entry else []
        inpaint_run.run(compose_cfg(model, tmp_path / name, *extra, **scene))
        results[name] = pixels(tmp_path / name / "photo_edited.png").astype(int)
        if entry:
            meta = json.loads(Image.open(tmp_path / name / "photo_edited.png").text["loras"])
            assert meta == [{"path": str(lora / inpaint_run.LORA_WEIGHT_NAME), "scale": float(entry[-3:])}]
    inside = _mask() > 0
    assert np.abs(results["one"][inside] - results["none"][inside]).mean() > 1
    assert np.abs(results["zero"] - results["none"]).max() <= 1
    # Adapters are unloaded after the run: the cached pipeline is back to the base model.
    inpaint_run.run(compose_cfg(model, tmp_path / "after", **scene))
    assert np.abs(pixels(tmp_path / "after" / "photo_edited.png").astype(int) - results["none"]).max() <= 1


def test_a_lora_for_another_model_stops_with_one_line(scene: dict[str, Path], tmp_path: Path) -> None:
    lora = _make_lora("tiny_qwen_edit", tmp_path / "lora")
    with pytest.raises(UsageError, match="none of its weights match this model's layers") as caught:
        inpaint_run.run(compose_cfg("tiny_sdxl", tmp_path / "out", f"lora_weights={lora}", **scene))
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out" / "photo_edited.png").exists()


# ---- the real entry point -----------------------------------------------------------------------------------


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inpaint.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_script_with_a_missing_mask_exits_2_with_one_line(scene: dict[str, Path], tmp_path: Path) -> None:
    result = _script(
        "model=tiny_flux",
        "prompt=a cat",
        f"image={scene['image']}",
        f"mask={tmp_path / 'nope.png'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: mask={tmp_path / 'nope.png'} does not exist; check the path"
    ]


@pytest.mark.slow
def test_script_edits_into_the_hydra_run_dir(scene: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _script(
        "model=tiny_flux",
        "prompt=a cat",
        f"image={scene['image']}",
        f"mask={scene['mask']}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outside = _mask() == 0
    assert np.array_equal(pixels(run_dir / "photo_edited.png")[outside], _photo()[outside])


# ---- what real models, real sizes and real photos need (issue 11) ---------------------------------------------

# Every pipeline, sdxl_inpainting (the 9-channel UNet) included.
ALL_PIPELINES = [
    *FAMILIES,
    ("tiny_sdxl", ["model.inpaint_pretrained=tiny:sdxl_inpaint"]),
]
ALL_PIPELINE_IDS = [*FAMILY_IDS, "sdxl_inpainting"]
LORA_FAMILY = {"tiny_qwen_edit": "qwen", "tiny_sdxl": "sdxl", "tiny_flux": "flux"}


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random LoRA per denoiser architecture (FLUX's loads into Fill too, SDXL's into the 9-channel UNet)."""
    folder = tmp_path_factory.mktemp("loras")
    return {name: _make_lora(model, folder / name) for model, name in LORA_FAMILY.items()}


@pytest.mark.parametrize(("model", "extra"), ALL_PIPELINES, ids=ALL_PIPELINE_IDS)
def test_bf16_edits_with_a_lora_and_grayscale_change_only_the_mask(
    model: str, extra: list[str], scene: dict[str, Path], loras: dict[str, Path], tmp_path: Path
) -> None:
    """The precision a CUDA run uses (bf16 weights), with a LoRA and the grayscale round trip, on CPU."""
    import torch

    lora = loras[LORA_FAMILY[model]]
    overrides = ["model.dtype=bf16", "inpaint/preprocess=grayscale", f"lora_weights={lora}:0.5", *extra]
    cfg = compose_cfg(model, tmp_path, *overrides, **scene)
    family = inpaint_run.build_family(cfg)
    pipe = inpaint_run.load_pipeline(family, cfg.model)
    assert getattr(pipe, family.denoiser_name).dtype == torch.bfloat16
    inpaint_run.run(cfg)
    before, after = _photo(), pixels(tmp_path / "photo_edited.png")
    outside = _mask() == 0
    assert np.array_equal(after[outside], before[outside])
    assert np.abs(after[~outside].astype(int) - before[~outside]).mean() > 5  # the model did edit


@pytest.mark.parametrize(("model", "extra"), ALL_PIPELINES, ids=ALL_PIPELINE_IDS)
def test_nothing_in_the_edit_path_records_autograd(
    model: str, extra: list[str], scene: dict[str, Path], tmp_path: Path
) -> None:
    """Before, Qwen edit-plus VAE-encoded the original with grad on (its weights require grad) and the held
    latents kept that graph for the whole call: here 77 module calls ran with grad on and 4.6 MB were saved
    for backward at 64 px; ~0.9 GiB at 256 px and ~14 GiB at 1024 px on the real VAE."""
    import torch

    cfg = compose_cfg(model, tmp_path, *extra, **scene)
    family = inpaint_run.build_family(cfg)
    inpaint_run.load_pipeline(family, cfg.model)
    with_grad: list[str] = []
    saved: list[int] = []

    def forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            with_grad.append(type(module).__name__)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    handle = torch.nn.modules.module.register_module_forward_hook(forward)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            inpaint_run.run(cfg)
    finally:
        handle.remove()
    assert (len(with_grad), sum(saved)) == (0, 0), f"{sorted(set(with_grad))}, {sum(saved)} bytes saved"


def _stroke_scene(folder: Path) -> tuple[Path, Path, np.ndarray]:
    """A 64x64 photo (the tiny models' native size, so the crop is the model's input as is) with a 6 px
    stroke at x = 1..6, inside the first 8 px latent column but missing both pixels nearest sampling takes
    (0 and 8), and a box not aligned to 8 px."""
    mask = np.zeros((64, 64), bool)
    mask[:, 1:7] = True
    mask[21:35, 45:59] = True
    Image.fromarray(_photo()[:64, :64]).save(folder / "square.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "square_mask.png")
    return folder / "square.png", folder / "square_mask.png", mask


@pytest.mark.parametrize(
    ("model", "extra"),
    [ALL_PIPELINES[i] for i in (1, 2, 5, 4)],
    ids=["qwen_edit_inpaint", "sdxl", "sdxl_inpainting", "flux_inpaint"],
)
def test_the_model_mask_covers_every_latent_cell_the_mask_touches(
    model: str, extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """These pipelines shrink the mask to latent cells by nearest sampling. Before, the 6 px stroke reached
    no latent cell and the box lost its first row and column of cells: 13 of the 17 cells the mask touches
    were missed."""
    import torch

    image, mask_path, mask = _stroke_scene(tmp_path)
    latent_masks: list[torch.Tensor] = []
    interpolate = torch.nn.functional.interpolate

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = interpolate(tensor, *args, **kwargs)
        if out.ndim == 4 and out.shape[1] == 1 and tuple(out.shape[-2:]) == (8, 8):
            latent_masks.append(out.detach().float())
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    inpaint_run.run(compose_cfg(model, tmp_path / "out", *extra, image=image, mask=mask_path))
    touched = mask.reshape(8, 8, 8, 8).any(axis=(1, 3))
    assert latent_masks, "the pipeline made no 8x8 latent mask"
    seen = latent_masks[0][0, 0].numpy() > 0.5
    assert np.array_equal(seen, touched), (
        f"missed {int((touched & ~seen).sum())} of {int(touched.sum())} cells"
    )


@pytest.mark.parametrize("pipeline", ["edit_inpaint", "edit_plus"])
def test_a_crop_shape_qwen_resizes_is_edited_at_the_size_it_keeps(
    pipeline: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 160x96 crop was planned at 96x64, which the Qwen pipelines' size rule turns into 64x64: v1 then
    generated 64x64 and the run died after the whole generation; edit-plus conditioned on 64x64 while
    generating 96x64 (two VAE encodes instead of one, the condition misaligned with the held surroundings)."""
    Image.fromarray(np.resize(_photo(), (96, 160, 3))).save(tmp_path / "wide.png")
    Image.fromarray(_mask((40, 20, 120, 76), size=(160, 96))).save(tmp_path / "wide_mask.png")
    cfg = compose_cfg(
        "tiny_qwen_edit",
        tmp_path / "out",
        f"model.pipeline={pipeline}",
        image=tmp_path / "wide.png",
        mask=tmp_path / "wide_mask.png",
    )
    pipe = inpaint_run.load_pipeline(inpaint_run.build_family(cfg), cfg.model)
    encodes = []
    vae_encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: encodes.append(a[0].shape) or vae_encode(*a, **k))
    inpaint_run.run(cfg)
    out = pixels(tmp_path / "out" / "wide_edited.png")
    outside = _mask((40, 20, 120, 76), size=(160, 96)) == 0
    assert np.array_equal(out[outside], np.resize(_photo(), (96, 160, 3))[outside])
    assert json.loads(Image.open(tmp_path / "out" / "wide_edited.png").text["model_size"]) == [64, 64]
    if pipeline == "edit_plus":
        assert len(encodes) == 1, encodes  # the condition is the planned image, encoded once


def test_an_embedded_colour_profile_is_carried_to_the_output(tmp_path: Path) -> None:
    """A phone's Display P3 JPEG was written as a PNG without its profile, so every pixel, the bit-exact
    ones too, displayed differently from the input."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_photo()).save(tmp_path / "phone.png", icc_profile=icc)
    Image.fromarray(_mask()).save(tmp_path / "phone_mask.png")
    cfg = compose_cfg(
        "tiny_flux",
        tmp_path / "out",
        "save_comparison=true",
        image=tmp_path / "phone.png",
        mask=tmp_path / "phone_mask.png",
    )
    inpaint_run.run(cfg)
    for name in ("phone_edited.png", "phone_comparison.png"):
        assert Image.open(tmp_path / "out" / name).info.get("icc_profile") == icc, name
    outside = _mask() == 0
    assert np.array_equal(pixels(tmp_path / "out" / "phone_edited.png")[outside], _photo()[outside])


@pytest.mark.parametrize(
    ("model", "extra", "warns"),
    [
        ("tiny_flux", [], True),  # Fill zeroes the masked pixels of its condition
        ("tiny_flux", ["model.pipeline=inpaint", "strength=1.0"], True),  # starts from pure noise
        ("tiny_flux", ["model.pipeline=inpaint"], False),  # 0.9: its start latents carry the grey
        ("tiny_qwen_edit", [], False),  # the condition image shows the grey region
    ],
    ids=["flux_fill", "flux_inpaint_strength_1", "flux_inpaint_default", "qwen_edit_plus"],
)
def test_grayscale_on_a_pipeline_that_never_sees_it_says_so_in_one_line(
    model: str,
    extra: list[str],
    warns: bool,
    scene: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = compose_cfg(model, tmp_path, "inpaint/preprocess=grayscale", *extra, **scene)
    with caplog.at_level("WARNING", logger="stylekit.inpaint.run"):
        inpaint_run.run(cfg)
    lines = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(lines) == (1 if warns else 0), lines
    assert all("\n" not in line and "inpaint.preprocess=['grayscale']" in line for line in lines)


def test_flux_inpaint_metadata_names_the_model_that_ran(scene: dict[str, Path], tmp_path: Path) -> None:
    """Before, an edit by FLUX.1-dev (pipeline=inpaint) was recorded as made by FLUX.1-Fill-dev."""
    inpaint_run.run(compose_cfg("tiny_flux", tmp_path, "model.pipeline=inpaint", **scene))
    text = Image.open(tmp_path / "photo_edited.png").text
    assert (text["inpaint_pretrained"], text["pipeline"], json.loads(text["strength"])) == (
        "tiny:flux",
        "inpaint",
        0.9,
    )
