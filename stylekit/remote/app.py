"""stylekit on Modal: the image (from the project's uv.lock), volumes, secrets, the job worker and the Inpainter.

Two ways in:
- ``hydra/launcher=modal`` builds an ephemeral app per launch with ``build_remote(settings)``, so each launch's
  GPU, timeout and volumes come from its Hydra config.
- ``stylekit modal deploy`` (``modal deploy -m stylekit.remote.app``) deploys the module-level ``app`` below: a
  warm ``Inpainter`` that ``scripts/inpaint.py hydra/launcher=modal hydra.launcher.use_deployed=true`` uses.
  ``STYLEKIT_MODAL_GPU`` (default H100; "H100,A100-80GB" for a fallback list) and ``STYLEKIT_MODAL_APP``
  (default stylekit) pick its GPU and app name at deploy time.

Modal finds functions and classes in the container by module name and re-imports this module there as
``stylekit.remote.app`` (the image carries the ``stylekit`` package). Deploying the file by path
(``modal deploy stylekit/remote/app.py``) would record a top-level module ``app`` that no container can import;
hence module mode. Everything here is at module scope and builds nothing until Modal asks.
"""

import hashlib
import logging
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modal

from stylekit.remote import (
    CONTAINER_PROJECT_DIR,
    ImageSpec,
    ModalSettings,
    container_env,
    gpu_option,
    image_spec,
    resources,
    source_fingerprint,
)
from stylekit.remote.worker import InpaintSession, check_gpu, prefetch_models, run_payload

WORKER_NAME = "run_job"
PREFETCH_NAME = "prefetch"
INFO_NAME = "deployment_info"
# The uv that builds the image: pinned, so a new uv release cannot change what a rebuild installs.
UV_VERSION = "0.13.9"
# pyproject tables that decide what `uv sync --frozen` installs; the rest (ruff, pytest, hatch settings) must
# not change the layer's inputs, or editing a linter setting would reinstall torch.
_LOCK_TABLES = ("project", "dependency-groups", "build-system")
_LOCK_PROJECT_KEYS = ("name", "version", "requires-python", "dependencies", "optional-dependencies")
_FINGERPRINT_ENV = "STYLEKIT_DEPLOYED_FINGERPRINT"


def lock_context(project_dir: Path) -> Path:
    """A folder holding uv.lock and the part of pyproject.toml that decides the installed packages.

    Named by its content, so the same lock gives the same folder (and the same cached image layer).
    """
    pyproject = tomllib.loads((project_dir / "pyproject.toml").read_text())
    kept: dict[str, Any] = {k: pyproject[k] for k in _LOCK_TABLES if k in pyproject}
    kept["project"] = {k: v for k, v in kept.get("project", {}).items() if k in _LOCK_PROJECT_KEYS}
    if "uv" in pyproject.get("tool", {}):
        kept["tool"] = {"uv": pyproject["tool"]["uv"]}
    text = _toml(kept)
    lock = (project_dir / "uv.lock").read_bytes()
    digest = hashlib.sha256(text.encode() + b"\0" + lock).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "stylekit-modal-lock" / digest
    if not (folder / "uv.lock").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (("pyproject.toml", text.encode()), ("uv.lock", lock)):
            partial = folder / f".{name}.{os.getpid()}.part"
            partial.write_bytes(data)
            partial.replace(folder / name)
    return folder


def _toml(table: dict[str, Any], name: str = "") -> str:
    """TOML for nested tables of strings, numbers, booleans and lists of those (what pyproject holds)."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    scalars = [f"{json.dumps(k)} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = (f"[{name}]\n" if name else "") + "".join(line + "\n" for line in scalars)
    for key, sub in table.items():
        if isinstance(sub, dict):
            out += "\n" + _toml(sub, f"{name}.{json.dumps(key)}" if name else json.dumps(key))
    return out


def build_image(spec: ImageSpec) -> modal.Image:
    """The caller's Python, the locked dependencies (``uv sync --frozen``), then the project's own files.

    Dependencies come first so that a code or config change rebuilds only the last, cheap layers.
    """
    # In a container the image is already built (and the project's pyproject is not there to read).
    uv_dir = lock_context(spec.project_dir) if modal.is_local() else spec.project_dir
    image = modal.Image.debian_slim(python_version=spec.python_version).uv_sync(
        str(uv_dir), frozen=True, extra_options=spec.uv_options, uv_version=UV_VERSION
    )
    image = image.add_local_python_source(*spec.packages)
    for name in spec.data_dirs:
        image = image.add_local_dir(spec.project_dir / name, f"{CONTAINER_PROJECT_DIR}/{name}")
    return image


def volumes(settings: ModalSettings) -> dict[str, modal.Volume]:
    specs = (settings.volumes.hf_cache, settings.volumes.outputs)
    return {spec.path: modal.Volume.from_name(spec.name, create_if_missing=True) for spec in specs}


def secrets(names: list[str]) -> list[modal.Secret]:
    return [modal.Secret.from_name(name) for name in names]


def function_options(
    settings: ModalSettings, image: modal.Image, secret_names: list[str] | None = None
) -> dict:
    """Keyword arguments of ``app.function`` for one launch's settings and the secrets its jobs need."""
    cpu, memory = resources(settings)
    names = list(settings.secrets or []) if secret_names is None else secret_names
    return {
        "image": image,
        "gpu": gpu_option(settings.gpu),
        "timeout": int(settings.timeout),
        "retries": int(settings.retries),
        "max_containers": settings.max_containers,
        "cpu": cpu,
        "memory": memory,
        "secrets": secrets(names),
        "volumes": volumes(settings),
        "env": container_env(settings),
    }


