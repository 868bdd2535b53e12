"""Inpainting orchestration: validate every input, load the family's pipeline once, edit each image.

Order matters for the user: every file, mask and setting is checked before any weights load, so a typo in the
30th mask of a batch costs a second, not a model load. Then one pipeline serves every image and every seed,
and stays cached for the next ``run`` in the same process (sweeps, the Modal worker). Per output: mask ops ->
crop around the mask -> pre steps (crop resolution) -> resize to the family's size -> ``family.edit`` ->
resize back -> post steps -> composite (pixels outside the mask copied bit for bit) -> atomic PNG with the
settings as text chunks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from PIL import Image

from stylekit.errors import UsageError
from stylekit.inpaint.images import find_pairs, load_image, load_mask, output_path, save_png_atomic
from stylekit.inpaint.masks import (
    CropPlan,
    binarize,
    composite,
    cover_cells,
    crop_array,
    feather,
    from_model,
    grow,
    min_crop_side,
    plan_crop,
    to_model,
)
from stylekit.inpaint.steps import (
    PostStep,
    PreStep,
    StepContext,
    resolve_steps,
    run_post_steps,
    run_pre_steps,
)

if TYPE_CHECKING:
    from stylekit.models.base import ModelFamily

log = logging.getLogger(__name__)

# diffusers' standard LoRA file name, which stylekit's training writes too.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SETTING_KEYS = ("negative_prompt", "num_inference_steps", "guidance_scale", "true_cfg_scale", "strength")

# The last loaded pipeline, keyed by its resolved model config: later runs in this process reuse it.
_PIPELINE_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class Lora:
    given: str  # the lora_weights entry as written, for messages and metadata
    file: Path
    scale: float


@dataclass
class Options:
    """The run's settings, read from the config and checked."""

    prompt: str
    settings: dict[str, Any]
    seeds: list[int]
    output_dir: Path
    loras: list[Lora]
    threshold: float
    grow: int
    feather: int
    resize: bool
    context: float | str
    max_upscale: float
    pre_names: list[str]
    post_names: list[str]
    pre_steps: list[tuple[str, PreStep]] = field(default_factory=list)
    post_steps: list[tuple[str, PostStep]] = field(default_factory=list)
    save_comparison: bool = False
    skip_existing: bool = False
    protected: list[Path] = field(default_factory=list)


@dataclass
class Job:
    """One (image, mask) pair and the outputs still to write for it: (seed, path)."""

    image: Path
    mask: Path
    outputs: list[tuple[int, Path]]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Edit every image of the run; returns what was written and how long it took."""
    start = time.perf_counter()
    family, opts, jobs, skipped = prepare(cfg)
    written: list[Path] = []
    if jobs:
        _remove_stale_temps(opts, jobs)
        with _oom_as_usage_error("loading the model"):
            pipe = load_pipeline(family, cfg.model)
        # The pipeline's execution device walks every module's hooks: ask once per run, not per image.
        device = getattr(pipe, "_execution_device", None) or pipe.device
        _warn_if_pre_steps_are_unseen(family, pipe, opts)
        with _loras_applied(pipe, opts.loras, family), Saver() as saver:
            for job in jobs:
                written += edit_job(job, Editor(family, pipe, device, saver), opts)
    seconds = time.perf_counter() - start
    log.info("Wrote %d images to %s in %.1fs (%d skipped).", len(written), opts.output_dir, seconds, skipped)
    return {
        "outputs": [str(p) for p in written],
        "skipped": skipped,
        "seconds": seconds,
        "seconds_per_image": seconds / len(written) if written else 0.0,
    }


_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # save_png_atomic's temp file for output \1


def _remove_stale_temps(opts: Options, jobs: list[Job]) -> None:
    """Delete the temp files a run killed mid-save (kill -9 skips every cleanup) left for the outputs this run
    is about to write: hidden `.<output name>.<12 hex>.tmp` files (save_png_atomic's names) only."""
    suffixes = ("edited", "comparison") if opts.save_comparison else ("edited",)
    names = {
        output_path(opts.output_dir, job.image.stem, seed if len(opts.seeds) > 1 else None, suffix).name
        for job in jobs
        for seed, _ in job.outputs
        for suffix in suffixes
    }
    with contextlib.suppress(OSError):
        for path in opts.output_dir.iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if match and match[1] in names:
                log.info("removing %s, left by a run that was killed while saving", path)
                with contextlib.suppress(OSError):
                    path.unlink()


class Saver:
    """Writes outputs on one background thread, so encoding a PNG (about a second for 4 MP) and its fsync
    overlap the next model call. At most MAX_PENDING results wait in memory; a failed save stops the run at
    the next submit, and leaving the block waits for every save (also when the run is failing)."""

    MAX_PENDING = 2

    def __init__(self) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylekit-save")
        self._pending: list[Future[Any]] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args, **kwargs))
        while len(self._pending) > self.MAX_PENDING:
            self._pending.pop(0).result()

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:  # when the run is failing already, its own error is the one to report
            for future in self._pending:
                future.result()


