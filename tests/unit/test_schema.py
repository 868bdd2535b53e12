"""stylekit.schema: every key of conf/ typed and ranged in one place; Hydra's composition errors as one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stylekit import schema
from stylekit.app import composition_error_line, hydra_app, one_line_composition_errors
from stylekit.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _compose(task: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=task, overrides=overrides)


def _problems(task: str, overrides: list[str]) -> list[str]:
    with pytest.raises(UsageError) as caught:
        schema.validate(task, _compose(task, overrides))
    return str(caught.value).splitlines()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", DATA)
def test_every_shipped_config_passes(model: str, data: str) -> None:
    schema.validate("train", _compose("train", [f"model={model}", f"data={data}"]))
    schema.validate(
        "inpaint", _compose("inpaint", [f"model={model}", "prompt=x", "inpaint/preprocess=grayscale"])
    )


@pytest.mark.parametrize(
    ("group", "section"),
    [("trainer/default", schema.Trainer), ("lora/default", schema.Lora), ("optimizer/adamw", schema.Optimizer),
     ("logger/wandb", schema.Logger)],
)  # fmt: skip
def test_schema_defaults_are_the_shipped_defaults(group: str, section: type[schema.Section]) -> None:
    # A default changed in one place only would make `+key` overrides and the yaml disagree.
    shipped = yaml.safe_load((CONF / f"{group}.yaml").read_text())
    defaults = section().model_dump(by_alias=True)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items() if k in shipped} == shipped
    assert set(defaults) == set(shipped)


def test_data_schema_knows_every_data_key_and_nothing_more() -> None:
    keys = set(OmegaConf.to_container(_compose("train", ["data=tile"]).data))
    assert keys == set(schema.Data.model_fields)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a whole number >= 1"),
        ("trainer.batch_size=2.5", "trainer.batch_size=2.5 must be a whole number >= 1"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0 must be a whole number >= 1 (keep at least 1 so runs can resume)"),
        ("trainer.mixed_precision=fp8", "trainer.mixed_precision='fp8' must be one of: auto, no, bf16, fp16"),
        ("trainer.gradient_checkpointing=maybe", "trainer.gradient_checkpointing='maybe' must be one of: auto, true, false"),
        ("trainer.lr_scheduler=step", "trainer.lr_scheduler='step' must be one of: constant, linear, cosine"),
        ("trainer.timestep_sampling=beta", "trainer.timestep_sampling='beta' must be one of: sigmoid, logit_normal, uniform"),
        ("trainer.lora_format=kohya", "trainer.lora_format='kohya' must be one of: diffusers, comfyui"),
        ("trainer.logit_std=0", "trainer.logit_std=0 must be a number > 0 (e.g. 1.0)"),
        ("trainer.shift=-1", "trainer.shift=-1 must be a number > 0"),
        ("trainer.validation_steps=0", "trainer.validation_steps=0 must be a whole number >= 1 or null"),
        ("optimizer.lr=1e-4x", "optimizer.lr='1e-4x' must be a number > 0 (e.g. 1e-4; prodigy expects 1.0)"),
        ("optimizer.lr=0", "optimizer.lr=0 must be a number > 0 (e.g. 1e-4; prodigy expects 1.0)"),
        ("optimizer.name=sgd", "optimizer.name='sgd' must be one of: adamw, adamw8bit, prodigy, adafactor"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1), e.g. [0.9,0.999]"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two numbers in [0, 1), e.g. [0.9,0.999]"),
        ("lora.target_modules=[to_q,null]", "lora.target_modules=[to_q, null] must be a list of text or null"),
        ("trainer.snr_gamma=-1", "trainer.snr_gamma=-1 must be a number >= 0 or null (0 or null: off; 5.0 is usual)"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 must be a number >= 0"),
        ("lora.rank=true", "lora.rank=true must be a whole number >= 1 (e.g. 4, 16, 64)"),
        ("lora.dropout=1", "lora.dropout=1 must be a number in [0, 1)"),
        ("lora.alpha=0", "lora.alpha=0 must be a number > 0 (alpha = rank keeps the scale at 1)"),
        ("lora.target_regex='(a'", "lora.target_regex='(a': not a valid regular expression (missing ), unterminated subpattern at position 0)"),
        ("seed=abc", "seed='abc' must be a whole number"),
        ("data.crop=middle", "data.crop='middle' must be one of: center, random"),
        ("data.random_flip=2", "data.random_flip=2 must be a number in [0, 1]"),
        ("data.resolution=0", "data.resolution=0 must be a whole number >= 1"),
        ("data.caption_dropout=-0.1", "data.caption_dropout=-0.1 must be a number in [0, 1]"),
        ("data.max_upscale=0.5", "data.max_upscale=0.5 must be a number >= 1 (how much an image may be enlarged)"),
        ("logger.mode=sometimes", "logger.mode='sometimes' must be one of: auto, online, offline"),
        ("logger.backend=tensorboard", "logger.backend='tensorboard' must be one of: wandb, none"),
        ("model.dtype=fp8", "model.dtype='fp8' must be one of: auto, bf16, fp16, fp32"),
        ("model.quantize=fp4", "model.quantize='fp4' must be one of: none, nf4, int8"),
        ("model.offload=disk", "model.offload='disk' must be one of: none, model, sequential"),
        ("model.device=tpu", "model.device='tpu' must be one of: cpu, cuda or null"),
        ("model.pipeline=edit", "model.pipeline='edit' must be one of: fill, inpaint or null"),
        ("model.resolution=1000", "model.resolution=1000 must be a whole number that is a multiple of 16 (>= 16)"),
        ("model.max_sequence_length=1024", "model.max_sequence_length=1024 must be a whole number in [1, 512]"),
        ("model.inference.strength=0", "model.inference.strength=0 must be a number in (0, 1] or null (1.0 repaints the masked region fully)"),
        ("+trainer.typo=1", "trainer.typo is not a setting of trainer; its keys are: max_steps, batch_size,"),
        ("+lora.rnk=8", "lora.rnk is not a setting of lora (did you mean lora.rank?); its keys are: rank, alpha,"),
        ("+model.zzz=1", "model.zzz is not a setting of model; its keys are: _target_, pretrained,"),
    ],
)  # fmt: skip
def test_a_bad_train_value_is_one_line_naming_key_value_and_what_is_allowed(override: str, line: str) -> None:
    (problem,) = _problems("train", ["model=flux", override])
    assert problem.startswith(line), problem


@pytest.mark.parametrize(
    ("model", "override", "line"),
    [
        ("sdxl", "model.prediction_type=x0", "model.prediction_type='x0' must be one of: epsilon, v_prediction or null"),
        ("sdxl", "model.resolution=1020", "model.resolution=1020 must be a whole number that is a multiple of 8"),
        ("qwen_edit", "model.pipeline=fill", "model.pipeline='fill' must be one of: edit_plus, edit_inpaint or null"),
        ("qwen_edit", "model.condition_area=0", "model.condition_area=0 must be a whole number >= 1"),
    ],
)  # fmt: skip
def test_each_family_has_its_own_choices(model: str, override: str, line: str) -> None:
    (problem,) = _problems("train", [f"model={model}", override])
    assert problem.startswith(line), problem


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("strength=0", "strength=0 must be a number in (0, 1] or null (null for the model's default;"),
        ("num_images=0", "num_images=0 must be a whole number >= 1"),
        ("num_inference_steps=0", "num_inference_steps=0 must be a whole number >= 1 or null"),
        ("guidance_scale=high", "guidance_scale='high' must be a number >= 0 or null"),
        ("seed=1.5", "seed=1.5 must be a whole number"),
        ("inpaint.mask.threshold=0", "inpaint.mask.threshold=0 must be a number in (0, 1] (0.5 suits black/white masks)"),
        ("inpaint.mask.grow=1.5", "inpaint.mask.grow=1.5 must be a whole number (pixels; negative shrinks)"),
        ("inpaint.mask.feather=-1", "inpaint.mask.feather=-1 must be a whole number >= 0 (pixels of inward soft edge)"),
        ("inpaint.context=-1", "inpaint.context=-1 must be >= 0: a factor like 0.5 or pixels like 64px"),
        ("inpaint.context=abc", "inpaint.context='abc' must be a factor like 0.5 or pixels like 64px"),
        ("inpaint.context=64", "inpaint.context=64 is a factor of the mask's box and must be at most 4; for pixels write inpaint.context=64px"),
        ("inpaint.max_upscale=0.5", "inpaint.max_upscale=0.5 must be a number >= 1"),
    ],
)  # fmt: skip
def test_a_bad_inpaint_value_is_one_line(override: str, line: str) -> None:
    (problem,) = _problems("inpaint", ["prompt=x", override])
    assert problem.startswith(line), problem


def test_a_family_of_your_own_gets_the_shared_checks_and_keeps_its_own_keys() -> None:
    overrides = ["model._target_=my_models.Mine", "+model.my_knob=3"]
    schema.validate("train", _compose("train", overrides))
    (problem,) = _problems("train", [*overrides, "model.dtype=fp8"])
    assert problem.startswith("model.dtype='fp8' must be one of: auto, bf16, fp16, fp32")


class _MyFlux(__import__("stylekit.models.flux", fromlist=["FluxFamily"]).FluxFamily):
    """A family of one's own built on FLUX."""


