"""Training settings a real run depends on: gradient checkpointing defaults, Qwen's text mask, logit-normal timestep
sampling, and what a real model does on a machine that cannot run or fetch it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from stylekit import schema
from stylekit.errors import UsageError
from stylekit.train import loop

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _compose(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=["output_dir=unused", *overrides])


# ---- gradient checkpointing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [("flux", True), ("qwen_edit", True), ("qwen_edit_v1", True), ("sdxl", False), ("tiny_flux", True)],
)
def test_gradient_checkpointing_defaults_on_for_flux_and_qwen_edit_and_off_for_sdxl(
    model: str, expected: bool
) -> None:
    cfg = _compose(f"model={model}")
    assert cfg.trainer.gradient_checkpointing == "auto"
    assert loop.gradient_checkpointing(cfg.trainer, instantiate(cfg.model)) is expected


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_gradient_checkpointing_setting_wins_over_the_family_default(value: bool) -> None:
    cfg = _compose("model=qwen_edit", f"trainer.gradient_checkpointing={str(value).lower()}")
    assert loop.gradient_checkpointing(cfg.trainer, instantiate(cfg.model)) is value


def test_a_bad_gradient_checkpointing_value_is_a_usage_error() -> None:
    cfg = _compose("model=tiny_flux", "trainer.gradient_checkpointing=sometimes")
    with pytest.raises(UsageError, match="trainer.gradient_checkpointing='sometimes'"):
        schema.validate("train", cfg)


def test_a_default_flux_run_trains_with_gradient_checkpointing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import ModelMixin

    from stylekit.train.run import run

    enabled: list[str] = []
    original = ModelMixin.enable_gradient_checkpointing

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        enabled.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "enable_gradient_checkpointing", spy)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(images / "a.png")
    cfg = _compose(
        "model=tiny_flux",
        "logger=none",
        f"data.dataset_dir={images}",
        f"output_dir={tmp_path / 'run'}",
        f"trainer.checkpoint_root={tmp_path / 'ck'}",
        f"trainer.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=1",
        "lora.rank=2",
    )
    run(cfg)
    assert enabled[0] == "FluxTransformer2DModel"


# ---- Qwen's text mask ----------------------------------------------------------------------------------------


def test_qwen_training_passes_no_text_mask_when_nothing_is_padded_and_the_mask_when_something_is() -> None:
    """An all-ones mask would keep SDPA off its fused kernels for nothing (the pipeline passes None too)."""
    import torch

    family = instantiate(_compose("model=tiny_qwen_edit").model)
    denoiser = family.load_denoiser(family.runtime("cpu"))
    seen: list[Any] = []
    denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states_mask"]), with_kwargs=True
    )
    channels = denoiser.config.in_channels // 4
    generator = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(2, channels, 8, 8, generator=generator),
        "control_latents": torch.randn(2, channels, 8, 8, generator=generator),
        "prompt_embeds": torch.randn(2, 7, denoiser.config.joint_attention_dim, generator=generator),
        "prompt_embeds_mask": torch.ones(2, 7, dtype=torch.long),
    }
    trainer = OmegaConf.create({})
    noise, t = torch.randn(2, channels, 8, 8, generator=generator), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        family.training_loss(denoiser, batch, noise, t, trainer)
        batch["prompt_embeds_mask"][1, 5:] = 0  # the shorter prompt of a batch, right-padded by collate
        family.training_loss(denoiser, batch, noise, t, trainer)
    assert seen[0] is None
    assert torch.equal(seen[1], batch["prompt_embeds_mask"])


# ---- logit-normal timestep sampling --------------------------------------------------------------------------


def _median_sigma(**trainer: Any) -> float:
    import torch

    family = instantiate(_compose("model=tiny_flux").model)
    settings = OmegaConf.create({"timestep_sampling": "logit_normal", "shift": 1.0, **trainer})
    sigmas = family.sample_timesteps(20_000, torch.Generator().manual_seed(0), settings)
    return float(sigmas.median())


def test_logit_normal_sampling_follows_its_configured_mean_and_std() -> None:
    assert _median_sigma(logit_mean=0.0, logit_std=1.0) == pytest.approx(0.5, abs=0.02)
    assert _median_sigma(logit_mean=1.5, logit_std=0.5) == pytest.approx(1 / (1 + np.exp(-1.5)), abs=0.02)
    assert _median_sigma(logit_mean=-1.0, logit_std=1.0) == pytest.approx(1 / (1 + np.exp(1.0)), abs=0.02)


def test_a_non_positive_logit_std_is_a_usage_error() -> None:
    cfg = _compose("model=tiny_flux", "trainer.logit_std=0")
    with pytest.raises(UsageError, match="trainer.logit_std=0"):
        schema.validate("train", cfg)


# ---- a real model where it cannot run ------------------------------------------------------------------------


def _run_script(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", HF_HOME=str(tmp / "hf-home"))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args, f"hydra.run.dir={tmp / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-2000:]
    assert "Traceback" not in out
    # The first screen is stylekit's own: no library deprecation or CPU-kernel warnings before the error.
    assert "FutureWarning" not in out and "bitsandbytes" not in out.lower()
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return error


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(np.full((1024, 1024, 3), 90, np.uint8)).save(folder / "a.png")  # real-model sized
    return folder


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_no_cuda = pytest.mark.skipif(_cuda(), reason="checks what happens on a machine without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("model", ["flux", "sdxl", "qwen_edit"])
def test_training_a_real_model_without_cuda_stops_in_one_line_before_any_download(
    model: str, photos: Path, tmp_path: Path
) -> None:
    error = _one_error_line(
        _run_script("train.py", f"model={model}", f"data.dataset_dir={photos}", "logger=none", tmp=tmp_path)
    )
    assert "needs a CUDA GPU" in error and f"model=tiny_{model}" in error
    assert "hydra/launcher=modal" in error and "model.device=cpu" in error
    assert not (tmp_path / "hf-home").exists()  # nothing was fetched, not even a config


@needs_no_cuda
def test_editing_with_a_real_model_without_cuda_stops_in_one_line(tmp_path: Path) -> None:
    demo = ROOT / "assets" / "demo"
    error = _one_error_line(
        _run_script(
            "inpaint.py",
            "model=flux",
            "prompt=a cat",
            f"image={demo / 'base' / 'chelsea.jpg'}",
            f"mask={demo / 'masks' / 'chelsea.png'}",
            f"output_dir={tmp_path / 'out'}",
            tmp=tmp_path,
        )
    )
    assert "needs a CUDA GPU" in error and "model=tiny_flux" in error


def test_a_real_model_neither_cached_nor_reachable_is_one_line_naming_the_model_and_what_to_do(
    photos: Path, tmp_path: Path
) -> None:
    error = _one_error_line(
        _run_script(
            "train.py",
            "model=flux",
            "model.device=cpu",
            f"data.dataset_dir={photos}",
            "logger=none",
            tmp=tmp_path,
        )
    )
    assert "black-forest-labs/FLUX.1-dev" in error
    assert "HF_HUB_OFFLINE" in error and "licence" in error and "HF_TOKEN" in error
