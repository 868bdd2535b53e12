"""What training reads from the data: resume identity over the photos, SDXL's size/crop conditioning and buckets,
the precision of the latent cache, the area Qwen's control is encoded at, and DoRA in the ComfyUI copy.

Runs go through `stylekit.train.run.run(cfg)` in this process on the tiny models, like test_train.py, whose
helpers they share.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_train import Data, _write_images, assert_same_tensors, load_lora, train

from stylekit.train.lora_io import read_metadata


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """3 captioned images and their controls, as in test_train.py."""
    root = tmp_path_factory.mktemp("data-tests")
    return Data(
        images=_write_images(root / "images", 3),
        controls=_write_images(root / "controls", 3, seed=100, captions=False),
        single=_write_images(root / "single", 1, seed=7),
        cache=root / "cache",
    )


# ---- resume identity covers the data -----------------------------------------------------------------------


def _own_copy(data: Data, tmp: Path) -> Data:
    """The module's images and controls copied where a test may replace them."""
    images, controls = tmp / "images", tmp / "controls"
    shutil.copytree(data.images, images)
    shutil.copytree(data.controls, controls)
    return Data(images=images, controls=controls, single=data.single, cache=data.cache)


def _replace_photos(folder: Path, seed: int) -> None:
    """Other pictures under the same file names, captions untouched: what a user swapping photos does."""
    other = folder.with_name(folder.name + "-other")
    _write_images(other, len(list(folder.glob("*.png"))), seed=seed, captions=False)
    for path in other.glob("*.png"):
        shutil.copy(path, folder / path.name)
    shutil.rmtree(other)


@pytest.mark.parametrize("change", ["photos", "class_images"])
def test_changed_data_in_the_same_folder_trains_a_new_lora_instead_of_resuming_the_old(
    tmp_path: Path, data: Data, change: str
) -> None:
    own = _own_copy(data, tmp_path)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (96, 96), (120, 90, 60)).save(class_dir / "mine.png")
    prior = {}
    if change == "class_images":
        prior = {"data__class_dir": class_dir, "data__class_prompt": "a pattern", "data__num_class_images": 1}
        prior["data__max_upscale"] = 4
    checkpoints = tmp_path / "checkpoints"
    first = train(tmp_path / "first", own, trainer__checkpoint_root=checkpoints, **prior)

    if change == "photos":
        _replace_photos(own.images, seed=50)
    else:
        Image.new("RGB", (96, 96), (10, 200, 30)).save(class_dir / "mine.png")
    again = train(tmp_path / "again", own, trainer__checkpoint_root=checkpoints, **prior)

    assert "Resumed from" not in again.log
    assert "for 2 steps (from 0)" in again.log
    # The first step's loss is on the new data (the class image's prior loss is part of it).
    assert again.metrics("train/loss")[0][1] != first.metrics("train/loss")[0][1]
    if change == "photos":
        import torch

        first_lora, again_lora = load_lora(first.lora), load_lora(again.lora)
        assert any(not torch.equal(first_lora[k], again_lora[k]) for k in first_lora)
        assert (
            read_metadata(again.lora)["stylekit.dataset_hash"]
            != read_metadata(first.lora)["stylekit.dataset_hash"]
        )
    # Both runs' checkpoints stay, each under its own identity.
    assert len(list(checkpoints.glob("train-*"))) == 2


def test_rerunning_a_finished_run_on_the_same_data_says_so_and_where_its_lora_is(
    tmp_path: Path, data: Data
) -> None:
    first = train(tmp_path / "first", data, trainer__checkpoint_root=tmp_path / "checkpoints")
    again = train(tmp_path / "again", data, trainer__checkpoint_root=tmp_path / "checkpoints")

    assert f"already finished at step 2 on the same data; its LoRA is {first.lora.resolve()}" in again.log
    assert_same_tensors(load_lora(again.lora), load_lora(first.lora))
    assert (
        read_metadata(again.lora)["stylekit.dataset_hash"]
        == read_metadata(first.lora)["stylekit.dataset_hash"]
    )


def test_resuming_an_explicit_checkpoint_of_other_data_warns_that_it_does(tmp_path: Path, data: Data) -> None:
    own = _own_copy(data, tmp_path)
    first = train(tmp_path, own, trainer__max_steps=2)
    (checkpoint,) = first.checkpoints.glob("train-*/checkpoint-00000002")
    assert json.loads((checkpoint / "state.json").read_text())["dataset_hash"]
    _replace_photos(own.images, seed=60)
    again = train(tmp_path, own, trainer__max_steps=3, trainer__resume=checkpoint)

    assert f"Resumed from {checkpoint} (step 2)" in again.log
    assert f"{checkpoint} was trained on other data" in again.log


# ---- a Hugging Face datasets dataset instead of a folder ------------------------------------------------------


