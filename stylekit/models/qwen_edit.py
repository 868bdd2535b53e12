"""Qwen-Image-Edit: 2509/2511 through the edit-plus pipeline, v1 through the masked edit-inpaint pipeline."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.models import flow
from stylekit.models.base import JOINT_ATTENTION_TARGETS, ModelFamily, module_dtype, prompt_kwargs

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# The target areas diffusers' Qwen-Image-Edit pipelines resize their condition image to: the VAE's ~1 MP and
# the vision-language encoder's 384x384 (edit-plus only).
MODEL_CONDITION_AREA = 1024 * 1024
MODEL_VL_CONDITION_AREA = 384 * 384

# The pipelines read those areas from a module-level function at call time; swapping it is process-wide.
_AREA_LOCK = threading.Lock()
# Side granularity of the pipelines' size rule (`calculate_dimensions` rounds to it).
SIZE_MULTIPLE = 32


def pipeline_size(target_area: float, ratio: float) -> tuple[int, int]:
    """The size diffusers' Qwen-Image-Edit pipelines resize an image of aspect `ratio` to: their private
    `calculate_dimensions` (sides of about sqrt(area * ratio), rounded to 32). Kept here so planning a crop
    needs no diffusers import; tests/unit/test_edit_sizes.py checks it still matches diffusers'."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(height / SIZE_MULTIPLE) * SIZE_MULTIPLE


def fixed_point_size(crop_w: int, crop_h: int, target_area: int) -> tuple[int, int]:
    """A (width, height) near the crop's aspect at about `target_area` pixels that the pipelines' size rule
    maps to itself.

    The edit-inpaint (v1) pipeline ignores the size it is given and generates at `pipeline_size` of its input's
    aspect; edit-plus resizes its condition image the same way. Rounding both sides to 32 does not always
    survive that second rounding (a 928x1344 crop plans 864x1248, which the rule turns into 864x1216), so
    among the sizes within three steps of the first guess this takes the fixed point closest in aspect, then
    in area.
    """
    ratio = crop_w / crop_h
    first_w, first_h = (max(side, SIZE_MULTIPLE) for side in pipeline_size(target_area, ratio))
    best: tuple[tuple[float, float], tuple[int, int]] | None = None
    for dw in range(-3, 4):
        for dh in range(-3, 4):
            width, height = first_w + dw * SIZE_MULTIPLE, first_h + dh * SIZE_MULTIPLE
            if min(width, height) < SIZE_MULTIPLE:
                continue
            if pipeline_size(target_area, width / height) != (width, height):
                continue
            key = (abs(math.log(width / height / ratio)), abs(math.log(width * height / target_area)))
            if best is None or key < best[0]:
                best = (key, (width, height))
    if best is None:  # only for strips beyond the 4:1 aspect crop_box holds crops to
        return first_w, first_h
    return best[1]


@contextmanager
def condition_areas(pipe: DiffusionPipeline, vae_area: int, vl_area: int) -> Iterator[None]:
    """Make `pipe` resize its condition image to `vae_area` / `vl_area` pixels instead of the model's own."""
    module = sys.modules[type(pipe).__module__]
    original = getattr(module, "calculate_dimensions", None)
    areas = {MODEL_CONDITION_AREA: vae_area, MODEL_VL_CONDITION_AREA: vl_area}
    if original is None or (vae_area, vl_area) == (MODEL_CONDITION_AREA, MODEL_VL_CONDITION_AREA):
        yield
        return

    def scaled(target_area: float, ratio: float) -> tuple:
        return original(areas.get(target_area, target_area), ratio)

    with _AREA_LOCK:
        module.calculate_dimensions = scaled
        try:
            yield
        finally:
            module.calculate_dimensions = original


