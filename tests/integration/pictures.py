"""Training photos for the integration tests: colour gradients with texture, different per seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (128, 96)) -> np.ndarray:
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    rgb = np.stack([127 + 100 * np.sin(x * 0.05 * (1 + c) + y * 0.03 + phase[c]) for c in range(3)], axis=-1)
    return np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)


def captioned_images(folder: Path, count: int = 3, seed: int = 0) -> Path:
    """`count` pictures img<i>.png with captions naming the trigger `sks`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(picture(seed + i)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks cat number {i}")
    return folder
