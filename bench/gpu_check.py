"""Prove stylekit's CUDA paths in one run: bf16 + autocast training through a mid-run validation, a checkpoint
and a resume; nf4 and int8 denoiser training (bitsandbytes); editing with every pipeline in bf16, with
model.offload=model and =sequential, and in nf4; a provoked CUDA out-of-memory error in training and in
inpainting that must end in the one-line advice, exit code 2 and no partial output. Peak VRAM
(torch.cuda.max_memory_allocated) and seconds per step / per edit for every case; GPU, driver, torch and CUDA in
the header. Writes GPU_RESULTS.md and gpu_results.json (raw figures) to --out-dir after every case, so a run
cut short still leaves its table.

    python -m bench.gpu_check                         # on a CUDA machine (bash bench/gpu_check.sh installs
                                                      #   the wheels of gpu-wheels/ first); < 8 min on one GPU
    python -m bench.gpu_check --tiny --cpu            # the CPU dry run (make test runs it): tiny models only
    python -m bench.gpu_check --families flux --cases 'train-*,oom-*'   # a rerun of some cases

Models: tiny_<family> (random weights, toy widths) and shallow_<family> (real widths, few blocks: what makes the
VRAM figures and the OOM real). A model config missing from conf/model/ is recorded as skipped. Everything runs
through stylekit's own entry points: stylekit.train.run.run / stylekit.inpaint.run.run in this process (so peak
VRAM is per case), and scripts/train.py / scripts/inpaint.py as child processes for the OOM cases (what a user
sees: stderr and the exit code). On CPU, the CUDA-only cases check that they are refused with the clear message,
and the OOM cases are emulated (bench/oom_child.py --emulate).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu import peak_gib, reset_peak

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAMILIES = ("flux", "sdxl", "qwen_edit")
TRAIN_CASES = ("train-bf16", "train-nf4", "train-int8")
EDIT_VARIANTS = ("offload-model", "offload-sequential", "nf4")
OOM_CASES = ("oom-train", "oom-inpaint")
PROMPT = "a photo of sks fabric"
EDIT_PROMPT = "a red scarf"
OOM_ADVICE = "CUDA ran out of memory"
log = logging.getLogger("bench.gpu_check")


# ---- results ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    case: str
    status: str = "ok"  # ok | FAIL | skipped | refused (a CUDA-only case on CPU, with the expected message)
    note: str = ""
    s_per_step: float | None = None
    s_per_edit: float | None = None
    load_s: float | None = None
    peak_gib: float | None = None
    wall_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class CheckFailed(Exception):
    """A case ran but did not do what it must (no resume, a partial output, a missing sample...)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---- the device -------------------------------------------------------------------------------------------


def device_header(cuda: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    header: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "hydra-core"):
        try:
            header[name] = version(name)
        except PackageNotFoundError:
            header[name] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        header.update(
            device="cuda",
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(),
            cudnn=torch.backends.cudnn.version(),
        )
    return header


def _driver_version() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    return None


def free_memory() -> None:
    from stylekit.inpaint import run as inpaint_run

    inpaint_run.clear_pipeline_cache()
    reset_peak()


