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
    gpus: int = 0  # GPUs the job asked for: it stops at once when torch cannot use them


@dataclass
class Payload:
    index: int
    config: DictConfig
    hydra_context: HydraContext
    singleton_state: dict[str, Any]
    task: TaskRef
    project_dir: str = "."
    container: Container | None = None
    # More than one: the job runs as that many processes (DDP) with one run dir; rank 0's result comes back.
    processes: int = 1


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
        if payload.container is not None and payload.container.gpus:
            check_gpu(payload.container.gpus)
        if payload.processes > 1:
            with _container(payload.container):
                return run_ranks(payload)
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
        # Modal refuses to commit a volume with open files in it ("open files preventing the operation"): the
        # working directory and the job's log file count. Step out and close the log first.
        os.chdir("/")
        close_file_logs(container.workdir)
        # Modal also commits in the background and at exit; this makes the run dir readable right now.
        _commit(container.outputs_volume)


def close_file_logs(root: str) -> None:
    """Close and detach every logging file handler writing under ``root`` (Hydra's ``<job>.log``)."""
    import logging

    base = Path(root).resolve()
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", [])):
            filename = getattr(handler, "baseFilename", None)
            if filename and Path(filename).resolve().is_relative_to(base):
                handler.close()
                logger.removeHandler(handler)


def _commit(volume_name: str) -> None:
    import modal

    try:
        modal.Volume.from_name(volume_name).commit()
    except Exception:  # the job's own result matters more than a failed commit
        log.exception("Could not commit volume %s", volume_name)


# ---- GPUs -------------------------------------------------------------------------------------------------


class GpuUnusableError(RuntimeError):
    """The container has (or was promised) a GPU that torch cannot use."""


def check_gpu(count: int) -> None:
    """Stop in the first seconds when torch cannot use ``count`` GPUs, instead of training on the CPU for hours
    of GPU billing. The usual cause: a driver older than the CUDA build of torch that uv.lock pins."""
    import torch

    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if usable >= count:
        return
    raise GpuUnusableError(
        f"this job asked for {count} GPU(s) but torch can use {usable}: torch {torch.__version__} is built for "
        f"CUDA {torch.version.cuda}, and the container's driver is {driver_summary()}. Stopping now rather "
        "than running on the CPU. Pick another GPU type (hydra.launcher.gpu) or lock a torch built for this "
        "driver's CUDA version."
    )


def driver_summary() -> str:
    """``nvidia-smi``'s driver version and the newest CUDA it supports, in words."""
    import re
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown (nvidia-smi did not run: {error})"
    driver = re.search(r"Driver Version:\s*([\w.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\w.]+)", out)
    if driver is None:
        return "unknown (nvidia-smi printed no driver version)"
    return f"{driver[1]} (supports CUDA up to {cuda[1] if cuda else 'unknown'})"


def gpu_probe() -> dict[str, Any]:
    """What a GPU container sees: nvidia-smi's driver, torch's CUDA build, and whether torch can use the GPU."""
    import torch

    available = torch.cuda.is_available()
    return {
        "cuda_available": available,
        "device": torch.cuda.get_device_name(0) if available else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": driver_summary(),
    }


# ---- one job, several processes ---------------------------------------------------------------------------

RANKS_MODULE = "stylekit.remote.ranks"


def rank_command(processes: int, gpus: int) -> list[str]:
    """How the job's processes start: ``accelerate launch`` on GPUs; torch's launcher with gloo on CPUs
    (accelerate's multi-CPU path needs MPI)."""
    if gpus:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--module", RANKS_MODULE,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "--module", RANKS_MODULE,
    ]  # fmt: skip


def run_ranks(payload: Payload) -> JobResult:
    """Run the job as ``payload.processes`` processes in this cwd; rank 0's result is the job's."""
    import dataclasses
    import subprocess

    gpus = payload.container.gpus if payload.container is not None else _local_gpus(payload.processes)
    single = dataclasses.replace(payload, processes=1, container=None)
    with tempfile.TemporaryDirectory(prefix="stylekit-ranks-") as tmp:
        payload_file, result_file = Path(tmp, "payload.pkl"), Path(tmp, "result.pkl")
        payload_file.write_bytes(dumps(single))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [*rank_command(payload.processes, gpus), str(payload_file), str(result_file)]
        log.info("Job %d: %d processes: %s", payload.index, payload.processes, shlex.join(command))
        code = subprocess.run(command, env=env).returncode
        if result_file.is_file():
            return loads(result_file.read_bytes())
    return JobResult(
        payload.index,
        JobStatus.FAILED,
        error=f"the job's {payload.processes} processes exited with code {code} before rank 0 reported a "
        "result; their output is in the log above",
    )


def _local_gpus(processes: int) -> int:
    """backend=local: one GPU per process when this machine has enough, else CPU processes."""
    import torch

    return processes if torch.cuda.is_available() and torch.cuda.device_count() >= processes else 0


def quiet_rank_config(config: DictConfig) -> DictConfig:
    """Rank > 0's copy: no ``.hydra/`` files and no log file, which rank 0 writes for the job."""
    import copy

    from omegaconf import open_dict, read_write

    config = copy.deepcopy(config)
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        logging_cfg = config.hydra.get("job_logging") or {}
        handlers = logging_cfg.get("handlers") or {}
        files = [name for name, h in handlers.items() if "FileHandler" in str(h.get("class", ""))]
        for name in files:
            del handlers[name]
        root = logging_cfg.get("root")
        if root is not None and root.get("handlers"):
            root.handlers = [h for h in root.handlers if h not in files]
    return config


# ---- models, downloaded once per account ------------------------------------------------------------------

PREFETCHED_DIR = "stylekit/prefetched"


def prefetch_marker(repo: str, revision: str | None) -> str:
    """Where (relative to the HF cache volume) a finished download of ``repo@revision`` is recorded."""
    return f"{PREFETCHED_DIR}/{repo.replace('/', '--')}@{revision or 'main'}.json"


def prefetch_models(requests: list[dict[str, Any]], cache_root: str, volume_name: str) -> list[str]:
    """Download each pipeline (``repo``, ``revision``, ``variant``) into the HF cache and commit the volume.

    Runs once per launch on a CPU container before the GPU jobs start, so parallel jobs read one copy instead
    of each downloading its own (every container writes its own view of the volume).
    """
    import json

    from diffusers import DiffusionPipeline

    done = []
    for request in requests:
        repo, revision = request["repo"], request.get("revision")
        log.info("Downloading %s@%s into the model cache", repo, revision or "main")
        DiffusionPipeline.download(repo, revision=revision, variant=request.get("variant"))
        marker = Path(cache_root, prefetch_marker(repo, revision))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(request))
        done.append(repo)
    _commit(volume_name)
    return done


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
        from stylekit import schema
        from stylekit.inpaint.run import build_family, load_pipeline

        cfg = self.compose(["prompt=warm-up"])
        schema.validate("inpaint", cfg)  # the session's model overrides, before any weights load
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
