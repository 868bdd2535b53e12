"""Optimizers and learning-rate schedules for the LoRA parameters."""

from __future__ import annotations

from typing import Any


def make_optimizer(params: list, opt: Any) -> Any:
    import torch

    name, lr = str(opt.name), float(opt.lr)
    weight_decay = float(opt.get("weight_decay", 0.0))
    betas = tuple(opt.get("betas", (0.9, 0.999)))
    eps = float(opt.get("eps", 1e-8))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay, safeguard_warmup=True)
    from transformers.optimization import Adafactor

    return Adafactor(
        params,
        lr=lr,
        weight_decay=weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


def make_schedule(optimizer: Any, trainer: Any) -> Any:
    from diffusers.optimization import get_scheduler

    name = str(trainer.lr_scheduler)
    warmup = int(trainer.warmup_steps)
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=int(trainer.max_steps))
