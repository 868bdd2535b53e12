"""The training task: data -> cached encodings -> LoRA steps -> checkpoints -> saved, verified LoRA.

Every random draw of a step comes from a generator seeded by (seed, micro-batch index), and the batch order is a
pure function of (seed, epoch): a run resumed from a checkpoint continues exactly where the interrupted one was.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("stylekit.train")

# Keys that do not change what is trained: a rerun differing only in these resumes the same checkpoints.
_NOT_IDENTITY = ("output_dir", "logger", "trainer.resume", "trainer.max_steps", "trainer.checkpoint_every",
                 "trainer.keep_checkpoints", "trainer.validate_every", "trainer.validation_prompts",
                 "trainer.checkpoint_root", "trainer.cache_dir")  # fmt: skip


@dataclass
class Encoded:
    """One training example, encoded: latents (+ control latents) and text tensors, batch dim 1."""

    size: tuple[int, int]
    tensors: dict[str, Any]
    is_prior: bool = False


@dataclass
class Batches:
    """Deterministic batches of equal-size examples: micro-batch m is a pure function of (seed, m)."""

    examples: list[Encoded]
    batch_size: int
    seed: int
    _orders: dict[int, list[list[int]]] = field(default_factory=dict)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            import torch

            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            by_size: dict[tuple[int, int], list[int]] = {}
            for index in torch.randperm(len(self.examples), generator=generator).tolist():
                by_size.setdefault(self.examples[index].size, []).append(index)
            batches = [
                indices[i : i + self.batch_size]
                for indices in by_size.values()
                for i in range(0, len(indices), self.batch_size)
            ]
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._orders = {epoch: [batches[i] for i in order]}
        return self._orders[epoch]

    def __len__(self) -> int:
        # Every epoch has the same number of batches; asking for epoch 0 evicted the cached current epoch, so
        # each get() past the first epoch shuffled twice.
        return len(self._epoch(next(iter(self._orders), 0)))

    def get(self, micro: int) -> dict[str, Any]:
        per_epoch = len(self)
        indices = self._epoch(micro // per_epoch)[micro % per_epoch]
        return collate([self.examples[i].tensors for i in indices])


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; sequences of different lengths (Qwen prompts) are right-padded, masks with zeros."""
    import torch

    out = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        longest = max(t.shape[1] for t in tensors) if tensors[0].ndim >= 2 else None
        if longest is not None and any(t.shape[1] != longest for t in tensors):
            tensors = [torch.nn.functional.pad(t, _pad_spec(t, longest)) for t in tensors]
        out[key] = torch.cat(tensors, dim=0)
    return out


def _pad_spec(tensor: Any, length: int) -> tuple[int, ...]:
    # F.pad counts from the last dim backwards; pad only dim 1 at its end.
    spec = [0, 0] * (tensor.ndim - 2) + [0, length - tensor.shape[1]]
    return tuple(spec)


def identity_hash(cfg: DictConfig, data_hash: str) -> str:
    """A hash of everything that determines the trained weights: the config (not where or how long it runs) and
    the data (`dataset_hash` over images, captions, control and class images)."""
    config = OmegaConf.to_container(cfg, resolve=False)
    config = {k: v for k, v in config.items() if k != "hydra"}
    for dotted in _NOT_IDENTITY:
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    identity = {"config": config, "data": data_hash}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def micro_generator(seed: int, micro: int) -> Any:
    import torch

    return torch.Generator().manual_seed((seed * 2654435761 + micro) % (2**63))


def checkpoints_dir(cfg: DictConfig) -> Path:
    """`trainer.checkpoint_root`: the folder holding one checkpoint folder per run identity."""
    return Path(cfg.trainer.get("checkpoint_root") or "outputs/checkpoints")


def checkpoint_root(cfg: DictConfig, data_hash: str) -> Path:
    """Where this run's checkpoints live. Keyed on the data as well as the config: new photos in the same
    data.dataset_dir must start a new run, never resume (or hand back) one trained on the old photos."""
    return checkpoints_dir(cfg) / f"{cfg.get('task_name', 'train')}-{identity_hash(cfg, data_hash)}"


def gradient_checkpointing(trainer: DictConfig, family: Any) -> bool:
    """trainer.gradient_checkpointing, with `auto` meaning the family's default."""
    value = trainer.get("gradient_checkpointing", "auto")
    return bool(family.gradient_checkpointing_default) if value == "auto" else bool(value)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
