"""Real FLUX, SDXL and Qwen-Image-Edit on a CUDA machine: seconds per training step and per edit, and peak VRAM,
at 512 and 1024 px, in bf16 and nf4, with the hub weights. Writes a markdown table (bench/GPU_REAL_MODELS.md);
bench/GPU_RESULTS.md is bench/gpu_check.py's (tiny and real-width shallow models, no hub access needed).

    python -m bench.gpu                                   # all families, 512 + 1024, bf16 + nf4
    python -m bench.gpu --families flux --sizes 1024 --modes nf4
    python -m bench.gpu --tiny                            # the same code on the tiny models, on CPU (a check)

It runs the code stylekit runs: the family's encoders, denoiser, LoRA attachment, training loss and edit call.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS, EDIT_RUNS = 5, 2


@dataclass
class Row:
    family: str
    size: int
    mode: str
    train_s: float | None
    train_gib: float | None
    edit_s: float | None
    edit_gib: float | None
    note: str = ""


def _family(name: str, mode: str, tiny: bool) -> tuple[Any, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    model = f"tiny_{name}" if tiny else name
    quantize = "nf4" if mode == "nf4" else "none"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"model={model}", f"model.quantize={quantize}", "lora.rank=16"])
    return instantiate(cfg.model), cfg


def reset_peak() -> None:
    """Free what Python no longer holds and start a new peak-memory window (CUDA; a no-op elsewhere)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """The CUDA peak since reset_peak, after the queued kernels finish; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_training(name: str, size: int, mode: str, tiny: bool) -> tuple[float, float | None]:
    import torch
    from PIL import Image

    from stylekit.train.lora_io import attach_lora

    family, cfg = _family(name, mode, tiny)
    runtime = family.runtime()
    reset_peak()
    encoders = family.load_encoders(runtime)
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    control = Image.new("RGB", (size, size), (128, 100, 90)) if family.needs_control else None
    with torch.no_grad():
        batch = {"latents": family.encode_image(encoders, pixels)}
        if control is not None:
            batch["control_latents"] = family.encode_image(encoders, pixels)
        batch |= family.encode_prompt(encoders, "a photo of sks fabric", control)
    batch = {k: v.to(runtime.device) for k, v in batch.items()}
    encoders.to("cpu")
    del encoders
    reset_peak()
    denoiser = family.load_denoiser(runtime)
    denoiser.enable_gradient_checkpointing()
    torch.manual_seed(0)
    attach_lora(denoiser, cfg.lora, family)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if runtime.is_cuda
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        noise = torch.randn(batch["latents"].shape, generator=generator).to(runtime.device)
        t = family.sample_timesteps(1, generator, cfg.trainer).to(runtime.device)
        with autocast:
            loss = family.training_loss(denoiser, batch, noise, t, cfg.trainer).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator
    _sync()
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    _sync()
    seconds = (time.perf_counter() - start) / TRAIN_STEPS
    return seconds, peak_gib()


def measure_edit(name: str, size: int, mode: str, tiny: bool) -> tuple[float, float | None]:
    import torch
    from PIL import Image

    family, _ = _family(name, mode, tiny)
    reset_peak()
    pipe = family.load_pipeline("inpaint")
    image = Image.new("RGB", (size, size), (120, 110, 100))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    settings = {"strength": 1.0, **family.inference_defaults()}
    generator = torch.Generator(pipe.device).manual_seed(0)
    # As stylekit.inpaint.run edits: no autograd anywhere, so the peak is the edit's own.
    with torch.inference_mode():
        family.edit(pipe, image, mask, "a red scarf", settings, generator)  # warm-up
        _sync()
        start = time.perf_counter()
        for _ in range(EDIT_RUNS):
            family.edit(pipe, image, mask, "a red scarf", settings, generator)
        _sync()
    seconds = (time.perf_counter() - start) / EDIT_RUNS
    return seconds, peak_gib()


def run_one(name: str, size: int, mode: str, tiny: bool) -> Row:
    row = Row(name, size, "fp32 (CPU)" if tiny else mode, None, None, None, None)
    for label, measure in (("train", measure_training), ("edit", measure_edit)):
        try:
            seconds, peak = measure(name, size, mode, tiny)
            setattr(row, f"{label}_s", seconds)
            setattr(row, f"{label}_gib", peak)
        except Exception as error:  # an OOM in one cell should not lose the rest of the table
            row.note += f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:80]} "
            reset_peak()
    return row


def table(rows: list[Row], device: str) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"# GPU results ({device})",
        "",
        f"Command: `{' '.join(['python -m bench.gpu', *sys.argv[1:]])}`. Training: LoRA rank 16, batch 1, gradient "
        f"checkpointing, AdamW, mean of {TRAIN_STEPS} steps after one warm-up. Edit: the family's inpaint pipeline "
        f"at its published step count, mean of {EDIT_RUNS} calls after one warm-up. Peak = torch.cuda.max_memory_allocated.",
        "",
        "| family | px | precision | s/train step | train peak GiB | s/edit | edit peak GiB | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.size} | {r.mode} | {fmt(r.train_s, '.3f')} | {fmt(r.train_gib, '.1f')} | "
            f"{fmt(r.edit_s, '.2f')} | {fmt(r.edit_gib, '.1f')} | {r.note.strip()} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="flux,sdxl,qwen_edit")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--modes", default="bf16,nf4")
    parser.add_argument("--tiny", action="store_true", help="the tiny models on CPU: checks this script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "GPU_REAL_MODELS.md")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print(
            "bench/gpu.py needs a CUDA GPU (real models in bf16/nf4); use --tiny to check it on CPU",
            file=sys.stderr,
        )
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if args.tiny:
        modes = [m for m in modes if m != "nf4"]  # bitsandbytes quantization needs CUDA
    rows = [
        run_one(name, int(size), mode, args.tiny)
        for name in args.families.split(",")
        for size in args.sizes.split(",")
        for mode in modes
    ]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU, tiny models"
    text = table(rows, device)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
