"""Several processes (DDP): what `accelerate launch scripts/train.py ...` does on a multi-GPU machine, run here as
two CPU processes over gloo on the tiny models.

The two-process runs are real `accelerate launch` subprocesses (`slow`: each process pays its imports). They go
through a small wrapper that runs scripts/train.py unchanged and records, per rank, what the run did: DDP
gradient all-reduces (a counting comm hook), cache entries encoded, class images written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pictures import captioned_images, picture
from PIL import Image

from stylekit.train.checkpoint import is_complete
from stylekit.train.lora_io import WEIGHT_NAME

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
SCRIPT = ROOT / "scripts" / "train.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"

# Runs scripts/train.py exactly as `accelerate launch` would, after installing probes that count, per rank, what
# the run did; the counts land in $PROBE_DIR/rank-<r>.json when the process exits (normally or by sys.exit).
WRAPPER = """
import atexit, json, os, runpy, sys, time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import stylekit.io
from stylekit.train.cache import TensorCache

rank = int(os.environ["RANK"])
Path(os.environ["PROBE_DIR"], f"pid-{rank}").write_text(str(os.getpid()))
counts = {"synced_backwards": 0, "bucket_allreduces": 0, "cache_writes": 0, "class_images": []}
atexit.register(lambda: Path(os.environ["PROBE_DIR"], f"rank-{rank}.json").write_text(json.dumps(counts)))
delay = float(os.environ.get("PROBE_ALLREDUCE_DELAY", "0"))

def counting_hook(state, bucket):
    counts["bucket_allreduces"] += 1
    counts["synced_backwards"] += int(bucket.is_last())
    time.sleep(delay)  # a slow interconnect: keeps the run going long enough to be interrupted
    return default_hooks.allreduce_hook(state, bucket)

prepare = Accelerator.prepare
def prepare_with_probe(self, *args, **kwargs):
    prepared = prepare(self, *args, **kwargs)
    for item in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(item, torch.nn.parallel.DistributedDataParallel):
            item.register_comm_hook(None, counting_hook)
    return prepared
Accelerator.prepare = prepare_with_probe

write = TensorCache._write
def write_with_probe(self, path, tensors):
    counts["cache_writes"] += 1
    return write(self, path, tensors)
TensorCache._write = write_with_probe

atomic_write_bytes = stylekit.io.atomic_write_bytes
def atomic_write_bytes_with_probe(path, data, *args, **kwargs):
    if Path(path).name.startswith("class_"):
        counts["class_images"].append(Path(path).name)
    return atomic_write_bytes(path, data, *args, **kwargs)
stylekit.io.atomic_write_bytes = atomic_write_bytes_with_probe

if rank == 1:  # a rank that starts a little later, as they do: its Hydra resolves ${now:...} a second later
    time.sleep(float(os.environ.get("PROBE_RANK1_DELAY", "0")))
