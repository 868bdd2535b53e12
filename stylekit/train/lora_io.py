"""LoRA adapters: attach with peft, save in diffusers format with our metadata, prove the file loads.

The saved file is what every tool expects: `pipe.load_lora_weights(dir)` in diffusers, and (with
trainer.lora_format=comfyui) a kohya-keyed copy ComfyUI and A1111 load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylekit.errors import UsageError

if TYPE_CHECKING:
    import torch

    from stylekit.models.base import ModelFamily

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMFY_NAME = "lora_comfyui.safetensors"
ADAPTER = "default"


def attach_lora(denoiser: torch.nn.Module, lora: Any, family: ModelFamily) -> Any:
    """Add a trainable LoRA adapter to the frozen denoiser; returns the peft config used."""
    from peft import LoraConfig

    # rank, alpha and target_regex were checked by stylekit.schema (Lora) before any model loaded.
    targets: Any = list(lora.target_modules) if lora.target_modules else family.lora_target_modules
    if lora.get("target_regex"):
        targets = str(lora.target_regex)
    config = LoraConfig(
        r=int(lora.rank),
        lora_alpha=float(lora.alpha),
        lora_dropout=float(lora.dropout),
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=bool(lora.use_dora),
    )
    denoiser.requires_grad_(False)
    try:
        denoiser.add_adapter(config)
    except ValueError as error:
        raise UsageError(
            f"lora target modules {targets!r} match nothing in the {family.family} model: {error}"
        ) from error
    return config


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}


def load_lora_state_dict(denoiser: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(denoiser, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"LoRA state has keys the model lacks: {unexpected[:3]}")


def _adapter_metadata(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def save_lora(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    config: Any,
    out_dir: Path,
    metadata: dict[str, Any],
    comfyui: bool = False,
) -> Path:
    """Write `<out_dir>/pytorch_lora_weights.safetensors` (diffusers format) atomically, with `metadata` in the
    safetensors header, and a model card. Returns the weights file."""
    from diffusers.utils import convert_state_dict_to_diffusers

    cls = _pipeline_class(family)
    state = lora_state_dict(denoiser)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        layers = convert_state_dict_to_diffusers(state) if family.denoiser_name == "unet" else state
        cls.save_lora_weights(
            tmp,
            **{f"{family.denoiser_name}_lora_layers": layers},
            **{f"{family.denoiser_name}_lora_adapter_metadata": _adapter_metadata(config)},
            weight_name=WEIGHT_NAME,
        )
        _add_metadata(tmp / WEIGHT_NAME, metadata)
        if comfyui:
            dora = comfyui_dora_scales(denoiser) if config.use_dora else None
            write_comfyui_copy(tmp / WEIGHT_NAME, tmp / COMFY_NAME, family, float(config.lora_alpha), dora)
        (tmp / "README.md").write_text(model_card(metadata))
        # The previous LoRA stays on disk until the new one is in place.
        aside = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, aside)
        os.replace(tmp, out_dir)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / WEIGHT_NAME


def _pipeline_class(family: ModelFamily) -> Any:
    import diffusers

    return getattr(diffusers, family.pipeline_class_name("train"))


def _add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    header.update(
        {f"stylekit.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()}
    )
    save_file(tensors, str(path), metadata=header)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def verify_loads(pipe: Any, lora_dir: Path, adapter_name: str = "trained") -> None:
    """Load the saved file into a pipeline the way users will; fail loudly if it does not apply.
    The adapter stays loaded, so the caller can sample with exactly what was saved."""
    from diffusers.utils import logging as diffusers_logging

    # Pipelines built without text encoders (training's samplers) report "no LoRA keys for NoneType": noise.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(lora_dir), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
        adapters = pipe.get_list_adapters()
    except Exception as error:
        raise RuntimeError(
            f"the LoRA saved to {lora_dir} does not load back with load_lora_weights: {error}"
        ) from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not any(adapter_name in names for names in adapters.values()):
        raise RuntimeError(f"the LoRA saved to {lora_dir} loaded but attached to no module")


def comfyui_dora_scales(denoiser: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Module name -> the `.dora_scale` ComfyUI needs to rebuild each DoRA layer of `denoiser` exactly.

    peft's DoRA weight is m * (W + dW) / ||W + dW||, norms over each output row, with m of shape (out,). ComfyUI
    reads a dora_scale whose first dim is the output size as that per-row magnitude, shaped (out, 1[, 1, 1]), but
    divides by the rows of the base weight W, not of W + dW (comfy/weight_adapter/base.py, weight_decompose). So the
    scale written is m * ||W|| / ||W + dW||: at strength 1 ComfyUI's merge is then peft's weight.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    scales: dict[str, torch.Tensor] = {}
    for name, module in denoiser.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_magnitude_vector:
            continue
        with torch.no_grad():
            base = dequantize_module_weight(module.get_base_layer()).float()
            rows = base.shape[0]
            adapted = base + module.get_delta_weight(adapter).float()
            magnitude = module.lora_magnitude_vector[adapter].weight.float().flatten()
            scale = magnitude * base.reshape(rows, -1).norm(dim=1) / adapted.reshape(rows, -1).norm(dim=1)
        scales[name] = scale.reshape(rows, *[1] * (base.dim() - 1)).cpu().contiguous()
    return scales


# kohya / ComfyUI naming: lora_unet_<dotted_path_with_underscores>.lora_down/lora_up/alpha[/dora_scale]
def write_comfyui_copy(
    source: Path,
    target: Path,
    family: ModelFamily,
    alpha: float,
    dora_scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """The kohya-keyed copy of a diffusers-format LoRA file; DoRA layers need `dora_scales`
    (comfyui_dora_scales), which cannot be read back from the file alone."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    dora_scales = dora_scales or {}
    magnitudes = re.compile(r"^(?:unet|transformer)\.(.+)\.lora_magnitude_vector(?:\.weight)?$")
    dora_modules = {match[1] for key in state if (match := magnitudes.match(key))}
    if dora_modules - set(dora_scales):
        # Without its dora_scale ComfyUI would apply a DoRA layer as a plain LoRA: a different model.
        missing = sorted(dora_modules - set(dora_scales))
        raise RuntimeError(f"{source}: no dora_scale for the DoRA layer {missing[0]} (of {len(missing)})")
    out: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?:unet|transformer)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
    for key, tensor in state.items():
        match = pattern.match(key)
        if not match:
            continue
        module, kind = match.groups()
        base = family.comfyui_prefix + module.replace(".", "_")
        suffix = "lora_down" if kind in ("lora_A", "lora.down") else "lora_up"
        out[f"{base}.{suffix}.weight"] = tensor
        out[f"{base}.alpha"] = torch.tensor(alpha)
        if module in dora_scales:
            out[f"{base}.dora_scale"] = dora_scales[module]
    if not out:
        raise RuntimeError(f"no LoRA keys to convert in {source}")
    save_file(
        out, str(target), metadata={"ss_network_module": "networks.lora", "stylekit.family": family.family}
    )


def model_card(metadata: dict[str, Any]) -> str:
    lines = [
        f"# LoRA for {metadata.get('pretrained', 'unknown base')}",
        "",
        f"Trained with stylekit ({metadata.get('family')}).",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in metadata.items()]
    trigger = metadata.get("trigger")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"pipe.load_lora_weights('path/to/lora', weight_name='{WEIGHT_NAME}')",
        "```",
    ]
    if trigger:
        lines += ["", f"Put `{trigger}` in your prompt."]
    return "\n".join(lines) + "\n"
