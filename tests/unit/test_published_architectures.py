"""The real checkpoints' architectures, built on the meta device from the configs shipped in stylekit (no weights,
no download): parameter counts, LoRA targets, trainable parameters per rank, and saved LoRA key names that the real
pipeline classes' `load_lora_weights` maps onto the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from stylekit import memory
from stylekit.models import published

# Parameter counts of the published checkpoints (their model cards and safetensors sizes: FLUX.1-dev's
# transformer is 23,802,816,640 bytes in bf16, T5-XXL's encoder 9.52 GB, SDXL's UNet 5.14 GB in fp16).
PUBLISHED_PARAMETERS = {
    ("flux", "transformer"): 11_901_408_320,
    ("flux", "transformer_fill"): 11_902_391_360,
    ("flux", "vae"): 83_819_683,
    ("flux", "text_encoder"): 123_060_480,
    ("flux", "text_encoder_2"): 4_762_310_656,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("qwen_edit", "transformer"): 20_430_401_088,
    ("qwen_edit", "vae"): 126_892_531,
    ("qwen_edit", "text_encoder"): 8_292_166_656,
}
# FLUX: 19 double blocks x 12 + 38 single blocks x 4; SDXL: 70 transformer blocks x 2 attentions x 4;
# Qwen-Image: 60 blocks x 12.
DEFAULT_TARGET_MODULES = {"flux": 380, "sdxl": 560, "qwen_edit": 720}
# LoRA parameters per unit of rank with the default targets: sum of (in + out) over the wrapped Linears.
LORA_PARAMETERS_PER_RANK = {"flux": 3_385_344, "sdxl": 1_451_520, "qwen_edit": 6_635_520}
FAMILIES = tuple(DEFAULT_TARGET_MODULES)


def _family(name: str) -> Any:
    from stylekit.models.flux import FluxFamily
    from stylekit.models.qwen_edit import QwenEditFamily
    from stylekit.models.sdxl import SDXLFamily

    return {"flux": FluxFamily, "sdxl": SDXLFamily, "qwen_edit": QwenEditFamily}[name](pretrained="meta")


def _lora_cfg(rank: int) -> Any:
    return OmegaConf.create(
        {"rank": rank, "alpha": rank, "dropout": 0.0, "target_modules": None, "use_dora": False}
    )


def _denoiser_with_lora(family: str, rank: int) -> tuple[Any, Any]:
    """The real denoiser on the meta device with stylekit's LoRA attached (stylekit.train.lora_io)."""
    from stylekit.train import lora_io

    denoiser = published.build_on_meta(family, memory.DENOISER[family])
    config = lora_io.attach_lora(denoiser, _lora_cfg(rank), _family(family))
    return denoiser, config


@pytest.fixture(scope="module")
def rank_one() -> Any:
    """family -> the meta denoiser with a rank-1 LoRA and its peft config, built once per module (attaching 380-720
    adapters takes seconds)."""
    built: dict[str, tuple[Any, Any]] = {}

    def get(family: str) -> tuple[Any, Any]:
        if family not in built:
            built[family] = _denoiser_with_lora(family, rank=1)
        return built[family]

    return get


def _lora_modules(model: Any) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@pytest.mark.parametrize(("family", "component"), sorted(PUBLISHED_PARAMETERS))
def test_published_configs_build_the_real_architectures_on_meta(family: str, component: str) -> None:
    model = published.build_on_meta(family, component)
    assert all(p.is_meta for p in model.parameters())
    assert published.parameter_count(model) == PUBLISHED_PARAMETERS[family, component]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_wrap_the_expected_module_counts(family: str, rank_one: Any) -> None:
    denoiser, _ = rank_one(family)
    wrapped = _lora_modules(denoiser)
    assert len(wrapped) == DEFAULT_TARGET_MODULES[family]
    # The memory arithmetic picks the same modules from the census as peft does from the model.
    census = memory.census(family, memory.DENOISER[family])
    assert sorted(
        name for name, _, _ in memory.lora_targets(census, memory.default_targets(family))
    ) == sorted(wrapped)


