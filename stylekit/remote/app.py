"""stylekit on Modal: the image (from the project's uv.lock), volumes, secrets, the job worker and the Inpainter.

Two ways in:
- ``hydra/launcher=modal`` builds an ephemeral app per launch with ``build_remote(settings)``, so each launch's
  GPU, timeout and volumes come from its Hydra config.
- ``modal deploy stylekit/remote/app.py`` deploys the module-level ``app`` below: a warm ``Inpainter`` that
  ``scripts/inpaint.py hydra/launcher=modal`` uses when it finds it. ``STYLEKIT_MODAL_GPU`` (default H100) and
  ``STYLEKIT_MODAL_APP`` (default stylekit) pick its GPU and app name at deploy time.

Modal resolves functions and classes by module and name inside the container, which re-imports this module;
everything here is therefore defined at module scope and builds nothing until Modal asks.
"""

import os
from dataclasses import dataclass

import modal

from stylekit.remote import (
    CONTAINER_PROJECT_DIR,
    ImageSpec,
    ModalSettings,
    container_env,
    gpu_option,
    image_spec,
)
from stylekit.remote.worker import InpaintSession, run_payload

WORKER_NAME = "run_job"


def build_image(spec: ImageSpec) -> modal.Image:
    """The caller's Python, the locked dependencies (``uv sync --frozen``), then the project's own files.

    Dependencies come first so that a code change rebuilds only the last, cheap layers.
    """
    image = modal.Image.debian_slim(python_version=spec.python_version).uv_sync(
        str(spec.project_dir), frozen=True, extra_options=spec.uv_options
    )
    image = image.add_local_python_source(*spec.packages)
    for name in spec.data_dirs:
        image = image.add_local_dir(spec.project_dir / name, f"{CONTAINER_PROJECT_DIR}/{name}")
    return image


def volumes(settings: ModalSettings) -> dict[str, modal.Volume]:
    specs = (settings.volumes.hf_cache, settings.volumes.outputs)
    return {spec.path: modal.Volume.from_name(spec.name, create_if_missing=True) for spec in specs}


def secrets(settings: ModalSettings) -> list[modal.Secret]:
    return [modal.Secret.from_name(name) for name in settings.secrets]


def function_options(settings: ModalSettings, image: modal.Image) -> dict:
    """Keyword arguments of ``app.function`` for one launch's settings."""
    return {
        "image": image,
        "gpu": gpu_option(settings.gpu),
        "timeout": int(settings.timeout),
        "retries": int(settings.retries),
        "max_containers": settings.max_containers,
        "cpu": settings.cpu,
        "memory": settings.memory,
        "secrets": secrets(settings),
        "volumes": volumes(settings),
        "env": container_env(settings),
    }


@dataclass
class Remote:
    """One launch's ephemeral app and its worker function."""

    app: modal.App
    worker: modal.Function
    outputs: modal.Volume


def build_remote(settings: ModalSettings, spec: ImageSpec | None = None) -> Remote:
    # include_source=False: the image carries the project's sources explicitly (build_image).
    app = modal.App(settings.app_name, include_source=False)
    options = function_options(settings, build_image(spec or image_spec()))
    worker = app.function(name=WORKER_NAME, **options)(run_payload)
    return Remote(app=app, worker=worker, outputs=options["volumes"][settings.volumes.outputs.path])


# ---- the deployable app -----------------------------------------------------------------------------------

SETTINGS = ModalSettings(
    gpu=os.environ.get("STYLEKIT_MODAL_GPU", "H100"),
    app_name=os.environ.get("STYLEKIT_MODAL_APP", "stylekit"),
)
image = build_image(image_spec())
app = modal.App(SETTINGS.app_name, include_source=False)
run_job = app.function(name=WORKER_NAME, **function_options(SETTINGS, image))(run_payload)
_outputs_volume = volumes(SETTINGS)[SETTINGS.volumes.outputs.path]


@app.cls(
    image=image,
    gpu=gpu_option(SETTINGS.gpu),
    volumes=volumes(SETTINGS),
    secrets=secrets(SETTINGS),
    env=container_env(SETTINGS),
    timeout=30 * 60,
    # Stay warm a while between edits; the snapshot makes the next cold start skip the heavy imports.
    scaledown_window=10 * 60,
    enable_memory_snapshot=True,
)
class Inpainter:
    """A warm inpainting pipeline: ``Inpainter(model_overrides="model=flux").edit.remote(png, mask, [...])``.

    ``model_overrides`` (Hydra overrides of the ``model`` group, space-separated) is fixed per instance: Modal
    keeps one container pool per value, each with its pipeline loaded once.
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
