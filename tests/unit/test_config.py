"""The configs compose for every combination the README shows, and real configs name the real models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from stylekit.errors import CudaRequiredError, UsageError

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")

MODELS = [
    "flux",
    "sdxl",
    "sdxl_inpainting",
    "qwen_edit",
    "qwen_edit_v1",
    "tiny_flux",
    "tiny_sdxl",
    "tiny_qwen_edit",
]


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _resolved(cfg, *keys: str):
    # ${hydra:...} resolves only inside a running app; tests read everything else.
    node = cfg
    for key in keys:
        node = node[key]
    return OmegaConf.to_container(node, resolve=True)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", ["resize", "tile"])
@pytest.mark.parametrize("logger", ["wandb", "none"])
def test_train_config_composes_for_every_model_data_and_logger(model: str, data: str, logger: str) -> None:
    cfg = _compose("train", [f"model={model}", f"data={data}", f"logger={logger}"])
    data_cfg = _resolved(cfg, "data")
    assert data_cfg["mode"] == data
    assert data_cfg["resolution"] == cfg.model.resolution
    if data == "tile":
        assert data_cfg["tile_size"] == cfg.model.resolution
    assert cfg.logger.backend == logger


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("preprocess", ["none", "grayscale"])
def test_inpaint_config_composes_for_every_model_and_preprocess(model: str, preprocess: str) -> None:
    cfg = _compose("inpaint", [f"model={model}", f"inpaint/preprocess={preprocess}", "prompt=a red scarf"])
    expected = {"none": ([], []), "grayscale": (["grayscale"], ["revert_grayscale"])}[preprocess]
    assert (list(cfg.inpaint.preprocess), list(cfg.inpaint.postprocess)) == expected
    assert cfg.num_inference_steps == cfg.model.inference.num_inference_steps


def test_keys_users_sweep_are_settable_from_the_command_line() -> None:
    cfg = _compose(
        "train",
        [
            "lora.rank=8",
            "lora.alpha=4",
            "optimizer.lr=3e-4",
            "trainer.max_steps=2000",
            "data=tile",
            "data.dataset_dir=/photos",
            "data.resolution=512",
            "data.tile_size=256",
        ],
    )
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optimizer.lr, cfg.trainer.max_steps) == (8, 4, 3e-4, 2000)
    assert (cfg.data.dataset_dir, cfg.data.resolution, cfg.data.tile_size) == ("/photos", 512, 256)


def test_grayscale_step_lists_can_be_overridden() -> None:
    cfg = _compose(
        "inpaint",
        ["inpaint/preprocess=grayscale", "inpaint.postprocess=[revert_grayscale,color_match]", "prompt=x"],
    )
    assert list(cfg.inpaint.postprocess) == ["revert_grayscale", "color_match"]


def test_outputs_go_under_outputs_dir() -> None:
    for name in ("train", "inpaint"):
        cfg = _compose(name, ["prompt=x"] if name == "inpaint" else [])
        assert cfg.hydra.run.dir.startswith("outputs/")
        assert cfg.hydra.sweep.dir.startswith("outputs/")
    assert "outputs/" in (ROOT / ".gitignore").read_text()


def test_experiment_preset_switches_to_the_tiny_model() -> None:
    cfg = _compose("train", ["experiment=tiny_smoke"])
    assert cfg.model.pretrained == "tiny:flux"
    assert cfg.trainer.max_steps == 4


REAL = {
    # model config: (family, train hub id, inpaint hub id, train pipeline, inpaint pipeline)
    "flux": (
        "flux",
        "black-forest-labs/FLUX.1-dev",
        "black-forest-labs/FLUX.1-Fill-dev",
        "FluxPipeline",
        "FluxFillPipeline",
    ),
    "sdxl": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "sdxl_inpainting": (
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "qwen_edit": (
        "qwen_edit",
        "Qwen/Qwen-Image-Edit-2511",
        "Qwen/Qwen-Image-Edit-2511",
        "QwenImageEditPlusPipeline",
        "QwenImageEditPlusPipeline",
    ),
    "qwen_edit_v1": (
        "qwen_edit",
        "Qwen/Qwen-Image-Edit",
        "Qwen/Qwen-Image-Edit",
        "QwenImageEditPipeline",
        "QwenImageEditInpaintPipeline",
    ),
}


@pytest.mark.parametrize("model", sorted(REAL))
def test_real_configs_name_the_real_hub_ids_and_pipeline_classes(model: str) -> None:
    import diffusers

    family_name, train_id, inpaint_id, train_cls, inpaint_cls = REAL[model]
    family = instantiate(_compose("inpaint", [f"model={model}", "prompt=x"]).model)
    assert family.family == family_name
    assert family.source("train") == train_id
    assert family.source("inpaint") == inpaint_id
    assert family.pipeline_class_name("train") == train_cls
    assert family.pipeline_class_name("inpaint") == inpaint_cls
    for cls in (train_cls, inpaint_cls):
        assert hasattr(diffusers, cls)


def test_flux_inpaint_pipeline_runs_on_the_base_model_with_its_guidance() -> None:
    family = instantiate(_compose("inpaint", ["model=flux", "model.pipeline=inpaint", "prompt=x"]).model)
    assert family.pipeline_class_name("inpaint") == "FluxInpaintPipeline"
    assert family.source("inpaint") == "black-forest-labs/FLUX.1-dev"
    assert family.inference_defaults()["guidance_scale"] == 3.5
    fill = instantiate(_compose("inpaint", ["model=flux", "prompt=x"]).model)
    assert fill.inference_defaults()["guidance_scale"] == 30.0


def test_qwen_defaults_are_the_published_ones() -> None:
    plus = _compose("inpaint", ["model=qwen_edit", "prompt=x"])
    v1 = _compose("inpaint", ["model=qwen_edit_v1", "prompt=x"])
    assert (plus.true_cfg_scale, plus.negative_prompt, plus.num_inference_steps) == (4.0, " ", 40)
    assert (v1.true_cfg_scale, v1.negative_prompt, v1.num_inference_steps) == (4.0, " ", 50)
    family = instantiate(plus.model)
    assert (family.condition_area, family.vl_condition_area) == (1024 * 1024, 384 * 384)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.pipeline=bogus", "model.pipeline"),
        ("model.quantize=fp4", "model.quantize"),
        ("model.offload=disk", "model.offload"),
        ("model.dtype=int4", "model.dtype"),
        ("model.resolution=1000", "model.resolution"),
    ],
)
def test_bad_model_settings_name_the_key(override: str, key: str) -> None:
    from stylekit import schema

    cfg = _compose("train", ["model=flux", override])
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(UsageError) as caught:
        schema.validate("train", cfg)
    assert str(caught.value).startswith(f"{override.split('=')[0]}=") and "\n" not in str(caught.value)
    assert key in str(caught.value)


def test_quantize_on_cpu_is_a_clear_error_not_a_crash() -> None:
    import torch

    from stylekit.models.base import Runtime

    family = instantiate(_compose("train", ["model=flux", "model.quantize=nf4"]).model)
    with pytest.raises(CudaRequiredError, match="model.quantize=nf4 needs a CUDA GPU"):
        family.quantization_config(Runtime("cpu", torch.float32))


@pytest.mark.parametrize("script", ["train", "inpaint"])
@pytest.mark.parametrize("flag", ["--help", "--cfg job", "--info"])
def test_config_tooling_does_not_import_torch_or_diffusers(script: str, flag: str) -> None:
    extra = ["prompt=x"] if script == "inpaint" else []
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['scripts/{script}.py', *{extra!r}, *{flag.split()!r}]\n"
        "try:\n"
        f"    runpy.run_path('scripts/{script}.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
