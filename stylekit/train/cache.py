"""VAE latents and text embeddings, computed once and kept on disk as safetensors.

Entries are keyed by content hash + crop/size/flip + model, so they are shared by reruns and by every job of a
sweep (a LoRA rank x lr grid encodes the dataset once). Files are written to a temp name and renamed, so two
jobs filling the same cache at once cannot leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    from stylekit.paths import cache_root

    return cache_root() / "encoded"


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    def __str__(self) -> str:
        return f"{self.hits} hits, {self.misses} encoded"


class TensorCache:
    """A folder of `<key>.safetensors` files, each holding a dict of CPU tensors."""

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.stats = CacheStats()

    def _path(self, key: str) -> Path:
        digest = short_hash(key)
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self._path(key)
        if self.enabled and path.exists():
            try:
                tensors = load_file(str(path))
                self.stats.hits += 1
                return tensors
            except Exception as error:  # a damaged entry is re-encoded, not fatal
                log.warning("Re-encoding damaged cache entry %s (%s)", path, error)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
        self.stats.misses += 1
        if self.enabled:
            self._write(path, tensors)
        return tensors

    def _write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
