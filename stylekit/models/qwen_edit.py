"""Qwen-Image-Edit: 2509/2511 through the edit-plus pipeline, v1 through the masked edit-inpaint pipeline."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.models import flow
from stylekit.models.base import ModelFamily

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# The target areas diffusers' Qwen-Image-Edit pipelines resize their condition image to: the VAE's ~1 MP and
# the vision-language encoder's 384x384 (edit-plus only).
MODEL_CONDITION_AREA = 1024 * 1024
MODEL_VL_CONDITION_AREA = 384 * 384

# The pipelines read those areas from a module-level function at call time; swapping it is process-wide.
_AREA_LOCK = threading.Lock()


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
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )

    condition_area: int = MODEL_CONDITION_AREA
    vl_condition_area: int = MODEL_VL_CONDITION_AREA

    def pipeline_class_name(self, task: str = "train") -> str:
        # v1 checkpoints train through the v1 edit pipeline's encoders.
        if task == "train" and self.pipeline == "edit_inpaint":
            return "QwenImageEditPipeline"
        return super().pipeline_class_name(task)

    def call_context(self, pipe: DiffusionPipeline) -> AbstractContextManager[None]:
        return condition_areas(pipe, self.condition_area, self.vl_condition_area)

    # ---- training: target image + control (source) image + instruction ---------------------------------
    needs_control: ClassVar[bool] = True

    def _condition_size(self, image: Any, area: int) -> tuple[int, int]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        width, height = calculate_dimensions(area, image.width / image.height)[:2]
        return int(width), int(height)

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

    def sample_timesteps(self, n: int, generator: torch.Generator, trainer: Any) -> torch.Tensor:
        return flow.sample_sigmas(n, generator, trainer.timestep_sampling, trainer.shift)

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
        dtype = core.dtype
        packed = pack(noisy, b, c, h, w)
        hidden = torch.cat([packed, pack(control, b, c, ch, cw)], dim=1).to(dtype)
        prediction = denoiser(
            hidden_states=hidden,
            timestep=t.to(latents.device, dtype),
            guidance=None,
            encoder_hidden_states_mask=batch["prompt_embeds_mask"],
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            img_shapes=[[(1, h // 2, w // 2), (1, ch // 2, cw // 2)]] * b,
            return_dict=False,
        )[0][:, : packed.shape[1]]
        return flow.per_sample_mse(prediction, pack(target, b, c, h, w))

    def sample(self, pipe: Any, prompt: str, size: tuple[int, int], steps: int, generator: Any, control=None):
        defaults = self.inference_defaults()
        with self.call_context(pipe):
            return pipe(
                image=[control] if self.pipeline == "edit_plus" else control,
                prompt=prompt,
                negative_prompt=defaults.get("negative_prompt"),
                true_cfg_scale=defaults.get("true_cfg_scale", 4.0),
                width=size[0],
                height=size[1],
                num_inference_steps=steps,
                generator=generator,
            ).images[0]
