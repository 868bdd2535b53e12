"""Faults: a training run killed at any step, or out of disk while checkpointing, ends with the same LoRA as an
uninterrupted one once rerun; an inpaint batch killed midway leaves only whole outputs and a rerun with
skip_existing=true writes only what is missing.

The cheap versions run in this process (a crash is an exception from the optimizer step or a file write); the
real kill -9 of scripts/train.py and scripts/inpaint.py subprocesses is `slow` (each process pays ~20 s of
imports on a busy machine).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from pictures import captioned_images, picture
from PIL import Image

from stylekit.errors import UsageError
from stylekit.inpaint import run as inpaint_run
from stylekit.train.lora_io import WEIGHT_NAME
from stylekit.train.run import run as train_run

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
TOTAL = 6  # steps of the in-process runs; every step is checkpointed


# ---- helpers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("fault-data") / "images")


def _train_settings(images: Path, root: Path, cache: Path, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "model": "tiny_flux",
        "logger": "none",
        "data.dataset_dir": images,
        "trainer.checkpoint_root": root / "checkpoints",
        "trainer.cache_dir": cache,
        "trainer.max_steps": TOTAL,
        "trainer.checkpoint_every": 1,
        "lora.rank": 4,
        "lora.alpha": 4,
        # Dropout draws random numbers too: the resumed run must draw the same ones.
        "lora.dropout": 0.1,
        "optimizer.lr": 1e-3,
    }
    settings.update({key.replace("__", "."): value for key, value in extra.items()})
    return settings


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("stylekit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def train(images: Path, root: Path, cache: Path, **extra: Any) -> str:
    """One in-process run with its run dir at root/run; returns what stylekit logged."""
    settings = _train_settings(images, root, cache, output_dir=root / "run", **extra)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"{k}={v}" for k, v in settings.items()])
    with _captured_log() as messages:
        train_run(cfg)
    return "\n".join(messages)


def load_lora(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_lora(a: Path, b: Path) -> None:
    import torch

    first, second = load_lora(a), load_lora(b)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} of {len(first)} tensors differ, e.g. {different[0]}"


def checkpoints(root: Path) -> dict[int, Path]:
    """Complete checkpoints under a checkpoint_root, by step."""
    found = {}
    for marker in root.glob("train-*/checkpoint-*/COMPLETE"):
        found[int(marker.parent.name.split("-")[1])] = marker.parent
    return found


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob("train-*/.tmp-*")) + sorted(root.glob("train-*/.old-*"))


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted in-process run's LoRA file."""
    root = tmp_path_factory.mktemp("reference")
    train(images, root, root / "cache")
    return root / "run" / "lora" / WEIGHT_NAME


@contextlib.contextmanager
def _crash_at_optimizer_step(n: int) -> Iterator[None]:
    """The n-th optimizer step of the next run raises, after its backward pass and before any update."""
    from torch.optim import AdamW  # the configured optimizer (optimizer=adamw)

    real = AdamW.step
    calls = []

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdamW, "step", step)
        yield


# ---- training: crashes and a full disk, in this process ---------------------------------------------------------


def test_a_run_crashing_mid_step_twice_resumes_to_the_same_lora_as_an_uninterrupted_one(
    images: Path, reference: Path, tmp_path: Path
) -> None:
    cache = reference.parents[2] / "cache"
    # Crash while applying step 2 (checkpoint 1 on disk), then while applying step 4 of the resumed run.
    with _crash_at_optimizer_step(2), pytest.raises(RuntimeError, match="simulated crash"):
        train(images, tmp_path, cache)
    assert sorted(checkpoints(tmp_path / "checkpoints")) == [1]
    with _crash_at_optimizer_step(3), pytest.raises(RuntimeError, match="simulated crash"):
        train(images, tmp_path, cache)
    assert sorted(checkpoints(tmp_path / "checkpoints")) == [2, 3]  # keep_checkpoints=2
    assert not (tmp_path / "run" / "lora").exists()

    log = train(images, tmp_path, cache)
    assert re.search(r"Resumed from .*checkpoint-00000003 \(step 3\)", log), log
    assert_same_lora(tmp_path / "run" / "lora" / WEIGHT_NAME, reference)
    assert not leftovers(tmp_path / "checkpoints")


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one_and_a_rerun_resumes_from_it(
    images: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    cache = reference.parents[2] / "cache"
    real_save, saves = torch.save, []

    def save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        """The 3rd checkpoint's optimizer state: half the bytes reach the disk, then it is full."""
        saves.append(target)
        if len(saves) != 3:
            return real_save(obj, target, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        Path(target).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UsageError) as caught:
        train(images, tmp_path, cache, trainer__keep_checkpoints=1)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "step 3 checkpoint" in message and "No space left on device" in message and "rerun" in message
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    found = checkpoints(root)
    assert sorted(found) == [2]  # the only checkpoint kept (keep_checkpoints=1) survived the failed save
    assert not leftovers(root)  # the half-written checkpoint-3 was removed
    previous = found[2]
    assert json.loads((previous / "state.json").read_text())["step"] == 2
    assert load_lora(previous / "lora.safetensors")
    assert torch.load(previous / "optim.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]

    log = train(images, tmp_path, cache, trainer__keep_checkpoints=1)
    assert re.search(r"Resumed from .*checkpoint-00000002 \(step 2\)", log), log
    assert_same_lora(tmp_path / "run" / "lora" / WEIGHT_NAME, reference)


def test_a_damaged_cache_entry_is_re_encoded_and_the_lora_is_unchanged(
    images: Path, reference: Path, tmp_path: Path
) -> None:
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(reference.parents[2] / "cache", cache)
    entries = sorted(cache.rglob("*.safetensors"))
    assert entries
    for entry in entries:  # a disk that lost the end of every file
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])

    log = train(images, tmp_path, cache)
    assert log.count("Re-encoding damaged cache entry") == len(entries)
    assert_same_lora(tmp_path / "run" / "lora" / WEIGHT_NAME, reference)


