"""Experiment tracking behind one small interface: W&B when configured, and always the run dir.

Every tracker appends metrics to `<run_dir>/metrics.jsonl` and keeps `<run_dir>/summary.json`, so a run
logged offline, or with `logger=none`, loses nothing. Secrets are scrubbed before anything is written.
`wandb` is imported only when the W&B backend is used.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from stylekit.errors import UsageError
from stylekit.io import atomic_write_text

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

MASK = "***"
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "MODAL_TOKEN_ID",
    "MODAL_TOKEN_SECRET",
)
# Shorter values are not real tokens, and masking them would mangle ordinary text ("1", "true").
_MIN_SECRET_LEN = 6
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}


# --- secrets -------------------------------------------------------------------------------------------


def _secret_values() -> list[str]:
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    # Longest first so a token that contains another is masked whole.
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def looks_secret(key: str) -> bool:
    """True for names like hf_token, api_key, apiKey, MODAL_TOKEN_SECRET, db_password; not tokenizer."""
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", str(key)) if w]
    if not words:
        return False
    if _SECRET_WORDS.intersection(words) or words[-1] == "key":
        return True
    return any(a == "api" and b == "key" for a, b in zip(words, words[1:], strict=False))


def scrub_text(text: str) -> str:
    """`text` with the values of secret env vars (HF_TOKEN, WANDB_API_KEY, ...) replaced by ***."""
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


def scrub(config: Any) -> Any:
    """A copy of `config` (dicts/lists nested) with secret-looking keys and secret env values masked."""
    if isinstance(config, Mapping):
        return {
            key: (MASK if looks_secret(key) and value not in (None, "") else scrub(value))
            for key, value in config.items()
        }
    if isinstance(config, Sequence) and not isinstance(config, str | bytes):
        return [scrub(item) for item in config]
    if isinstance(config, str):
        return scrub_text(config)
    return config


class ScrubFilter(logging.Filter):
    """A logging filter that masks secret env values in records (add it to the run's log handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_text(record.getMessage())
        record.args = None
        return True


# --- run naming under Hydra ----------------------------------------------------------------------------


def hydra_config() -> Any | None:
    """The running Hydra app's `hydra` node, or None outside Hydra (tests, notebooks, plain scripts)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg: Any | None) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def run_group(logger_cfg: Mapping[str, Any], hydra_cfg: Any | None) -> str | None:
    """logger.group, else the sweep dir's name for the jobs of one multirun, else no group."""
    if logger_cfg.get("group"):
        return str(logger_cfg["group"])
    if _is_multirun(hydra_cfg):
        return Path(str(hydra_cfg.sweep.dir)).name
    return None


def _mask_overrides(overrides: str) -> str:
    # `+hf_token=...` on the command line ends up in override_dirname; keep its value out of run names.
    return re.sub(
        r"([^,=]+)=([^,]*)", lambda m: f"{m[1]}={MASK}" if looks_secret(m[1]) else m[0], scrub_text(overrides)
    )


def run_name(hydra_cfg: Any | None) -> str | None:
    """`<job num>_<override_dirname>` for a multirun job (e.g. `3_lora.rank=16`), else None (W&B picks)."""
    if not _is_multirun(hydra_cfg):
        return None
    job = hydra_cfg.job
    overrides = _mask_overrides(str(job.get("override_dirname") or ""))
    return (f"{job.num}_{overrides}" if overrides else str(job.num))[:128]


# --- mode and credentials ------------------------------------------------------------------------------


def has_wandb_credentials() -> bool:
    """WANDB_API_KEY is set, or ~/.netrc (or $NETRC) has an entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | disabled for logger.mode; WANDB_MODE=offline/disabled in the env always wins."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun", "disabled"):
        return "disabled" if env == "disabled" else "offline"
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    if mode == "online" and not has_wandb_credentials():
        raise UsageError(
            "logger.mode=online but no W&B credentials: run `wandb login` or set WANDB_API_KEY "
            "(or use logger.mode=offline)"
        )
    return mode


# --- trackers ------------------------------------------------------------------------------------------


@runtime_checkable
class Tracker(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...
    def log_images(
        self, name: str, images: Image.Image | list[Image.Image], step: int, captions: list[str] | None = None
    ) -> None: ...
    def log_artifact(self, path: Path, name: str, type: str) -> None: ...
    def summary(self, values: Mapping[str, Any]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...
    def __enter__(self) -> Tracker: ...
    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None: ...


def _jsonable(value: Any) -> Any:
    # Tensors and numpy scalars: loops log them straight from the loss.
    for method in ("item", "tolist"):
        try:
            return getattr(value, method)()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            continue
    return str(value)


def _as_list(images: Any, captions: list[str] | None) -> tuple[list[Any], list[str | None]]:
    images = list(images) if isinstance(images, list | tuple) else [images]
    captions = list(captions) if captions is not None else [None] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return images, [scrub_text(c) if c is not None else None for c in captions]


class NullTracker:
    """logger.backend=none: metrics to `metrics.jsonl`, summary to `summary.json`, images to `media/`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._summary: dict[str, Any] = {}
        self._finished = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        line = scrub_text(json.dumps(row, default=_jsonable))
        # Open per call: a killed run keeps every line written so far, at a cost that logging rates never notice.
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def log_images(
        self, name: str, images: Image.Image | list[Image.Image], step: int, captions: list[str] | None = None
    ) -> None:
        images, _captions = _as_list(images, captions)
        folder = self.run_dir / "media" / re.sub(r"[^\w.-]+", "_", name)
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(folder / f"step-{step:08d}-{index}.png")

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        log.debug("artifact %s (%s) stays at %s", name, type, path)  # already in the run dir

    def summary(self, values: Mapping[str, Any]) -> None:
        self._summary.update(scrub(dict(values)))
        text = json.dumps(self._summary, indent=2, default=_jsonable)
        atomic_write_text(self.run_dir / "summary.json", text + "\n")

    def finish(self, exit_code: int = 0) -> None:
        self._finished = True

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


class WandbTracker(NullTracker):
    """W&B run (files under `<run_dir>/wandb/`) plus the run-dir metrics and summary of NullTracker."""

    def __init__(self, run_dir: Path, run: Any) -> None:
        super().__init__(run_dir)
        self.run = run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log(scrub(dict(metrics)), step=step)

    def log_images(
        self, name: str, images: Image.Image | list[Image.Image], step: int, captions: list[str] | None = None
    ) -> None:
        import wandb

        # No PNG copies here: wandb keeps its own under <run_dir>/wandb/*/files/media/.
        images, captions = _as_list(images, captions)
        self.run.log(
            {name: [wandb.Image(i, caption=c) for i, c in zip(images, captions, strict=True)]}, step=step
        )

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w.-]+", "-", name), type=type)
        path = Path(path)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def summary(self, values: Mapping[str, Any]) -> None:
        super().summary(values)
        self.run.summary.update(scrub(dict(values)))

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=exit_code)


