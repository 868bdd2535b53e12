"""LoRA training end to end on the tiny models (CPU): every family, the saved file, caching, resuming, signals.

Most runs go through `stylekit.train.run.run(cfg)` in this process, with configs composed from the real conf/
tree (a tiny run takes a second or two once the first has paid for the imports). Behaviour that belongs to the
process (exit codes, SIGTERM, Hydra multirun) runs scripts/train.py as a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from pictures import picture
from PIL import Image

from stylekit.train.lora_io import COMFY_NAME, WEIGHT_NAME, read_metadata
from stylekit.train.run import run

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
SCRIPT = str(ROOT / "scripts" / "train.py")

FAMILIES = ["tiny_flux", "tiny_sdxl", "tiny_qwen_edit"]
TINY_NAMES = {"tiny_flux": "flux", "tiny_sdxl": "sdxl", "tiny_qwen_edit": "qwen_edit"}


# ---- data --------------------------------------------------------------------------------------------------


def _write_images(folder: Path, count: int, seed: int = 0, captions: bool = True) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(picture(seed + i)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of [trigger] cat number {i}")
    return folder


@dataclass(frozen=True)
class Data:
    images: Path  # 3 captioned images
    controls: Path  # their source images (same names), for the edit family
    single: Path  # one captioned image
    cache: Path  # the encoded-tensor cache shared by the runs of this module


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("train-data")
    return Data(
        images=_write_images(root / "images", 3),
        controls=_write_images(root / "controls", 3, seed=100, captions=False),
        single=_write_images(root / "single", 1, seed=7),
        cache=root / "cache",
    )


# ---- running -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    loss: float
    run_dir: Path
    checkpoints: Path  # trainer.checkpoint_root
    log: str  # what stylekit logged while it ran

    @property
    def lora(self) -> Path:
        return self.run_dir / "lora" / WEIGHT_NAME

    def metrics(self, key: str) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row[key]) for row in rows if key in row]


def _overrides(tmp: Path, data: Data, model: str, extra: dict[str, Any]) -> list[str]:
    settings: dict[str, Any] = {
        "model": model,
        "logger": "none",
        "data.dataset_dir": data.images,
        "output_dir": tmp / "run",
        "trainer.checkpoint_root": tmp / "checkpoints",
        "trainer.cache_dir": data.cache,
        "trainer.max_steps": 2,
        "lora.rank": 4,
        "lora.alpha": 4,
        "data.trigger": "sks",
    }
    if model == "tiny_qwen_edit":
        settings["data.control_dir"] = data.controls
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@contextlib.contextmanager
def stylekit_log() -> Iterator[list[str]]:
    """The messages stylekit logs inside the block (usable from module-scoped fixtures, unlike caplog)."""
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


def train(tmp: Path, data: Data, model: str = "tiny_flux", **extra: Any) -> Run:
    """One in-process run; keyword overrides use `__` for dots (trainer__max_steps=4)."""
    settings = {key.replace("__", "."): value for key, value in extra.items()}
    cfg = compose_train(_overrides(tmp, data, model, settings))
    with stylekit_log() as messages:
        loss = run(cfg)
    return Run(loss, Path(cfg.output_dir), Path(cfg.trainer.checkpoint_root), "\n".join(messages))


def load_lora(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


def _checkpoint_lora(root: Path, step: int) -> dict[str, Any]:
    (folder,) = root.glob(f"train-*/checkpoint-{step:08d}")
    assert (folder / "COMPLETE").is_file()
    return load_lora(folder / "lora.safetensors")


# ---- subprocesses ------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # conftest already set HF_HUB_OFFLINE, WANDB_MODE=offline and STYLEKIT_CACHE_DIR; one thread for the
    # reasons in `one_thread`, and so that runs in different processes compute bit-identical steps.
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cli_args(tmp: Path, data: Data, *extra: str, model: str = "tiny_flux") -> list[str]:
    base = _overrides(tmp, data, model, {})
    base = [arg for arg in base if not arg.startswith("output_dir=")]
    return [sys.executable, SCRIPT, *base, f"hydra.run.dir={tmp / 'run'}", *extra]


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one `error:` line that names what is wrong."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


# ---- every family ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_run(tmp_path_factory: pytest.TempPathFactory, data: Data) -> Callable[[str], Run]:
    """Each family trained once (4 steps at lr 1e-3, trigger `sks`) and shared by the tests below."""
    done: dict[str, Run] = {}

    def get(model: str) -> Run:
        if model not in done:
            tmp = tmp_path_factory.mktemp(model)
            done[model] = train(tmp, data, model, trainer__max_steps=4, optimizer__lr=1e-3, seed=3)
        return done[model]

    return get


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_trains_and_writes_lora_card_samples_and_summary(
    model: str, family_run: Callable[[str], Run]
) -> None:
    result = family_run(model)

    assert isinstance(result.loss, float) and math.isfinite(result.loss)
    assert result.lora.is_file()
    card = (result.run_dir / "lora" / "README.md").read_text()
    assert f"tiny:{TINY_NAMES[model]}" in card and "sks" in card
    assert sorted(p.name for p in (result.run_dir / "samples").glob("*.png"))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["validation_loss"] == pytest.approx(result.loss)
    assert Path(summary["lora"]) == result.lora

    meta = read_metadata(result.lora)
    assert meta["stylekit.family"] == TINY_NAMES[model]
    assert meta["stylekit.pretrained"] == f"tiny:{TINY_NAMES[model]}"
    assert json.loads(meta["stylekit.rank"]) == 4
    assert json.loads(meta["stylekit.alpha"]) == 4.0
    assert meta["stylekit.trigger"] == "sks"
    assert json.loads(meta["stylekit.steps"]) == 4
    assert re.fullmatch(r"[0-9a-f]{16}", meta["stylekit.dataset_hash"])
    assert meta["stylekit.dataset_hash"] == summary["dataset_hash"]
    # The returned value is the final validation loss, also what the file and the metrics say.
    assert json.loads(meta["stylekit.validation_loss"]) == pytest.approx(result.loss)
    assert result.metrics("val/loss")[-1] == (4, pytest.approx(result.loss))
    assert "Encoded" in result.log and "LoRA saved to" in result.log


def _generate(model: str, pipe: Any, control: Image.Image) -> np.ndarray:
    """Two sampling steps at 64x64 with a fixed seed, as float pixels (no 8-bit rounding hiding changes)."""
    import torch
    from hydra.utils import instantiate

    cfg = compose_train([f"model={model}", "output_dir=unused"])
    family = instantiate(cfg.model)
    kwargs: dict[str, Any] = {
        "prompt": "a photo of sks cat number 1",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "generator": torch.Generator("cpu").manual_seed(0),
        "output_type": "np",
    }
    if model == "tiny_flux":
        kwargs.update(guidance_scale=3.5, max_sequence_length=family.max_sequence_length)
    elif model == "tiny_sdxl":
        kwargs.update(guidance_scale=5.0)
    else:
        kwargs.update(image=[control], negative_prompt=" ", true_cfg_scale=4.0)
    with family.call_context(pipe), torch.no_grad():
        return np.asarray(pipe(**kwargs).images[0], dtype=np.float64)


@pytest.mark.parametrize("model", FAMILIES)
def test_saved_lora_changes_a_fresh_diffusers_pipeline_and_weight_zero_or_unload_restores_it(
    model: str, family_run: Callable[[str], Run], data: Data
) -> None:
    import diffusers
    import torch

    from stylekit.models.tiny import tiny_path

    result = family_run(model)
    cls = {"tiny_flux": "FluxPipeline", "tiny_sdxl": "StableDiffusionXLPipeline"}.get(
        model, "QwenImageEditPlusPipeline"
    )
    pipe = getattr(diffusers, cls).from_pretrained(tiny_path(TINY_NAMES[model]), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(data.controls / "img1.png").convert("RGB")

    base = _generate(model, pipe, control)
    pipe.load_lora_weights(str(result.run_dir / "lora"), adapter_name="style")
    styled = _generate(model, pipe, control)
    assert np.abs(styled - base).max() > 1e-4, "the trained LoRA does not change the pipeline's output"

    # Equal up to float rounding: the wrapped layers add their (zero) LoRA term in another order.
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    np.testing.assert_allclose(_generate(model, pipe, control), base, atol=1e-5)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    np.testing.assert_allclose(_generate(model, pipe, control), styled, atol=1e-5)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(_generate(model, pipe, control), base, atol=1e-5)


def test_comfyui_format_also_writes_a_comfyui_keyed_copy(tmp_path: Path, data: Data) -> None:
    result = train(tmp_path, data, trainer__max_steps=1, trainer__lora_format="comfyui")

    diffusers_keys = load_lora(result.lora)
    comfy = load_lora(result.run_dir / "lora" / COMFY_NAME)
    # ComfyUI maps lora_unet_* FLUX keys onto its own layout; diffusers-named FLUX modules go as lora_transformer_*.
    prefix = "lora_transformer_"
    pattern = re.compile(prefix + r"(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
    modules: dict[str, set[str]] = {}
    for key in comfy:
        match = pattern.fullmatch(key)
        assert match, f"not a kohya key: {key}"
        modules.setdefault(match[1], set()).add(match[2])
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    assert len(modules) == sum(key.endswith("lora_A.weight") for key in diffusers_keys)
    for module in modules:
        down, up = comfy[f"{prefix}{module}.lora_down.weight"], comfy[f"{prefix}{module}.lora_up.weight"]
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert float(comfy[f"{prefix}{module}.alpha"]) == 4.0
    assert read_metadata(result.run_dir / "lora" / COMFY_NAME)["stylekit.family"] == "flux"


# ---- learning ----------------------------------------------------------------------------------------------


def test_a_few_dozen_steps_on_one_repeated_image_lower_the_loss_and_move_the_weights(
    tmp_path: Path, data: Data
) -> None:
    steps = 30
    result = train(
        tmp_path,
        data,
        data__dataset_dir=data.single,
        data__repeats=4,
        optimizer__lr=1e-3,
        trainer__max_steps=steps,
        trainer__validate_every=2,
        trainer__checkpoint_every=2,
        trainer__keep_checkpoints=100,
    )

    # Validation loss: fixed noise and noise levels, so the numbers are comparable across steps.
    val = dict(result.metrics("val/loss"))
    assert sorted(val) == list(range(2, steps + 1, 2))
    assert val[steps] == pytest.approx(result.loss)
    losses = [val[step] for step in sorted(val)]
    # Small but steady: most of a flow-matching loss is the unpredictable noise, which no LoRA removes.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.995 * losses[0], losses

    import torch

    early, final = _checkpoint_lora(result.checkpoints, 2), _checkpoint_lora(result.checkpoints, steps)
    moved = [
        float((final[k] - early[k]).norm() / early[k].norm().clamp_min(1e-12)) for k in early if "lora_B" in k
    ]
    assert min(moved) > 0.5, "lora_B barely moved after step 2"
    assert any(not torch.equal(final[k], early[k]) for k in early if "lora_A" in k)


# ---- the latent cache --------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_data_reads_every_encoding_from_the_cache(
    tmp_path: Path, data: Data
) -> None:
    cache = tmp_path / "cache"
    first = train(tmp_path / "a", data, trainer__max_steps=1, trainer__cache_dir=cache)
    files = sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))
    # 3 images and 3 captions; the validation examples are the same images, so they already hit.
    assert "cache 6 hits, 6 encoded" in first.log
    assert len(files) == 6
    stamps = {p: (cache / p).stat().st_mtime_ns for p in files}

    second = train(tmp_path / "b", data, trainer__max_steps=1, trainer__cache_dir=cache)
    assert "cache 12 hits, 0 encoded" in second.log
    assert sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors")) == files
    assert {p: (cache / p).stat().st_mtime_ns for p in files} == stamps
    assert math.isfinite(second.loss)


# ---- resuming ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"lora__dropout": 0.2, "trainer__gradient_accumulation_steps": 2}],
    ids=["plain", "dropout_accumulation"],
)
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_lora_as_an_uninterrupted_one(
    tmp_path: Path, data: Data, extra: dict[str, Any]
) -> None:
    total, cut = 6, 3
    whole = train(tmp_path / "whole", data, trainer__max_steps=total, trainer__resume="never", **extra)

    interrupted = tmp_path / "pieces"
    first = train(interrupted, data, trainer__max_steps=cut, **extra)
    assert "Resumed from" not in first.log
    first_lora = load_lora(first.lora)  # the rerun writes its LoRA to the same run dir
    rest = train(interrupted, data, trainer__max_steps=total, **extra)
    assert re.search(rf"Resumed from .*checkpoint-{cut:08d} \(step {cut}\)", rest.log)
    assert f"for {total} steps (from {cut})" in rest.log

    assert_same_tensors(load_lora(rest.lora), load_lora(whole.lora))
    assert rest.loss == whole.loss
    # Not vacuous: the first piece alone is a different LoRA.
    import torch

    assert not all(
        torch.equal(a, b) for a, b in zip(first_lora.values(), load_lora(whole.lora).values(), strict=True)
    )


def test_rerunning_a_finished_run_returns_its_final_loss_not_nan(tmp_path: Path, data: Data) -> None:
    first = train(tmp_path, data, trainer__max_steps=2)
    again = train(tmp_path, data, trainer__max_steps=2)
    assert "Resumed from" in again.log
    assert again.loss == first.loss
    assert json.loads(read_metadata(again.lora)["stylekit.steps"]) == 2
    assert_same_tensors(load_lora(again.lora), load_lora(first.lora))


# ---- optimizers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "lr"), [("adamw8bit", 1e-3), ("prodigy", 1.0), ("adafactor", 1e-3)])
def test_each_optimizer_trains_two_steps(tmp_path: Path, data: Data, name: str, lr: float) -> None:
    result = train(tmp_path, data, optimizer__name=name, optimizer__lr=lr)

    assert math.isfinite(result.loss)
    weights = load_lora(result.lora)
    # lora_B starts at zero: any non-zero entry means the optimizer stepped.
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)
    assert [step for step, _ in result.metrics("train/loss")] == [1, 2]


# ---- bad input: one line, exit code 2 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.name=sgd", "optimizer.name"),
        ("lora.rank=0", "lora.rank"),
        ("optimizer.lr=-1e-4", "optimizer.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, data: Data, override: str, key: str
) -> None:
    start = time.monotonic()
    result = run_cli(_cli_args(tmp_path, data, override), timeout=120)
    assert_usage_error(result, key)
    assert not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - start < 60  # rejected before any model loads


def test_nf4_quantization_on_cpu_exits_2_with_one_clear_line(tmp_path: Path, data: Data) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("nf4 works on CUDA")
    result = run_cli(_cli_args(tmp_path, data, "model.quantize=nf4"), timeout=180)
    assert_usage_error(result, "model.quantize=nf4", "CUDA")
    assert "Encoded" not in result.stdout  # refused before the encoders load
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.parametrize("contents", ["empty", "text_only"])
def test_a_folder_without_usable_images_exits_2_before_any_model_loads(tmp_path: Path, contents: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    if contents == "text_only":
        (folder / "notes.txt").write_text("a caption without an image")
    empty = Data(images=folder, controls=folder, single=folder, cache=tmp_path / "cache")
    start = time.monotonic()
    result = run_cli(_cli_args(tmp_path, empty), timeout=120)

    assert_usage_error(result, "no usable training images", str(folder))
    # The family's runtime (device, dtype) is resolved just before loading; it never got there.
    assert "No CUDA device" not in result.stdout + result.stderr
    assert not (tmp_path / "cache").exists()
    assert time.monotonic() - start < 60


# ---- W&B ---------------------------------------------------------------------------------------------------


def test_wandb_logger_offline_writes_a_run_under_the_run_dir_and_metrics_jsonl(
    tmp_path: Path, data: Data
) -> None:
    assert os.environ.get("WANDB_MODE") == "offline"  # set by conftest: this run must never go online
    result = train(tmp_path, data, logger="wandb", trainer__max_steps=2)

    (records,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    raw = records.read_bytes()
    assert b"train/loss" in raw and b"val/loss" in raw
    assert [step for step, _ in result.metrics("train/loss")] == [1, 2]
    assert result.metrics("val/loss")[-1][1] == pytest.approx(result.loss)


# ---- processes: multirun and SIGTERM -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_multirun_sweep_trains_one_lora_per_job_sharing_the_encoded_cache(
    tmp_path: Path, data: Data
) -> None:
    sweep = tmp_path / "sweep"
    fresh = Data(data.images, data.controls, data.single, cache=tmp_path / "cache")  # the first job fills it
    args = _cli_args(tmp_path, fresh, "lora.rank=4,8", "optimizer.lr=1e-4,1e-3", f"hydra.sweep.dir={sweep}")
    args = [a for a in args if a != "lora.rank=4" and not a.startswith("hydra.run.dir=")]
    args.insert(2, "-m")
    result = run_cli(args, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]

    # Job dirs are <sweep>/<num>_<override_dirname>; path-valued overrides nest them, so search.
    jobs = {}
    for weights in sweep.rglob(f"lora/{WEIGHT_NAME}"):
        job_dir = weights.parents[1]
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        jobs[job_dir] = (overrides, read_metadata(weights))
    assert len(jobs) == 4
    combos = set()
    for job_dir, (overrides, meta) in jobs.items():
        rank = int(re.search(r"lora\.rank=(\d+)", overrides)[1])
        lr = float(re.search(r"optimizer\.lr=([\d.e-]+)", overrides)[1])
        assert json.loads(meta["stylekit.rank"]) == rank
        combos.add((rank, lr))
        assert math.isfinite(json.loads((job_dir / "summary.json").read_text())["validation_loss"])
    assert combos == {(4, 1e-4), (4, 1e-3), (8, 1e-4), (8, 1e-3)}

    encoded = re.findall(r"cache (\d+) hits, (\d+) encoded", result.stdout)
    assert encoded == [("6", "6"), ("12", "0"), ("12", "0"), ("12", "0")], result.stdout[-3000:]


def _wait_for(path_glob: Callable[[], list[Path]], process: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = path_glob()
        if found:
            return found[0]
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint within {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_a_rerun_finishes_the_same_lora(
    tmp_path: Path, data: Data
) -> None:
    total, every = 600, 50
    settings = [
        f"trainer.max_steps={total}",
        f"trainer.checkpoint_every={every}",
        "trainer.validate_every=1000",
    ]
    stopped = tmp_path / "stopped"
    whole = tmp_path / "whole"
    stopped.mkdir(), whole.mkdir()
    command = _cli_args(stopped, data, *settings)
    log = (stopped / "first.log").open("w")
    reference_log = (whole / "run.log").open("w")
    reference = subprocess.Popen(
        _cli_args(whole, data, *settings),
        stdout=reference_log,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
    )
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    try:
        root = stopped / "checkpoints"
        _wait_for(lambda: sorted(root.glob(f"train-*/checkpoint-{every:08d}/COMPLETE")), process, 240)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    first_log = (stopped / "first.log").read_text()
    assert "Traceback" not in first_log
    step = int(re.search(r"Stopped at step (\d+) by SIGTERM", first_log)[1])
    assert every <= step < total
    (checkpoint,) = root.glob(f"train-*/checkpoint-{step:08d}")
    assert (checkpoint / "COMPLETE").is_file()
    assert json.loads((checkpoint / "state.json").read_text())["step"] == step
    assert not list(root.glob("train-*/.tmp-*"))
    assert not (stopped / "run" / "lora").exists()

    rerun = run_cli(command, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resumed from {checkpoint} (step {step})" in rerun.stdout
    try:
        assert reference.wait(timeout=400) == 0
    finally:
        if reference.poll() is None:
            reference.kill()
        reference_log.close()
    assert_same_tensors(
        load_lora(stopped / "run" / "lora" / WEIGHT_NAME), load_lora(whole / "run" / "lora" / WEIGHT_NAME)
    )


# ---- prior preservation ------------------------------------------------------------------------------------


def test_prior_preservation_generates_missing_class_images_then_trains_with_them(
    tmp_path: Path, data: Data
) -> None:
    from PIL import Image

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (96, 96), (120, 90, 60)).save(class_dir / "mine.png")  # one the user already had
    result = train(
        tmp_path,
        data,
        data__class_dir=class_dir,
        data__class_prompt="a photo of a pattern",
        data__num_class_images=3,
        data__max_upscale=4,
        trainer__max_steps=2,
        trainer__prior_loss_weight=0.5,
    )
    generated = sorted(class_dir.glob("class_*.png"))
    assert len(generated) == 2  # only what was missing
    assert (class_dir / "mine.png").exists()
    for path in generated:
        with Image.open(path) as image:
            image.load()
            assert image.size == (64, 64)
    assert result.lora.exists()
    assert math.isfinite(result.loss)
    # A rerun finds enough class images and generates none.
    again = train(
        tmp_path / "again",
        data,
        data__class_dir=class_dir,
        data__class_prompt="a photo of a pattern",
        data__num_class_images=3,
        data__max_upscale=4,
        trainer__max_steps=1,
    )
    assert sorted(class_dir.glob("class_*.png")) == generated
    assert again.lora.exists()


@pytest.mark.parametrize(
    "options",
    [
        {"lora__use_dora": True},
        {"trainer__gradient_checkpointing": True},
        {"lora__target_regex": "'transformer_blocks.0.attn.to_(q|v)'"},  # quoted: Hydra grammar
    ],
    ids=["dora", "gradient_checkpointing", "target_regex"],
)
def test_lora_variants_train_and_save(tmp_path: Path, data: Data, options: dict) -> None:
    result = train(tmp_path, data, **options)
    keys = load_lora(result.lora)
    assert keys and math.isfinite(result.loss)
    if "lora__target_regex" in options:
        modules = {key.split(".lora_")[0] for key in keys}
        assert modules == {
            "transformer.transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.0.attn.to_v",
        }
    if "lora__use_dora" in options:
        assert any("magnitude" in key for key in keys)