def allocated_gib() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def picture(side: int, seed: int) -> Any:
    """A textured colour gradient: something a VAE can encode without degenerate statistics."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    phase = rng.uniform(0, 6.28, 3)
    rgb = np.stack([127 + 100 * np.sin(6 * x * (1 + c) + 4 * y + phase[c]) for c in range(3)], axis=-1)
    return np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)


def write_images(folder: Path, side: int, count: int, seed: int, captions: bool) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(picture(side, seed + i)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"{PROMPT} number {i}")
    return folder


def edit_inputs(folder: Path, side: int) -> tuple[Path, Path]:
    """A photo and a mask over its middle half."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image, mask = folder / "photo.png", folder / "photo_mask.png"
    Image.fromarray(picture(side, 99)).save(image)
    grey = np.zeros((side, side), np.uint8)
    grey[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    Image.fromarray(grey).save(mask)
    return image, mask


# ---- config -----------------------------------------------------------------------------------------------


def compose(config: str, overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config, overrides=overrides)


def family_of(model: str) -> Any:
    from hydra.utils import instantiate

    return instantiate(compose("train", [f"model={model}"]).model)


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One run of the check: where it writes, what it may run, and what it found so far."""

    work: Path
    out_dir: Path
    cuda: bool
    budget_s: float
    edit_steps: int
    oom_cap_gib: float
    cases: list[str]
    header: dict[str, Any]
    command: str
    results: list[Result] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    loras: dict[str, Path] = field(default_factory=dict)

    def wanted(self, case: str) -> bool:
        return any(fnmatch.fnmatch(case, pattern) for pattern in self.cases)

    def run_case(self, model: str, case: str, body: Callable[[Result], None]) -> Result:
        result = Result(model, case)
        elapsed = time.perf_counter() - self.started
        if elapsed > self.budget_s:
            result.status, result.note = "skipped", f"time budget ({self.budget_s:.0f} s) spent"
        else:
            print(f"[{elapsed:6.1f}s] {model} {case} ...", flush=True)
            free_memory()
            result.details["resident_gib_before"] = allocated_gib()
            start = time.perf_counter()
            try:
                body(result)
            except CheckFailed as error:
                result.status, result.note = "FAIL", str(error)
            except Exception as error:  # one broken case must not lose the rest of the table
                result.status, result.note = "FAIL", f"{type(error).__name__}: {_first_line(error)}"
                log.exception("%s %s failed", model, case)
            result.wall_s = time.perf_counter() - start
            if not case.startswith("oom-"):  # those ran in a child process: this one's peak says nothing
                result.peak_gib = peak_gib()
            free_memory()
            print(f"          {result.status} {result.note}", flush=True)
        self.results.append(result)
        self.write()
        return result

    def write(self) -> None:
        from stylekit.io import atomic_write_text

        self.out_dir.mkdir(parents=True, exist_ok=True)
        raw = {"header": self.header, "command": self.command, "results": [asdict(r) for r in self.results]}
        atomic_write_text(self.out_dir / "gpu_results.json", json.dumps(raw, indent=1, default=str) + "\n")
        atomic_write_text(self.out_dir / "GPU_RESULTS.md", markdown(self))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def _refused_on_cpu(result: Result, check_run: Check, overrides: list[str], run: Callable[[], Any]) -> bool:
    """On CPU a quantized case must be refused with the one-line CUDA message; True when it was."""
    from stylekit.errors import UsageError

    quantized = any(o.startswith("model.quantize=") and o != "model.quantize=none" for o in overrides)
    if check_run.cuda or not quantized:
        return False
    try:
        run()
    except UsageError as error:
        check("needs a CUDA GPU" in str(error), f"refused with an unclear message: {_first_line(error)}")
        result.status, result.note = "refused", f"on CPU: {_first_line(error)}"
        return True
    raise CheckFailed("a CUDA-only setting ran on CPU instead of being refused")


# ---- training ---------------------------------------------------------------------------------------------


@dataclass
class TrainSetup:
    model: str
    family: Any
    data: Path
    controls: Path | None
    cache: Path

    def overrides(self, run_dir: Path, checkpoints: Path, **extra: Any) -> list[str]:
        settings: dict[str, Any] = {
            "model": self.model,
            "model.dtype": "bf16",
            "trainer.mixed_precision": "bf16",
            "logger": "none",
            "data.dataset_dir": self.data,
            "output_dir": run_dir,
            "trainer.checkpoint_root": checkpoints,
            "trainer.cache_dir": self.cache,
            "trainer.gradient_checkpointing": True,
            "trainer.validation_steps": 2,
            "lora.rank": 16,
            "lora.alpha": 16,
            "seed": 0,
        }
        if self.controls is not None:
            settings["data.control_dir"] = self.controls
        settings.update(extra)
        return [f"{key}={value}" for key, value in settings.items()]


def train_setup(check_run: Check, model: str) -> TrainSetup:
    family = family_of(model)
    side = int(family.resolution)
    root = check_run.work / model
    data = root / "data"
    if not data.exists():
        write_images(data, side, 3, seed=0, captions=True)
    controls = None
    if family.needs_control:
        controls = root / "controls"
        if not controls.exists():
            write_images(controls, side, 3, seed=100, captions=False)
    return TrainSetup(model, family, data, controls, root / "cache")


def train(overrides: list[str]) -> float:
    from stylekit.train.run import run

    return float(run(compose("train", overrides)))


def step_seconds(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["train/step_seconds"]) for row in rows if "train/step_seconds" in row]


def median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in root.rglob("state.json"))


def case_train_bf16(check_run: Check, setup: TrainSetup, result: Result) -> None:
    """Steps 1-4 with a validation (samples) at step 2 and checkpoints at 2 and 4; a rerun to 6 resumes at 4."""
    root = check_run.work / setup.model / "train-bf16"
    checkpoints = root / "checkpoints"
    first, second = root / "run1", root / "run2"
    every = {"trainer.validate_every": 2, "trainer.checkpoint_every": 2, "trainer.keep_checkpoints": 3}
    loss1 = train(setup.overrides(first, checkpoints, **every, **{"trainer.max_steps": 4}))
    check((first / "samples" / "step_000002.png").is_file(), "no validation samples at step 2")
    check(
        checkpoint_steps(checkpoints) == [2, 4], f"checkpoints at {checkpoint_steps(checkpoints)}, not [2, 4]"
    )
    loss2 = train(setup.overrides(second, checkpoints, **every, **{"trainer.max_steps": 6}))
    resumed = step_seconds(second)
    check(bool(resumed) and resumed[0][0] == 5, f"the rerun did not resume at step 5 (steps {resumed[:1]})")
    lora = second / "lora" / "pytorch_lora_weights.safetensors"
    check(lora.is_file(), "no LoRA saved after the resumed run")
    check(math.isfinite(loss1) and math.isfinite(loss2), f"validation loss not finite: {loss1}, {loss2}")
    steps = step_seconds(first) + resumed
    # The first step after a load pays for kernel selection and allocator growth.
    result.s_per_step = median([s for step, s in steps if step not in (1, 5)])
    result.details.update(val_loss=[loss1, loss2], checkpoints=checkpoint_steps(checkpoints))
    check_run.loras[setup.model] = lora.parent


def case_train_quantized(check_run: Check, setup: TrainSetup, result: Result, quantize: str) -> None:
    """Three steps with the denoiser in nf4/int8, then the saved LoRA checked in a fresh quantized pipeline."""
    root = check_run.work / setup.model / f"train-{quantize}"
    overrides = setup.overrides(
        root / "run", root / "checkpoints",
        **{"model.quantize": quantize, "trainer.max_steps": 3, "trainer.validate_every": 3,
           "trainer.checkpoint_every": 3},
    )  # fmt: skip
    if _refused_on_cpu(result, check_run, overrides, lambda: train(overrides)):
        return
    loss = train(overrides)
    check(math.isfinite(loss), f"validation loss {loss}")
    check((root / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file(), "no LoRA saved")
    result.s_per_step = median([s for step, s in step_seconds(root / "run") if step != 1])
    result.details.update(val_loss=loss)


# ---- editing ----------------------------------------------------------------------------------------------


def edit(overrides: list[str]) -> dict[str, Any]:
    from stylekit.inpaint import run as inpaint_run

    return inpaint_run.run(compose("inpaint", overrides))


def check_edit(image: Path, mask: Path, output: Path) -> None:
    """The edited file is whole, the pixels outside the mask are the input's, and the masked region holds an
    image (a NaN in bf16 comes out as one flat colour)."""
    import numpy as np
    from PIL import Image

    check(output.is_file(), f"no {output.name} written")
    before = np.asarray(Image.open(image).convert("RGB"))
    after = np.asarray(Image.open(output).convert("RGB"))
    check(after.shape == before.shape, f"output is {after.shape}, input {before.shape}")
    inside = np.asarray(Image.open(mask).convert("L")) > 127
    check(np.array_equal(after[~inside], before[~inside]), "pixels outside the mask changed")
    check(float(after[inside].std()) > 0.5, "the masked region is one flat colour (NaN in the model?)")


def case_edit(check_run: Check, model: str, result: Result, extra: list[str]) -> None:
    """Load + one edit, then two more edits on the cached pipeline: s/edit is their mean."""
    family = family_of(model)
    side = int(family.resolution)
    root = check_run.work / model / result.case
    image, mask = edit_inputs(check_run.work / model / "edit-inputs", side)
    base = [f"model={model}", "model.dtype=bf16", f"prompt={EDIT_PROMPT}", f"image={image}", f"mask={mask}",
            f"num_inference_steps={check_run.edit_steps}", *extra]  # fmt: skip
    lora = check_run.loras.get(model)
    if lora is not None:  # the LoRA trained by train-bf16: LoRA loading on the edit pipeline, on the device
        base.append(f"lora_weights={lora}")
    result.details.update(lora=lora is not None, steps=check_run.edit_steps)
    first = base + [f"output_dir={root / 'first'}"]
    if _refused_on_cpu(result, check_run, first, lambda: edit(first)):
        return
    start = time.perf_counter()
    edit(first)
    first_s = time.perf_counter() - start
    check_edit(image, mask, root / "first" / "photo_edited.png")
    summary = edit(base + [f"output_dir={root / 'warm'}", "num_images=2"])
    for path in summary["outputs"]:
        check_edit(image, mask, Path(path))
    result.s_per_edit = summary["seconds"] / 2
    result.load_s = max(0.0, first_s - result.s_per_edit)


# ---- out of memory ----------------------------------------------------------------------------------------


@dataclass
class OomPlan:
    """An over-large run and the memory cap that makes it fail fast on any card."""

    cap_gib: float
    batch: int
    train_side: int
    inpaint_area: int
    emulate: bool


def oom_plan(check_run: Check, family: Any) -> OomPlan:
    if not check_run.cuda:
        # Emulated (bench/oom_child.py): a 256 KiB cap stops the over-large run at its first convolution.
        return OomPlan(cap_gib=1 / 4096, batch=16, train_side=256, inpaint_area=1024 * 1024, emulate=True)
    side = int(family.resolution)
    # 64 images of 1024 px in one batch, whatever the model's own resolution: far past any cap below 40 GiB.
    batch = max(8, math.ceil(64 * (1024 / side) ** 2))
    return OomPlan(check_run.oom_cap_gib, batch, side, 8192 * 8192, emulate=False)


def run_child(plan: OomPlan, task: str, overrides: list[str], log_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bench.oom_child", f"--cap-gib={plan.cap_gib}"]
    command += ["--emulate"] if plan.emulate else []
    command += [task, *overrides]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log_path.write_text(f"$ {shlex.join(command)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done


def judge_oom(done: subprocess.CompletedProcess, partial: list[Path]) -> str:
    """What the user must see: exit code 2, the advice as the last stderr line, no traceback, no partial file.
    Returns that line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    check(done.returncode == 2, f"exit code {done.returncode}, not 2; last stderr line: {last[:200]!r}")
    check(last.startswith(f"error: {OOM_ADVICE}"), f"last stderr line is not the advice: {last[:200]!r}")
    check("Traceback" not in done.stderr, "a traceback was printed")
    check(not partial, f"partial output left: {', '.join(str(p) for p in partial[:5])}")
    return last


def partial_files(folder: Path, finished: Callable[[Path], bool]) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".tmp" or finished(p))]


