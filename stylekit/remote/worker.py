"""Run one Hydra job from a payload, in a Modal container or in this process (``backend=local``).

The launcher resolves each job's config on the caller's machine and ships it with Hydra's singleton state and a
way to find the task function; this module turns that back into Hydra's ``run_job`` call. Payload and result
cross as cloudpickle bytes, so both backends run exactly this code on exactly the same bytes.

Also here: ``InpaintSession``, the modal-free half of the deployed ``Inpainter`` (load the pipeline once, then
edit one image per call), so that it can be exercised without Modal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# The name hydra.main gives its wrapper; a script's module namespace holds the wrapper, Hydra ran what it wraps.
_HYDRA_MAIN_WRAPPER = "decorated_main"
_SCRIPTS: dict[str, dict[str, Any]] = {}


def _cloudpickle() -> Any:
    # Closures and lambdas (OmegaConf resolvers in Hydra's singleton state, test task functions) need
    # cloudpickle rather than plain pickle; it is a locked dependency, so both ends have the same version.
    import cloudpickle

    return cloudpickle


def dumps(obj: Any) -> bytes:
    return _cloudpickle().dumps(obj)


def loads(data: bytes) -> Any:
    _cloudpickle()  # the pickled closures reference cloudpickle's helpers
    import pickle

    return pickle.loads(data)


# ---- the task function ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRef:
    """How the worker finds the task function.

    A task in a script run as ``__main__`` (``scripts/train.py``'s ``main``) is found again by running that
    script under another name: ``script`` is relative to the project dir (Modal) or absolute (local). Anything
    else is pickled: by reference when importable, by value for closures.
    """

    qualname: str = ""
    script: str | None = None
    pickled: bytes | None = None

    @classmethod
    def of(cls, task: Callable[..., Any], script_root: Path | None = None) -> TaskRef:
        module = getattr(task, "__module__", None)
        qualname = getattr(task, "__qualname__", "")
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if module == "__main__" and main_file and "<locals>" not in qualname:
            path = Path(main_file).resolve()
            if script_root is None:
                return cls(qualname=qualname, script=str(path))
            if not path.is_relative_to(script_root):
                raise ValueError(
                    f"The task script {path} is outside {script_root}, the project the image holds"
                )
            return cls(qualname=qualname, script=str(path.relative_to(script_root)))
        return cls(qualname=qualname, pickled=dumps(task))

    def load(self, project_dir: str | Path) -> Callable[..., Any]:
        if self.pickled is not None:
            return loads(self.pickled)
        assert self.script is not None
        namespace = _run_script(Path(project_dir, self.script))
        obj: Any = namespace[self.qualname.split(".")[0]]
        for part in self.qualname.split(".")[1:]:
            obj = getattr(obj, part)
        if getattr(getattr(obj, "__code__", None), "co_name", "") == _HYDRA_MAIN_WRAPPER:
            obj = obj.__wrapped__
        return obj


def _run_script(path: Path) -> dict[str, Any]:
    """The script's globals, run once per process under a name that skips its ``if __name__ == "__main__"``."""
    key = str(path)
    if key not in _SCRIPTS:
        if not path.is_file():
            raise FileNotFoundError(f"task script {path} is missing (is it inside the project?)")
        # As `python script.py` would: the script's folder comes first on sys.path.
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        _SCRIPTS[key] = runpy.run_path(key, run_name="__stylekit_task__")
    return _SCRIPTS[key]


# ---- payload and result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """Where a job runs when it runs in a Modal container."""

    workdir: str  # the container's cwd, on the outputs volume (relative paths in the config land there)
    project_dir: str  # conf/ and scripts/ in the image
    outputs_volume: str  # committed after the job so the caller can read the results at once


@dataclass
class Payload:
    index: int
    config: DictConfig
    hydra_context: HydraContext
    singleton_state: dict[str, Any]
    task: TaskRef
    project_dir: str = "."
    container: Container | None = None


@dataclass
class JobResult:
    """A JobReturn that always pickles: a failure comes back as its traceback text."""

    index: int
    status: JobStatus
    return_value: Any = None
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    cfg: DictConfig | None = None
    hydra_cfg: DictConfig | None = None
    working_dir: str | None = None
    task_name: str | None = None
    output_dir: str | None = None  # where the job wrote its run dir (a container path with Modal)


def run_payload(payload: bytes) -> bytes:
    """The Modal function's body: payload bytes in, ``JobResult`` bytes out."""
    return dumps(run(loads(payload)))


def run(payload: Payload) -> JobResult:
    # Leave Hydra's state and the cwd as they were: in-process runs share them with the launcher, and a warm
    # container runs the next job after this one.
    previous, cwd = Singleton.get_state(), os.getcwd()
    try:
        Singleton.set_state(payload.singleton_state)
        task = payload.task.load(payload.project_dir)
        with _container(payload.container):
            ret = run_job(
                hydra_context=payload.hydra_context,
                task_function=task,
                config=payload.config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        return _result(payload.index, ret)
    except Exception:
        return JobResult(payload.index, JobStatus.FAILED, error=traceback.format_exc())
    finally:
        os.chdir(cwd)
        Singleton.set_state(previous)


@contextlib.contextmanager
def _container(container: Container | None) -> Iterator[None]:
    if container is None:
        yield
        return
    # Relative paths in the config (outputs/..., checkpoints) resolve onto the outputs volume.
    Path(container.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(container.workdir)
    try:
        yield
    finally:
        # Modal also commits in the background and at exit; this makes the run dir readable right now.
        _commit(container.outputs_volume)


def _commit(volume_name: str) -> None:
    import modal

    try:
        modal.Volume.from_name(volume_name).commit()
    except Exception:  # the job's own result matters more than a failed commit
        log.exception("Could not commit volume %s", volume_name)


def _result(index: int, ret: JobReturn) -> JobResult:
    result = JobResult(
        index=index,
        status=ret.status,
        overrides=list(ret.overrides or []),
        cfg=ret.cfg,
        hydra_cfg=ret.hydra_cfg,
        working_dir=ret.working_dir,
        task_name=ret.task_name,
        output_dir=str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None,
    )
    value = ret._return_value
    if ret.status == JobStatus.FAILED:
        result.error = "".join(traceback.format_exception(value))
    elif _picklable(value):
        result.return_value = value
    else:
        log.warning("Job %d returned an unpicklable %s; the launcher gets None", index, type(value).__name__)
    return result


def _picklable(value: Any) -> bool:
    try:
        dumps(value)
    except Exception:
        return False
    return True


# ---- inpainting as a service -------------------------------------------------------------------------------

# Keys the caller may not set per edit: the image, mask and output are the call's own; the model is fixed per
# session (changing it would reload the pipeline).
_SESSION_OWNED = ("image", "mask", "output_dir", "model")


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``; ``model=flux`` -> ``model``; ``~x`` -> ``x``."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def is_model_override(override: str) -> bool:
    key = override_key(override)
    return key == "model" or key.startswith("model.") or key.startswith("model/")


class InpaintSession:
    """Compose the inpaint config once per model, load its pipeline once, then edit one image per call.

    ``stylekit.inpaint.run.run`` keeps the last pipeline cached by its model config, so each edit reuses the
    pipeline loaded here as long as the per-call overrides leave ``model`` alone (they may not set it).
    """

    def __init__(self, model_overrides: str | list[str] = "", project_dir: str | Path | None = None) -> None:
        if isinstance(model_overrides, str):
            model_overrides = shlex.split(model_overrides)
        self.model_overrides = list(model_overrides)
        self.project_dir = Path(project_dir or os.environ.get("STYLEKIT_PROJECT_DIR") or _checkout())

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(self.project_dir / "conf"), version_base="1.3"):
            return compose(config_name="inpaint", overrides=[*self.model_overrides, *overrides])

    def load(self) -> None:
        from stylekit.inpaint.run import build_family, load_pipeline

        cfg = self.compose(["prompt=warm-up"])
        load_pipeline(build_family(cfg), cfg.model)

    def edit_files(
        self, image: bytes, mask: bytes, overrides: list[str], name: str = "image.png"
    ) -> dict[str, bytes]:
        """Edit one image; returns every file the run wrote (``<stem>_edited.png``, ...) by name."""
        from stylekit.inpaint.run import run

        owned = [o for o in overrides if override_key(o).split(".")[0] in _SESSION_OWNED]
        if owned:
            raise ValueError(f"these overrides belong to the session, not to one edit: {owned}")
        name = Path(name).name or "image.png"
        with tempfile.TemporaryDirectory(prefix="stylekit-edit-") as tmp:
            root = Path(tmp)
            (root / "in").mkdir()
            image_path, mask_path = root / "in" / name, root / "in" / f"{Path(name).stem}_mask.png"
            image_path.write_bytes(image)
            mask_path.write_bytes(mask)
            out = root / "out"
            paths = {"image": image_path, "mask": mask_path, "output_dir": out}
            cfg = self.compose([*overrides, *(f"{key}={quote(str(path))}" for key, path in paths.items())])
            run(cfg)
            return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}

    def edit(self, image: bytes, mask: bytes, overrides: list[str]) -> bytes:
        files = self.edit_files(image, mask, overrides)
        edited = [data for fname, data in files.items() if "_edited" in fname]
        if not edited:
            raise RuntimeError(f"the edit wrote no image (files: {sorted(files)})")
        return edited[0]


def quote(value: str) -> str:
    """A Hydra override value that keeps spaces, quotes and '=' as they are."""
    escaped = value.replace("'", "\\'")
    return f"'{escaped}'"


def _checkout() -> Path:
    from stylekit.remote import package_root

    return package_root()