# ---- validation: everything before any weights load -------------------------------------------------------


def prepare(cfg: DictConfig) -> tuple[ModelFamily, Options, list[Job], int]:
    """Check the whole run; raise one UsageError listing every problem (one line each). No weights load."""
    from stylekit import schema

    try:
        schema.validate("inpaint", cfg)
    except UsageError as error:
        # Bad settings: the files they name are still checked, so one run reports everything it can.
        found = [str(error)]
        _record(found, lambda: find_pairs(_value(cfg, "image"), _value(cfg, "mask")))
        raise UsageError(schema.listed(found)) from None
    problems: list[str] = []
    opts = read_options(cfg, problems)
    family = _record(problems, lambda: build_family(cfg))
    pairs = _record(problems, lambda: find_pairs(_value(cfg, "image"), _value(cfg, "mask"))) or []
    jobs, skipped = _jobs(pairs, opts, problems)
    for job in jobs if family is not None else []:
        _record(problems, lambda job=job: _check_pair(job, opts, family))
    if problems:
        raise UsageError(schema.listed(problems))  # a file met again by several pairs is listed once
    return family, opts, jobs, skipped


def read_options(cfg: DictConfig, problems: list[str]) -> Options:
    mask_cfg = _value(cfg, "inpaint.mask") or {}
    context = _value(cfg, "inpaint.context")
    seed = int(_value(cfg, "seed"))
    opts = Options(
        prompt=str(_value(cfg, "prompt", required=True)),
        settings={key: _value(cfg, key) for key in SETTING_KEYS},
        seeds=[seed + i for i in range(_value(cfg, "num_images"))],
        output_dir=_output_dir(cfg, problems),
        loras=_record(problems, lambda: parse_loras(_value(cfg, "lora_weights"))) or [],
        threshold=float(mask_cfg.get("threshold", 0.5)),
        grow=int(mask_cfg.get("grow", 0)),
        feather=int(mask_cfg.get("feather", 0)),
        resize=bool(mask_cfg.get("resize", False)),
        context=0.5 if context is None else context,
        max_upscale=float(_or(_value(cfg, "inpaint.max_upscale"), 4.0)),
        pre_names=list(_value(cfg, "inpaint.preprocess") or []),
        post_names=list(_value(cfg, "inpaint.postprocess") or []),
        save_comparison=bool(_value(cfg, "save_comparison")),
        skip_existing=bool(_value(cfg, "skip_existing")),
    )
    steps = _record(problems, lambda: resolve_steps(opts.pre_names, opts.post_names))
    if steps:
        opts.pre_steps, opts.post_steps = steps
    return opts


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def build_family(cfg: DictConfig) -> ModelFamily:
    """The model family from cfg.model (no weights), with its config errors as the user's one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.model, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, UsageError):
            raise error.__cause__ from None
        raise


def parse_loras(value: Any) -> list[Lora]:
    """``lora_weights``: a path or a list of "path[:scale]"; a folder means its pytorch_lora_weights.safetensors."""
    if value is None or value == "":
        return []
    entries = [value] if isinstance(value, str) else list(value)
    loras = []
    for entry in entries:
        text = str(entry).strip()
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        # "path:0.8" is a scale unless the whole entry names an existing file or folder ("run:1").
        if sep and head and not Path(text).expanduser().exists():
            with contextlib.suppress(ValueError):
                path, scale = head, float(tail)
        if not math.isfinite(scale):
            raise UsageError(f"lora_weights entry {text!r} has scale {scale}; use a finite number like 0.8")
        loras.append(Lora(text, _lora_file(Path(path).expanduser(), text), scale))
    return loras


def _lora_file(path: Path, given: str) -> Path:
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise UsageError(
                f"lora_weights entry {given!r}: folder {path} has no {LORA_WEIGHT_NAME}; "
                "pass the .safetensors file itself"
            )
        return path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise UsageError(f"lora_weights entry {given!r}: {path} does not exist; check the path")
    return path


def _output_dir(cfg: DictConfig, problems: list[str]) -> Path:
    try:
        value = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        # ${hydra:runtime.output_dir} resolves only inside the Hydra app (scripts/inpaint.py).
        problems.append("output_dir is not set outside the Hydra app; pass output_dir=PATH")
        return Path(".")
    directory = Path(str(value or ".")).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problems.append(
            f"output_dir={directory} cannot be created ({error.strerror or error}); choose another"
        )
        return directory
    if not os.access(directory, os.W_OK | os.X_OK):
        problems.append(f"output_dir={directory} is not writable; choose another folder")
    return directory


def _jobs(pairs: list[tuple[Path, Path]], opts: Options, problems: list[str]) -> tuple[list[Job], int]:
    """The outputs each pair needs (skip_existing drops written ones); clashes and inputs as outputs are
    problems."""
    opts.protected = sorted({p for pair in pairs for p in pair})
    protected = {p.resolve() for p in opts.protected}
    suffixes = ("edited", "comparison") if opts.save_comparison else ("edited",)
    claimed: dict[Path, Path] = {}
    jobs, skipped = [], 0
    for image, mask in pairs:
        outputs = []
        for seed in opts.seeds:
            tag = seed if len(opts.seeds) > 1 else None
            for suffix in suffixes:
                path = output_path(opts.output_dir, image.stem, tag, suffix)
                _claim(path, image, protected, claimed, problems)
            edited = output_path(opts.output_dir, image.stem, tag)
            if opts.skip_existing and edited.exists():
                skipped += 1
            else:
                outputs.append((seed, edited))
        if outputs:
            jobs.append(Job(image, mask, outputs))
    return jobs, skipped


def _claim(
    path: Path, image: Path, protected: set[Path], claimed: dict[Path, Path], problems: list[str]
) -> None:
    if path.resolve() in protected:
        problems.append(f"output {path} would overwrite an input file; set output_dir elsewhere")
    elif path in claimed:
        problems.append(
            f"images {claimed[path].name} and {image.name} would both write {path.name}; rename one"
        )
    claimed.setdefault(path, image)


def _check_pair(job: Job, opts: Options, family: ModelFamily) -> None:
    """Decode both files and plan the crop, so size mismatches and empty masks stop the run here."""
    image = load_image(job.image)
    plan_job(job_mask(job, image.size, opts), opts, family, job.mask)


def plan_job(binary: np.ndarray, opts: Options, family: ModelFamily, source: Path) -> CropPlan:
    """The crop around the mask, at least big enough that the model's size enlarges it at most
    ``inpaint.max_upscale`` times (a 10 px mask is not blown up 50x), edited at the family's native size."""
    return plan_crop(
        binary,
        opts.context,
        family.native_area,
        family.resolution_multiple,
        source=source,
        min_side=min_crop_side(family.native_area, opts.max_upscale),
        size_rule=family.native_size,
    )


