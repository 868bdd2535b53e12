"""The `stylekit` console script: parsing, forwarding overrides to the Hydra apps, edit naming, doctor."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stylekit import cli

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(cli, "_run", lambda task, overrides: calls.append((task, overrides)))
    return calls


def test_finetune_forwards_overrides_in_order(captured: list) -> None:
    result = runner.invoke(cli.app, ["finetune", "model=tiny_flux", "lora.rank=4", "optimizer.lr=3e-4"])
    assert result.exit_code == 0, result.output
    assert captured == [("train", ["model=tiny_flux", "lora.rank=4", "optimizer.lr=3e-4"])]


def test_finetune_multirun_flag_reaches_hydra(captured: list) -> None:
    result = runner.invoke(cli.app, ["finetune", "-m", "lora.rank=4,8"])
    assert result.exit_code == 0, result.output
    assert captured == [("train", ["--multirun", "lora.rank=4,8"])]


def test_config_file_settings_come_first_and_pick_groups(captured: list, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: tiny_sdxl\nlora:\n  rank: 8\ndata:\n  dataset_dir: /my photos\ntrainer:\n"
        "  validation_prompts: [a cat, a dog]\n"
    )
    result = runner.invoke(cli.app, ["finetune", "--config", str(config), "lora.rank=32"])
    assert result.exit_code == 0, result.output
    task, overrides = captured[0]
    assert overrides == [
        "model=tiny_sdxl",
        "lora.rank=8",
        'data.dataset_dir="/my photos"',
        'trainer.validation_prompts=["a cat","a dog"]',
        "lora.rank=32",
    ]


def test_missing_config_file_is_exit_2_with_one_line(captured: list, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["finetune", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in result.output
    assert "Traceback" not in result.output


def test_help_lists_the_most_used_options_with_defaults() -> None:
    result = runner.invoke(cli.app, ["finetune", "--help"])
    assert result.exit_code == 0
    for text in ("lora.rank=16", "optimizer.lr=1e-4", "trainer.max_steps=1000", "data=resize"):
        assert text in result.output
    result = runner.invoke(cli.app, ["inpaint", "--help"])
    for text in ("model=qwen_edit", "lora_weights", "inpaint/preprocess=none|grayscale"):
        assert text in result.output


@pytest.mark.parametrize("style", ["underscores", "dashes"])
def test_edit_writes_beside_the_original_by_default(captured: list, tmp_path: Path, style: str) -> None:
    image, mask = tmp_path / "photo one.jpg", tmp_path / "mask.png"
    image.write_bytes(b"x")
    mask.write_bytes(b"x")
    sep = "_" if style == "underscores" else "-"
    args = [
        "edit",
        f"--original{sep}image",
        str(image),
        f"--mask{sep}image",
        str(mask),
        "--prompt",
        "floral dress",
    ]
    result = runner.invoke(cli.app, [*args, "num_inference_steps=2"])
    assert result.exit_code == 0, result.output
    task, overrides = captured[0]
    assert task == "inpaint"
    assert overrides[0] == "model=qwen_edit"
    assert f'image="{image.resolve()}"' in overrides
    assert 'prompt="floral dress"' in overrides
    assert f"output_dir={tmp_path.resolve()}" in overrides
    assert overrides[-1] == "num_inference_steps=2"


def test_edit_output_dir_and_model_override(captured: list, tmp_path: Path) -> None:
    image, mask = tmp_path / "a.png", tmp_path / "m.png"
    image.write_bytes(b"x")
    mask.write_bytes(b"x")
    out = tmp_path / "out"
    args = ["edit", "--original_image", str(image), "--mask_image", str(mask), "--prompt", "x"]
    result = runner.invoke(cli.app, [*args, "--output-dir", str(out), "model=tiny_qwen_edit"])
    assert result.exit_code == 0, result.output
    overrides = captured[0][1]
    assert "model=qwen_edit" not in overrides
    assert "model=tiny_qwen_edit" in overrides
    assert f"output_dir={out.resolve()}" in overrides


def test_edit_with_a_missing_image_is_exit_2_naming_the_flag(captured: list, tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    mask.write_bytes(b"x")
    args = [
        "edit",
        "--original_image",
        str(tmp_path / "gone.png"),
        "--mask_image",
        str(mask),
        "--prompt",
        "x",
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2
    assert "--original_image" in result.output and "gone.png" in result.output
    assert captured == []


def test_doctor_without_cuda_reports_and_never_prints_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = "hf_sentinel_secret_0123456789"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    result = runner.invoke(cli.app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output
    assert "No CUDA device" in result.output
    assert "Hugging Face credentials: yes ($HF_TOKEN)" in result.output
    assert sentinel not in result.output


def test_doctor_tells_which_families_fit() -> None:
    from stylekit.doctor import fits

    assert fits(0) == {"flux": [], "sdxl": [], "qwen_edit": []}
    assert "train nf4" in fits(24)["flux"] and "train bf16" not in fits(24)["flux"]
    assert "inpaint bf16" in fits(80)["qwen_edit"]


def test_edit_runs_50_steps_unless_told_otherwise(captured: list, tmp_path: Path) -> None:
    image, mask = tmp_path / "a.png", tmp_path / "m.png"
    image.write_bytes(b"x")
    mask.write_bytes(b"x")
    args = ["edit", "--original_image", str(image), "--mask_image", str(mask), "--prompt", "x"]
    assert runner.invoke(cli.app, args).exit_code == 0
    assert "num_inference_steps=50" in captured[0][1]
    assert runner.invoke(cli.app, [*args, "num_inference_steps=2"]).exit_code == 0
    steps = [o for o in captured[1][1] if o.startswith("num_inference_steps=")]
    assert steps == ["num_inference_steps=2"]
