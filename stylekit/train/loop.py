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

from stylekit.errors import UsageError

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


def check_trainer_config(cfg: DictConfig) -> None:
    """Reject bad numbers before anything heavy runs, naming the key."""
    t = cfg.trainer
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.batch_size": t.batch_size,
        "trainer.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "trainer.checkpoint_every": t.checkpoint_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.validate_every": t.validate_every,
    }
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{key}={value} must be a positive integer")
    # A typo like optimizer.lr=1e-4x must not surface as a ValueError traceback (or after the model loads).
    numbers = (
        ("seed", cfg.seed, int),
        ("lora.rank", cfg.lora.rank, int),
        ("optimizer.lr", cfg.optimizer.lr, float),
        ("lora.alpha", cfg.lora.alpha, float),
        ("lora.dropout", cfg.lora.dropout, float),
        ("optimizer.weight_decay", cfg.optimizer.get("weight_decay", 0.0), float),
        ("trainer.guidance", t.guidance, float),
        ("trainer.noise_offset", t.noise_offset, float),
        ("trainer.shift", t.shift, float),
        ("trainer.max_grad_norm", t.max_grad_norm or 0.0, float),
        ("trainer.prior_loss_weight", t.prior_loss_weight, float),
        ("trainer.warmup_steps", t.warmup_steps, int),
        ("trainer.logit_mean", t.get("logit_mean", 0.0), float),
        ("trainer.logit_std", t.get("logit_std", 1.0), float),
    )
    for key, value, kind in numbers:
        try:
            kind(value)
        except (TypeError, ValueError):
            what = "a whole number" if kind is int else "a number"
            raise UsageError(f"{key}={value} must be {what}") from None
    if float(cfg.optimizer.lr) <= 0:
        raise UsageError(f"optimizer.lr={cfg.optimizer.lr} must be > 0 (e.g. 1e-4)")
    from stylekit.train.optim import OPTIMIZERS, SCHEDULES

    if str(cfg.optimizer.name) not in OPTIMIZERS:
        raise UsageError(f"optimizer.name={cfg.optimizer.name!r} is not one of: {', '.join(OPTIMIZERS)}")
    if str(t.lr_scheduler) not in SCHEDULES:
        raise UsageError(f"trainer.lr_scheduler={t.lr_scheduler!r} is not one of: {', '.join(SCHEDULES)}")
    if int(cfg.lora.rank) < 1:
        raise UsageError(f"lora.rank={cfg.lora.rank} must be a positive integer (e.g. 4, 16, 64)")
    if not 0.0 <= float(cfg.lora.dropout) < 1.0:
        raise UsageError(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    if float(cfg.optimizer.get("weight_decay", 0.0)) < 0:
        raise UsageError(f"optimizer.weight_decay={cfg.optimizer.weight_decay} must be >= 0")
    betas = cfg.optimizer.get("betas", [0.9, 0.999])
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise UsageError(f"optimizer.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9,0.999]")
    if str(t.lora_format) not in ("diffusers", "comfyui"):
        raise UsageError(f"trainer.lora_format={t.lora_format!r} is not one of: diffusers, comfyui")
    if float(t.get("logit_std", 1.0)) <= 0:
        raise UsageError(f"trainer.logit_std={t.logit_std} must be > 0 (e.g. 1.0)")
    if t.get("gradient_checkpointing", "auto") not in ("auto", True, False):
        raise UsageError(
            f"trainer.gradient_checkpointing={t.gradient_checkpointing!r} is not one of: auto, true, false"
        )
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise UsageError(f"trainer.mixed_precision={t.mixed_precision!r} is not one of: auto, no, bf16, fp16")


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
