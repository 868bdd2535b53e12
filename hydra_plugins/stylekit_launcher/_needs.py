"""What a sweep's jobs need from the Modal account before they start: secrets, and model weights in the cache."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hydra_plugins.stylekit_launcher._jobs import Job
from stylekit.errors import UsageError

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


def _select(job: Job, key: str) -> Any:
    return OmegaConf.select(job.config, key, default=None)


def uses_wandb(job: Job) -> str | None:
    """The W&B mode of a job that logs to W&B (auto / online), else None (offline or another logger)."""
    if _select(job, "logger.backend") != "wandb":
        return None
    mode = str(_select(job, "logger.mode") or "auto")
    return None if mode == "offline" else mode


def model_sources(job: Job) -> list[dict[str, Any]]:
    """The Hub pipelines a job loads (repo, revision, variant); tiny models and local folders need none."""
    model = job.config.get("model")
    if model is None or not model.get("pretrained"):
        return []
    task = "inpaint" if job.task_name == "inpaint" else "train"
    repo = _family_source(model, task)
    if not repo or repo.startswith(TINY_PREFIX) or Path(repo).expanduser().exists() or repo.count("/") != 1:
        return []
    return [{"repo": repo, "revision": model.get("revision"), "variant": model.get("variant")}]


def _family_source(model: Any, task: str) -> str | None:
    """The family's own choice (FLUX inpaints with FLUX.1-dev when pipeline=inpaint), without loading it."""
    pretrained, inpaint = model.get("pretrained"), model.get("inpaint_pretrained")
    if str(pretrained).startswith(TINY_PREFIX):
        return None
    if "_target_" not in model:
        return str(inpaint if task == "inpaint" and inpaint else pretrained)
    try:
        from hydra.utils import instantiate

        return str(instantiate(model).source(task))
    except Exception:  # a family that cannot be built here still names its weights in the config
        return str(inpaint if task == "inpaint" and inpaint else pretrained)


def needed_secrets(jobs: list[Job], settings: Any, exists: Callable[[str], bool]) -> list[str]:
    """The secrets to attach: ``settings.secrets`` when given, else the ones these jobs need.

    A missing secret a job needs is a one-line error naming it and the command that creates it; W&B in
    ``auto`` mode without its secret logs offline into the run dir instead (what ``auto`` means locally too).
    """
    if settings.secrets is not None:
        names = [str(s) for s in settings.secrets]
        _require(names, exists, {name: "named in hydra.launcher.secrets" for name in names})
        return names
    names: list[str] = []
    reasons: dict[str, str] = {}
    gated = sorted(
        {s["repo"] for job in jobs for s in model_sources(job) if _is_gated(s["repo"], settings.gated_models)}
    )
    if gated:
        names.append(settings.hf_secret)
        reasons[settings.hf_secret] = f"{', '.join(gated)} is gated on the Hub"
    modes = {mode for job in jobs if (mode := uses_wandb(job))}
    if modes:
        if "online" in modes or exists(settings.wandb_secret):
            names.append(settings.wandb_secret)
            reasons[settings.wandb_secret] = "logger=wandb with logger.mode=online"
        else:
            log.warning(
                "No Modal secret %r: W&B runs are written offline into each run dir (create it with "
                "`modal secret create %s WANDB_API_KEY=...` to log online)",
                settings.wandb_secret,
                settings.wandb_secret,
            )
    _require(names, exists, reasons)
    return names


def _is_gated(repo: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(repo, pattern) for pattern in patterns)


_CREATE = {"huggingface": "HF_TOKEN=hf_...", "wandb": "WANDB_API_KEY=..."}


def _require(names: list[str], exists: Callable[[str], bool], reasons: dict[str, str]) -> None:
    for name in names:
        if not exists(name):
            example = _CREATE.get(name, "KEY=value")
            raise UsageError(
                f"Modal secret {name!r} does not exist ({reasons.get(name, 'needed by these jobs')}): create it "
                f"with `modal secret create {name} {example}`"
            )


def modal_secret_exists(name: str) -> bool:
    import modal

    try:
        modal.Secret.from_name(name).hydrate()
    except modal.exception.NotFoundError:
        return False
    return True


def prefetch_requests(jobs: list[Job], cached: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The distinct pipelines these jobs load that the cache volume does not hold yet."""
    unique = {(s["repo"], s["revision"], s["variant"]): s for job in jobs for s in model_sources(job)}
    return [s for s in unique.values() if not cached(s)]
