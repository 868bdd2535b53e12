"""`stylekit doctor`: what this machine can run, and what is missing, without printing any secret."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def vram_gib() -> dict[str, dict[str, float]]:
    """Peak GiB per family and mode (stylekit.memory): weights, LoRA and optimizer state computed exactly from the
    published architectures, plus estimated activations and CUDA runtime overhead."""
    from stylekit.memory import GIB, table

    return {family: {mode: b.total / GIB for mode, b in modes.items()} for family, modes in table().items()}


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
        for family, modes in vram_gib().items()
    }


def report() -> None:
    import torch
    from rich.console import Console

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
    _memory_table(console, best)
    for service, state in credentials().items():
        console.print(f"{service} credentials: {state}")
    root, size = hf_cache_size()
    console.print(f"HF cache {root}: {size / 2**30:.2f} GiB")


def _memory_table(console: Any, free_gib: float) -> None:
    from rich.table import Table

    from stylekit.memory import GIB, table

    budgets = table()
    titles = list(next(iter(budgets.values())))
    grid = Table(
        title=f"Peak GiB, batch 1 at 1024 px, LoRA rank 16 (green: fits in {free_gib:.0f} GiB free)",
        caption="exact weights + LoRA + optimizer state / ~total with estimated activations and CUDA overhead; "
        "train nf4 uses optimizer.name=adamw8bit",
    )
    grid.add_column("family")
    for title in titles:
        grid.add_column(title)
    for family, modes in budgets.items():
        cells = []
        for budget in modes.values():
            colour = "green" if budget.total / GIB <= free_gib else "red"
            cells.append(f"[{colour}]{budget.exact / GIB:.1f} / ~{budget.total / GIB:.0f}[/]")
        grid.add_row(family, *cells)
    console.print(grid)