def test_a_saved_hf_dataset_trains_the_lora_its_folder_trains_from_the_same_cache(
    tmp_path: Path, data: Data
) -> None:
    import datasets

    photos = sorted(data.images.glob("*.png"))
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": None} for p in photos],
        "text": [p.with_suffix(".txt").read_text() for p in photos],
    }
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(saved))
    # data.dataset_dir names a folder that does not exist: the run must not read it.
    elsewhere = Data(images=tmp_path / "absent", controls=data.controls, single=data.single, cache=data.cache)

    from_folder = train(tmp_path / "folder", data)
    from_dataset = train(tmp_path / "dataset", elsewhere, data__hf_dataset=saved)

    assert f"data.dataset_dir={elsewhere.images} is not read" in from_dataset.log
    assert "for 2 steps (from 0)" in from_dataset.log
    assert "0 encoded" in from_dataset.log  # every latent and prompt came from the folder run's cache entries
    assert_same_tensors(load_lora(from_dataset.lora), load_lora(from_folder.lora))


# ---- SDXL: 64 px buckets, real size/crop conditioning, fp32 VAE ----------------------------------------------

SDXL_PHOTO = (150, 100)  # width, height: off every bucket, so the crop and the original size both matter


@pytest.fixture(scope="module")
def sdxl_training_inputs(tmp_path_factory: pytest.TempPathFactory, data: Data) -> list[tuple[tuple, Any]]:
    """(latent shape, time_ids) of every UNet call that trained (grad enabled) in one bf16 tiny SDXL run at
    data.resolution=128 on two 150x100 photos (center crop)."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("sdxl")
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 256, (SDXL_PHOTO[1], SDXL_PHOTO[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    calls: list[tuple[tuple, Any]] = []
    forward = UNet2DConditionModel.forward

    def recording(self: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            calls.append(
                (tuple(sample.shape), kwargs["added_cond_kwargs"]["time_ids"].detach().float().cpu())
            )
        return forward(self, sample, *args, **kwargs)

    own = Data(images=photos, controls=data.controls, single=data.single, cache=tmp / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNet2DConditionModel, "forward", recording)
        # bf16 weights and autocast, as on CUDA: the fp32 VAE must still decode the final samples.
        result = train(tmp, own, "tiny_sdxl", data__resolution=128, model__dtype="bf16",
                       trainer__mixed_precision="bf16")  # fmt: skip
    assert result.lora.is_file() and list((result.run_dir / "samples").glob("*.png"))
    assert calls
    return calls


def test_sdxl_trains_on_buckets_of_a_64_px_grid(sdxl_training_inputs: list[tuple[tuple, Any]]) -> None:
    # Latent sides a multiple of 8 are pixel sides a multiple of 64 (an 8 px grid gave 152x104 here).
    shapes = {shape[-2:] for shape, _ in sdxl_training_inputs}
    assert shapes == {(16, 16)}, shapes


def test_sdxl_time_ids_carry_the_photos_real_size_and_crop(
    sdxl_training_inputs: list[tuple[tuple, Any]],
) -> None:
    # 150x100 scaled by 1.28 to cover 128x128, centre crop 25 px in from the left in the photo -> 32 px scaled.
    for _, time_ids in sdxl_training_inputs:
        assert time_ids.tolist() == [[100.0, 150.0, 0.0, 32.0, 128.0, 128.0]] * time_ids.shape[0]


def test_sdxl_encodes_the_latent_cache_in_fp32_from_fp32_weights_even_when_the_run_is_bf16() -> None:
    import torch

    from stylekit.data.transforms import to_tensor
    from stylekit.models.sdxl import SDXLFamily

    photo = Image.open(next(iter(sorted(Path(__file__).parents[2].glob("assets/demo/train/*.jpg"))))).convert(
        "RGB"
    )
    pixels = to_tensor(photo.resize((64, 64)))[None]
    bf16 = SDXLFamily(pretrained="tiny:sdxl", dtype="bf16", resolution=64)
    fp32 = SDXLFamily(pretrained="tiny:sdxl", dtype="fp32", resolution=64)
    bf16_encoders = bf16.load_encoders(bf16.runtime("cpu"))
    with torch.inference_mode():
        latents = bf16.encode_image(bf16_encoders, pixels)
        reference = fp32.encode_image(fp32.load_encoders(fp32.runtime("cpu")), pixels)

    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-6)
    assert bf16_encoders.text_encoder.dtype == torch.bfloat16  # only the VAE leaves the run's dtype


# ---- Qwen-Image-Edit: the control at the pipeline's condition area ------------------------------------------


def test_qwen_control_latents_are_encoded_at_the_area_the_pipeline_conditions_on(
    tmp_path: Path, data: Data
) -> None:
    """Training must show the transformer the control tokens inference will: the edit pipeline VAE-encodes its
    condition image at model.condition_area (here 128x128), whatever size the target's bucket is (64x64)."""
    import torch
    from hydra.utils import instantiate
    from test_train import _overrides, compose_train

    from stylekit.data.dataset import prepare_samples
    from stylekit.data.transforms import load_rgb, render
    from stylekit.train.run import Session

    settings = {"model.condition_area": 128 * 128}
    cfg = compose_train(_overrides(tmp_path, data, "tiny_qwen_edit", settings))
    family = instantiate(cfg.model)
    sample = prepare_samples(cfg, multiple=family.bucket_multiple, seed=0)[0]
    assert sample.size == (64, 64)
    session = Session(cfg, family, tmp_path / "run")
    session.prepare_models()
    session.encode([sample], [sample], [])
    trained = session.examples[0].tensors["control_latents"]

    # What the pipeline encodes when handed the same crop of the control image at full resolution.
    left, top, right, bottom = sample.box
    control = render(load_rgb(sample.record.control_path), sample.box, (right - left, bottom - top))
    pipe = family.pipeline_with(family.load_denoiser(session.runtime), session.encoders)
    seen = []
    encode = pipe._encode_vae_image

    def recording(image: Any, generator: Any) -> Any:
        latents = encode(image, generator)
        seen.append(latents[:, :, 0].detach().cpu())
        return latents

    pipe._encode_vae_image = recording
    with torch.inference_mode():
        family.sample(pipe, sample.caption, sample.size, 1, torch.Generator().manual_seed(0), control)

    (inferred,) = seen
    assert trained.shape == inferred.shape == (1, trained.shape[1], 16, 16)
    # Same pixels up to the resampling filter's edge handling (PIL's resize with a box reads past the box).
    assert float((trained - inferred).abs().mean()) < 0.05 * float(inferred.abs().mean())


