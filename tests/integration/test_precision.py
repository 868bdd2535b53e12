"""The precision tier: training what a CUDA run trains (bf16 weights, bf16 autocast; fp16 where the family allows
it) on the tiny models, on the CPU, through everything a real run reaches: a mid-run validation with samples, a
checkpoint, an interruption, the resume, the final fresh-pipeline check.

fp32 on the CPU hid a crash at the first mid-run validation of every real run (the sampler got accelerate's
fp32-output wrapper, and its fp32 latents met a bf16 VAE); these runs would have caught it.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stylekit.train.lora_io import WEIGHT_NAME, read_metadata

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _write_images(folder: Path, count: int, seed: int, captions: bool = True) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of sks cat number {i}")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision-data")
    return {
        "images": _write_images(root / "images", 2, seed=0),
        "controls": _write_images(root / "controls", 2, seed=50, captions=False),
        "cache": root / "cache",
    }


def _cfg(tmp: Path, data: dict[str, Path], model: str, **extra: Any) -> Any:
    settings: dict[str, Any] = {
        "model": model,
        "logger": "none",
        "data.dataset_dir": data["images"],
        "output_dir": tmp / "run",
        "trainer.checkpoint_root": tmp / "checkpoints",
        "trainer.cache_dir": data["cache"],
        "lora.rank": 4,
        "lora.alpha": 4,
        "optimizer.lr": 1e-3,
    }
    if model == "tiny_qwen_edit":
        settings["data.control_dir"] = data["controls"]
    settings.update({key.replace("__", "."): value for key, value in extra.items()})
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=[f"{k}={v}" for k, v in settings.items()])


def _sigterm_after_step(monkeypatch: pytest.MonkeyPatch, stop_after: int) -> None:
    """Deliver SIGTERM to this process right after training step `step` is logged, as a scheduler would."""
    from stylekit.tracking import NullTracker

    original = NullTracker.log

    def log(self: Any, metrics: Any, step: int) -> None:
        original(self, metrics, step=step)
        if "train/loss" in metrics and step == stop_after:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(NullTracker, "log", log)


def _interrupted_then_resumed(
    tmp: Path, data: dict[str, Path], model: str, monkeypatch: pytest.MonkeyPatch, **precision: Any
) -> tuple[Any, float]:
    """4 steps, validation with samples and a checkpoint every 2; SIGTERM while step 3 runs (the loop sees it at
    the end of that step); the same command again."""
    from stylekit.train.run import run

    settings = dict(
        trainer__max_steps=4, trainer__validate_every=2, trainer__checkpoint_every=2, trainer__val_images=1
    )
    cfg = _cfg(tmp, data, model, **settings, **precision)
    with monkeypatch.context() as patch:
        _sigterm_after_step(patch, 2)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 143
    run_dir = Path(cfg.output_dir)
    # The mid-run validation at step 2 sampled (this is where bf16 runs died), then step 3 was checkpointed.
    assert (run_dir / "samples" / "step_000002.png").is_file()
    assert sorted(p.name for p in Path(cfg.trainer.checkpoint_root).glob("train-*/checkpoint-*")) == [
        "checkpoint-00000002",
        "checkpoint-00000003",
    ]
    loss = run(cfg)  # the same command: resumes at step 3, validates at 4, saves and checks the LoRA
    return cfg, loss


def _assert_finished(cfg: Any, loss: float) -> None:
    import torch
    from safetensors.torch import load_file

    run_dir = Path(cfg.output_dir)
    assert math.isfinite(loss)
    lora = run_dir / "lora" / WEIGHT_NAME
    tensors = load_file(str(lora))
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert json.loads(read_metadata(lora)["stylekit.steps"]) == 4
    # The final grid is sampled by a fresh pipeline of the run's dtype with the saved file loaded into it.
    assert (run_dir / "samples" / "step_000004.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["validation_loss"] == pytest.approx(loss)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics if "train/loss" in row] == [1, 2, 3, 4]
    assert all(math.isfinite(row["train/loss"]) for row in metrics if "train/loss" in row)


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl", "tiny_qwen_edit"])
def test_bf16_weights_and_autocast_train_through_validation_interruption_resume_and_fresh_pipeline(
    model: str, tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, loss = _interrupted_then_resumed(
        tmp_path, data, model, monkeypatch, model__dtype="bf16", trainer__mixed_precision="bf16"
    )
    _assert_finished(cfg, loss)


def test_sdxl_fp16_weights_and_fp16_mixed_precision_train_through_interruption_and_resume(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # FLUX and Qwen-Image overflow in fp16 (black or NaN images): fp16 is an SDXL setting.
    cfg, loss = _interrupted_then_resumed(
        tmp_path, data, "tiny_sdxl", monkeypatch, model__dtype="fp16", trainer__mixed_precision="fp16"
    )
    _assert_finished(cfg, loss)


def test_bf16_autocast_is_active_in_training_steps_and_validation_samples_with_fp32_weights(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.dtype=fp32 + trainer.mixed_precision=bf16: the LoRA-bearing denoiser must run under bf16 autocast
    both when training and when sampling (accelerate's own wrapper is removed, so stylekit must provide it)."""
    import torch

    from stylekit.models.flux import FluxFamily
    from stylekit.train.run import run

    seen: dict[str, list[Any]] = {"loss": [], "sample": []}
    loss_fn, sample_fn = FluxFamily.training_loss, FluxFamily.sample

    def training_loss(self: Any, denoiser: Any, *args: Any, **kwargs: Any) -> Any:
        seen["loss"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return loss_fn(self, denoiser, *args, **kwargs)

    def sample(self: Any, pipe: Any, *args: Any, **kwargs: Any) -> Any:
        seen["sample"].append((torch.is_autocast_enabled("cpu"), pipe.transformer.dtype))
        return sample_fn(self, pipe, *args, **kwargs)

    monkeypatch.setattr(FluxFamily, "training_loss", training_loss)
    monkeypatch.setattr(FluxFamily, "sample", sample)
    cfg = _cfg(
        tmp_path,
        data,
        "tiny_flux",
        model__dtype="fp32",
        trainer__mixed_precision="bf16",
        trainer__max_steps=2,
        trainer__validate_every=1,
    )
    assert math.isfinite(run(cfg))
    assert seen["loss"] and all(entry == (True, torch.bfloat16) for entry in seen["loss"])
    # step 1 (mid-run) and the final fresh pipeline both sample under autocast, from fp32 weights
    assert len(seen["sample"]) == 2 and all(entry == (True, torch.float32) for entry in seen["sample"])


def test_validation_samples_from_prompts_encoded_once_and_never_moves_text_encoders_again(
    tmp_path: Path, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 24 GB card with Qwen nf4 fits training but not the text encoder on top: sampling must not bring it
    back. After the encoding stage no text encoder is moved, and no text encoder runs."""
    from stylekit.train.run import Session, run

    moves: list[str] = []
    calls: list[str] = []
    encode = Session.encode

    def spied_encode(self: Any, *args: Any) -> None:
        encode(self, *args)
        for name, module in self.encoders.components.items():
            if name.startswith("text_encoder") and module is not None:
                to = module.to
                module.to = lambda *a, _n=name, _to=to, **k: (moves.append(_n), _to(*a, **k))[1]
                module.register_forward_pre_hook(lambda *a, _n=name: calls.append(_n))

    monkeypatch.setattr(Session, "encode", spied_encode)
    cfg = _cfg(
        tmp_path,
        data,
        "tiny_qwen_edit",
        trainer__max_steps=2,
        trainer__validate_every=1,
        trainer__validation_prompts='["make it blue","make it red"]',
    )
    assert math.isfinite(run(cfg))
    assert len(list((Path(cfg.output_dir) / "samples").glob("step_*.png"))) == 2
    assert moves == [] and calls == []