def case_oom_train(check_run: Check, setup: TrainSetup, result: Result) -> None:
    plan = oom_plan(check_run, setup.family)
    root = check_run.work / setup.model / "oom-train"
    data = write_images(root / "data", plan.train_side, 2, seed=0, captions=True)
    controls = (
        write_images(root / "controls", plan.train_side, 2, seed=100, captions=False)
        if setup.controls is not None
        else None
    )
    big = TrainSetup(setup.model, setup.family, data, controls, root / "cache")
    overrides = big.overrides(
        root / "run", root / "checkpoints",
        **{"data.resolution": plan.train_side, "data.repeats": plan.batch // 2, "trainer.batch_size": plan.batch,
           "trainer.max_steps": 2, "trainer.gradient_checkpointing": False, "hydra.run.dir": root / "hydra"},
    )  # fmt: skip
    done = run_child(plan, "train", overrides, root / "child.log")
    partial = partial_files(root, lambda p: "lora" in p.parts or p.name == "COMPLETE")
    result.note = judge_oom(done, partial)[len("error: ") :][:160]
    result.details.update(cap_gib=plan.cap_gib, batch=plan.batch, px=plan.train_side, emulated=plan.emulate)


def case_oom_inpaint(check_run: Check, model: str, result: Result) -> None:
    family = family_of(model)
    plan = oom_plan(check_run, family)
    root = check_run.work / model / "oom-inpaint"
    image, mask = edit_inputs(root / "inputs", int(family.resolution))
    overrides = [f"model={model}", "model.dtype=bf16", f"model.native_area={plan.inpaint_area}",
                 f"prompt={EDIT_PROMPT}", f"image={image}", f"mask={mask}", "num_inference_steps=1",
                 f"output_dir={root / 'out'}", f"hydra.run.dir={root / 'hydra'}"]  # fmt: skip
    done = run_child(plan, "inpaint", overrides, root / "child.log")
    partial = partial_files(root / "out", lambda p: p.suffix == ".png")
    result.note = judge_oom(done, partial)[len("error: ") :][:160]
    side = int(math.isqrt(plan.inpaint_area))
    result.details.update(cap_gib=plan.cap_gib, px=side, emulated=plan.emulate)