# Depth overrides that keep every kind of block (FLUX's double and single, each SDXL level) but few of them.
TWO_BLOCKS = {
    "flux": {"num_layers": 1, "num_single_layers": 1},
    "sdxl": {"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]},
    "qwen_edit": {"num_layers": 2},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_per_rank_match_the_arithmetic(family: str, rank_one: Any) -> None:
    from stylekit.train import lora_io

    census = memory.census(family, memory.DENOISER[family])
    modules = memory.lora_targets(census, memory.default_targets(family))
    denoiser = rank_one(family)[0]
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    assert trainable == LORA_PARAMETERS_PER_RANK[family] == memory.lora_parameters(modules, 1)
    # Rank 16 on a shallow build of the same widths (attaching hundreds of adapters again costs seconds).
    shallow = published.build_on_meta(family, memory.DENOISER[family], **TWO_BLOCKS[family])
    shallow_modules = memory.lora_targets(memory.census_of(shallow), memory.default_targets(family))
    lora_io.attach_lora(shallow, _lora_cfg(16), _family(family))
    trainable = sum(p.numel() for p in shallow.parameters() if p.requires_grad)
    assert (
        trainable
        == memory.lora_parameters(shallow_modules, 16)
        == 16 * memory.lora_parameters(shallow_modules, 1)
    )


def _materialize_lora(denoiser: Any, seed: int = 0) -> None:
    """Give the meta LoRA tensors real (small, random) values so the file can be written."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, param in list(denoiser.named_parameters()):
        if param.requires_grad:
            owner = denoiser.get_submodule(name.rsplit(".", 1)[0])
            owner.weight = torch.nn.Parameter(torch.randn(param.shape, generator=generator))


def _pipeline_shell(family: str, denoiser: Any) -> Any:
    """The family's real training pipeline class holding only the denoiser: `load_lora_weights` needs no more."""
    import diffusers

    cls = getattr(diffusers, _family(family).pipeline_class_name("train"))
    names = set(cls._get_signature_keys(cls)[0])
    parts: dict[str, Any] = dict.fromkeys(names)
    parts[memory.DENOISER[family]] = denoiser
    if "add_watermarker" in names:
        parts["add_watermarker"] = False
    parts.pop("requires_aesthetics_score", None)
    parts.pop("force_zeros_for_empty_prompt", None)
    return cls(**parts)


def _load_and_report(family: str, lora_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """Load `lora_dir` into a fresh meta-built denoiser through the pipeline's `load_lora_weights` (diffusers'
    own key conversion and mapping); returns the model and every LoRA key that did not map onto it."""
    import diffusers.loaders.peft as peft_loader

    from stylekit.train.lora_io import WEIGHT_NAME

    unhandled: list[str] = []
    original = peft_loader._maybe_warn_for_unhandled_keys

    def record(incompatible: Any, adapter_name: str) -> None:
        for key in [
            *getattr(incompatible, "unexpected_keys", []),
            *getattr(incompatible, "missing_keys", []),
        ]:
            if ".lora_" in key:
                unhandled.append(key)
        original(incompatible, adapter_name)

    monkeypatch.setattr(peft_loader, "_maybe_warn_for_unhandled_keys", record)
    fresh = published.build_on_meta(family, memory.DENOISER[family])
    pipe = _pipeline_shell(family, fresh)
    pipe.load_lora_weights(str(lora_dir), weight_name=WEIGHT_NAME, adapter_name="check")
    assert "check" in pipe.get_list_adapters().get(memory.DENOISER[family], [])
    return fresh, unhandled


@pytest.fixture(autouse=True)
def _quiet_diffusers() -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_keys_load_into_the_real_pipeline_class(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank_one: Any
) -> None:
    from safetensors import safe_open

    from stylekit.train import lora_io

    denoiser, config = rank_one(family)
    _materialize_lora(denoiser)
    weights = lora_io.save_lora(_family(family), denoiser, config, tmp_path / "lora", {"family": family})
    with safe_open(str(weights), framework="pt") as handle:
        saved = list(handle.keys())  # noqa: SIM118 - safe_open has no iter
    assert len(saved) == 2 * DEFAULT_TARGET_MODULES[family]

    fresh, unhandled = _load_and_report(family, weights.parent, monkeypatch)
    assert unhandled == []
    assert len(_lora_modules(fresh)) == DEFAULT_TARGET_MODULES[family]


def test_a_saved_key_the_model_lacks_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank_one: Any
) -> None:
    """The key check above can fail: one key renamed to a module FLUX does not have is reported."""
    from safetensors.torch import load_file, save_file

    from stylekit.train import lora_io

    denoiser, config = rank_one("flux")
    _materialize_lora(denoiser)
    weights = lora_io.save_lora(_family("flux"), denoiser, config, tmp_path / "lora", {"family": "flux"})
    state = load_file(str(weights))
    key = next(k for k in state if ".attn.to_q.lora_A." in k)
    state[key.replace(".attn.to_q.", ".attn.to_qq.")] = state.pop(key)
    save_file(state, str(weights))

    _, unhandled = _load_and_report("flux", weights.parent, monkeypatch)
    assert unhandled, "a LoRA key naming a missing module went unnoticed"
