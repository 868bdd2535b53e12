"""bench/gpu_check.py, the one-command proof of the CUDA paths, in its CPU dry run; and the CUDA-path behaviour
it found that a CPU run can show (bf16 weights + bf16 autocast, as a GPU run trains by default)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from bench import gpu_check
from stylekit.train.run import run

ROOT = Path(__file__).resolve().parents[2]


def gpu_check_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _images(folder: Path, count: int, side: int = 64) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        rgb = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks cat {i}")
    return folder


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl", "tiny_qwen_edit"])
def test_bf16_mixed_precision_training_samples_at_a_mid_run_validation(model: str, tmp_path: Path) -> None:
    # accelerate's autocast wrapper hands fp32 predictions to the sampling loop; a bf16 VAE then refused them.
    data = _images(tmp_path / "data", 2)
    overrides = [f"model={model}", "model.dtype=bf16", "trainer.mixed_precision=bf16", "logger=none",
                 f"data.dataset_dir={data}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2",
                 "trainer.validate_every=1", "trainer.validation_steps=2", "trainer.checkpoint_every=2",
                 f"trainer.checkpoint_root={tmp_path / 'ckpt'}", f"trainer.cache_dir={tmp_path / 'cache'}",
                 "lora.rank=4"]  # fmt: skip
    if model == "tiny_qwen_edit":
        overrides.append(f"data.control_dir={_images(tmp_path / 'controls', 2)}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run(cfg)
    sample = tmp_path / "run" / "samples" / "step_000001.png"
    assert sample.is_file()
    assert np.asarray(Image.open(sample)).std() > 0.5  # an image, not one flat colour


def test_training_runs_in_one_process_may_use_different_mixed_precision(tmp_path: Path) -> None:
    # A sweep over trainer.mixed_precision, a reused Modal container or a GPU check runs several jobs in one
    # process; accelerate keeps its first precision process-wide and refused any other.
    data = _images(tmp_path / "data", 1)
    for precision in ("no", "bf16"):
        overrides = [
            "model=tiny_sdxl", f"trainer.mixed_precision={precision}", "logger=none", f"data.dataset_dir={data}",
            f"output_dir={tmp_path / precision}", "trainer.max_steps=1", "trainer.resume=never",
            f"trainer.checkpoint_root={tmp_path / 'ckpt'}", f"trainer.cache_dir={tmp_path / 'cache'}", "lora.rank=4",
        ]  # fmt: skip
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        run(cfg)
        assert (tmp_path / precision / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ---- bench/gpu_check.py's CPU dry run ----------------------------------------------------------------------


def _dry_run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "out"
    code = gpu_check.main(["--tiny", "--cpu", "--edit-steps", "2", "--budget-s", "3600", "--out-dir", str(out),
                           "--work-dir", str(tmp_path / "work"), *args])  # fmt: skip
    raw = json.loads((out / "gpu_results.json").read_text())
    failed = [(r["model"], r["case"], r["note"]) for r in raw["results"] if r["status"] == "FAIL"]
    assert code == 0 and not failed, failed
    return raw, (out / "GPU_RESULTS.md").read_text()


def _statuses(raw: dict) -> dict[str, str]:
    return {f"{r['model']} {r['case']}": r["status"] for r in raw["results"]}


def test_cpu_dry_run_trains_resumes_edits_and_shows_the_oom_advice(tmp_path: Path) -> None:
    raw, table = _dry_run(tmp_path, "--families", "flux")
    assert _statuses(raw) == {
        "tiny_flux train-bf16": "ok",  # validation at 2, checkpoints 2 and 4, a rerun resumed at 5
        "tiny_flux train-nf4": "refused",  # bitsandbytes quantization is CUDA-only: the one-line message
        "tiny_flux train-int8": "refused",
        "tiny_flux edit-fill-bf16": "ok",  # with the LoRA just trained; outside the mask bit-exact
        "tiny_flux edit-inpaint-bf16": "ok",
        "tiny_flux edit-offload-model": "skipped",
        "tiny_flux edit-offload-sequential": "skipped",
        "tiny_flux edit-nf4": "refused",
        "tiny_flux oom-train": "ok",  # scripts/train.py: exit 2, the advice last, no traceback, no LoRA
        "tiny_flux oom-inpaint": "ok",  # scripts/inpaint.py: exit 2, the advice last, no PNG
    }
    by_case = {r["case"]: r for r in raw["results"]}
    assert by_case["train-bf16"]["s_per_step"] > 0
    assert by_case["train-bf16"]["details"]["checkpoints"] == [2, 4, 6]
    assert by_case["edit-fill-bf16"]["s_per_edit"] > 0 and by_case["edit-fill-bf16"]["details"]["lora"]
    assert by_case["oom-train"]["note"].startswith("CUDA ran out of memory training flux")
    assert by_case["oom-inpaint"]["note"].startswith("CUDA ran out of memory editing photo.png")
    assert raw["header"]["device"] == "cpu" and raw["header"]["torch"]
    assert "CPU dry run" in table and "| tiny_flux | train-bf16 | ok |" in table


@pytest.mark.slow
def test_cpu_dry_run_of_sdxl_and_qwen_edit(tmp_path: Path) -> None:
    raw, _ = _dry_run(tmp_path, "--families", "sdxl,qwen_edit", "--cases", "train-*,edit-*")
    statuses = _statuses(raw)
    assert statuses["tiny_sdxl train-bf16"] == statuses["tiny_qwen_edit train-bf16"] == "ok"
    assert statuses["tiny_sdxl edit-inpaint-bf16"] == "ok"
    assert (
        statuses["tiny_qwen_edit edit-edit_plus-bf16"]
        == statuses["tiny_qwen_edit edit-edit_inpaint-bf16"]
        == "ok"
    )
    assert statuses["tiny_sdxl edit-nf4"] == statuses["tiny_qwen_edit train-int8"] == "refused"


@pytest.mark.slow
def test_cpu_dry_run_oom_cases_of_sdxl_and_qwen_edit(tmp_path: Path) -> None:
    raw, _ = _dry_run(tmp_path, "--families", "sdxl,qwen_edit", "--cases", "oom-*")
    assert set(_statuses(raw).values()) == {"ok"} and len(raw["results"]) == 4


def test_a_model_config_not_in_the_checkout_is_recorded_as_skipped(tmp_path: Path) -> None:
    check_run = gpu_check.Check(
        work=tmp_path, out_dir=tmp_path / "out", cuda=False, budget_s=60, edit_steps=2, oom_cap_gib=1,
        cases=["*"], header={"date": "", "device": "cpu"} | dict.fromkeys(
            ("torch", "python", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core")),
        command="test",
    )  # fmt: skip
    gpu_check.run_model(check_run, "shallow_not_built_yet")
    assert {r.status for r in check_run.results} == {"skipped"}
    assert "conf/model/shallow_not_built_yet.yaml is not in this checkout" in check_run.results[0].note
    assert (
        "| shallow_not_built_yet | train-bf16 | skipped |"
        in (tmp_path / "out" / "GPU_RESULTS.md").read_text()
    )


def _child(returncode: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["x"], returncode, "", stderr)


ADVICE = "error: CUDA ran out of memory editing a.png at 8192x8192; try model.offload=model"


@pytest.mark.parametrize(
    ("child", "partial", "why"),
    [
        (
            _child(1, "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory"),
            [],
            "exit code 1",
        ),
        (_child(2, "error: model.dtype='x' is not one of"), [], "not the advice"),
        (_child(2, f"Traceback (most recent call last):\n{ADVICE}"), [], "a traceback"),
        (_child(2, ADVICE), [Path("out/.a_edited.png.0123456789ab.tmp")], "partial output"),
    ],
)
def test_oom_judge_fails_what_the_user_must_not_see(child, partial, why: str) -> None:
    with pytest.raises(gpu_check.CheckFailed, match=why):
        gpu_check.judge_oom(child, partial)
    assert gpu_check.judge_oom(_child(2, f"some warning\n{ADVICE}\n"), []) == ADVICE


@pytest.mark.skipif(gpu_check_has_cuda(), reason="on a CUDA machine the check would run")
def test_without_cuda_the_check_asks_for_the_cpu_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--tiny"]) == 2
    assert "--tiny --cpu is its CPU dry run" in capsys.readouterr().err


def test_cuda_out_of_memory_while_loading_a_lora_gives_the_memory_advice(tmp_path: Path, monkeypatch) -> None:
    # torch.OutOfMemoryError is a RuntimeError: it read as "is it a LoRA for this base model?".
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline

    from stylekit.errors import UsageError
    from stylekit.inpaint import run as inpaint_run

    def oom(*args, **kwargs) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "load_lora_weights", oom)
    image, mask = gpu_check.edit_inputs(tmp_path, 64)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    overrides = ["model=tiny_sdxl", "prompt=a red scarf", f"image={image}", f"mask={mask}",
                 f"output_dir={tmp_path / 'out'}", f"lora_weights={lora}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="inpaint", overrides=overrides)
    with pytest.raises(
        UsageError,
        match="CUDA ran out of memory loading lora_weights entry .*style.safetensors.*model.offload=model",
    ):
        inpaint_run.run(cfg)
    assert not list((tmp_path / "out").glob("*.png"))
