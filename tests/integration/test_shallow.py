"""The shallow tier: each family's denoiser at the real checkpoint's widths with one or two blocks (model=shallow_*),
trained one bf16 step with bf16 autocast and sampled, on CPU, through scripts/train.py as a user runs it.

Tiny configs use one width everywhere, so a joint-attention width passed where a pooled width belongs, or an
added-embedding size computed from the wrong encoder, goes unnoticed; here every width is the real one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylekit.train.lora_io import WEIGHT_NAME

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "train.py")

# LoRA modules the family presets wrap in the shallow denoisers: FLUX 1 double block x 12 + 1 single x 4;
# SDXL 7 transformer blocks (down 2, mid 1, up 4) x 2 attentions x 4; Qwen-Image 1 block x 12.
SHALLOW_TARGET_MODULES = {"shallow_flux": 16, "shallow_sdxl": 56, "shallow_qwen_edit": 12}


def _write_images(folder: Path, count: int, seed: int, captions: bool) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of [trigger] cat number {i}")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(SHALLOW_TARGET_MODULES))
def test_real_width_denoiser_trains_a_bf16_step_and_samples(model: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    images = _write_images(tmp_path / "images", 2, seed=0, captions=True)
    args = [
        sys.executable,
        SCRIPT,
        f"model={model}",
        "model.dtype=bf16",
        "trainer.mixed_precision=bf16",
        "logger=none",
        f"data.dataset_dir={images}",
        "data.trigger=sks",
        "trainer.max_steps=1",
        # 64 px and short captions: a real-width block costs seconds per token on a CPU in bf16.
        "data.resolution=64",
        "lora.rank=4",
        "lora.alpha=4",
        f"trainer.checkpoint_root={tmp_path / 'checkpoints'}",
        f"trainer.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    if model == "shallow_flux":
        args.append("model.max_sequence_length=16")
    if model == "shallow_qwen_edit":
        args.append(f"data.control_dir={_write_images(tmp_path / 'controls', 2, seed=1, captions=False)}")
        args.append("model.condition_area=4096")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "train.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    output = log_path.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, output[-4000:]
    # Measured, for the report and for whoever sizes CI: wall time and peak RSS of the whole run.
    print(f"{model}: {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB")

    run_dir = tmp_path / "run"
    with safe_open(str(run_dir / "lora" / WEIGHT_NAME), framework="pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 - safe_open has no iter
        dtypes = {str(handle.get_tensor(key).dtype) for key in keys}
    assert len(keys) == 2 * SHALLOW_TARGET_MODULES[model]
    assert dtypes == {"torch.float32"}  # LoRA weights train in fp32 on the bf16 model
    assert list((run_dir / "samples").glob("step_*.png")), "no validation sample was written"
    assert re.search(r"validation loss \d", output), output[-2000:]
