"""Running stylekit on Modal: settings shared by the Hydra launcher plugin and the Modal app.

Only ``stylekit.remote.app`` imports modal. This module and ``stylekit.remote.worker`` stay importable without
it, because Hydra imports the launcher plugin (and so its config, which is built from these dataclasses) at
every start-up, ``--help`` included.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylekit.errors import UsageError

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


# FLUX.1-dev and its Fill model are gated on the Hub: their download needs the huggingface secret.
GATED_MODELS = ["black-forest-labs/*"]
# What one GPU's worth of host needs to load FLUX.1-dev (bf16 transformer + T5 pass through host RAM while
# loading); multi-GPU jobs load once per process, so the request scales with the GPU count.
CPU_PER_GPU = 8.0
MEMORY_PER_GPU_MIB = 64 * 1024


@dataclass
class ModalSettings:
    """What a Modal container gets. Secrets are created once per account: ``modal secret create huggingface
    HF_TOKEN=hf_...`` and ``modal secret create wandb WANDB_API_KEY=...``."""

    # A GPU type ("H100", "A100-80GB", "L40S", "A10G"), with ":N" for N GPUs in one container ("H100:4"), a
    # fallback list tried in order (also "H100,A100-80GB"), or none for CPU only.
    gpu: Any = field(default_factory=lambda: default_gpu())
    timeout: int = 6 * 3600
    # Retries after a crash or preemption; a job that raises is reported as failed, not retried.
    retries: int = 1
    max_containers: int | None = None
    cpu: float | None = None  # null: CPU_PER_GPU per GPU (Modal's default without a GPU)
    memory: int | None = None  # MiB; null: MEMORY_PER_GPU_MIB per GPU (Modal's default without a GPU)
    # Secrets attached to every job. null: only those a job needs (wandb_secret for the W&B logger, hf_secret
    # for models matching gated_models), each checked to exist before any container starts.
    secrets: list[str] | None = None
    wandb_secret: str = "wandb"
    hf_secret: str = "huggingface"
    gated_models: list[str] = field(default_factory=lambda: list(GATED_MODELS))
    volumes: VolumesSpec = field(default_factory=VolumesSpec)
    env: dict[str, str] = field(default_factory=dict)
    app_name: str = "stylekit"
    # Processes per job (DDP under accelerate); null: one per GPU in ``gpu`` ("H100:4" -> 4).
    processes: int | None = None


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


def default_gpu() -> str:
    """``STYLEKIT_MODAL_GPU`` (a type or a comma-separated fallback list), else H100."""
    return os.environ.get("STYLEKIT_MODAL_GPU", "").strip() or "H100"


def gpu_option(gpu: Any) -> str | list[str] | None:
    """Modal's ``gpu=``: a type, a fallback list, or None; "none"/"cpu" also mean no GPU."""
    if isinstance(gpu, str):
        gpu = [g.strip() for g in gpu.split(",") if g.strip()]
    types = [str(g) for g in gpu or []]
    if not types or types[0].lower() in ("none", "cpu"):
        return None
    return types[0] if len(types) == 1 else types


def gpu_count(gpu: Any) -> int:
    """GPUs per container: "H100:4" -> 4, "H100" -> 1, none -> 0. Every fallback must ask for the same count."""
    option = gpu_option(gpu)
    if option is None:
        return 0
    counts = set()
    for entry in [option] if isinstance(option, str) else option:
        _, _, count = entry.partition(":")
        if count and not count.isdigit():
            raise UsageError(
                f"hydra.launcher.gpu={entry!r}: the count after ':' must be a number, e.g. H100:4"
            )
        counts.add(int(count or 1))
    if len(counts) > 1:
        raise UsageError(
            f"hydra.launcher.gpu={option}: every GPU in a fallback list must ask for the same count "
            "(a job's process count depends on it)"
        )
    return counts.pop()


def process_count(settings: ModalSettings) -> int:
    """Processes a job runs: ``processes`` if set, else one per GPU (at least one)."""
    if settings.processes is not None:
        if int(settings.processes) < 1:
            raise UsageError(f"hydra.launcher.processes={settings.processes}: use 1 or more")
        return int(settings.processes)
    return max(1, gpu_count(settings.gpu))


def resources(settings: ModalSettings) -> tuple[float | None, int | None]:
    """``cpu`` and ``memory`` requests: the settings', else enough host for each GPU to load FLUX.1-dev."""
    gpus = gpu_count(settings.gpu)
    cpu = settings.cpu if settings.cpu is not None else (CPU_PER_GPU * gpus if gpus else None)
    memory = settings.memory if settings.memory is not None else (MEMORY_PER_GPU_MIB * gpus if gpus else None)
    return cpu, memory


def source_fingerprint(project_dir: Path | None = None) -> str:
    """stylekit's version and a hash of the sources and configs an image carries: what a deployment runs."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    root = project_dir or package_root()
    digest = hashlib.sha256()
    patterns = ("stylekit/**/*.py", "hydra_plugins/stylekit_launcher/*.py", "conf/**/*.yaml", "scripts/*.py")
    for path in sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        release = version("stylekit")
    except PackageNotFoundError:
        release = "unknown"
    return f"{release}+{digest.hexdigest()[:12]}"
