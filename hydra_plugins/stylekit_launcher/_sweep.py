"""A sweep's containers: spawn one call per job, copy each run dir back as soon as its job ends.

Results are never held hostage by the slowest job or by this process: each finished job is copied back when it
finishes, Ctrl-C or a lost connection still copies back every job that had finished, and the call ids go to
``<sweep dir>/.stylekit-modal.json`` so ``stylekit modal collect <sweep dir>`` can fetch them later
(``hydra.launcher.detach=true`` leaves the jobs running and returns at once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_plugins.stylekit_launcher import _transfer as transfer
from hydra_plugins.stylekit_launcher._jobs import Job
from stylekit.io import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = ".stylekit-modal.json"
POLL_SECONDS = 2.0


@dataclass
class Finished:
    job: Job
    output: Any  # the worker's result bytes, or the exception the call raised


def write_manifest(
    sweep_dir: Path, jobs: list[Job], calls: list[Any], volume: str, mount: str, app: str
) -> Path:
    """Add this launch's jobs to the sweep dir's manifest. A sweeper that launches in batches (Optuna) calls the
    launcher once per batch with the same sweep dir: earlier batches' entries stay, so collect sees every job."""
    entries = {
        job.index: {
            "index": job.index,
            "overrides": job.overrides,
            "call_id": getattr(call, "object_id", None),
            "remote_dir": job.remote_dir,
            "local_dir": str(job.local_dir),
        }
        for job, call in zip(jobs, calls, strict=True)
    }
    path = sweep_dir / MANIFEST
    earlier = json.loads(path.read_text()).get("jobs", []) if path.is_file() else []
    kept = [entry for entry in earlier if entry.get("index") not in entries]
    merged = sorted([*kept, *entries.values()], key=lambda entry: entry["index"])
    payload = {"app": app, "volume": volume, "mount": mount, "jobs": merged}
    atomic_write_text(path, json.dumps(payload, indent=1))
    return path


def _poll(call: Any) -> tuple[bool, Any]:
    """(finished, output) without waiting. A lost connection raises: it says nothing about the job."""
    from modal.exception import AuthError, FunctionTimeoutError, OutputExpiredError
    from modal.exception import ConnectionError as ModalConnectionError
    from modal.exception import TimeoutError as ModalTimeout

    try:
        return True, call.get(timeout=0)
    except (OutputExpiredError, FunctionTimeoutError) as error:  # both are "timeouts" that mean finished
        return True, error
    except ModalTimeout:
        return False, None
    except (ModalConnectionError, AuthError, OSError):
        raise
    except Exception as error:  # the call failed (container crash after its retries, ...)
        return True, error


def wait_and_collect(
    jobs: list[Job],
    calls: list[Any],
    on_finished: Callable[[Finished], Any],
    manifest: Path,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[int, Any]:
    """``on_finished`` (copy back, build the JobReturn) for each job as it ends; returns them by job index.

    On KeyboardInterrupt or a lost connection, every job found finished is still handled before the error goes on.
    """
    pending = dict(zip((job.index for job in jobs), zip(jobs, calls, strict=True), strict=True))
    done: dict[int, Any] = {}
    try:
        while pending:
            for index, (job, call) in list(pending.items()):
                finished, output = _poll(call)
                if finished:
                    done[index] = on_finished(Finished(job, output))
                    del pending[index]
            if pending:
                sleep(POLL_SECONDS)
    except BaseException:
        for index, (job, call) in list(pending.items()):
            try:
                finished, output = _poll(call)
            except BaseException:  # the connection is gone: nothing more to learn
                break
            if finished:
                done[index] = on_finished(Finished(job, output))
                del pending[index]
        log.error(
            "Interrupted: %d finished job(s) copied back; %d not finished (%s). A detached sweep keeps running: "
            "`stylekit modal collect %s` fetches the rest later",
            len(done),
            len(pending),
            ", ".join(f"#{i}" for i in pending) or "none",
            manifest.parent,
        )
        raise
    return done


def collect(
    sweep_dir: Path,
    volume: Any,
    call_from_id: Callable[[str], Any],
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    """Copy back every finished job of a (detached) sweep; report what is still running. Counts by state."""
    manifest = sweep_dir / MANIFEST
    if not manifest.is_file():
        from stylekit.errors import UsageError

        raise UsageError(f"{manifest} does not exist: collect reads the sweep dir a Modal launch wrote")
    data = json.loads(manifest.read_text())
    counts = {"finished": 0, "failed": 0, "running": 0}
    for entry in data["jobs"]:
        finished, output = _poll(call_from_id(entry["call_id"])) if entry.get("call_id") else (True, None)
        label = f"#{entry['index']} {' '.join(entry['overrides'])}"
        if not finished:
            counts["running"] += 1
            echo(f"{label}: still running")
            continue
        state = "failed" if isinstance(output, BaseException) or _failed(output) else "finished"
        counts[state] += 1
        local = Path(entry["local_dir"])
        source = transfer.volume_path(entry["remote_dir"], data["mount"])
        try:
            count = transfer.download(volume, source, local)
        except Exception as error:
            echo(f"{label}: {state}, nothing to copy back ({error})")
            continue
        echo(f"{label}: {state}, {count} files -> {local}")
    return counts


def _failed(output: Any) -> bool:
    if not isinstance(output, bytes):
        return False
    from hydra.core.utils import JobStatus

    from stylekit.remote.worker import loads

    try:
        return loads(output).status != JobStatus.COMPLETED
    except Exception:
        return True