def test_a_subclass_of_a_shipped_family_keeps_its_pipelines_and_pixel_grid() -> None:
    target = f"{__name__}._MyFlux"
    schema.validate("train", _compose("train", ["model=flux", f"model._target_={target}", "+model.knob=1"]))
    problems = _problems(
        "train", ["model=flux", f"model._target_={target}", "model.pipeline=edit", "model.resolution=1000"]
    )
    assert [p.split("=")[0] for p in problems] == ["model.pipeline", "model.resolution"]


def test_inpaint_needs_a_prompt() -> None:
    assert (
        _problems("inpaint", [])
        == _problems("inpaint", ["prompt=null"])
        == ['prompt is required; pass prompt="what to paint in the masked region"']
    )


def test_every_problem_is_reported_together_one_line_each() -> None:
    overrides = ["trainer.max_steps=0", "optimizer.lr=-1", "lora.rank=0", "model.dtype=x", "data.crop=x"]
    problems = _problems("train", overrides)
    assert [p.split("=")[0] for p in problems] == ["data.crop", "lora.rank", "optimizer.lr", "trainer.max_steps",
                                                    "model.dtype"]  # fmt: skip


def test_a_long_list_is_cut_to_a_screen() -> None:
    overrides = [f"trainer.{k}=0" for k in ("max_steps", "batch_size", "gradient_accumulation_steps",
                 "checkpoint_every", "keep_checkpoints", "validate_every", "logit_std", "shift")]  # fmt: skip
    overrides += [
        "lora.rank=0",
        "lora.alpha=0",
        "optimizer.lr=0",
        "optimizer.eps=0",
        "data.resolution=0",
        "seed=x",
    ]
    problems = _problems("train", overrides)
    assert len(problems) == schema.MAX_LISTED + 1 and problems[-1] == "... and 2 more"