# ---- DoRA in the ComfyUI copy --------------------------------------------------------------------------------


def _comfyui_merge(weight: Any, down: Any, up: Any, alpha: float, dora_scale: Any | None) -> Any:
    """A LoRA (+ DoRA) layer merged into `weight` as ComfyUI's weight adapter does it at strength 1: the delta
    up @ down * alpha / rank, then with a dora_scale whose first dim is the output size, each output row rescaled
    by dora_scale / (the base weight's row norm + eps)."""
    import torch

    merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / down.shape[0])
    if dora_scale is None:
        return merged
    assert dora_scale.shape[0] == weight.shape[0]
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return merged * dora_scale / (norm + torch.finfo(weight.dtype).eps)


def test_comfyui_copy_of_a_dora_lora_rebuilds_the_trained_weights_as_comfyui_merges_them(
    tmp_path: Path, data: Data
) -> None:
    import torch
    from diffusers import FluxPipeline

    from stylekit.models.base import resolve_source
    from stylekit.train.lora_io import COMFY_NAME

    result = train(tmp_path, data, trainer__max_steps=3, optimizer__lr=1e-2, lora__use_dora=True,
                   trainer__lora_format="comfyui")  # fmt: skip
    comfy = load_lora(result.run_dir / "lora" / COMFY_NAME)
    # What diffusers (peft) makes of the trained file: the reference the ComfyUI copy must match.
    pipe = FluxPipeline.from_pretrained(resolve_source("tiny:flux"))
    base = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(str(result.run_dir / "lora"))
    pipe.fuse_lora()
    # Fused layers keep peft's wrapper: the merged weight sits in its base_layer.
    fused = {
        n.replace(".base_layer", ""): p for n, p in pipe.transformer.named_parameters() if "lora_" not in n
    }

    prefix = "lora_transformer_"
    modules = {key[len(prefix) :].split(".")[0] for key in comfy}
    by_flat_name = {
        name[: -len(".weight")].replace(".", "_"): name for name in base if name.endswith(".weight")
    }
    assert modules and all(f"{prefix}{m}.dora_scale" in comfy for m in modules)
    worst = 0.0
    for module in modules:
        name = by_flat_name[module]
        key = f"{prefix}{module}"
        assert comfy[f"{key}.dora_scale"].shape == (base[name].shape[0], 1)
        merged = _comfyui_merge(base[name], comfy[f"{key}.lora_down.weight"], comfy[f"{key}.lora_up.weight"],
                                float(comfy[f"{key}.alpha"]), comfy[f"{key}.dora_scale"])  # fmt: skip
        worst = max(worst, float((merged - fused[name]).abs().max() / fused[name].abs().max()))
    assert worst < 1e-5, f"ComfyUI's merge differs from the trained weights by up to {worst:.2e} (relative)"
    # Not vacuous: the same copy applied as a plain LoRA (the magnitudes dropped) is another model.
    name = by_flat_name[next(iter(modules))]
    key = f"{prefix}{next(iter(modules))}"
    plain = _comfyui_merge(base[name], comfy[f"{key}.lora_down.weight"], comfy[f"{key}.lora_up.weight"],
                           float(comfy[f"{key}.alpha"]), None)  # fmt: skip
    assert not torch.allclose(plain, fused[name], rtol=0, atol=1e-5)
