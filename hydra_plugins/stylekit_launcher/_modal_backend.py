"""``backend=modal``: upload inputs, fan the jobs out as parallel containers, copy each run dir back."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, configure_log, run_job

from hydra_plugins.stylekit_launcher import _transfer as transfer
from hydra_plugins.stylekit_launcher._jobs import Job, failed_result, localize, to_job_return
from stylekit.remote import ImageSpec

if TYPE_CHECKING:
    from hydra_plugins.stylekit_launcher.modal_launcher import ModalLauncher

log = logging.getLogger(__name__)


class ModalBackend:
    def __init__(self, launcher: ModalLauncher, spec: ImageSpec) -> None:
        self.launcher = launcher
        self.conf = launcher.conf
        self.spec = spec
        self.mount = self.conf.volumes.outputs.path

    def run(self, jobs: list[Job]) -> list[JobReturn]:
        import modal

        from stylekit.remote.app import build_remote
        from stylekit.remote.worker import dumps

        remote = build_remote(self._settings(), self.spec)
        transfer.upload(remote.outputs, _unique([s for job in jobs for s in job.staged]))
        inpainter = self._deployed_inpainter(jobs)
        if inpainter is not None:
            return self._run_deployed(jobs, inpainter)
        task = self._task_ref()
        payloads = [dumps(self.launcher.payload(job, task, in_container=True)) for job in jobs]
        with modal.enable_output(), remote.app.run():
            outputs = remote.worker.map(payloads, order_outputs=True, return_exceptions=True)
            return [self._collect(job, out, remote.outputs) for job, out in zip(jobs, outputs, strict=True)]

    def _settings(self) -> Any:
        """The launcher's settings plus ``hydra.job.env_copy``: variables Hydra says to carry to remote jobs."""
        assert self.launcher.config is not None
        names = self.launcher.config.hydra.job.get("env_copy") or []
        copied = {name: os.environ[name] for name in names if name in os.environ}
        return dataclasses.replace(self.conf, env={**copied, **self.conf.env})

    def _task_ref(self) -> Any:
        from stylekit.remote.worker import TaskRef

        assert self.launcher.task_function is not None
        ref = TaskRef.of(self.launcher.task_function, script_root=self.spec.project_dir)
        if ref.script is not None and Path(ref.script).parts[0] not in self.spec.data_dirs:
            raise ValueError(
                f"The task script {ref.script} must live in {', '.join(self.spec.data_dirs)}/ of "
                f"{self.spec.project_dir}: only those folders are in the Modal image."
            )
        return ref

    def _collect(self, job: Job, out: Any, volume: Any) -> JobReturn:
        from stylekit.remote.worker import loads

        if isinstance(out, BaseException):
            result = failed_result(job, f"{type(out).__name__}: {out}")
        else:
            result = loads(out)
        self._copy_back(job, volume)
        return localize(to_job_return(result, job), job, self.mount)

    def _copy_back(self, job: Job, volume: Any) -> None:
        assert job.remote_dir is not None
        source = transfer.volume_path(job.remote_dir, self.mount)
        try:
            count = transfer.download(volume, source, job.local_dir)
        except Exception as error:  # a failed job may have written nothing; the others still count
            log.warning("Job #%d: nothing copied back from %s:%s (%s)", job.index, volume, source, error)
            return
        log.info("Job #%d: %d files -> %s", job.index, count, job.local_dir)

    # ---- inpaint jobs on the deployed Inpainter ---------------------------------------------------------
    def _deployed_inpainter(self, jobs: list[Job]) -> Any:
        if not jobs or any(job.task_name != "inpaint" for job in jobs):
            return None
        import modal

        cls = modal.Cls.from_name(self.conf.app_name, "Inpainter")
        try:
            cls.hydrate()
        except modal.exception.NotFoundError:
            log.info(
                "No deployed Inpainter in app %r: each job runs in its own container", self.conf.app_name
            )
            return None
        log.info("Using the deployed Inpainter of app %r", self.conf.app_name)
        return cls

    def _run_deployed(self, jobs: list[Job], inpainter: Any) -> list[JobReturn]:
        from hydra_plugins.stylekit_launcher._deployed import DeployedInpaint

        launcher = self.launcher
        assert launcher.hydra_context is not None and launcher.config is not None
        returns = []
        for job in jobs:
            task = DeployedInpaint(inpainter, job.overrides, job.updates.get("lora_weights"))
            returns.append(
                run_job(
                    hydra_context=launcher.hydra_context,
                    task_function=task,
                    config=job.config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
        return returns


def _unique(staged: list[transfer.Staged]) -> list[transfer.Staged]:
    return list({item.volume_path: item for item in staged}.values())
