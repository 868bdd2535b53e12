"""Stable Diffusion XL: LoRAs on the UNet; edits through StableDiffusionXLInpaintPipeline with the base weights
or the 9-channel inpainting checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.errors import UsageError
from stylekit.models import flow
from stylekit.models.base import ModelFamily, module_dtype, prompt_kwargs

if TYPE_CHECKING:
    import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class SDXLFamily(ModelFamily):
    family: ClassVar[str] = "sdxl"
    resolution_multiple: ClassVar[int] = 8
    denoiser_name: ClassVar[str] = "unet"
    train_pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    inpaint_pipeline_classes: ClassVar[dict[str, str]] = {"inpaint": "StableDiffusionXLInpaintPipeline"}
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    # None: what the checkpoint's scheduler config says (epsilon for SDXL base 1.0).
    prediction_type: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(
                f"model.prediction_type={self.prediction_type!r} is not one of: {', '.join(PREDICTION_TYPES)}"
            )

    # ---- training ---------------------------------------------------------------------------------------
    def load_encoders(self, runtime: Any = None) -> Any:
        from diffusers import DDPMScheduler

        pipe = super().load_encoders(runtime)
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
        import torch

        vae = pipe.vae
        # SDXL's VAE overflows in fp16; encode in fp32 like the pipelines do when force_upcast is set.
        dtype = vae.dtype
        if vae.config.force_upcast and dtype == torch.float16:
            vae.float()
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
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
        # (original size, crop top-left, target size): the whole bucket, uncropped.
        time_ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], device=latents.device).repeat(b, 1)
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
        return pipe(
            **prompt_kwargs(prompt, pipe._execution_device),
            width=size[0],
            height=size[1],
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=generator,
        ).images[0]

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
