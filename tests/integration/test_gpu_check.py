"""bench/gpu_check.py, the one-command proof of the CUDA paths, in its CPU dry run; and the CUDA-path behaviour
it found that a CPU run can show (bf16 weights + bf16 autocast, as a GPU run trains by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stylekit.train.run import run

ROOT = Path(__file__).resolve().parents[2]


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