@dataclass
class QwenEditFamily(ModelFamily):
    family: ClassVar[str] = "qwen_edit"
    # 8x VAE downsampling and 2x2 latent patches; the edit pipelines round sides to 32 px.
    resolution_multiple: ClassVar[int] = 32
    denoiser_name: ClassVar[str] = "transformer"
    train_pipeline_class: ClassVar[str] = "QwenImageEditPlusPipeline"
    inpaint_pipeline_classes: ClassVar[dict[str, str]] = {
        "edit_plus": "QwenImageEditPlusPipeline",
        "edit_inpaint": "QwenImageEditInpaintPipeline",
    }
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        *JOINT_ATTENTION_TARGETS,
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )
    fp16_overflows: ClassVar[bool] = True

    # 20 B parameters and ~8k image tokens (target + control): no 80 GB card fits its activations without it.
    gradient_checkpointing_default: ClassVar[bool] = True

    condition_area: int = MODEL_CONDITION_AREA
    vl_condition_area: int = MODEL_VL_CONDITION_AREA

    def pipeline_class_name(self, task: str = "train") -> str:
        # v1 checkpoints train through the v1 edit pipeline's encoders.
        if task == "train" and self.pipeline == "edit_inpaint":
            return "QwenImageEditPipeline"
        return super().pipeline_class_name(task)

    def call_context(self, pipe: DiffusionPipeline) -> AbstractContextManager[None]:
        return condition_areas(pipe, self.condition_area, self.vl_condition_area)

    def native_size(self, crop_w: int, crop_h: int) -> tuple[int, int]:
        """Edits run at a fixed point of the pipelines' own size rule at `condition_area` (see
        `fixed_point_size`): v1 generates at that size whatever it is asked, and edit-plus conditions on it."""
        return fixed_point_size(crop_w, crop_h, self.condition_area)

    # ---- training: target image + control (source) image + instruction ---------------------------------
    needs_control: ClassVar[bool] = True
    # The last block's text stream is discarded (only image tokens reach the output), so its text-side LoRA
    # weights get no gradient.
    ddp_find_unused_parameters: ClassVar[bool] = True

    def _condition_size(self, image: Any, area: int) -> tuple[int, int]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        width, height = calculate_dimensions(area, image.width / image.height)[:2]
        return int(width), int(height)

    def control_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size the edit pipelines VAE-encode their condition image at: `condition_area` pixels at the
        image's aspect ratio, sides rounded to 32 (not the target's bucket: at data.resolution=512 that would
        train on a quarter of the control tokens inference shows the model)."""
        return pipeline_size(self.condition_area, size[0] / size[1])

    def encode_prompt(self, pipe: Any, caption: str, control: Any = None) -> dict[str, torch.Tensor]:
        """The instruction encoded together with the control image, as the edit pipeline conditions on both."""
        import torch

        images = None
        if control is not None:
            area = self.vl_condition_area if self.pipeline == "edit_plus" else self.condition_area
            width, height = self._condition_size(control, area)
            resized = pipe.image_processor.resize(control, height, width)
            images = [resized] if self.pipeline == "edit_plus" else resized
        embeds, mask = pipe.encode_prompt(prompt=caption, image=images, device=pipe.device)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_image(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        video = pixels.to(vae.device, vae.dtype).unsqueeze(2)  # the Qwen VAE takes (b, c, frames, h, w)
        return pipe._encode_vae_image(video, generator=None)[:, :, 0]

    def training_loss(
        self,
        denoiser: Any,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor,
        t: torch.Tensor,
        trainer: Any,
    ) -> torch.Tensor:
        """Flow-matching loss on the target's packed latents, with the control's latents appended to the
        sequence the way the edit pipelines feed the transformer."""
        import torch
        from diffusers import QwenImageEditPlusPipeline

        pack = QwenImageEditPlusPipeline._pack_latents
        latents, control = batch["latents"], batch["control_latents"]
        b, c, h, w = latents.shape
        ch, cw = control.shape[-2:]
        noisy, target = flow.noisy_and_target(latents, noise, t)
        core = getattr(denoiser, "module", denoiser)  # unwrapped under DDP
        dtype = module_dtype(core)
        packed = pack(noisy, b, c, h, w)
        hidden = torch.cat([packed, pack(control, b, c, ch, cw)], dim=1).to(dtype)
        prediction = denoiser(
            hidden_states=hidden,
            timestep=t.to(latents.device, dtype),
            guidance=None,
            encoder_hidden_states_mask=_padding_mask(batch["prompt_embeds_mask"]),
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            img_shapes=[[(1, h // 2, w // 2), (1, ch // 2, cw // 2)]] * b,
            return_dict=False,
        )[0][:, : packed.shape[1]]
        return flow.per_sample_mse(prediction, pack(target, b, c, h, w))

    def sampling_inputs(self, pipe: Any, prompt: str, control: Any = None) -> dict[str, torch.Tensor]:
        # Sampling uses true CFG with the model's negative prompt, encoded with the same control image.
        inputs = self.encode_prompt(pipe, prompt, control)
        negative = self.inference_defaults().get("negative_prompt")
        if negative is not None:
            encoded = self.encode_prompt(pipe, negative, control)
            inputs["negative_prompt_embeds"] = encoded["prompt_embeds"]
            inputs["negative_prompt_embeds_mask"] = encoded["prompt_embeds_mask"]
        return inputs

    def sample(
        self, pipe: Any, prompt: str | dict, size: tuple[int, int], steps: int, generator: Any, control=None
    ):
        defaults = self.inference_defaults()
        text = isinstance(prompt, str)
        with self.call_context(pipe):
            return pipe(
                image=[control] if self.pipeline == "edit_plus" else control,
                **prompt_kwargs(prompt, pipe._execution_device),
                negative_prompt=defaults.get("negative_prompt") if text else None,
                true_cfg_scale=defaults.get("true_cfg_scale", 4.0),
                width=size[0],
                height=size[1],
                num_inference_steps=steps,
                generator=generator,
            ).images[0]

    # ---- inpainting -------------------------------------------------------------------------------------
    def edit(self, pipe: Any, image: Any, mask: Any, prompt: str, settings: dict[str, Any], generator: Any):
        """Regenerate the white region of `mask` in `image` (both at a multiple of 32 px).

        v1 (edit_inpaint) masks natively. The edit-plus pipeline (2509/2511) has no mask input, so it is held to
        the mask in latent space: see `held_to_mask`.
        """
        from contextlib import nullcontext

        width, height = image.size
        steps, strength = int(settings["num_inference_steps"]), float(settings["strength"])
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": settings.get("negative_prompt"),
            "true_cfg_scale": float(settings.get("true_cfg_scale") or 1.0),
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "generator": generator,
        }
        # Only guidance-distilled checkpoints take guidance_scale; the others warn on every call.
        if pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = settings.get("guidance_scale")
        during: AbstractContextManager[Any] = nullcontext()
        if self.pipeline == "edit_inpaint":
            kwargs.update(image=image, mask_image=mask, strength=strength)
        else:
            held, during = held_to_mask(pipe, image, mask, strength, steps, generator)
            kwargs.update(image=[image], **held)
        with self.call_context(pipe), during:
            return pipe(**kwargs).images[0]


def _padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The text mask only where it masks something: without one, SDPA can take its fused kernels (the pipeline
    passes None for unpadded prompts too)."""
    return None if bool(mask.all()) else mask