# ---- the plan ---------------------------------------------------------------------------------------------


def models_for(family: str, tiny_only: bool) -> list[str]:
    return [f"tiny_{family}"] + ([] if tiny_only else [f"shallow_{family}"])


def run_model(check_run: Check, model: str) -> None:
    config = CONF / "model" / f"{model}.yaml"
    cases = [*TRAIN_CASES, *edit_cases(check_run, model), *OOM_CASES]
    cases = [c for c in cases if check_run.wanted(c)]
    if not config.exists():
        for case in cases:
            check_run.results.append(
                Result(model, case, "skipped", f"conf/model/{model}.yaml is not in this checkout")
            )
        check_run.write()
        return
    # The OOM cases need the real widths; the tiny models only show the message on CPU (emulated there).
    oom_here = model.startswith("shallow_") or not check_run.cuda
    setup = train_setup(check_run, model)
    for case in cases:
        if case == "train-bf16":
            check_run.run_case(model, case, lambda r: case_train_bf16(check_run, setup, r))
        elif case in ("train-nf4", "train-int8"):
            quantize = case.split("-")[1]
            check_run.run_case(
                model, case, lambda r, q=quantize: case_train_quantized(check_run, setup, r, q)
            )
        elif case.startswith("edit-"):
            extra = edit_overrides(check_run, model, case)
            if extra is None:
                check_run.results.append(Result(model, case, "skipped", "model.offload needs CUDA"))
                check_run.write()
            else:
                check_run.run_case(model, case, lambda r, e=extra: case_edit(check_run, model, r, e))
        elif case in OOM_CASES and not oom_here:
            check_run.results.append(
                Result(model, case, "skipped", "provoked on the shallow (real-width) model")
            )
            check_run.write()
        elif case == "oom-train":
            check_run.run_case(model, case, lambda r: case_oom_train(check_run, setup, r))
        elif case == "oom-inpaint":
            check_run.run_case(model, case, lambda r: case_oom_inpaint(check_run, model, r))


