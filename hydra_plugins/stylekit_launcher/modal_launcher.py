"""``hydra/launcher=modal``: each sweep job runs in its own Modal container; results come back to ``outputs/``.

Per job the launcher resolves the config here (``load_sweep_config``), fixes its run dir, and ships it with
Hydra's singleton state and a reference to the task function to ``stylekit.remote.worker``, which calls Hydra's
``run_job`` there. ``backend=local`` sends the same bytes through the same worker in this process.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.stylekit_launcher._jobs import Job, make_job, prepare_for_container, to_job_return
from hydra_plugins.stylekit_launcher.config import BACKENDS, ModalLauncherConf
from stylekit.errors import UsageError
from stylekit.remote import (
    CONTAINER_PROJECT_DIR,
    ImageSpec,
    find_project_root,
    gpu_count,
    image_spec,
    process_count,
)

log = logging.getLogger(__name__)


class ModalLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.conf = _settings(params)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except UsageError as error:
            # Hydra would print a traceback and exit 1; a usage problem is one line and exit code 2.
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(error.exit_code) from None

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweeper = _result_reading_sweeper(self.config)
        if sweeper and self.conf.detach:
            raise UsageError(
                f"hydra.launcher.detach=true returns before the jobs finish, but hydra/sweeper={sweeper} chooses "
                "each batch of trials from the previous batch's results: drop detach (Ctrl-C still copies back "
                "every finished job)"
            )
        jobs = [self._job(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        # A bad value stops a grid before anything is uploaded or started. A sweeper that reads each trial's
        # result (Optuna) gets those trials back as failed instead, and its study goes on.
        problems = job_config_problems(jobs)
        if problems and not sweeper:
            from stylekit.schema import listed

            raise UsageError(listed([line for lines in problems.values() for line in lines]))
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        runnable = [job for job in jobs if job.index not in problems]
        ran = self._run(runnable, sweeper) if runnable else []
        returns = dict(zip([job.index for job in runnable], ran, strict=True))
        for job in jobs:
            if job.index in problems:
                log.warning("Not starting %s", problems[job.index][0])
                returns[job.index] = _refused_return(job, problems[job.index])
        return [returns[job.index] for job in jobs]

    def _run(self, jobs: list[Job], sweeper: str | None) -> Sequence[JobReturn]:
        assert self.config is not None
        spec = self.image_spec()
        if self.conf.backend == "modal":
            for job in jobs:
                prepare_for_container(job, self.conf.volumes.outputs.path, list(self.conf.inputs), Path.cwd())
        if self.conf.dry_run:
            from hydra_plugins.stylekit_launcher._plan import describe

            print(describe(jobs, self.conf, spec))
            if sweeper:  # its next batch depends on results a dry run does not produce
                print(
                    f"Dry run: hydra/sweeper={sweeper} picks each next batch from this one's results; stopping here."
                )
                raise SystemExit(0)
            return [_dry_return(job) for job in jobs]
        log.info("Launching %d job(s) with backend=%s", len(jobs), self.conf.backend)
        if self.conf.backend == "local":
            return self._run_local(jobs, spec)
        from hydra_plugins.stylekit_launcher._modal_backend import ModalBackend

        return ModalBackend(self, spec).run(jobs)

    # ---- jobs ---------------------------------------------------------------------------------------------
    def _job(self, index: int, overrides: Sequence[str]) -> Job:
        assert self.config is not None and self.hydra_context is not None
        log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        # As run_job does: interpolations in the run dir may read Hydra's config (${hydra:...}).
        HydraConfig.instance().set_config(config)
        return make_job(index, list(overrides), config)

    def image_spec(self) -> ImageSpec:
        return image_spec(self.project_dir())

    def project_dir(self) -> Path | None:
        """The project the container is built from: the task script's, else the launch directory's."""
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        starts = [Path(main_file).parent] if main_file else []
        for start in [*starts, Path.cwd()]:
            root = find_project_root(start)
            if root is not None:
                return root
        return None

    def payload(self, job: Job, task: Any, in_container: bool) -> Any:
        from stylekit.remote.worker import Container, Payload

        assert self.hydra_context is not None
        container = None
        if in_container:
            outputs = self.conf.volumes.outputs
            container = Container(
                workdir=outputs.path,
                project_dir=CONTAINER_PROJECT_DIR,
                outputs_volume=outputs.name,
                gpus=gpu_count(self.conf.gpu),
            )
        return Payload(
            index=job.index,
            config=job.shipped if job.shipped is not None else job.config,
            hydra_context=self.hydra_context,
            singleton_state=Singleton.get_state(),
            task=task,
            project_dir=CONTAINER_PROJECT_DIR if in_container else os.getcwd(),
            container=container,
            processes=process_count(self.conf),
        )

    def payload_bytes(self, job: Job, task: Any, in_container: bool) -> bytes:
        from stylekit.remote.worker import dumps

        return dumps(self.payload(job, task, in_container))

    # ---- backend=local ------------------------------------------------------------------------------------
    def _run_local(self, jobs: list[Job], spec: ImageSpec) -> list[JobReturn]:
        from stylekit.remote.app import build_remote
        from stylekit.remote.worker import TaskRef, loads

        assert self.config is not None and self.task_function is not None
        worker = build_remote(self.conf, spec).worker
        task = TaskRef.of(self.task_function)
        returns = []
        for job in jobs:
            with warnings.catch_warnings():
                # Function.local() warns that volumes are not mounted: backend=local uses local paths.
                warnings.filterwarnings("ignore", message=".*executing locally.*")
                result = loads(worker.local(self.payload_bytes(job, task, in_container=False)))
            returns.append(to_job_return(result, job))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns


def job_config_problems(jobs: list[Job]) -> dict[int, list[str]]:
    """Each job's config against stylekit's schema, here, before anything is uploaded or started: job index
    -> its problems, one line each, naming the job. Jobs of apps other than stylekit's are not checked."""
    from stylekit import schema

    problems: dict[int, list[str]] = {}
    for job in jobs:
        app = OmegaConf.select(job.config, "hydra.job.config_name", default=None)
        if app not in schema.SCHEMAS:
            continue
        task_config = OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"])
        try:
            schema.validate(str(app), task_config)
        except UsageError as error:
            where = " ".join(filter_overrides(job.overrides)) or "no overrides"
            problems[job.index] = [f"job #{job.index} ({where}): {line}" for line in str(error).splitlines()]
    return problems


