"""`stylekit doctor`: what this machine can run, and what is missing, without printing any secret."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# Approximate peak VRAM (GiB) per family and mode, for a batch of 1 at 1024 px with gradient checkpointing and
# cached latents. Sources: the checkpoints' published weight sizes (FLUX.1-dev transformer 23.8 GB bf16, T5-XXL
# 9.5 GB; SDXL UNet 5.1 GB; Qwen-Image 20B transformer ~41 GB bf16, Qwen2.5-VL-7B encoder ~16.6 GB) plus
# activations and optimizer state as reported in diffusers' and ai-toolkit's training guides. Estimates, not
# measurements from this project: bench/gpu.py measures them on a real card.
VRAM_GIB = {
    "flux": {"train bf16": 40, "train nf4": 18, "inpaint bf16": 36, "inpaint offload": 24, "inpaint nf4": 16},
    "sdxl": {"train bf16": 16, "train nf4": 12, "inpaint bf16": 10, "inpaint offload": 6, "inpaint nf4": 8},
    "qwen_edit": {
        "train bf16": 80,
        "train nf4": 32,
        "inpaint bf16": 62,
        "inpaint offload": 44,
        "inpaint nf4": 24,
    },
}


def _credential(env: tuple[str, ...], files: tuple[Path, ...], needle: str | None = None) -> str:
    for name in env:
        if os.environ.get(name):
            return f"yes (${name})"
    for path in files:
        try:
            if path.is_file() and (needle is None or needle in path.read_text(errors="ignore")):
                return f"yes ({path})"
        except OSError:
            continue
    return "no"


def credentials() -> dict[str, str]:
    home = Path.home()
    hf_home = Path(os.environ.get("HF_HOME", home / ".cache" / "huggingface"))
    return {
        "Hugging Face": _credential(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), (hf_home / "token",)),
        "Weights & Biases": _credential(("WANDB_API_KEY",), (home / ".netrc",), needle="api.wandb.ai"),
        "Modal": _credential(("MODAL_TOKEN_ID",), (home / ".modal.toml",)),
    }


def hf_cache_size() -> tuple[Path, int]:
    from huggingface_hub.constants import HF_HUB_CACHE

    root = Path(HF_HUB_CACHE)
    total = 0
    if root.exists():
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                if not path.is_symlink():
                    total += path.stat().st_size
    return root, total


def fits(free_gib: float) -> dict[str, list[str]]:
    return {
        family: [mode for mode, need in modes.items() if need <= free_gib]
        for family, modes in VRAM_GIB.items()
    }


def report() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"Python {sys.version.split()[0]} on {platform.platform()}")
    console.print(f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    best = 0.0
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            best = max(best, free / 2**30)
            name = torch.cuda.get_device_name(index)
            console.print(f"cuda:{index} {name}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    else:
        console.print(
            "[yellow]No CUDA device[/]: training and editing run on CPU, for smoke runs on tiny models only."
        )
    table = Table(title=f"What fits in {best:.0f} GiB (estimates; see stylekit/doctor.py for sources)")
    table.add_column("family")
    for mode in VRAM_GIB["flux"]:
        table.add_column(f"{mode} (GiB)")
    for family, modes in VRAM_GIB.items():
        cells = [f"[green]{need}[/]" if need <= best else f"[red]{need}[/]" for need in modes.values()]
        table.add_row(family, *cells)
    console.print(table)
    for service, state in credentials().items():
        console.print(f"{service} credentials: {state}")
    root, size = hf_cache_size()
    console.print(f"HF cache {root}: {size / 2**30:.2f} GiB")
