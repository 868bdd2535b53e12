"""One sweep job as the launcher sees it: its config, where it writes here and in the container, its inputs."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.stylekit_launcher._transfer import Staged, apply_updates, plan_inputs

# Absolute local sweep dirs outside the launch dir keep their full path under this folder of the volume.
ABSOLUTE_DIR = "_abs"


class RemoteJobError(RuntimeError):
    """A job failed where it ran; the message carries that traceback."""


@dataclass
class Job:
    index: int
    overrides: list[str]
    config: DictConfig  # resolved here, with this machine's paths
    sweep_dir: str
    subdir: str
    local_dir: Path  # the job's run dir on this machine
    shipped: DictConfig | None = None  # what the container gets (paths rewritten); None: ship `config`
    remote_dir: str | None = None  # the job's run dir in the container
    staged: list[Staged] = field(default_factory=list)
    updates: dict[str, Any] = field(default_factory=dict)

    @property
    def task_name(self) -> str | None:
        return OmegaConf.select(self.config, "task_name", default=None)


def make_job(index: int, overrides: list[str], config: DictConfig) -> Job:
    """``config`` is Hydra's sweep config for the job, with ``hydra.job.num`` set and HydraConfig pointing at it."""
    sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))
    subdir = str(OmegaConf.select(config, "hydra.sweep.subdir"))
    local_dir = Path(os.path.abspath(os.path.join(sweep_dir, subdir)))
    return Job(index, list(overrides), config, sweep_dir, subdir, local_dir)


def container_dir(local: str, mount: str, cwd: Path) -> str:
    """Where a local directory lives on the outputs volume, which mirrors the launch directory."""
    path = Path(local)
    if path.is_absolute() or ".." in path.parts:
        absolute = Path(os.path.abspath(path))
        try:
            path = absolute.relative_to(cwd.resolve())
        except ValueError:
            path = Path(ABSOLUTE_DIR, *absolute.parts[1:])
    return str(PurePosixPath(mount, *path.parts))


def prepare_for_container(job: Job, mount: str, input_keys: list[str], cwd: Path) -> None:
    """Rewrite a copy of the job's config for the container: run dir and cwd on the volume, inputs uploaded."""
    shipped = copy.deepcopy(job.config)
    remote_sweep = container_dir(job.sweep_dir, mount, cwd)
    with read_write(shipped.hydra), open_dict(shipped.hydra):
        # Concrete strings: a timestamp must not be re-evaluated in the container.
        shipped.hydra.sweep.dir = remote_sweep
        shipped.hydra.sweep.subdir = job.subdir
        shipped.hydra.runtime.cwd = mount
    job.staged, job.updates = plan_inputs(shipped, input_keys, mount)
    apply_updates(shipped, job.updates)
    job.shipped = shipped
    job.remote_dir = str(PurePosixPath(remote_sweep, job.subdir))


def localize(ret: JobReturn, job: Job, mount: str) -> JobReturn:
    """Point a container job's return at this machine's run dir, where its files were copied."""
    cwd = os.getcwd()
    if ret.working_dir == job.remote_dir:
        ret.working_dir = str(job.local_dir)
    elif ret.working_dir == mount or ret.working_dir is None:
        ret.working_dir = cwd
    if ret.hydra_cfg is not None:
        runtime = ret.hydra_cfg.hydra.runtime
        with read_write(runtime):
            runtime.output_dir = str(job.local_dir)
            runtime.cwd = cwd
    return ret


def to_job_return(result: Any, job: Job) -> JobReturn:
    """A worker ``JobResult`` as Hydra's ``JobReturn``; a failure raises ``RemoteJobError`` when read."""
    ret = JobReturn(
        overrides=result.overrides or list(job.overrides),
        cfg=result.cfg,
        hydra_cfg=result.hydra_cfg,
        working_dir=result.working_dir,
        task_name=result.task_name,
        status=result.status,
    )
    if result.status == JobStatus.COMPLETED:
        ret.return_value = result.return_value
    else:
        ret.status = JobStatus.FAILED
        ret.return_value = RemoteJobError(
            f"job #{job.index} ({' '.join(job.overrides)}) failed:\n{result.error}"
        )
    return ret


def failed_result(job: Job, error: str) -> Any:
    from stylekit.remote.worker import JobResult

    return JobResult(job.index, JobStatus.FAILED, error=error, overrides=list(job.overrides))