# --- factory -------------------------------------------------------------------------------------------


def _wandb_settings() -> Any:
    import wandb

    return wandb.Settings(
        save_code=False,
        disable_code=True,
        disable_git=True,  # git remotes can carry tokens (https://user:token@...)
        x_disable_meta=True,  # wandb-metadata: argv (`+hf_token=...` overrides), host, user, email
        x_disable_machine_info=True,
        console="off",  # stdout/stderr capture cannot be scrubbed; Hydra's log file keeps the console
        reinit="finish_previous",  # sequential multirun jobs in one process get one run each
    )


def make_tracker(
    logger_cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any], job_name: str | None = None
) -> Tracker:
    """The tracker for `logger_cfg` (conf/logger/*.yaml), writing under `run_dir`.

    `config` is the run's resolved config as a plain dict; it is scrubbed of secrets before W&B sees it.
    `job_name` defaults to the multirun job's `<num>_<overrides>`.
    """
    backend = logger_cfg.get("backend", "none")
    if backend == "none":
        return NullTracker(run_dir)
    mode = resolve_mode(str(logger_cfg.get("mode", "auto")))
    if mode == "disabled":
        return NullTracker(run_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_cfg = hydra_config()

    import wandb

    run = wandb.init(
        project=logger_cfg.get("project") or "stylekit",
        entity=logger_cfg.get("entity") or None,
        group=run_group(logger_cfg, hydra_cfg),
        name=scrub_text(job_name) if job_name else run_name(hydra_cfg),
        tags=[str(tag) for tag in (logger_cfg.get("tags") or [])],
        config=scrub(dict(config)),
        dir=str(run_dir),
        mode=mode,
        settings=_wandb_settings(),
    )
    # Offline runs have no name until they sync: the id is what `wandb sync` and the folder name use.
    log.info("W&B run %s (%s) in %s", run.name or run.id, mode, run_dir / "wandb")
    return WandbTracker(run_dir, run)
