"""The real checkpoints' architectures, from their published config.json values shipped in this package.

`stylekit/models/configs/<family>/<component>.json` holds the values of FLUX.1-dev, SDXL base 1.0 and
Qwen-Image-Edit-2511 (plus FLUX.1-Fill-dev's transformer, which differs only in its input/output widths). They
build on the meta device: every shape is real, no weight is allocated or downloaded. Tests check LoRA targets and
saved key names against them; `stylekit.memory` counts bytes from them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

# Which published component each family's pipeline loads, by pipeline folder name; the first is the denoiser.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "qwen_edit": ("transformer", "vae", "text_encoder"),
}
# What each family's configs are the published values of.
CHECKPOINTS = {
    "flux": "black-forest-labs/FLUX.1-dev",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "qwen_edit": "Qwen/Qwen-Image-Edit-2511",
}
# Published by another checkpoint of the family: the edit model's own denoiser.
EDIT_DENOISERS = {"flux": ("transformer_fill", "black-forest-labs/FLUX.1-Fill-dev")}


def config(family: str, component: str) -> dict[str, Any]:
    """The published config.json values of `component` (e.g. "transformer") of `family`'s checkpoint."""
    return json.loads(_read(family, component))


@cache
def _read(family: str, component: str) -> str:
    path = resources.files("stylekit.models") / "configs" / family / f"{component}.json"
    if not path.is_file():
        raise KeyError(f"no published config for {family}/{component}")
    return path.read_text()


@contextmanager
def _on_meta() -> Iterator[None]:
    """Parameters and buffers on the meta device: real shapes, no memory, no initialisation cost."""
    import torch

    with torch.device("meta"):
        yield


def build_on_meta(family: str, component: str, **overrides: Any) -> torch.nn.Module:
    """The component's real architecture with every parameter on the meta device (`overrides` change config
    values, e.g. a shallower depth)."""
    values = config(family, component) | overrides
    name = values.pop("_class_name")
    with _on_meta():
        if name in _TRANSFORMERS_CLASSES:
            return _transformers_model(name, values)
        import diffusers

        return getattr(diffusers, name).from_config(values)


_TRANSFORMERS_CLASSES = (
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "T5EncoderModel",
    "Qwen2_5_VLForConditionalGeneration",
)


def _transformers_model(name: str, values: dict[str, Any]) -> torch.nn.Module:
    """transformers reads the hub's config.json layout (Qwen2.5-VL's flat text keys included) with from_dict."""
    import transformers

    model_class = getattr(transformers, name)
    return model_class._from_config(model_class.config_class.from_dict(values))


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