def _refused_return(job: Job, problems: list[str]) -> JobReturn:
    """A job the schema refused, as a failed trial: reading its result raises the problems."""
    ret = JobReturn(
        overrides=list(job.overrides),
        working_dir=str(job.local_dir),
        task_name=str(OmegaConf.select(job.config, "hydra.job.name", default="")),
        status=JobStatus.FAILED,
    )
    ret.return_value = UsageError("\n".join(problems))
    return ret


def _settings(params: dict[str, Any]) -> ModalLauncherConf:
    """The launcher's parameters, type-checked against its dataclass."""
    params = {k: v for k, v in params.items() if k != "_target_"}
    merged = OmegaConf.merge(OmegaConf.structured(ModalLauncherConf), params)
    conf = OmegaConf.to_object(merged)
    assert isinstance(conf, ModalLauncherConf)
    if conf.backend not in BACKENDS:
        raise UsageError(f"hydra.launcher.backend={conf.backend!r}: expected one of {', '.join(BACKENDS)}")
    return conf


def _result_reading_sweeper(config: DictConfig) -> str | None:
    """The name of a sweeper that reads each batch's results to choose the next (Optuna), else None.

    Hydra's basic sweeper fixes every job up front; any other sweeper is assumed to need the results."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not target or target.endswith(".BasicSweeper"):
        return None
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    return str(choices.get("hydra/sweeper") or target.rsplit(".", 1)[-1])


def _dry_return(job: Job) -> JobReturn:
    return JobReturn(
        overrides=list(job.overrides),
        working_dir=str(job.local_dir),
        task_name=str(OmegaConf.select(job.config, "hydra.job.name", default="")),
        status=JobStatus.COMPLETED,
    )
