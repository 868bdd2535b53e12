"""``hydra.launcher.dry_run=true``: what each job would run, where, on what; nothing is contacted."""

from __future__ import annotations

from typing import Any

from hydra_plugins.stylekit_launcher._jobs import Job
from stylekit.remote import ImageSpec, container_env, gpu_option


def describe(jobs: list[Job], conf: Any, spec: ImageSpec) -> str:
    lines = [f"stylekit launcher dry run: {len(jobs)} job(s), backend={conf.backend}, app={conf.app_name}"]
    if conf.backend == "modal":
        lines += _modal_header(conf, spec)
    if conf.backend == "modal" and any(job.task_name == "inpaint" for job in jobs):
        lines.append(
            f"  inpaint: edits go to the deployed Inpainter of app {conf.app_name!r} if there is one "
            "(not looked up in a dry run), else each job runs in its own container as below"
        )
    for job in jobs:
        lines += _job_lines(job, conf)
    return "\n".join(lines)


def _modal_header(conf: Any, spec: ImageSpec) -> list[str]:
    volumes = conf.volumes
    env = ", ".join(f"{k}={v}" for k, v in container_env(conf).items())
    return [
        f"  image: debian_slim python {spec.python_version} + uv sync --frozen {spec.uv_options} "
        f"({spec.project_dir / 'uv.lock'}) + {', '.join(spec.packages)} + "
        f"{', '.join(d + '/' for d in spec.data_dirs)}",
        f"  gpu: {gpu_option(conf.gpu) or 'none (CPU)'} | timeout {conf.timeout}s | retries {conf.retries} | "
        f"max_containers {_or_default(conf.max_containers)} | cpu {_or_default(conf.cpu)} | "
        f"memory {_or_default(conf.memory, ' MiB')}",
        f"  volumes: {volumes.hf_cache.name} -> {volumes.hf_cache.path}, "
        f"{volumes.outputs.name} -> {volumes.outputs.path} (container cwd)",
        f"  secrets: {', '.join(conf.secrets) or 'none'}",
        f"  env: {env}",
    ]


def _or_default(value: Any, unit: str = "") -> str:
    return "Modal's default" if value is None else f"{value}{unit}"


def _job_lines(job: Job, conf: Any) -> list[str]:
    lines = [f"#{job.index}: {' '.join(job.overrides) or '(no overrides)'}"]
    if conf.backend == "modal":
        lines.append(f"  gpu {gpu_option(conf.gpu) or 'none'}; runs in {job.remote_dir}")
        lines += [f"  uploads {s.key}: {s.local} -> {s.container_path}" for s in job.staged]
        lines.append(f"  copies back to {job.local_dir}")
    else:
        lines.append(f"  runs here, in {job.local_dir}")
    return lines
