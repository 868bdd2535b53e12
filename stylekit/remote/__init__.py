"""Running stylekit on Modal: settings shared by the Hydra launcher plugin and the Modal app.

Only ``stylekit.remote.app`` imports modal. This module and ``stylekit.remote.worker`` stay importable without
it, because Hydra imports the launcher plugin (and so its config, which is built from these dataclasses) at
every start-up, ``--help`` included.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where the image keeps the project's conf/ and scripts/ (the Python packages go on the image's sys.path).
CONTAINER_PROJECT_DIR = "/root/project"
# Files that mark the project root: the image is built from its lock file.
PROJECT_MARKERS = ("uv.lock", "pyproject.toml")


@dataclass
class VolumeSpec:
    """A Modal Volume (created on first use) and where containers mount it."""

    name: str = ""
    path: str = ""


@dataclass
class VolumesSpec:
    # Model weights download once per Modal account; stylekit's encoded-latent cache lives here too.
    hf_cache: VolumeSpec = field(default_factory=lambda: VolumeSpec("stylekit-hf-cache", "/cache"))
    # A mirror of the launch directory: relative paths such as outputs/... land on it, so runs, checkpoints
    # and staged inputs survive the container (a retried job resumes from its checkpoints).
    outputs: VolumeSpec = field(default_factory=lambda: VolumeSpec("stylekit-outputs", "/workspace"))


@dataclass
class ModalSettings:
    """What a Modal container gets. Secrets are created once per account: ``modal secret create huggingface
    HF_TOKEN=hf_...`` and ``modal secret create wandb WANDB_API_KEY=...``."""

    # A GPU type ("H100", "A100-80GB", "L40S", "A10G"), a fallback list tried in order, or null for CPU only.
    gpu: Any = "H100"
    timeout: int = 6 * 3600
    # Retries after a crash or preemption; a job that raises is reported as failed, not retried.
    retries: int = 1
    max_containers: int | None = None
    cpu: float | None = None
    memory: int | None = None  # MiB
    secrets: list[str] = field(default_factory=lambda: ["huggingface", "wandb"])
    volumes: VolumesSpec = field(default_factory=VolumesSpec)
    env: dict[str, str] = field(default_factory=dict)
    app_name: str = "stylekit"


@dataclass(frozen=True)
class ImageSpec:
    """The container image: the caller's Python, the project's uv.lock, and the project's own sources."""

    python_version: str
    project_dir: Path
    packages: tuple[str, ...] = ("stylekit", "hydra_plugins.stylekit_launcher")
    data_dirs: tuple[str, ...] = ("conf", "scripts")
    # Dev tools (pytest, ruff) have no business in a training container.
    uv_options: str = "--no-dev"


def python_version() -> str:
    """The caller's major.minor: pickled configs and task functions need the same Python on both ends."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_project_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` holding both uv.lock and pyproject.toml."""
    start = start.resolve()
    for directory in (start, *start.parents):
        if all((directory / marker).is_file() for marker in PROJECT_MARKERS):
            return directory
    return None


def package_root() -> Path:
    """The checkout stylekit is imported from (its pyproject/uv.lock are there in an editable install)."""
    return Path(__file__).resolve().parents[2]


def image_spec(project_dir: Path | None = None) -> ImageSpec:
    return ImageSpec(python_version=python_version(), project_dir=project_dir or package_root())


def container_env(settings: ModalSettings) -> dict[str, str]:
    """Environment of every container; the user's ``env`` wins."""
    cache = settings.volumes.hf_cache.path.rstrip("/")
    return {
        "HF_HOME": f"{cache}/huggingface",
        "STYLEKIT_CACHE_DIR": f"{cache}/stylekit",
        "STYLEKIT_PROJECT_DIR": CONTAINER_PROJECT_DIR,
        # Logs stream to the caller's terminal as they happen, not when a buffer fills.
        "PYTHONUNBUFFERED": "1",
        **{str(k): str(v) for k, v in settings.env.items()},
    }


def gpu_option(gpu: Any) -> str | list[str] | None:
    """Modal's ``gpu=``: a type, a fallback list, or None; "none"/"cpu" also mean no GPU."""
    if gpu is None or (isinstance(gpu, str) and gpu.lower() in ("", "none", "cpu")):
        return None
    if isinstance(gpu, str):
        return gpu
    types = [str(g) for g in gpu]
    if not types:
        return None
    return types[0] if len(types) == 1 else types