def job_mask(job: Job, size: tuple[int, int], opts: Options) -> np.ndarray:
    """The pair's mask as the bool region to regenerate: loaded, thresholded, grown."""
    grey = load_mask(job.mask, size, resize=opts.resize, threshold=opts.threshold, image_path=job.image)
    return grow(binarize(grey, opts.threshold), opts.grow)


def _record(problems: list[str], check: Any) -> Any:
    """Run ``check``; a UsageError becomes a problem line (the run stops after all checks) instead."""
    try:
        return check()
    except UsageError as error:
        problems.append(str(error))
        return None


def _value(cfg: DictConfig, key: str, required: bool = False) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise UsageError(f'{key} is required; pass {key}="..."') from None
    if required and value is None:
        raise UsageError(f'{key} is required; pass {key}="..."')
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ---- the model: load once, LoRAs on, edit ---------------------------------------------------------------


def load_pipeline(family: ModelFamily, model_cfg: DictConfig) -> Any:
    """The family's inpainting pipeline, reused while the model config stays the same."""
    key = json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True, default=str)
    if _PIPELINE_CACHE.get("key") == key:
        return _PIPELINE_CACHE["pipe"]
    clear_pipeline_cache()
    pipe = family.load_pipeline("inpaint")
    _PIPELINE_CACHE.update(key=key, pipe=pipe)
    return pipe


