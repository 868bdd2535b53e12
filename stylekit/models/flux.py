"""FLUX.1: LoRAs train on FLUX.1-dev; edits run on FLUX.1-Fill-dev, or on FLUX.1-dev through the inpaint pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.models import flow
from stylekit.models.base import JOINT_ATTENTION_TARGETS, ModelFamily, module_dtype, prompt_kwargs

if TYPE_CHECKING:
    import torch

# Published guidance per pipeline: Fill-dev is distilled for guidance 30, dev for 3.5.
_GUIDANCE = {"fill": 30.0, "inpaint": 3.5}
# Denoising strength per pipeline. Fill-dev conditions on the unmasked pixels and regenerates the hole from
# noise (1.0). FLUX.1-dev through FluxInpaintPipeline only sees what is under the mask through its start
# latents: at 1.0 it ignores it and paints something unrelated, diffusers' own default (0.6) barely changes
# it; 0.9 keeps the layout under the mask and still lets the prompt redraw it.
_STRENGTH = {"fill": 1.0, "inpaint": 0.9}


@dataclass
class FluxFamily(ModelFamily):
    family: ClassVar[str] = "flux"
    # Latents are 8x smaller than pixels and packed in 2x2 patches.
    resolution_multiple: ClassVar[int] = 16
    denoiser_name: ClassVar[str] = "transformer"
    train_pipeline_class: ClassVar[str] = "FluxPipeline"
    inpaint_pipeline_classes: ClassVar[dict[str, str]] = {
        "fill": "FluxFillPipeline",
        "inpaint": "FluxInpaintPipeline",
    }
    # Attention and feed-forward projections of the double- and single-stream blocks.
    # ComfyUI reads lora_unet_* FLUX keys as its own BFL layout; diffusers module names go as lora_transformer_*.
    comfyui_prefix: ClassVar[str] = "lora_transformer_"
    # 12 B parameters at 4096 image tokens: activations alone exceed a 40 GB card without it.
    gradient_checkpointing_default: ClassVar[bool] = True
    fp16_overflows: ClassVar[bool] = True
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        *JOINT_ATTENTION_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )

    # T5 tokens per caption (FLUX.1-dev was trained with 512).
    max_sequence_length: int = 512

    def inpaint_id(self) -> str:
        # FluxInpaintPipeline runs on the base model, where a LoRA trained on FLUX.1-dev applies as is.
        return self.pretrained if self.pipeline == "inpaint" else super().inpaint_id()

    def inference_defaults(self) -> dict[str, Any]:
        defaults = super().inference_defaults()
        if defaults.get("guidance_scale") is None:
            defaults["guidance_scale"] = _GUIDANCE[self.pipeline]
        if defaults.get("strength") is None:
            defaults["strength"] = _STRENGTH[self.pipeline]
        return defaults

    def masked_pixels_reach_model(self, pipe: Any, strength: float) -> bool:
        # Fill zeroes the masked pixels of its condition image; both pipelines see them only through their
        # start latents, which at strength 1 are pure noise.
        return strength < 1.0

    # ---- training ---------------------------------------------------------------------------------------
    def encode_prompt(self, pipe: Any, caption: str, control: Any = None) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=caption, prompt_2=caption, device=pipe.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_image(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def training_loss(
        self,
        denoiser: Any,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor,
        t: torch.Tensor,
        trainer: Any,
    ) -> torch.Tensor:
        """Flow-matching loss per sample, on latents packed and positioned as FluxPipeline builds them."""
        import torch
        from diffusers import FluxPipeline

        latents = batch["latents"]
        b, c, h, w = latents.shape
        noisy, target = flow.noisy_and_target(latents, noise, t)
        core = getattr(denoiser, "module", denoiser)  # unwrapped under DDP
        device, dtype = latents.device, module_dtype(core)
        embeds = batch["prompt_embeds"].to(dtype)
        guidance = None
        if core.config.guidance_embeds:
            guidance = torch.full((b,), float(trainer.guidance), device=device)
        prediction = denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype),
            timestep=t.to(device, dtype),
            guidance=guidance,
            pooled_projections=batch["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            return_dict=False,
        )[0]
        return flow.per_sample_mse(prediction, FluxPipeline._pack_latents(target, b, c, h, w))

    def sampling_inputs(self, pipe: Any, prompt: str, control: Any = None) -> dict[str, torch.Tensor]:
        return self.encode_prompt(pipe, prompt)

    def sample(
        self, pipe: Any, prompt: str | dict, size: tuple[int, int], steps: int, generator: Any, control=None
    ):
        return pipe(
            **prompt_kwargs(prompt, pipe._execution_device),
            width=size[0],
            height=size[1],
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=self.max_sequence_length,
            generator=generator,
        ).images[0]

    # ---- inpainting -------------------------------------------------------------------------------------
    def edit(self, pipe: Any, image: Any, mask: Any, prompt: str, settings: dict[str, Any], generator: Any):
        """Regenerate the white region of `mask` in `image` (both at a multiple of 16 px) with FLUX.1 Fill or,
        for pipeline=inpaint, FLUX.1-dev through FluxInpaintPipeline (which also takes true CFG)."""
        width, height = image.size
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "image": image,
            "mask_image": mask,
            "height": height,
            "width": width,
            "strength": float(settings["strength"]),
            "guidance_scale": float(settings["guidance_scale"]),
            "num_inference_steps": int(settings["num_inference_steps"]),
            "generator": generator,
            "max_sequence_length": self.max_sequence_length,
        }
        true_cfg = float(settings.get("true_cfg_scale") or 1.0)
        if self.pipeline == "inpaint" and true_cfg > 1.0 and settings.get("negative_prompt"):
            kwargs.update(negative_prompt=settings["negative_prompt"], true_cfg_scale=true_cfg)
        with self.call_context(pipe):
            return pipe(**kwargs).images[0]
