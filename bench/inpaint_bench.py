"""Inpainting overhead on the tiny models, CPU: `python -m bench.inpaint_bench` (or `python -m bench`).

1. Overhead: the whole inpaint path (`stylekit.inpaint.run.run`: validation, decoding, mask ops, crop and
   resize, pre/post steps, `family.edit`, composite, atomic PNG save with metadata) per image over a batch of
   10, against the bare diffusers pipeline call on the same loaded pipeline at the same size (64x64). The
   pipeline is loaded before either is timed: it loads once per process, so a batch never pays for it twice.
   plumbing_ms separates stylekit's file and mask work from the family's own masking (`family.edit`; for
   Qwen edit-plus that includes encoding the original for the latent hold, which the bare call cannot do).
2. Crop-to-mask: a 2048x2048 photo with a 256x256 mask against a 64x64 photo at the model's native size; the
   model runs at the native size both times, so the ratio is what the 4-megapixel files and masks cost.

Each case is timed REPEATS times, interleaved with its baseline, and the least time of each is kept. Times
are CPU seconds of this process, all threads (the background PNG writer's included), not wall time: on a
shared 2-core runner wall-time ratios of the same code swung from 1.1 to 2.0 between runs, CPU time far less.
Torch runs on one thread (see main). `load_s` (wall) is the pipeline load the batch is spared.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BATCH = 10
REPEATS = 5
SIZE = 64  # the tiny models' native side (native_area 4096)
PROMPT = "a red cat"
MODELS = ("tiny_qwen_edit", "tiny_flux", "tiny_sdxl")


def _compose(model: str, image: Path, mask: Path, out: Path, *overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    args = [f"model={model}", f"prompt={PROMPT}", f"image={image}", f"mask={mask}", f"output_dir={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="inpaint", overrides=[*args, *overrides])


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full(x.shape, 128.0)], axis=-1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return mask


def _write_batch(folder: Path) -> tuple[Path, Path]:
    """BATCH 64x64 images whose 32x32 centre mask plus context 0.5 crops to exactly the native 64x64."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(), masks.mkdir()
    for index in range(BATCH):
        Image.fromarray(_texture(SIZE, SIZE, index)).save(images / f"img{index:02d}.png")
        Image.fromarray(_box_mask(SIZE, SIZE, (16, 16, 48, 48))).save(masks / f"img{index:02d}.png")
    return images, masks


def _bare_kwargs(family: Any, settings: dict[str, Any], image: Image.Image, mask: Image.Image) -> dict:
    """What a user calling diffusers directly would pass, with the same published settings."""
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": settings["num_inference_steps"],
    }
    if family.family == "qwen_edit":
        kwargs.update(negative_prompt=settings["negative_prompt"], true_cfg_scale=settings["true_cfg_scale"])
        if family.pipeline == "edit_plus":  # the bare pipeline cannot take a mask at all
            return kwargs | {"image": [image]}
        return kwargs | {"image": image, "mask_image": mask, "strength": settings["strength"]}
    kwargs.update(
        image=image, mask_image=mask, guidance_scale=settings["guidance_scale"], strength=settings["strength"]
    )
    if family.family == "flux":
        kwargs["max_sequence_length"] = family.max_sequence_length
    return kwargs


