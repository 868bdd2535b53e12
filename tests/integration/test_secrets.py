"""Secrets in the environment never reach a file: a tiny training run logged to W&B (offline) and an inpaint run
with HF_TOKEN, WANDB_API_KEY and MODAL_TOKEN_SECRET set to sentinel values, then every byte of every file they
wrote (run dirs, Hydra's .hydra/*.yaml and log, checkpoints, the latent cache, the offline W&B run and W&B's own
cache, config and staging folders) is searched for the sentinels.

A secret typed on the command line as a key of its own (`+hf_token=...`) is refused by the config schema before
the run starts, and the refusal does not repeat the value. (Hydra has already recorded the command line in the
run dir's .hydra/ by then; users turn that off with hydra.output_subdir=null.)

W&B stays offline throughout (WANDB_MODE=offline); MODAL_TOKEN_ID is never set, so nothing tries to reach Modal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from stylekit.inpaint import run as inpaint_run
from stylekit.train.lora_io import WEIGHT_NAME
from stylekit.train.run import run as train_run

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
SENTINELS = {
    "HF_TOKEN": "hf_SENTINELtoken7f3a9c21",
    "WANDB_API_KEY": "SENTINELwandbkey0123456789abcdef01234567",
    "MODAL_TOKEN_SECRET": "as-SENTINELmodal5d8e2b",
}
TYPED = "SENTINELtypedOnTheCommandLine4411"  # passed as +hf_token=...


def _write_inputs(root: Path) -> dict[str, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a photo of sks cat {i}")
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:100] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return {"images": images, "photo": images / "img0.png", "mask": root / "mask.png"}


def _wandb_home(root: Path) -> dict[str, str]:
    """W&B's cache, config, data and artifact-staging folders inside the test's tmp dir, so they are searched."""
    names = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
    return {name: str(root / "wandb-home" / name.lower()) for name in names}


def _train_overrides(root: Path, inputs: dict[str, Path]) -> list[str]:
    return [
        "model=tiny_flux",
        "logger=wandb",
        f"data.dataset_dir={inputs['images']}",
        f"trainer.checkpoint_root={root / 'checkpoints'}",
        f"trainer.cache_dir={root / 'cache'}",
        "trainer.max_steps=2",
        "trainer.checkpoint_every=1",
        "trainer.validate_every=1",  # validation samples (and their W&B images) at every step
        "lora.rank=4",
        "lora.alpha=4",
        "data.trigger=sks",
    ]


def _inpaint_overrides(inputs: dict[str, Path]) -> list[str]:
    return [
        "model=tiny_flux",
        "prompt=a red cat",
        f"image={inputs['photo']}",
        f"mask={inputs['mask']}",
        "save_comparison=true",
    ]


def leaks(root: Path, *values: str) -> list[str]:
    """'<value> in <file>' for every regular file under root (links not followed) holding one of the values."""
    found, searched = [], 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            searched += 1
            found += [f"{value} in {path.relative_to(root)}" for value in values if value.encode() in data]
    assert searched, f"no files under {root}"
    return found


def test_secrets_in_the_environment_reach_no_file_of_a_training_and_an_inpaint_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In this process (the run functions, no Hydra app): every file."""
    inputs = _write_inputs(tmp_path / "inputs")
    for name, value in {**SENTINELS, **_wandb_home(tmp_path), "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        train_cfg = compose(
            "train", [*_train_overrides(tmp_path, inputs), f"output_dir={tmp_path / 'train'}"]
        )
        inpaint_cfg = compose("inpaint", [*_inpaint_overrides(inputs), f"output_dir={tmp_path / 'inpaint'}"])
    train_run(train_cfg)
    inpaint_run.run(inpaint_cfg)

    run_dir = tmp_path / "train"
    assert (run_dir / "lora" / WEIGHT_NAME).is_file() and (tmp_path / "inpaint" / "img0_edited.png").is_file()
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # Not vacuous: the W&B record holds the config and the metrics in plain bytes.
    assert b"sks" in record.read_bytes() and b"train/loss" in record.read_bytes()
    assert list((tmp_path / "checkpoints").rglob("optim.pt")) and list(
        (tmp_path / "cache").rglob("*.safetensors")
    )
    assert leaks(tmp_path, *SENTINELS.values()) == []


@pytest.mark.parametrize("task", ["train", "inpaint"])
def test_a_secret_typed_as_a_key_of_its_own_is_refused_without_repeating_it(
    task: str, tmp_path: Path
) -> None:
    from stylekit import schema
    from stylekit.errors import UsageError

    inputs = _write_inputs(tmp_path / "inputs")
    overrides = _train_overrides(tmp_path, inputs) if task == "train" else _inpaint_overrides(inputs)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(task, [*overrides, f"+hf_token={TYPED}"])
    with pytest.raises(UsageError) as caught:
        schema.validate(task, cfg)
    assert str(caught.value).startswith("hf_token is not a setting of the config") and TYPED not in str(
        caught.value
    )


def _env(root: Path) -> dict[str, str]:
    env = {**os.environ, **SENTINELS, **_wandb_home(root)}
    env.pop("MODAL_TOKEN_ID", None)  # with it, modal would try to authenticate
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        NETRC=str(root / "no-netrc"),
        HOME=str(root / "home"),  # anything written under ~ is searched too
    )
    return env


@pytest.mark.slow
def test_secrets_reach_no_file_written_by_the_real_commands(
    tmp_path: Path,
) -> None:
    inputs = _write_inputs(tmp_path / "inputs")
    (tmp_path / "home").mkdir()
    train = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        *_train_overrides(tmp_path, inputs),
        f"hydra.run.dir={tmp_path / 'train'}",
    ]
    inpaint = [
        sys.executable,
        str(ROOT / "scripts" / "inpaint.py"),
        *_inpaint_overrides(inputs),
        f"hydra.run.dir={tmp_path / 'inpaint'}",
    ]
    env = _env(tmp_path)
    # Both at once: each pays ~20 s of imports on a busy machine.
    processes = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        for args in (train, inpaint)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()[-3000:]
        for value in SENTINELS.values():
            assert value.encode() not in stdout + stderr

    run_dir = tmp_path / "train"
    assert (run_dir / "lora" / WEIGHT_NAME).is_file() and (tmp_path / "inpaint" / "img0_edited.png").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "train.log").is_file() and (tmp_path / "inpaint" / "inpaint.log").is_file()
    assert leaks(tmp_path, *SENTINELS.values()) == []
