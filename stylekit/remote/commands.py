"""``stylekit modal ...``: deploy the Inpainter, collect a detached sweep, clean old runs off the outputs volume.

Modal is imported inside each command, so ``stylekit --help`` stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylekit.errors import UsageError
from stylekit.remote import VolumesSpec, package_root

DEPLOY_MODULE = "stylekit.remote.app"
NO_CREDENTIALS = "no Modal credentials: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET), then try again"


def has_credentials() -> bool:
    """A Modal token in the environment or in ~/.modal.toml (what the modal client would use)."""
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return True
    from modal.config import config

    return bool(config.get("token_id")) and bool(config.get("token_secret"))


def require_credentials() -> None:
    if not has_credentials():
        raise UsageError(NO_CREDENTIALS)


def deploy_argv() -> list[str]:
    """Module mode: Modal records ``stylekit.remote.app`` as the functions' module, which the image holds."""
    return [sys.executable, "-m", "modal", "deploy", "-m", DEPLOY_MODULE]


def deploy_env(gpu: str | None = None, app_name: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu:
        env["STYLEKIT_MODAL_GPU"] = gpu
    if app_name:
        env["STYLEKIT_MODAL_APP"] = app_name
    return env


def deploy(gpu: str | None = None, app_name: str | None = None) -> int:
    require_credentials()
    return subprocess.run(deploy_argv(), env=deploy_env(gpu, app_name), cwd=package_root()).returncode


# ---- collect --------------------------------------------------------------------------------------------


def collect(sweep_dir: Path, echo: Callable[[str], None] = print) -> dict[str, int]:
    import json

    import modal

    from hydra_plugins.stylekit_launcher._sweep import MANIFEST
    from hydra_plugins.stylekit_launcher._sweep import collect as collect_sweep

    manifest = sweep_dir / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"{manifest} does not exist: give the sweep dir a Modal launch printed")
    require_credentials()
    volume = modal.Volume.from_name(json.loads(manifest.read_text())["volume"])
    return collect_sweep(sweep_dir, volume, modal.FunctionCall.from_id, echo)


# ---- clean ----------------------------------------------------------------------------------------------

# Folders of the outputs volume whose children are whole runs, checkpoints or uploads, safe to drop by age.
CLEANABLE = ("outputs/*/multirun", "outputs/*/runs", "outputs/checkpoints", ".inputs")


@dataclass(frozen=True)
class Stale:
    path: str
    age_days: float


def stale_entries(volume: Any, older_than_days: float, now: float | None = None) -> list[Stale]:
    """Children of the cleanable folders last modified more than ``older_than_days`` ago."""
    import fnmatch

    now = time.time() if now is None else now
    found: list[Stale] = []

    def children(path: str) -> list[Any]:
        try:
            return list(volume.listdir(path))
        except Exception:  # a folder that does not exist yet
            return []

    parents = {".inputs", "outputs/checkpoints"}
    for task in children("outputs"):
        for kind in ("multirun", "runs"):
            parents.add(f"{task.path.rstrip('/')}/{kind}")
    for parent in sorted(p for p in parents if any(fnmatch.fnmatch(p, pattern) for pattern in CLEANABLE)):
        for entry in children(parent):
            age = (now - float(getattr(entry, "mtime", now))) / 86400
            if age > older_than_days:
                found.append(Stale(entry.path, age))
    return found


def clean(
    older_than_days: float,
    yes: bool,
    volume_name: str | None = None,
    volume: Any = None,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """List (and with ``yes``, remove) runs, checkpoints and uploads older than ``older_than_days``."""
    if older_than_days < 0:
        raise UsageError(f"--older-than {older_than_days}: use a number of days, 0 or more")
    if volume is None:
        import modal

        require_credentials()
        volume = modal.Volume.from_name(volume_name or VolumesSpec().outputs.name)
    stale = stale_entries(volume, older_than_days)
    for item in stale:
        echo(f"{'removing' if yes else 'would remove'} {item.path} ({item.age_days:.0f} days old)")
    if not stale:
        echo(f"nothing older than {older_than_days:g} days")
    if yes:
        for item in stale:
            volume.remove_file(item.path, recursive=True)
    elif stale:
        echo("add --yes to remove them")
    return [item.path for item in stale]