@pytest.mark.parametrize("override", ["logger.tags=null", "trainer.snr_gamma=0", "trainer.snr_gamma=null",
                                      "trainer.max_grad_norm=null", "data.random_flip=false"])  # fmt: skip
def test_values_that_mean_off_are_accepted(override: str) -> None:
    schema.validate("train", _compose("train", [override]))


def test_a_false_flag_becomes_a_number_too() -> None:
    cfg = _compose("train", ["data.random_flip=false"])
    schema.validate("train", cfg)
    assert cfg.data.random_flip == 0.0 and type(cfg.data.random_flip) is float


def test_a_normalized_interpolated_value_is_replaced_by_its_clean_value() -> None:
    cfg = _compose("inpaint", ["prompt=x", "model=sdxl", "model.inference.negative_prompt=123"])
    schema.validate("inpaint", cfg)
    assert cfg.negative_prompt == "123" and cfg.model.inference.negative_prompt == "123"


def test_a_read_only_config_is_checked_and_normalized() -> None:
    cfg = _compose("train", ["data.trigger=42"])
    OmegaConf.set_readonly(cfg, True)
    schema.validate("train", cfg)
    assert cfg.data.trigger == "42" and OmegaConf.is_readonly(cfg)


def test_a_config_with_hydras_node_is_checked_without_it() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["lora.rank=0"], return_hydra_config=True)
    assert _problems_of(cfg) == ["lora.rank=0 must be a whole number >= 1 (e.g. 4, 16, 64)"]


def _problems_of(cfg) -> list[str]:
    with pytest.raises(UsageError) as caught:
        schema.validate("train", cfg)
    return str(caught.value).splitlines()


def test_clean_values_are_written_back() -> None:
    cfg = _compose(
        "train", ["data.trigger=42", "data.random_flip=true", "trainer.max_steps=8.0", "lora.alpha=4"]
    )
    schema.validate("train", cfg)
    assert cfg.data.trigger == "42" and cfg.data.random_flip == 0.5
    assert cfg.trainer.max_steps == 8 and type(cfg.trainer.max_steps) is int
    assert (
        cfg.lora.alpha == 4 and type(cfg.lora.alpha) is int
    )  # a whole number where a float fits stays as given
    assert OmegaConf.to_container(cfg.data)["resolution"] == "${model.resolution}"  # interpolations untouched


def test_an_unresolvable_output_dir_outside_the_app_is_not_a_schema_error() -> None:
    # ${hydra:runtime.output_dir} resolves only inside a running Hydra app; the task says what to do.
    cfg = _compose("train", [])
    with pytest.raises(Exception):  # noqa: B017
        str(cfg.output_dir)
    schema.validate("train", cfg)


def test_a_mapping_of_data_keys_gets_the_same_messages() -> None:
    from stylekit.data.transforms import DataOptions

    with pytest.raises(UsageError, match=r"^data\.repeats=0 must be a whole number >= 1$"):
        DataOptions.from_cfg({"repeats": 0})