def edit_cases(check_run: Check, model: str) -> list[str]:
    if not (CONF / "model" / f"{model}.yaml").exists():
        return ["edit-bf16", *(f"edit-{v}" for v in EDIT_VARIANTS)]
    pipelines = list(family_of(model).inpaint_pipeline_classes)
    return [f"edit-{p}-bf16" for p in pipelines] + [f"edit-{v}" for v in EDIT_VARIANTS]


def edit_overrides(check_run: Check, model: str, case: str) -> list[str] | None:
    variant = case[len("edit-") :]
    if variant.startswith("offload-"):
        return [f"model.offload={variant.split('-')[1]}"] if check_run.cuda else None
    if variant == "nf4":
        return ["model.quantize=nf4"]
    return [f"model.pipeline={variant.removesuffix('-bf16')}"]


# ---- the table --------------------------------------------------------------------------------------------


def markdown(check_run: Check) -> str:
    h = check_run.header

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    if h.get("device") == "cuda":
        title = f"{h['gpu']} ({h['gpu_memory_gib']} GiB), driver {h['driver']}, CUDA {h['cuda']}"
    else:
        title = "CPU dry run (tiny models; CUDA-only cases refused, OOM emulated)"
    counts = {s: sum(r.status == s for r in check_run.results) for s in ("ok", "refused", "FAIL", "skipped")}
    lines = [
        f"# stylekit on CUDA: {title}",
        "",
        f"{h['date']}; torch {h['torch']}, Python {h['python']}, diffusers {h['diffusers']}, transformers "
        f"{h['transformers']}, peft {h['peft']}, accelerate {h['accelerate']}, bitsandbytes {h['bitsandbytes']}, "
        f"hydra-core {h['hydra-core']}. Command: `{check_run.command}`. "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f", {time.perf_counter() - check_run.started:.0f} s.",
        "",
        "Training: bf16 weights + bf16 autocast, LoRA rank 16, batch 1, gradient checkpointing; `train-bf16` runs "
        "steps 1-4 (validation with samples at 2, checkpoints at 2 and 4) and a rerun to 6 that must resume at 5; "
        "`train-nf4`/`-int8` quantize the denoiser (bitsandbytes) for 3 steps and load the LoRA into a fresh "
        "quantized pipeline. s/step = median step time without the first step after a load. Editing: "
        f"{check_run.edit_steps} steps with that LoRA; load s = first call minus one edit, s/edit = mean of two "
        "calls on the loaded pipeline. Peak = `torch.cuda.max_memory_allocated` over the case. `oom-*`: an "
        "over-large batch / edit area in a child process whose CUDA memory is capped (cap in the JSON), run "
        "through scripts/train.py and scripts/inpaint.py; it must exit 2 with the advice as its last line, no "
        "traceback and no partial file. Raw figures: gpu_results.json.",
        "",
        "| model | case | status | s/step | s/edit | load s | peak GiB | wall s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in check_run.results:
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r.model} | {r.case} | {r.status} | {fmt(r.s_per_step, '.3f')} | {fmt(r.s_per_edit, '.2f')} | "
            f"{fmt(r.load_s, '.1f')} | {fmt(r.peak_gib, '.2f')} | {fmt(r.wall_s, '.1f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """stylekit's INFO log goes to a file: the console keeps one line per case."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("stylekit", "bench")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="only the tiny models (no shallow_* ones)")
    parser.add_argument("--cpu", action="store_true", help="the CPU dry run: hide any GPU")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cases", default="*", help="comma-separated glob patterns: 'train-*,oom-*'")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    parser.add_argument("--edit-steps", type=int, default=8)
    parser.add_argument("--oom-cap-gib", type=float, default=20.0, help="CUDA memory cap of the OOM cases")
    parser.add_argument("--out-dir", type=Path, help="default: bench/ (CUDA) or outputs/gpu_check_cpu/ (CPU)")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temp folder, removed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    saved_env = {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "WANDB_MODE")}
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(args, argv, torch.cuda.is_available())
    finally:
        torch.set_num_threads(threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _main(args: argparse.Namespace, argv: list[str] | None, cuda: bool) -> int:
    import torch

    if args.cpu and cuda:
        print("--cpu: torch had already started CUDA in this process; run the check as its own process",
              file=sys.stderr)  # fmt: skip
        return 2
    if not cuda and not args.cpu:
        print("bench/gpu_check.py needs a CUDA GPU; --tiny --cpu is its CPU dry run", file=sys.stderr)
        return 2
    if not cuda:
        # Tiny models gain nothing from intra-op threads; on a shared CPU they make bf16 steps many times slower.
        torch.set_num_threads(1)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or (ROOT / "bench" if cuda else ROOT / "outputs" / "gpu_check_cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.gpu_check " + shlex.join(argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stylekit-gpu-check-")))
        else:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        stack.enter_context(logging_to(out_dir / "gpu_check.log"))
        check_run = Check(
            work=work, out_dir=out_dir, cuda=cuda, budget_s=args.budget_s, edit_steps=args.edit_steps,
            oom_cap_gib=args.oom_cap_gib, cases=[c for c in args.cases.split(",") if c],
            header=device_header(cuda), command=command.strip(),
        )  # fmt: skip
        check_run.write()
        # Every tiny model first (quick, and they prove each path), then the real-width ones.
        for model in [m for tiny in (True, False) for f in families for m in models_for(f, args.tiny)
                      if m.startswith("tiny_") == tiny]:  # fmt: skip
            run_model(check_run, model)
        check_run.write()
    failed = [r for r in check_run.results if r.status == "FAIL"]
    print(f"wrote {out_dir / 'GPU_RESULTS.md'}: {len(check_run.results)} cases, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
