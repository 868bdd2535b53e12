"""Qwen-Image-Edit: 2509/2511 through the edit-plus pipeline, v1 through the masked edit-inpaint pipeline."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from stylekit.models.base import ModelFamily

if TYPE_CHECKING:
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
