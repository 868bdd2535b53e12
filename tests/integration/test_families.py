"""Families load the real diffusers classes from tiny local folders through the same code a GPU user runs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]


def _family(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("inpaint", [f"model={model}", "prompt=x", *overrides])
    return instantiate(cfg.model)


@pytest.mark.parametrize(
    ("model", "overrides", "expected"),
    [
        ("tiny_flux", (), "FluxFillPipeline"),
        ("tiny_flux", ("model.pipeline=inpaint",), "FluxInpaintPipeline"),
        ("tiny_sdxl", (), "StableDiffusionXLInpaintPipeline"),
        ("tiny_qwen_edit", (), "QwenImageEditPlusPipeline"),
        ("tiny_qwen_edit", ("model.pipeline=edit_inpaint",), "QwenImageEditInpaintPipeline"),
    ],
)
def test_tiny_family_loads_its_real_inpaint_pipeline_offline(
    model: str, overrides: tuple, expected: str
) -> None:
    import torch

    family = _family(model, *overrides)
    pipe = family.load_pipeline("inpaint")
    assert type(pipe).__name__ == expected
    assert pipe.device.type == "cpu"
    assert getattr(pipe, family.denoiser_name).dtype == torch.float32


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl", "tiny_qwen_edit"])
def test_training_parts_load_separately_and_reassemble(model: str) -> None:
    family = _family(model)
    encoders = family.load_encoders()
    assert getattr(encoders, family.denoiser_name) is None
    denoiser = family.load_denoiser()
    pipe = family.pipeline_with(denoiser, encoders)
    assert type(pipe).__name__ == family.pipeline_class_name("train")
    assert getattr(pipe, family.denoiser_name) is denoiser


def test_cpu_runs_auto_in_float32_with_a_smoke_run_warning(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from stylekit.models.base import resolve_runtime

    with caplog.at_level(logging.WARNING):
        runtime = resolve_runtime("auto", device="cpu")
    assert runtime.dtype == torch.float32
    assert "CPU is for smoke runs" in caplog.text


@pytest.mark.parametrize(
    ("name", "expected"), [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")]
)
def test_an_explicit_dtype_is_honoured_on_cpu(name: str, expected: str) -> None:
    import torch

    from stylekit.models.base import resolve_runtime

    assert resolve_runtime(name, device="cpu").dtype == getattr(torch, expected)


def test_qwen_condition_area_is_a_config_value_applied_only_during_the_call() -> None:
    from diffusers import QwenImageEditPlusPipeline

    family = _family("tiny_qwen_edit")
    pipe = family.load_pipeline("inpaint")
    module = sys.modules[QwenImageEditPlusPipeline.__module__]
    original = module.calculate_dimensions
    with family.call_context(pipe):
        assert module.calculate_dimensions(1024 * 1024, 1.0)[:2] == (64, 64)
        assert module.calculate_dimensions(384 * 384, 1.0)[:2] == (64, 64)
    assert module.calculate_dimensions is original
    assert original(1024 * 1024, 1.0)[:2] == (1024, 1024)


def test_real_qwen_config_leaves_the_pipeline_untouched() -> None:
    from diffusers import QwenImageEditPlusPipeline

    family = _family("qwen_edit")
    module = sys.modules[QwenImageEditPlusPipeline.__module__]
    original = module.calculate_dimensions
    fake_pipe = QwenImageEditPlusPipeline.__new__(QwenImageEditPlusPipeline)
    with family.call_context(fake_pipe):
        assert module.calculate_dimensions is original