sys.argv = [os.environ["PROBE_SCRIPT"], *sys.argv[1:]]
runpy.run_path(os.environ["PROBE_SCRIPT"], run_name="__main__")
"""


# ---- helpers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("ddp-data") / "images")


@pytest.fixture(scope="module")
def controls(images: Path) -> Path:
    """Source images for the edit family, matched to `images` by file name."""
    folder = images.parent / "controls"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(picture(100 + i)).save(folder / f"img{i}.png")
    return folder


def _settings(images: Path, work: Path, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "model": "tiny_flux",
        "logger": "none",
        "data.dataset_dir": images,
        "trainer.checkpoint_root": work / "checkpoints",
        "trainer.cache_dir": work / "cache",
        "trainer.validate_every": 1000,
        "lora.rank": 4,
        "lora.alpha": 4,
        "lora.dropout": 0.1,  # dropout draws random numbers: each micro-batch must draw its own on every rank
        "optimizer.lr": 1e-3,
    }
    settings.update({key.replace("__", "."): value for key, value in extra.items()})
    return settings


def _free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine may be launching too
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(work: Path, settings: dict[str, Any], log: Path, **probe: str) -> subprocess.Popen:
    wrapper = work / "probed_train.py"
    wrapper.write_text(WRAPPER)
    (work / "probes").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PROBE_DIR=str(work / "probes"), PROBE_SCRIPT=str(SCRIPT), **probe)  # fmt: skip
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(wrapper), *[f"{k}={v}" for k, v in settings.items()],
    ]  # fmt: skip
    with log.open("a") as handle:
        # cwd=work: Hydra's default run dir (outputs/train/runs/<date>_<time>) lands under the test's folder.
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=work)


def _probes(work: Path) -> dict[int, dict[str, Any]]:
    return {rank: json.loads((work / "probes" / f"rank-{rank}.json").read_text()) for rank in (0, 1)}


def _losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def _lora(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _compose(settings: dict[str, Any], output_dir: Path) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", [*(f"{k}={v}" for k, v in settings.items()), f"output_dir={output_dir}"])


# ---- in this process --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl", "tiny_qwen_edit"])
def test_ddp_searches_for_unused_lora_weights_only_in_families_that_have_some(
    model: str, images: Path, controls: Path, tmp_path: Path
) -> None:
    """find_unused_parameters costs an autograd-graph walk on every step; it is on exactly where a training step
    leaves LoRA weights without a gradient (without it DDP stops with 'Expected to have finished reduction')."""
    import torch

    from stylekit.data.dataset import prepare_samples
    from stylekit.train import loop, lora_io
    from stylekit.train.run import Session, _with_controls

    extra = {"data.control_dir": controls} if model == "tiny_qwen_edit" else {}
    cfg = _compose(_settings(images, tmp_path, model=model, **extra), tmp_path / "run")
    family = instantiate(cfg.model)
    samples = _with_controls(prepare_samples(cfg, multiple=family.resolution_multiple, seed=0), family)
    session = Session(cfg, family, tmp_path / "run")
    session.prepare_models()
    session.encode(samples[:1], samples[:1], [])
    denoiser = session._denoiser()
    torch.manual_seed(0)
    lora_io.attach_lora(denoiser, cfg.lora, family)
    session.model = denoiser
    batch = loop.collate([session.examples[0].tensors])
    session._batch_loss(batch, torch.Generator().manual_seed(0)).mean().backward()

    lora = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
    unused = sorted(name for name, p in lora.items() if p.grad is None)
    assert lora and len(unused) < len(lora)
    assert bool(unused) == family.ddp_find_unused_parameters, unused
    assert session.accelerator.ddp_handler.find_unused_parameters == family.ddp_find_unused_parameters


def test_each_rank_of_a_multi_process_cpu_run_gets_float32_for_auto_like_one_process() -> None:
    """accelerate names the CPU of rank r "cpu:r"; that is still the CPU, where `auto` means float32."""
    import torch

    from stylekit.models.base import resolve_runtime

    for device in ("cpu", "cpu:0", "cpu:1"):
        assert resolve_runtime("auto", device).dtype == torch.float32, device
    assert resolve_runtime("bf16", "cpu:1").dtype == torch.bfloat16


# ---- two processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_the_one_process_lora_into_one_run_dir_splitting_the_encoding_and_class_images(
    images: Path, tmp_path: Path
) -> None:
    """Two ranks with 2 micro-batches each per step see the same micro-batches as one process accumulating 4:
    the same logged losses and LoRA, one gradient all-reduce per optimizer step, every cache entry and class
    image made once by one rank, and one run dir although rank 1 starts a second later."""
    from stylekit.train.run import run

    steps = 3
    class_dir = tmp_path / "class_images"
    prior = {"data.class_dir": class_dir, "data.class_prompt": "a photo of a cat", "data.num_class_images": 2}
    work = tmp_path / "ddp"
    work.mkdir()
    settings = _settings(
        images, work, **prior, trainer__max_steps=steps, trainer__gradient_accumulation_steps=2
    )
    log = work / "launch.log"
    process = _launch(work, settings, log, PROBE_RANK1_DELAY="1.2")
    assert process.wait(timeout=900) == 0, log.read_text()[-4000:]

    run_dirs = list((work / "outputs" / "train" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.rglob(WEIGHT_NAME)) == [WEIGHT_NAME]
    assert (run_dir / "ranks" / "1" / "train.log").is_file()  # rank 1's log, moved beside rank 0's files

    probes = _probes(work)
    # One all-reduce of the gradients per optimizer step, not one per micro-batch.
    assert [probes[r]["synced_backwards"] for r in (0, 1)] == [steps, steps]
    # Each rank encoded its share into the shared cache; no entry was encoded twice.
    entries = list((work / "cache").rglob("*.safetensors"))
    assert all(probes[r]["cache_writes"] > 0 for r in (0, 1)), probes
    assert probes[0]["cache_writes"] + probes[1]["cache_writes"] == len(entries), (probes, len(entries))
    # Class images: one each, the same files one process would have written.
    assert [probes[r]["class_images"] for r in (0, 1)] == [["class_00000.png"], ["class_00001.png"]]
    assert sorted(p.name for p in class_dir.iterdir()) == ["class_00000.png", "class_00001.png"]

    # The same training in one process, accumulating the 4 micro-batches the two ranks shared out.
    single = tmp_path / "single"
    single_settings = _settings(images, single, **prior, trainer__max_steps=steps,
                                trainer__gradient_accumulation_steps=4, trainer__cache_dir=work / "cache")  # fmt: skip
    run(_compose(single_settings, single / "run"))
    expected = _losses(single / "run" / "metrics.jsonl")
    assert len(expected) == steps
    assert _losses(run_dir / "metrics.jsonl") == pytest.approx(expected, rel=1e-5, abs=1e-6)
    ddp_lora, single_lora = (
        _lora(run_dir / "lora" / WEIGHT_NAME),
        _lora(single / "run" / "lora" / WEIGHT_NAME),
    )
    assert ddp_lora.keys() == single_lora.keys()
    for key, tensor in single_lora.items():
        assert (ddp_lora[key] - tensor).abs().max() < 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_a_two_process_run_stopped_by_sigterm_checkpoints_once_and_the_same_command_resumes_it(
    target: str, images: Path, tmp_path: Path
) -> None:
    """SIGTERM to `accelerate launch` (a scheduler, `kill`, Ctrl-C) reaches every rank; one to a single rank (a
    scheduler's per-process signal) reaches only it. Either way all ranks stop at the same step, rank 0 saves it
    before any rank exits, and the same command resumes from it."""
    steps = 30
    settings = _settings(images, tmp_path, trainer__max_steps=steps, trainer__checkpoint_every=2,
                         hydra__run__dir=tmp_path / "run")  # fmt: skip
    checkpoints = tmp_path / "checkpoints"

    def reached(step: int) -> bool:
        return any(
            is_complete(p) and int(p.name.split("-")[1]) >= step for p in checkpoints.glob("*/checkpoint-*")
        )

    first_log = tmp_path / "first.log"
    # 0.3 s per all-reduce: 30 steps take long enough to be interrupted after the first checkpoint.
    process = _launch(tmp_path, settings, first_log, PROBE_ALLREDUCE_DELAY="0.3")
    try:
        deadline = time.monotonic() + 600
        while not reached(2):
            assert process.poll() is None, first_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        if target == "launcher":
            process.send_signal(signal.SIGTERM)
        else:
            os.kill(int((tmp_path / "probes" / "pid-1").read_text()), signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    text = first_log.read_text()
    stopped = re.findall(r"Stopped at step (\d+)", text)
    # Both ranks stopped at the same step, and rank 0 checkpointed it before either exited.
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-4000:]
    stop_step = int(stopped[0])
    assert 2 <= stop_step < steps
    (folder,) = checkpoints.iterdir()
    assert is_complete(folder / f"checkpoint-{stop_step:08d}")
    assert not (tmp_path / "run" / "lora").exists()

    second_log = tmp_path / "second.log"
    rerun = _launch(tmp_path, settings, second_log)
    assert rerun.wait(timeout=900) == 0, second_log.read_text()[-4000:]
    text = second_log.read_text()
    assert f"(step {stop_step})" in text and "Resumed from" in text, text[-4000:]
    assert sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob(WEIGHT_NAME)) == [
        Path("lora") / WEIGHT_NAME
    ]
    assert [p.name for p in (tmp_path / "run").parent.iterdir() if p.name.startswith("run")] == ["run"]
    losses = _losses(tmp_path / "run" / "metrics.jsonl")
    assert len(losses) == steps  # stop_step steps before the stop, the rest after the resume