# ---- edit-plus held to a mask ---------------------------------------------------------------------------------


def held_to_mask(
    pipe: Any, image: Any, mask: Any, strength: float, steps: int, generator: Any
) -> tuple[dict[str, Any], AbstractContextManager[None]]:
    """QwenImageEditPlusPipeline arguments that confine its edit to `mask` (L, 255 = edit), and a context to
    make the call in.

    After every step the latents outside the mask become the original image's latents re-noised to the next
    step's sigma (flow matching: x_t = (1 - sigma) x0 + sigma noise), the clean original after the last, so the
    model denoises the masked region in the context of the real surroundings. The noise is the pipeline's own
    first draw from `generator`, passed in as `latents`. strength < 1 starts from the original noised to the
    schedule's sigma at that point and runs only the rest of the steps, as diffusers' img2img pipelines do.
    The context hands the pipeline our encoding of the image when it encodes the same pixels as its condition.
    """
    import numpy as np

    device = pipe._execution_device  # walks every module's hooks: ask once
    pixels, encoded = _encode(pipe, image, device)
    original, noise, region = _packed(pipe, encoded, mask, generator, device)
    kwargs: dict[str, Any] = {
        "latents": noise,
        "callback_on_step_end": MaskHold(original, noise, region),
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if strength < 1.0:
        full = np.linspace(1.0, 1.0 / steps, steps)
        sigmas = full[int(max(steps - min(steps * strength, steps), 0)) :].tolist()
        sigma = _first_sigma(pipe, sigmas, original.shape[1])
        kwargs.update(
            sigmas=sigmas, num_inference_steps=len(sigmas), latents=(1 - sigma) * original + sigma * noise
        )
    return kwargs, _reused_encoding(pipe, pixels, encoded)


class MaskHold:
    """callback_on_step_end: latents = region * latents + (1 - region) * original at the next step's noise."""

    def __init__(self, original: torch.Tensor, noise: torch.Tensor, region: torch.Tensor) -> None:
        self.original, self.noise, self.region = original, noise, region

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        latents = tensors["latents"]
        if step + 1 >= len(pipe.scheduler.timesteps):
            target = self.original
        else:
            sigma = pipe.scheduler.sigmas[step + 1].to(latents.device, latents.dtype)
            target = (1 - sigma) * self.original + sigma * self.noise
        return {"latents": self.region * latents + (1 - self.region) * target.to(latents.dtype)}


def _encode(pipe: Any, image: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The image preprocessed and VAE-encoded exactly as the pipeline does it: (b, c, frames, h, w) each."""
    import torch

    width, height = image.size
    # Outside the pipeline's no_grad: without this the VAE's weights make the encode record a graph that
    # the held latents keep alive for the whole call (~0.9 GiB at 256 px on the real VAE, ~14 GiB at 1024).
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
        pixels = pixels.to(device, pipe.text_encoder.dtype)  # the pipeline's latent dtype
        return pixels, pipe._encode_vae_image(pixels, generator=None)


def _packed(
    pipe: Any, encoded: torch.Tensor, mask: Any, generator: Any, device: Any
) -> tuple[torch.Tensor, ...]:
    """The original's latents, the initial noise and the edit region, packed (1, seq, c * 4) as the pipeline
    packs its latents (2x2 latent patches); the region is (1, seq, 1), 1 where any pixel of the patch is masked."""
    import numpy as np
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    dtype = pipe.text_encoder.dtype
    _, channels, _, lat_h, lat_w = encoded.shape
    original = pipe._pack_latents(encoded, 1, channels, lat_h, lat_w).to(dtype)
    # The pipeline's own first draw: same shape, generator, device and dtype as its prepare_latents.
    noise = randn_tensor((1, 1, channels, lat_h, lat_w), generator=generator, device=device, dtype=dtype)
    noise = pipe._pack_latents(noise, 1, channels, lat_h, lat_w)
    edit = torch.from_numpy(np.asarray(mask.convert("L")) > 127).float()[None, None]
    cells = torch.nn.functional.max_pool2d(edit, pipe.vae_scale_factor)
    region = pipe._pack_latents(cells, 1, 1, lat_h, lat_w).amax(dim=-1, keepdim=True)
    return original, noise, region.to(device, dtype)


@contextmanager
def _reused_encoding(pipe: Any, pixels: torch.Tensor, encoded: torch.Tensor) -> Iterator[None]:
    """While active, the pipeline's VAE encoding of `pixels` returns `encoded` instead of a second VAE pass.

    The pipeline encodes its condition image at the condition area; when that is the output size (the usual
    case: both about 1 MP) the pixels are the ones `_encode` already encoded, bit for bit.
    """
    import torch

    encode = pipe._encode_vae_image

    def reuse(image: torch.Tensor, generator: Any) -> torch.Tensor:
        if image.shape == pixels.shape and torch.equal(image, pixels.to(image.device, image.dtype)):
            return encoded
        return encode(image, generator)

    pipe._encode_vae_image = reuse
    try:
        yield
    finally:
        del pipe._encode_vae_image  # the class's method again


def _first_sigma(pipe: Any, sigmas: list[float], seq_len: int) -> float:
    """The scheduler's (shifted) first sigma for `sigmas`, computed the way the pipeline will set it."""
    config = pipe.scheduler.config
    mu = sys.modules[type(pipe).__module__].calculate_shift(
        seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return float(pipe.scheduler.sigmas[0])
