"""Per-family sampling defaults for editing, and the warnings and records that name what really ran."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from stylekit.inpaint import run as inpaint_run

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="inpaint", overrides=[*overrides, "prompt=x", "output_dir=."])


def _settings(*overrides: str) -> dict:
    cfg = _cfg(*overrides)
    settings = {key: cfg[key] for key in inpaint_run.SETTING_KEYS}
    return inpaint_run.effective_settings(inpaint_run.build_family(cfg), settings)


@pytest.mark.parametrize(
    ("overrides", "strength"),
    [
        (["model=flux"], 1.0),  # Fill paints the hole from noise, conditioned on the rest
        (["model=flux", "model.pipeline=inpaint"], 0.9),  # FLUX.1-dev only sees the region via its start
        (["model=sdxl"], 0.9999),  # SDXL inpainting degrades at exactly 1.0
        (["model=sdxl_inpainting"], 0.9999),
        (["model=qwen_edit"], 1.0),
        (["model=qwen_edit_v1"], 1.0),
        (["model=tiny_flux", "model.pipeline=inpaint"], 0.9),
        (["model=tiny_sdxl"], 0.9999),
    ],
)
def test_each_family_edits_at_its_own_default_strength(overrides: list[str], strength: float) -> None:
    """Before, every family ran at strength 1.0."""
    assert _settings(*overrides)["strength"] == strength


def test_an_explicit_strength_wins_over_the_family_default() -> None:
    assert _settings("model=sdxl", "strength=0.5")["strength"] == 0.5
    assert (
        _settings("model=flux", "model.pipeline=inpaint", "model.inference.strength=0.8")["strength"] == 0.8
    )


@pytest.mark.parametrize(("model", "warns"), [("flux", True), ("qwen_edit", True), ("sdxl", False)])
def test_fp16_on_a_family_that_overflows_it_warns(
    model: str, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    family = inpaint_run.build_family(_cfg(f"model={model}", "model.dtype=fp16"))
    with caplog.at_level(logging.WARNING, logger="stylekit.models.base"):
        family.runtime("cpu")
    lines = [r.getMessage() for r in caplog.records if "overflow float16" in r.getMessage()]
    assert len(lines) == (1 if warns else 0)
    assert all("model.dtype=bf16" in line for line in lines)


@pytest.mark.parametrize(
    ("overrides", "ran"),
    [
        (["model=flux"], "black-forest-labs/FLUX.1-Fill-dev"),
        (["model=flux", "model.pipeline=inpaint"], "black-forest-labs/FLUX.1-dev"),
        (["model=sdxl_inpainting"], "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"),
        (["model=qwen_edit_v1"], "Qwen/Qwen-Image-Edit"),
    ],
)
def test_the_recorded_edit_model_is_the_one_that_runs(overrides: list[str], ran: str) -> None:
    family = inpaint_run.build_family(_cfg(*overrides))
    assert family.describe()["inpaint_pretrained"] == ran
    assert family.inpaint_id() == ran
