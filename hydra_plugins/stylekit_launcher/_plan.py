"""``hydra.launcher.dry_run=true``: what each job would run, where, on what; nothing is contacted."""

from __future__ import annotations

from typing import Any

from hydra_plugins.stylekit_launcher._jobs import Job
from stylekit.remote import ImageSpec, container_env, gpu_option, process_count, resources


def describe(jobs: list[Job], conf: Any, spec: ImageSpec) -> str:
    lines = [f"stylekit launcher dry run: {len(jobs)} job(s), backend={conf.backend}, app={conf.app_name}"]
    if conf.backend == "modal":
        lines += _modal_header(conf, spec)
    if conf.backend == "modal" and conf.use_deployed:
        lines.append(
            f"  inpaint: edits go to the deployed Inpainter of app {conf.app_name!r} with these options "
            "(its sources are checked against this checkout at launch); only LoRA files are uploaded"
        )
    if conf.backend == "modal" and conf.detach:
        lines.append(
            "  detached: returns once the jobs start; `stylekit modal collect <sweep dir>` fetches them"
        )
    for job in jobs:
        lines += _job_lines(job, conf)
    return "\n".join(lines)


def _modal_header(conf: Any, spec: ImageSpec) -> list[str]:
    volumes = conf.volumes
    cpu, memory = resources(conf)
    secrets = (
        ", ".join(conf.secrets)
        if conf.secrets is not None
        else "only those the jobs need (checked at launch)"
    )
    env = ", ".join(f"{k}={v}" for k, v in container_env(conf).items())
    return [
        f"  image: debian_slim python {spec.python_version} + uv sync --frozen {spec.uv_options} "
        f"({spec.project_dir / 'uv.lock'}) + {', '.join(spec.packages)} + "
        f"{', '.join(d + '/' for d in spec.data_dirs)}",
        f"  gpu: {gpu_option(conf.gpu) or 'none (CPU)'} | timeout {conf.timeout}s | retries {conf.retries} | "
        f"max_containers {_or_default(conf.max_containers)} | cpu {_or_default(cpu)} | "
        f"memory {_or_default(memory, ' MiB')} | processes per job {process_count(conf)}",
        f"  volumes: {volumes.hf_cache.name} -> {volumes.hf_cache.path}, "
        f"{volumes.outputs.name} -> {volumes.outputs.path} (container cwd)",
        f"  secrets: {secrets or 'none'}",
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
