"""Files between this machine and the outputs volume: inputs up (once per content), run dirs back.

Works on anything shaped like ``modal.Volume`` (``iterdir``, ``read_file_into_fileobj``, ``batch_upload``), so
the logic is testable against a local stand-in. The volume is mounted at the container's working directory, so
a path on the volume and the container path are the same string below and above the mount.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

INPUTS_DIR = ".inputs"
# "path:0.8" in lora_weights: a path followed by a LoRA scale.
_SCALE = re.compile(r"^(?P<path>.+?)(?P<scale>:[-+]?(\d+\.?\d*|\.\d+))$")
_HASH_CHUNK = 1 << 20
DOWNLOAD_WORKERS = 8


@dataclass(frozen=True)
class Staged:
    """One local file or folder a job reads, and where the container sees its uploaded copy."""

    key: str
    local: Path
    volume_path: str  # relative to the volume root
    container_path: str


def content_hash(path: Path) -> str:
    """Names the upload, so unchanged inputs upload once and a changed folder never mixes with an old one."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _split_scale(entry: str) -> tuple[str, str]:
    """``a.safetensors:0.8`` -> (``a.safetensors``, ``:0.8``) unless the whole entry names a file."""
    match = _SCALE.match(entry)
    if Path(entry).exists() or match is None:
        return entry, ""
    return match["path"], match["scale"]


def plan_inputs(cfg: DictConfig, keys: list[str], mount: str) -> tuple[list[Staged], dict[str, Any]]:
    """What to upload for one job, and the new values of the keys that name local paths.

    ``keys`` are dotted config keys, each optionally ``key=default``: the path the task reads when the key is
    null (stylekit's inpaint reads data/base_images and data/masks then).
    """
    staged: list[Staged] = []
    updates: dict[str, Any] = {}
    for entry in keys:
        key, _, default = entry.partition("=")
        value = _value(cfg, key, default)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        new_items = []
        for item in items:
            new_item, item_staged = _stage_item(key, str(item), mount)
            new_items.append(new_item)
            staged += item_staged
        if new_items != items:
            updates[key] = new_items[0] if isinstance(value, str) else new_items
    return staged, updates


def _value(cfg: DictConfig, key: str, default: str) -> Any:
    absent = object()
    value = OmegaConf.select(cfg, key, default=absent)
    if value is absent:
        return None
    if value is None:
        return default or None
    if isinstance(value, ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _stage_item(key: str, item: str, mount: str) -> tuple[str, list[Staged]]:
    """One path (with its ``:scale``), rewritten to its uploaded copy when it exists here."""
    path, scale = _split_scale(item)
    local = Path(path).expanduser()
    if not path or not local.exists():
        return item, []
    staged = _stage(key, local.resolve(), mount)
    return staged.container_path + scale, [staged]


def _stage(key: str, local: Path, mount: str) -> Staged:
    volume_path = f"{INPUTS_DIR}/{content_hash(local)}/{local.name}"
    return Staged(key, local, volume_path, str(PurePosixPath(mount) / volume_path))


def apply_updates(cfg: DictConfig, updates: dict[str, Any]) -> None:
    for key, value in updates.items():
        OmegaConf.update(cfg, key, value, merge=False)


def upload(volume: Any, staged: list[Staged]) -> None:
    """Upload what the volume lacks; the content hash in the path means present is up to date."""
    todo = {item.volume_path: item for item in staged if not exists(volume, item.volume_path)}
    if not todo:
        return
    with volume.batch_upload() as batch:
        for item in todo.values():
            log.info("Uploading %s -> %s", item.local, item.container_path)
            if item.local.is_dir():
                batch.put_directory(item.local, item.volume_path)
            else:
                batch.put_file(item.local, item.volume_path)


def exists(volume: Any, path: str) -> bool:
    from modal.exception import NotFoundError

    try:
        return bool(volume.listdir(path))
    except (NotFoundError, FileNotFoundError):
        return False


def download(volume: Any, volume_dir: str, local_dir: Path, workers: int = DOWNLOAD_WORKERS) -> int:
    """Copy every file under ``volume_dir`` into ``local_dir`` (same layout), several files at a time.

    Each file lands whole or not at all (written beside, then renamed). Returns how many.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = PurePosixPath(volume_dir.strip("/"))
    paths = [entry.path for entry in volume.iterdir(str(root), recursive=True) if _is_file(entry)]

    def fetch(path: str) -> None:
        dest = local_dir / PurePosixPath(path).relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        with partial.open("wb") as handle:
            volume.read_file_into_fileobj(path, handle)
        partial.replace(dest)

    # Each file is one round trip to Modal; a run dir holds dozens (samples, checkpoints' metadata, logs).
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fetch, paths))
    return len(paths)


def _is_file(entry: Any) -> bool:
    kind = getattr(entry, "type", None)
    return getattr(kind, "name", kind) == "FILE"


def volume_path(container_path: str, mount: str) -> str:
    """The path on the volume of a container path under the mount."""
    return str(PurePosixPath(container_path).relative_to(mount))
