"""``backend=modal``: check what the jobs need, upload inputs, fan the jobs out, copy each run dir back.

Order matters for money: everything that can fail without a GPU (missing secrets, a plugin the image lacks, a
stale deployment) fails here before any container starts; model weights download once on a CPU container
before the GPU jobs start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job

from hydra_plugins.stylekit_launcher import _needs, _sweep
from hydra_plugins.stylekit_launcher import _transfer as transfer
from hydra_plugins.stylekit_launcher._jobs import Job, failed_result, localize, to_job_return
from stylekit.errors import UsageError
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
        from stylekit.remote.app import build_remote

        secret_names = _needs.needed_secrets(jobs, self.conf, _needs.modal_secret_exists)
        if self.conf.use_deployed:
            return self._run_deployed(jobs, secret_names)
        task = self._task_ref()
        payloads = [self.launcher.payload_bytes(job, task, in_container=True) for job in jobs]
        self._check_image_has(payloads[0] if payloads else b"")
        remote = build_remote(self._settings(), self.spec, secret_names)
        transfer.upload(remote.outputs, _unique([s for job in jobs for s in job.staged]))
        return self._run_containers(jobs, payloads, remote)

    def _run_containers(self, jobs: list[Job], payloads: list[bytes], remote: Any) -> list[JobReturn]:
        import modal

        assert self.launcher.config is not None
        sweep_dir = Path(str(self.launcher.config.hydra.sweep.dir))
        detach = bool(self.conf.detach)
        with modal.enable_output(), remote.app.run(detach=detach):
            self._prefetch(jobs, remote)
            calls = [remote.worker.spawn(payload) for payload in payloads]
            manifest = _sweep.write_manifest(
                sweep_dir, jobs, calls, self.conf.volumes.outputs.name, self.mount, self.conf.app_name
            )
            if detach:
                log.info(
                    "Detached: %d job(s) keep running on Modal; `stylekit modal collect %s` copies back the "
                    "finished ones",
                    len(jobs),
                    sweep_dir,
                )
                return [_detached_return(job) for job in jobs]
            done = _sweep.wait_and_collect(
                jobs, calls, lambda f: self._collect(f.job, f.output, remote.outputs), manifest
            )
        return [done[job.index] for job in jobs]

    def _prefetch(self, jobs: list[Job], remote: Any) -> None:
        """Download each pipeline the jobs load once, on a CPU container, unless the cache volume has it."""
        from stylekit.remote.worker import prefetch_marker

        if remote.prefetch is None:
            return

        def cached(source: dict[str, Any]) -> bool:
            return transfer.exists(remote.hf_cache, prefetch_marker(source["repo"], source["revision"]))

        todo = _needs.prefetch_requests(jobs, cached)
        if not todo:
            return
        names = ", ".join(t["repo"] for t in todo)
        log.info("Downloading %s once into the model cache volume (CPU container)", names)
        hf = self.conf.volumes.hf_cache
        remote.prefetch.remote(todo, hf.path, hf.name)

    def _settings(self) -> Any:
        """The launcher's settings plus ``hydra.job.env_copy``: variables Hydra says to carry to remote jobs."""
        assert self.launcher.config is not None
        names = self.launcher.config.hydra.job.get("env_copy") or []
        copied = {name: os.environ[name] for name in names if name in os.environ}
        return dataclasses.replace(self.conf, env={**copied, **self.conf.env})

    def _check_image_has(self, payload: bytes) -> None:
        from hydra_plugins.stylekit_launcher._modules import check_payload_modules

        if payload:
            check_payload_modules(payload, self.spec.packages, self.spec.project_dir / "uv.lock")

    def _task_ref(self) -> Any:
        from stylekit.remote.worker import TaskRef

        assert self.launcher.task_function is not None
        ref = TaskRef.of(self.launcher.task_function, script_root=self.spec.project_dir)
        if ref.script is not None and Path(ref.script).parts[0] not in self.spec.data_dirs:
            raise UsageError(
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

    # ---- inpaint jobs on the deployed Inpainter (hydra.launcher.use_deployed=true) -------------------------
    def _run_deployed(self, jobs: list[Job], secret_names: list[str]) -> list[JobReturn]:
        from hydra_plugins.stylekit_launcher._deployed import DeployedInpaint, lora_entries

        not_inpaint = [job.index for job in jobs if job.task_name != "inpaint"]
        if not_inpaint:
            raise UsageError(
                "hydra.launcher.use_deployed=true sends edits to the deployed Inpainter: it runs inpaint jobs "
                "only (drop it for training)"
            )
        inpainter, volume = self._deployed_inpainter(secret_names)
        # Images and masks travel as bytes with each call; only LoRA files must be on the volume.
        transfer.upload(volume, _unique([s for job in jobs for s in job.staged if s.key == "lora_weights"]))
        launcher = self.launcher
        assert launcher.hydra_context is not None and launcher.config is not None
        returns = []
        for job in jobs:
            task = DeployedInpaint(inpainter, job.overrides, lora_entries(job.config, job.updates))
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

    def _deployed_inpainter(self, secret_names: list[str]) -> tuple[Any, Any]:
        """The deployed class with this launch's options, after checking it runs this checkout's sources."""
        import modal

        from stylekit.remote import source_fingerprint
        from stylekit.remote.app import INFO_NAME, call_options, volumes

        app = self.conf.app_name
        try:
            info = modal.Function.from_name(app, INFO_NAME).remote()
        except modal.exception.NotFoundError:
            raise UsageError(
                f"hydra.launcher.use_deployed=true: no deployed app {app!r}; deploy it first with "
                f"`stylekit modal deploy` (STYLEKIT_MODAL_APP={app})"
            ) from None
        check_deployment(info, source_fingerprint(self.spec.project_dir), app)
        cls = modal.Cls.from_name(app, "Inpainter").with_options(**call_options(self.conf, secret_names))
        return cls, volumes(self.conf)[self.mount]


def check_deployment(info: dict[str, Any], local: str, app: str) -> None:
    deployed = str(info.get("fingerprint") or "unknown")
    if deployed != local:
        raise UsageError(
            f"the deployed app {app!r} runs stylekit {deployed}, this checkout is {local}: redeploy with "
            "`stylekit modal deploy`, or drop hydra.launcher.use_deployed to run each job in its own container"
        )


def _detached_return(job: Job) -> JobReturn:
    ret = JobReturn(overrides=list(job.overrides), working_dir=str(job.local_dir), status=JobStatus.UNKNOWN)
    ret.task_name = job.task_name or ""
    return ret


def _unique(staged: list[transfer.Staged]) -> list[transfer.Staged]:
    return list({item.volume_path: item for item in staged}.values())
