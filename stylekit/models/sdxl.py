"""Stable Diffusion XL: LoRAs on the UNet; edits through StableDiffusionXLInpaintPipeline with the base weights
or the 9-channel inpainting checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from stylekit.errors import UsageError
from stylekit.models.base import ModelFamily

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