def _fastest(cases: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Each case's least CPU time (this process, all threads) over REPEATS interleaved rounds."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(REPEATS):
        for name, case in cases.items():
            start = time.process_time()
            case()
            best[name] = min(best[name], time.process_time() - start)
    return best


def bench_batch(model: str, folder: Path) -> dict[str, Any]:
    import torch

    from stylekit.inpaint import run as inpaint_run

    images, masks = _write_batch(folder)
    cfg = _compose(model, images, masks, folder / "out")
    family = inpaint_run.build_family(cfg)
    load_start = time.perf_counter()
    pipe = inpaint_run.load_pipeline(family, cfg.model)
    load_seconds = time.perf_counter() - load_start
    pipe.set_progress_bar_config(disable=True)
    settings = inpaint_run.effective_settings(family, {k: cfg[k] for k in inpaint_run.SETTING_KEYS})
    inputs = [
        (Image.open(p).convert("RGB"), Image.open(masks / p.name).convert("L"))
        for p in sorted(images.iterdir())
    ]

    def bare() -> None:
        for seed, (image, mask) in enumerate(inputs):
            generator = torch.Generator("cpu").manual_seed(seed)
            with family.call_context(pipe):
                pipe(**_bare_kwargs(family, settings, image, mask), generator=generator)

    def edit() -> None:
        for seed, (image, mask) in enumerate(inputs):
            family.edit(pipe, image, mask, PROMPT, settings, torch.Generator("cpu").manual_seed(seed))

    def whole() -> None:
        inpaint_run.run(cfg)

    whole(), bare()  # warm-up: first calls allocate and pick kernels
    best = _fastest({"bare": bare, "edit": edit, "whole": whole})
    return {
        "bench": "inpaint",
        "case": f"{model} ({family.pipeline}): run() per image, batch of {BATCH}",
        "seconds": best["whole"] / BATCH,
        "baseline": "bare pipeline call",
        "baseline_seconds": best["bare"] / BATCH,
        "ratio": best["whole"] / best["bare"],
        "overhead_ms": (best["whole"] - best["bare"]) / BATCH * 1000,
        # run() minus family.edit: files, masks, crops, composite, save (the family's own masking excluded).
        "plumbing_ms": (best["whole"] - best["edit"]) / BATCH * 1000,
        "load_s": load_seconds,
    }


def bench_crop(folder: Path) -> dict[str, Any]:
    from stylekit.inpaint import run as inpaint_run
    from stylekit.inpaint.images import load_image, save_png_atomic

    big, small = folder / "big", folder / "small"
    big.mkdir(), small.mkdir()
    Image.fromarray(_texture(2048, 2048, 0)).save(big / "photo.png")
    Image.fromarray(_box_mask(2048, 2048, (896, 896, 1152, 1152))).save(big / "mask.png")
    Image.fromarray(_texture(SIZE, SIZE, 0)).save(small / "photo.png")
    Image.fromarray(_box_mask(SIZE, SIZE, (16, 16, 48, 48))).save(small / "mask.png")
    configs = {
        name: _compose(MODELS[0], path / "photo.png", path / "mask.png", path / "out")
        for name, path in (("big", big), ("small", small))
    }
    inpaint_run.load_pipeline(inpaint_run.build_family(configs["big"]), configs["big"].model)
    for cfg in configs.values():
        inpaint_run.run(cfg)  # warm-up
    best = _fastest({name: (lambda cfg=cfg: inpaint_run.run(cfg)) for name, cfg in configs.items()})
    # What the big case cannot avoid: writing its 4-megapixel output (and reading the input, twice).
    photo = np.asarray(Image.open(big / "photo.png"))
    files = _fastest(
        {
            "write": lambda: save_png_atomic(photo, big / "io_probe.png"),
            "read": lambda: (load_image(big / "photo.png"), load_image(big / "photo.png")),
        }
    )
    return {
        "bench": "inpaint",
        "case": f"{MODELS[0]}: 2048x2048 image, 256x256 mask (model at {SIZE}x{SIZE})",
        "seconds": best["big"],
        "baseline": f"{SIZE}x{SIZE} image at native size",
        "baseline_seconds": best["small"],
        "ratio": best["big"] / best["small"],
        "png_write_s": files["write"],
        "png_read_x2_s": files["read"],
    }


def main() -> list[dict[str, Any]]:
    import torch

    logging.getLogger("stylekit").setLevel(logging.ERROR)  # one "No CUDA" warning per model is enough noise
    # Tiny models gain nothing from intra-op threads; on a shared 2-core runner extra threads only contend
    # (we measured a 64x64 Qwen call at 0.09 s on one thread and 1.9 s on two while other jobs ran).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("STYLEKIT_CACHE_DIR", str(ROOT / ".stylekit-cache"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="stylekit-inpaint-bench-") as tmp:
        for model in MODELS:
            (Path(tmp) / model).mkdir()
            rows.append(bench_batch(model, Path(tmp) / model))
        (Path(tmp) / "crop").mkdir()
        rows.append(bench_crop(Path(tmp) / "crop"))
    torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    from bench.__main__ import format_table

    print(format_table(main()))