# --------------------------------------------------------------------------- Hydra's composition errors


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "model=nope",
            "model=nope is not an option of model; pick one of: flux, qwen_edit, qwen_edit_v1, sdxl,",
        ),
        (
            "hydra/launcher=nope",
            "hydra/launcher=nope is not an option of hydra/launcher; pick one of: basic,",
        ),
        ("trainer.typo=1", "trainer.typo is not a setting of trainer; its keys are: max_steps, batch_size,"),
        (
            "modl=flux",
            "modl is not a setting of the config (did you mean model?); its keys are: model, data, lora,",
        ),
        ("trainer.max_steps=[1", "an override does not parse (no viable alternative at input '[1')"),
        ("data.tile_size=512", "data.tile_size is a setting of data=tile only; add data=tile to use it"),
        (
            "hydra.job.chdir=maybe",
            "Error merging override hydra.job.chdir=maybe; Value 'maybe' is not a valid bool",
        ),
    ],
)
def test_composition_errors_are_one_line_and_exit_2(
    override: str, line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["stylekit finetune", override])
    with pytest.raises(SystemExit) as caught:
        hydra_app("train")()
    assert caught.value.code == 2
    (printed,) = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(f"error: {line}"), printed


def test_the_hydra_hook_is_removed_afterwards() -> None:
    from hydra._internal import utils as hydra_utils

    before = hydra_utils.run_and_report
    with one_line_composition_errors():
        assert hydra_utils.run_and_report is not before
    assert hydra_utils.run_and_report is before


def test_a_missing_config_message_is_rewritten_from_hydras_own_exception() -> None:
    # Pins what the rewrite relies on: Hydra's exception carries the group and its options.
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as caught:
        _compose("train", ["data=nope"])
    assert (
        composition_error_line(caught.value)
        == "data=nope is not an option of data; pick one of: resize, tile"
    )


def _exit_of(task: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", [f"stylekit {task}", *argv])
    with pytest.raises(SystemExit) as caught:
        hydra_app(task)()
    captured = capsys.readouterr()
    return caught.value.code, captured.err.strip().splitlines(), captured.out


def test_a_modal_sweep_with_a_bad_job_stops_before_any_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-m", "hydra/launcher=modal", "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path}",
            "model=tiny_flux", "lora.rank=0,4", "trainer.max_steps=2,0"]  # fmt: skip
    code, lines, out = _exit_of("train", argv, monkeypatch, capsys)
    assert code == 2
    assert [line for line in lines if "#" in line and " must be " in line] == [
        "error: job #0 (model=tiny_flux lora.rank=0 trainer.max_steps=2): lora.rank=0 must be a whole number >= 1 (e.g. 4, 16, 64)",
        "job #1 (model=tiny_flux lora.rank=0 trainer.max_steps=0): lora.rank=0 must be a whole number >= 1 (e.g. 4, 16, 64)",
        "job #1 (model=tiny_flux lora.rank=0 trainer.max_steps=0): trainer.max_steps=0 must be a whole number >= 1",
        "job #3 (model=tiny_flux lora.rank=4 trainer.max_steps=0): trainer.max_steps=0 must be a whole number >= 1",
    ]  # fmt: skip
    assert "dry run" not in out  # the launch stopped before its plan


def test_a_bad_launcher_setting_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-m", "hydra/launcher=modal", "hydra.launcher.backend=nope", f"hydra.sweep.dir={tmp_path}"]
    code, lines, _ = _exit_of("train", argv, monkeypatch, capsys)
    assert code == 2 and lines[-1] == "error: hydra.launcher.backend='nope': expected one of modal, local"
    assert not any("Traceback" in line for line in lines)


def test_a_crash_while_handling_a_usage_error_is_still_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra._internal import utils as hydra_utils

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def task() -> None:
        try:
            raise UsageError("a usage error")
        except UsageError:
            {}["missing"]  # noqa: B018

    with one_line_composition_errors(), pytest.raises(SystemExit) as caught:
        hydra_utils.run_and_report(task)
    assert caught.value.code == 1  # Hydra's own report of a crash, not a usage error's exit 2


def test_inpaint_reports_bad_settings_together_with_the_missing_files(tmp_path: Path) -> None:
    from stylekit.inpaint import run as inpaint_run

    missing = tmp_path / "nope.png"
    cfg = _compose("inpaint", ["prompt=x", "num_images=0", f"image='{missing}'", f"output_dir='{tmp_path}'"])
    with pytest.raises(UsageError) as caught:
        inpaint_run.prepare(cfg)
    assert str(caught.value).splitlines() == [
        "num_images=0 must be a whole number >= 1",
        f"image={missing} does not exist; check the path",
    ]