# ---- inpainting: a batch that fails midway ----------------------------------------------------------------------


def _inpaint_batch(folder: Path, count: int = 6) -> tuple[Path, Path]:
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True), masks.mkdir()
    for i in range(count):
        Image.fromarray(picture(10 + i)).save(images / f"img{i}.png")
        mask = np.zeros((96, 128), np.uint8)
        mask[20 + i : 60 + i, 30:90] = 255
        Image.fromarray(mask).save(masks / f"img{i}.png")
    return images, masks


def _inpaint_cfg(images: Path, masks: Path, out: Path, *extra: str) -> Any:
    args = ["model=tiny_flux", "prompt=a red cat", f"image={images}", f"mask={masks}", f"output_dir={out}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="inpaint", overrides=[*args, *extra])


def assert_only_whole_outputs(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every PNG decodes fully, no temp file is left; returns name -> (bytes, mtime_ns)."""
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix != ".png"]
    found = {}
    for path in sorted(out.glob("*.png")):
        with Image.open(path) as image:
            image.load()
        found[path.name] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def test_a_batch_stopped_by_a_full_disk_keeps_whole_outputs_and_skip_existing_writes_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, masks = _inpaint_batch(tmp_path)
    out = tmp_path / "out"
    real_save, saves = Image.Image.save, []

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if not hasattr(fp, "write"):
            return real_save(self, fp, *args, **kwargs)
        saves.append(1)
        if len(saves) == 4:  # the 4th output: a few bytes, then the disk is full
            fp.write(b"\x89PNG\r\n\x1a\n")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(UsageError, match="img3_edited.png.*No space left on device"):
        inpaint_run.run(_inpaint_cfg(images, masks, out, "skip_existing=true"))
    monkeypatch.undo()
    first = assert_only_whole_outputs(out)
    assert "img3_edited.png" not in first and {"img0_edited.png", "img1_edited.png"} <= first.keys()
    # What a kill -9 mid-save leaves (the slow tests below do it for real): removed once the output is written.
    (out / ".img3_edited.png.0123456789ab.tmp").write_bytes(b"\x89PNG")
    unrelated = [out / ".notes.txt.0123456789ab.tmp", out / ".x_edited.png.0123456789ab.tmp"]
    for path in unrelated:
        path.write_bytes(b"not ours")

    summary = inpaint_run.run(_inpaint_cfg(images, masks, out, "skip_existing=true"))
    assert summary["skipped"] == len(first)
    assert sorted(Path(p).name for p in summary["outputs"]) == sorted(
        f"img{i}_edited.png" for i in range(6) if f"img{i}_edited.png" not in first
    )
    assert all(path.read_bytes() == b"not ours" for path in unrelated)
    for path in unrelated:
        path.unlink()
    after = assert_only_whole_outputs(out)
    assert sorted(after) == [f"img{i}_edited.png" for i in range(6)]
    assert {name: after[name] for name in first} == first  # bytes and mtime untouched


# ---- real processes, kill -9 ------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread: bit-identical steps across processes (and no contention on a 2-core runner).
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _popen(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("a") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def _wait_until(found: Callable[[], Any], process: subprocess.Popen, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        assert process.poll() is None, f"the process ended (code {process.returncode}) before {what}"
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout}s")


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _train_cli(images: Path, root: Path, cache: Path, steps: int) -> list[str]:
    settings = _train_settings(images, root, cache, trainer__max_steps=steps, trainer__validate_every=1000)
    return [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        *[f"{k}={v}" for k, v in settings.items()],
        f"hydra.run.dir={root / 'run'}",
    ]


@pytest.mark.slow
def test_kill_9_at_five_different_steps_then_rerunning_ends_with_the_uninterrupted_lora(
    images: Path, tmp_path: Path
) -> None:
    steps, targets = 30, (2, 7, 12, 17, 22)
    cache = tmp_path / "cache"
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    whole.mkdir(), pieces.mkdir()
    # The reference runs beside the first piece: both pay their imports at the same time.
    reference = _popen(_train_cli(images, whole, cache, steps), whole / "run.log")
    killed_at, resumed_from = [], []
    try:
        for target in targets:
            log = pieces / f"until-{target}.log"
            process = _popen(_train_cli(images, pieces, cache, steps), log)
            try:
                _wait_until(
                    lambda t=target: max(checkpoints(pieces / "checkpoints"), default=0) >= t,
                    process,
                    300,
                    f"checkpoint {target}",
                )
            finally:
                _kill(process)
            assert process.returncode == -signal.SIGKILL
            killed_at.append(max(checkpoints(pieces / "checkpoints")))
            match = re.search(r"Resumed from \S*checkpoint-(\d+)", log.read_text())
            resumed_from.append(int(match[1]) if match else 0)
        assert not (pieces / "run" / "lora").exists()
        last = checkpoints(pieces / "checkpoints")[killed_at[-1]]

        final = subprocess.run(
            _train_cli(images, pieces, cache, steps), capture_output=True, text=True, env=_env(), cwd=ROOT
        )
        assert final.returncode == 0, final.stderr[-3000:]
        assert f"Resumed from {last} (step {killed_at[-1]})" in final.stdout
        assert reference.wait(timeout=600) == 0, (whole / "run.log").read_text()[-3000:]
    finally:
        _kill(reference)

    # Five kills at five different steps, each rerun resuming where the previous process was killed.
    assert len(set(killed_at)) == len(targets) and killed_at == sorted(killed_at), killed_at
    assert all(target <= step < steps for target, step in zip(targets, killed_at, strict=True)), killed_at
    assert resumed_from == [0, *killed_at[:-1]], (resumed_from, killed_at)
    assert not leftovers(pieces / "checkpoints")
    assert_same_lora(pieces / "run" / "lora" / WEIGHT_NAME, whole / "run" / "lora" / WEIGHT_NAME)


def _inpaint_cli(images: Path, masks: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "scripts" / "inpaint.py"),
        "model=tiny_flux",
        "prompt=a red cat",
        f"image={images}",
        f"mask={masks}",
        # Slow enough per image that the batch is still running when the first output appears.
        "num_inference_steps=30",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_kill_9_after_the_first_output_leaves_only_whole_files_and_skip_existing_finishes_the_rest(
    tmp_path: Path,
) -> None:
    images, masks = _inpaint_batch(tmp_path)
    inputs = {p: p.read_bytes() for p in sorted(images.iterdir()) + sorted(masks.iterdir())}
    run_dir = tmp_path / "run"
    process = _popen(_inpaint_cli(images, masks, run_dir), tmp_path / "first.log")
    try:
        _wait_until(lambda: list(run_dir.glob("*_edited.png")), process, 300, "a first output")
    finally:
        _kill(process)
    assert process.returncode == -signal.SIGKILL
    outputs = lambda: [p for p in run_dir.iterdir() if p.suffix == ".png" or p.name.endswith(".tmp")]  # noqa: E731
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs() if p.suffix == ".png"}
    assert 1 <= len(first) < 6, sorted(first)
    for name in first:
        with Image.open(run_dir / name) as image:
            image.load()

    rerun = subprocess.run(
        _inpaint_cli(images, masks, run_dir, "skip_existing=true"),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(first)} skipped)" in rerun.stdout + rerun.stderr
    final = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs()}
    assert sorted(final) == [f"img{i}_edited.png" for i in range(6)]  # and no temp file left
    assert {name: final[name] for name in first} == first
    for name in final:
        with Image.open(run_dir / name) as image:
            image.load()
    assert {p: p.read_bytes() for p in inputs} == inputs


_KILL_MID_WRITE = """
import os, runpy, signal, sys
real = os.replace
def replace(src, dst, *args, **kwargs):
    # The 2nd output: its temp file is written and synced, the rename never happens.
    if str(dst).endswith("_edited.png") and replace.outputs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    replace.outputs += str(dst).endswith("_edited.png")
    return real(src, dst, *args, **kwargs)
replace.outputs = 0
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill_9_between_writing_an_output_and_renaming_it_leaves_no_partial_png_and_a_rerun_cleans_up(
    tmp_path: Path,
) -> None:
    images, masks = _inpaint_batch(tmp_path, count=3)
    run_dir = tmp_path / "run"
    args = _inpaint_cli(images, masks, run_dir)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_MID_WRITE, *args[1:]],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["img0_edited.png"]
    assert [p.name for p in run_dir.glob(".img1_edited.png.*.tmp")]  # what kill -9 leaves behind

    rerun = subprocess.run(
        _inpaint_cli(images, masks, run_dir, "skip_existing=true"),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in (".png", ".tmp")) == [
        "img0_edited.png",
        "img1_edited.png",
        "img2_edited.png",
    ]