def call_options(settings: ModalSettings, secret_names: list[str]) -> dict:
    """``Cls.with_options`` keywords: the launcher's GPU, timeout, resources, volumes and secrets per launch."""
    options = function_options(settings, modal.Image.debian_slim(), secret_names)
    del options["image"]
    if isinstance(options["gpu"], list):
        # with_options takes one GPU type (modal 1.6: parse_gpu_config refuses lists); the first is preferred.
        logging.getLogger(__name__).warning(
            "The deployed Inpainter takes one GPU type per call: using %s of %s",
            options["gpu"][0],
            options["gpu"],
        )
        options["gpu"] = options["gpu"][0]
    # with_options cannot unset a value (None means "as deployed"); CPU-only stays as deployed.
    return {key: value for key, value in options.items() if value is not None}


@dataclass
class Remote:
    """One launch's ephemeral app, its worker function, the model prefetcher and the outputs volume."""

    app: modal.App
    worker: modal.Function
    outputs: modal.Volume
    prefetch: modal.Function | None = None
    hf_cache: modal.Volume | None = None


def build_remote(
    settings: ModalSettings, spec: ImageSpec | None = None, secret_names: list[str] | None = None
) -> Remote:
    # include_source=False: the image carries the project's sources explicitly (build_image).
    app = modal.App(settings.app_name, include_source=False)
    image = build_image(spec or image_spec())
    options = function_options(settings, image, secret_names)
    worker = app.function(name=WORKER_NAME, **options)(run_payload)
    # Downloads run once, on a CPU container, before the GPU jobs start (see worker.prefetch_models).
    prefetch = app.function(
        name=PREFETCH_NAME,
        image=image,
        timeout=3 * 3600,
        secrets=options["secrets"],
        volumes=options["volumes"],
        env=options["env"],
    )(prefetch_models)
    return Remote(
        app=app,
        worker=worker,
        outputs=options["volumes"][settings.volumes.outputs.path],
        prefetch=prefetch,
        hf_cache=options["volumes"][settings.volumes.hf_cache.path],
    )


def deployment_info() -> dict[str, str]:
    """What this deployment runs: the launcher refuses a deployment whose sources differ from its own."""
    return {"fingerprint": os.environ.get(_FINGERPRINT_ENV, ""), "app": SETTINGS.app_name}


# ---- the deployable app -----------------------------------------------------------------------------------

SETTINGS = ModalSettings(app_name=os.environ.get("STYLEKIT_MODAL_APP", "stylekit"))
# Computed where the deploy runs, from the sources it ships; containers read it back from their environment.
FINGERPRINT = source_fingerprint() if modal.is_local() else os.environ.get(_FINGERPRINT_ENV, "")
image = build_image(image_spec())
app = modal.App(SETTINGS.app_name, include_source=False)
_deployed_env = {**container_env(SETTINGS), _FINGERPRINT_ENV: FINGERPRINT}
info = app.function(name=INFO_NAME, image=image, env=_deployed_env, timeout=60)(deployment_info)
_cpu, _memory = resources(SETTINGS)
_outputs_volume = volumes(SETTINGS)[SETTINGS.volumes.outputs.path]


@app.cls(
    image=image,
    gpu=gpu_option(SETTINGS.gpu),
    cpu=_cpu,
    memory=_memory,
    volumes=volumes(SETTINGS),
    env=_deployed_env,
    timeout=30 * 60,
    # Stay warm a while between edits; the snapshot makes the next cold start skip the heavy imports.
    scaledown_window=10 * 60,
    enable_memory_snapshot=True,
)
class Inpainter:
    """A warm inpainting pipeline: ``Inpainter(model_overrides="model=flux").edit.remote(png, mask, [...])``.

    ``model_overrides`` (Hydra overrides of the ``model`` group, space-separated) is fixed per instance: Modal
    keeps one container pool per value, each with its pipeline loaded once. Secrets (``huggingface`` for a
    gated model) come per call: ``Inpainter.with_options(secrets=[modal.Secret.from_name("huggingface")])``.
    """

    model_overrides: str = modal.parameter(default="")

    @modal.enter(snap=True)
    def import_libraries(self) -> None:
        # No GPU before the snapshot: only the imports (several seconds of them) go into it.
        import diffusers  # noqa: F401
        import torch  # noqa: F401

        import stylekit.inpaint.run  # noqa: F401

    @modal.enter(snap=False)
    def load(self) -> None:
        # A container that asked for a GPU and cannot use it fails here, not after a slow CPU edit.
        if gpu_option(SETTINGS.gpu) is not None and modal.is_local() is False:
            check_gpu(1)
        self.session = InpaintSession(self.model_overrides)
        self.session.load()

    def _reload_outputs(self) -> None:
        # LoRAs trained or uploaded since this container started are on the outputs volume.
        if os.path.isdir(SETTINGS.volumes.outputs.path):
            _outputs_volume.reload()

    @modal.method()
    def edit(self, image_bytes: bytes, mask_bytes: bytes, overrides: list[str]) -> bytes:
        """The edited image as PNG bytes (the first one when ``num_images`` > 1)."""
        self._reload_outputs()
        return self.session.edit(image_bytes, mask_bytes, overrides)

    @modal.method()
    def edit_files(
        self, image_bytes: bytes, mask_bytes: bytes, overrides: list[str], name: str = "image.png"
    ) -> dict[str, bytes]:
        """Every file the edit wrote, by name (``<stem>_edited.png``, ``<stem>_comparison.png``, ...)."""
        self._reload_outputs()
        return self.session.edit_files(image_bytes, mask_bytes, overrides, name)
