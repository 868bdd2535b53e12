"""FLUX.1: LoRAs train on FLUX.1-dev; edits run on FLUX.1-Fill-dev, or on FLUX.1-dev through the inpaint pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stylekit.models.base import ModelFamily

# Published guidance per pipeline: Fill-dev is distilled for guidance 30, dev for 3.5.
_GUIDANCE = {"fill": 30.0, "inpaint": 3.5}


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
    default_lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )

    def source(self, task: str = "train") -> str:
        # FluxInpaintPipeline runs on the base model, where a LoRA trained on FLUX.1-dev applies as is.
        if task == "inpaint" and self.pipeline == "inpaint":
            return super().source("train")
        return super().source(task)

    def inference_defaults(self) -> dict[str, Any]:
        defaults = super().inference_defaults()
        if defaults.get("guidance_scale") is None:
            defaults["guidance_scale"] = _GUIDANCE[self.pipeline]
        return defaults
