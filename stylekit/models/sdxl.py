"""Stable Diffusion XL: LoRAs on the UNet; edits through StableDiffusionXLInpaintPipeline with the base weights
or the 9-channel inpainting checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.models import flow
from stylekit.models.base import ModelFamily, module_dtype, prompt_kwargs

if TYPE_CHECKING:
    import torch


@dataclass
class SDXLFamily(ModelFamily):
    family: ClassVar[str] = "sdxl"
    resolution_multiple: ClassVar[int] = 8
    # SDXL was trained on 64 px buckets; 8 px ones give latent sides its UNet cannot halve twice (1152x904).
    train_multiple: ClassVar[int] = 64
    denoiser_name: ClassVar[str] = "unet"
    train_pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    inpaint_pipeline_classes: ClassVar[dict[str, str]] = {"inpaint": "StableDiffusionXLInpaintPipeline"}
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    # None: what the checkpoint's scheduler config says (epsilon for SDXL base 1.0).
    prediction_type: str | None = None

    # ---- training ---------------------------------------------------------------------------------------
    def load_encoders(self, runtime: Any = None, **components: Any) -> Any:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler

        runtime = runtime or self.runtime()
        # The VAE stays in fp32, as in diffusers' reference trainer: bf16 latents lose detail the LoRA then
        # learns from, and fp16 overflows. Loaded from the checkpoint in fp32, not upcast from rounded weights.
        kwargs = self._from_pretrained_kwargs(runtime) | {"dtype": torch.float32, "subfolder": "vae"}
        components.setdefault("vae", AutoencoderKL.from_pretrained(self.source("train"), **kwargs))
        pipe = super().load_encoders(runtime, **components)
        # Training adds noise with the DDPM schedule the checkpoint was trained on.
        self._noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if self.prediction_type is not None:
            self._noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        return pipe

    def encode_prompt(self, pipe: Any, caption: str, control: Any = None) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=caption, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_image(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """fp32 latents from an fp32 VAE pass (load_encoders keeps the VAE in fp32; other pipelines' VAEs are
        upcast for the call)."""
        import torch

        vae = pipe.vae
        dtype = vae.dtype
        if dtype != torch.float32:
            vae.float()
        try:
            latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mode()
        finally:
            vae.to(dtype)
        return latents * vae.config.scaling_factor

    def sample_timesteps(self, n: int, generator: torch.Generator, trainer: Any) -> torch.Tensor:
        import torch

        return torch.rand(n, generator=generator)

    def training_loss(
        self,
        denoiser: Any,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor,
        t: torch.Tensor,
        trainer: Any,
    ) -> torch.Tensor:
        """Epsilon or v-prediction loss per sample at DDPM timesteps t*1000, with SDXL's size/crop time ids."""
        import torch

        scheduler = self._noise_scheduler
        # fp32 for the noise schedule: in bf16, sqrt(1 - alpha_bar) rounds to 0 at small t.
        latents, noise = batch["latents"].float(), noise.float()
        b, _, h, w = latents.shape
        steps = scheduler.config.num_train_timesteps
        timesteps = (t * steps).long().clamp(0, steps - 1).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        # SDXL's micro-conditioning, as diffusers' reference trainer builds it: (original h, w) of the photo, the
        # crop's (top, left) in the photo scaled to cover the bucket, then the (h, w) trained at.
        trained_size = torch.tensor([[h * 8, w * 8]], device=latents.device).repeat(b, 1)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], trained_size], dim=1)
        core = getattr(denoiser, "module", denoiser)  # unwrapped under DDP
        dtype = module_dtype(core)
        prediction = denoiser(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            added_cond_kwargs={
                "text_embeds": batch["pooled_prompt_embeds"].to(dtype),
                "time_ids": time_ids.to(dtype),
            },
            return_dict=False,
        )[0]
        loss = flow.per_sample_mse(prediction, target)
        if trainer.snr_gamma:
            loss = loss * self._min_snr_weights(timesteps, float(trainer.snr_gamma))
        return loss

    def _min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023): caps the weight of easy, low-noise timesteps."""
        import torch

        alphas = self._noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        capped = torch.minimum(snr, torch.full_like(snr, gamma))
        if self._noise_scheduler.config.prediction_type == "v_prediction":
            return capped / (snr + 1)
        return capped / snr

    def sampling_inputs(self, pipe: Any, prompt: str, control: Any = None) -> dict[str, torch.Tensor]:
        # Sampling uses CFG: the negative (zeroed for an empty negative prompt, as SDXL base was trained) too.
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def sample(
        self, pipe: Any, prompt: str | dict, size: tuple[int, int], steps: int, generator: Any, control=None
    ):
        kwargs = {
            **prompt_kwargs(prompt, pipe._execution_device),
            "width": size[0],
            "height": size[1],
            "num_inference_steps": steps,
            "guidance_scale": 5.0,
            "generator": generator,
        }
        if pipe.vae.dtype == module_dtype(pipe.unet):
            return pipe(**kwargs).images[0]
        # The training encoders' fp32 VAE (load_encoders): the pipeline would hand it bf16 latents, which it
        # refuses, so it decodes here in its own precision.
        latents = pipe(**kwargs, output_type="latent").images
        return _decode(pipe, latents)

    # ---- inpainting -------------------------------------------------------------------------------------
    def masked_pixels_reach_model(self, pipe: Any, strength: float) -> bool:
        # Both UNets start from pure noise at strength 1, and the 9-channel one's masked-image input has the
        # masked pixels zeroed: only the start latents (strength < 1) carry them.
        return strength < 1.0

    def edit(self, pipe: Any, image: Any, mask: Any, prompt: str, settings: dict[str, Any], generator: Any):
        """Regenerate the white region of `mask` in `image` (both at a multiple of 8 px) with
        StableDiffusionXLInpaintPipeline (base weights, or the 9-channel inpainting UNet)."""
        width, height = image.size
        with self.call_context(pipe):
            return pipe(
                prompt=prompt,
                negative_prompt=settings.get("negative_prompt"),
                image=image,
                mask_image=mask,
                height=height,
                width=width,
                strength=float(settings["strength"]),
                guidance_scale=float(settings["guidance_scale"]),
                num_inference_steps=int(settings["num_inference_steps"]),
                generator=generator,
            ).images[0]


def _decode(pipe: Any, latents: torch.Tensor) -> Any:
    """Latents -> PIL image through `pipe.vae` in the VAE's dtype, as the SDXL pipeline decodes them."""
    import torch

    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