def clear_pipeline_cache() -> None:
    """Drop the cached pipeline (and its GPU memory) before another one loads."""
    if not _PIPELINE_CACHE:
        return
    _PIPELINE_CACHE.clear()
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _loras_applied(pipe: Any, loras: list[Lora], family: ModelFamily) -> Iterator[None]:
    """Load each LoRA as adapter lora<i> at its scale; unload them all afterwards (the pipeline is cached)."""
    _unload_loras(pipe)  # a run that crashed mid-way may have left adapters on the cached pipeline
    try:
        for index, lora in enumerate(loras):
            _load_lora(pipe, lora, f"lora{index}", family)
        if loras:
            pipe.set_adapters(
                [f"lora{i}" for i in range(len(loras))], adapter_weights=[x.scale for x in loras]
            )
        yield
    finally:
        _unload_loras(pipe)


def _load_lora(pipe: Any, lora: Lora, name: str, family: ModelFamily) -> None:
    why = None
    try:
        # Inside the RuntimeError catch: an out-of-memory error is one too, but says nothing about the file.
        with _oom_as_usage_error(f"loading lora_weights entry {lora.given!r}"):
            pipe.load_lora_weights(str(lora.file.parent), weight_name=lora.file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        why = str(error).splitlines()[0][:200]
    # diffusers only warns when no key matches the model (a LoRA for another base model) and loads nothing.
    if why is None and not any(name in names for names in pipe.get_list_adapters().values()):
        why = "none of its weights match this model's layers"
    if why is not None:
        raise UsageError(
            f"lora_weights entry {lora.given!r} does not load into {family.family} ({why}); "
            "is it a LoRA for this base model?"
        )


def _unload_loras(pipe: Any) -> None:
    get_adapters = getattr(pipe, "get_list_adapters", None)
    if get_adapters is not None and any(get_adapters().values()):
        pipe.unload_lora_weights()


@dataclass(frozen=True)
class Editor:
    """What every edit of a run shares: the family, its loaded pipeline, where it runs, the output writer."""

    family: ModelFamily
    pipe: Any
    device: Any
    saver: Saver


def edit_job(job: Job, editor: Editor, opts: Options) -> list[Path]:
    """Every output of one pair: mask ops and pre steps once, then one model call per seed."""
    family = editor.family
    image = load_image(job.image)
    profile = image.info.get("icc_profile")
    original = np.asarray(image)
    binary = job_mask(job, (original.shape[1], original.shape[0]), opts)
    crop = plan_job(binary, opts, family, job.mask)
    alpha = feather(binary, opts.feather)
    ctx = StepContext(image=crop_array(original, crop.box), mask=crop_array(binary, crop.box))
    run_pre_steps(ctx, opts.pre_steps)
    model_image = Image.fromarray(to_model(ctx.image, crop, cropped=True))
    # Whole latent cells: the pipelines shrink the mask by nearest sampling, which would miss thin strokes.
    cells = cover_cells(to_model(ctx.mask, crop, cropped=True), _latent_cell(editor.pipe))
    model_mask = Image.fromarray(cells.astype(np.uint8) * 255)
    written = []
    for seed, path in job.outputs:
        started = time.perf_counter()
        with _oom_as_usage_error(f"editing {job.image.name} at {crop.native_size[0]}x{crop.native_size[1]}"):
            generated = _generate(editor, model_image, model_mask, opts, seed)
        region = run_post_steps(ctx, from_model(generated, crop), opts.post_steps)
        result = composite(original, region, alpha, crop.box)
        text = metadata(job, family, opts, seed, crop)
        editor.saver.submit(
            _save, job, path, seed, original, result, text, opts, time.perf_counter() - started, profile
        )
        written.append(path)
    return written


def _save(
    job: Job,
    path: Path,
    seed: int,
    original: np.ndarray,
    result: np.ndarray,
    text: dict,
    opts: Options,
    took: float,
    profile: bytes | None = None,
) -> None:
    # prepare() checked every output against every input; re-checking just this pair's files keeps a batch
    # linear (checking all inputs at every save is quadratic).
    protected = (job.image, job.mask)
    save_png_atomic(result, path, text=text, protected=protected, icc_profile=profile)
    if opts.save_comparison:
        tag = seed if len(opts.seeds) > 1 else None
        side = output_path(opts.output_dir, job.image.stem, tag, suffix="comparison")
        save_png_atomic(
            side_by_side(original, result), side, text=text, protected=protected, icc_profile=profile
        )
    log.info("%s -> %s (seed %d, %.2fs)", job.image, path, seed, took)


def _latent_cell(pipe: Any) -> int:
    """Pixels per latent cell side: the VAE's downsampling (8 for every family stylekit has)."""
    return int(getattr(pipe, "vae_scale_factor", 8))


def _generate(editor: Editor, image: Image.Image, mask: Image.Image, opts: Options, seed: int) -> np.ndarray:
    import torch

    generator = torch.Generator(editor.device).manual_seed(seed)
    settings = effective_settings(editor.family, opts.settings)
    # The whole edit, also the work families do outside the pipeline's own no_grad (Qwen's VAE encode of the
    # original), keeps no autograd graph: at 1024 px that graph alone is ~14 GiB.
    with torch.inference_mode():
        out = editor.family.edit(editor.pipe, image, mask, opts.prompt, settings, generator)
    out = out.convert("RGB")
    if out.size != image.size:
        raise RuntimeError(f"{type(editor.family).__name__}.edit returned {out.size}, expected {image.size}")
    return np.asarray(out)


def _warn_if_pre_steps_are_unseen(family: ModelFamily, pipe: Any, opts: Options) -> None:
    """Pre steps change the pixels under the mask; say so when this pipeline never looks at them."""
    strength = effective_settings(family, opts.settings)["strength"]
    if opts.pre_names and not family.masked_pixels_reach_model(pipe, float(strength)):
        log.warning(
            "inpaint.preprocess=%s has no effect on %s/%s at strength %g: it regenerates the masked region "
            "from noise without seeing it; lower strength (e.g. 0.9) or use qwen_edit, whose condition "
            "image shows it",
            opts.pre_names, family.family, family.pipeline, strength,
        )  # fmt: skip


def effective_settings(family: ModelFamily, settings: dict[str, Any]) -> dict[str, Any]:
    """The run's sampling settings, the family's published defaults filling what is left null."""
    defaults = {"strength": 1.0} | {k: v for k, v in family.inference_defaults().items() if v is not None}
    return {key: settings[key] if settings[key] is not None else defaults.get(key) for key in SETTING_KEYS}


@contextlib.contextmanager
def _oom_as_usage_error(doing: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise UsageError(
                f"CUDA ran out of memory {doing}; try model.offload=model, then model.offload=sequential "
                "(slower), or model.quantize=nf4"
            ) from error
        raise


# ---- outputs ----------------------------------------------------------------------------------------------


def metadata(job: Job, family: ModelFamily, opts: Options, seed: int, plan: CropPlan) -> dict[str, str]:
    """What made this output, as PNG text chunks (strings; lists and numbers as JSON)."""
    settings = effective_settings(family, opts.settings)
    described = family.describe()
    text = {
        "prompt": opts.prompt,
        "negative_prompt": settings["negative_prompt"] or "",
        "seed": str(seed),
        "model": described["family"],
        "pretrained": described["pretrained"],
        "inpaint_pretrained": described["inpaint_pretrained"],
        "pipeline": described["pipeline"],
        "loras": json.dumps([{"path": str(x.file), "scale": x.scale} for x in opts.loras]),
        "preprocess": json.dumps(opts.pre_names),
        "postprocess": json.dumps(opts.post_names),
        "source_image": job.image.name,
        "source_mask": job.mask.name,
        "crop_box": json.dumps(list(plan.box)),
        "model_size": json.dumps(list(plan.native_size)),
        "stylekit_version": _stylekit_version(),
    }
    text.update({key: json.dumps(settings[key]) for key in SETTING_KEYS if key != "negative_prompt"})
    return text


@functools.cache
def _stylekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stylekit")
    except PackageNotFoundError:
        return "unknown"


def side_by_side(original: np.ndarray, result: np.ndarray) -> np.ndarray:
    """Input | output, with a 1/64-width white gutter between them."""
    gap = max(2, original.shape[1] // 64)
    gutter = np.full((original.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([original, gutter, result], axis=1)
