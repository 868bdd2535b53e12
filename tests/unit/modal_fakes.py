"""Stand-ins for the few Modal objects the launcher talks to, for offline tests.

``FakeVolume`` is a ``modal.Volume`` over a local folder (the container writes the same folder: it is the
mount). ``install`` replaces ``build_remote`` with one whose calls run the real worker here on the real payload
bytes, and the secret lookup with a set of names.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Entry:
    path: str
    type: Any
    mtime: float = 0.0


class _Kind:
    name = "FILE"


class _DirKind:
    name = "DIRECTORY"


class FakeVolume:
    def __init__(self, root: Path, read_delay: float = 0.0) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.read_delay = read_delay
        self.reading = 0
        self.most_at_once = 0
        self.removed: list[str] = []
        self._lock = threading.Lock()

    def listdir(self, path: str) -> list[Entry]:
        target = self.root / path
        if not target.exists():
            raise FileNotFoundError(path)
        # As Modal's: a file path lists that file.
        paths = [target] if target.is_file() else sorted(target.iterdir())
        return [
            Entry(str(p.relative_to(self.root)), _Kind() if p.is_file() else _DirKind(), p.stat().st_mtime)
            for p in paths
        ]

    def iterdir(self, path: str, recursive: bool = True) -> Iterator[Entry]:
        base = self.root / path
        if not base.exists():
            raise FileNotFoundError(path)
        for p in sorted(base.rglob("*")):
            if p.is_file():
                yield Entry(str(p.relative_to(self.root)), _Kind(), p.stat().st_mtime)

    def read_file_into_fileobj(self, path: str, fileobj: io.BufferedWriter) -> int:
        with self._lock:
            self.reading += 1
            self.most_at_once = max(self.most_at_once, self.reading)
        time.sleep(self.read_delay)
        with self._lock:
            self.reading -= 1
        return fileobj.write((self.root / path).read_bytes())

    def remove_file(self, path: str, recursive: bool = False) -> None:
        target = self.root / path
        self.removed.append(path)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    @contextlib.contextmanager
    def batch_upload(self) -> Iterator[Any]:
        volume = self

        class Batch:
            def put_directory(self, local: Path, remote: str) -> None:
                shutil.copytree(local, volume.root / remote)

            def put_file(self, local: Path, remote: str) -> None:
                (volume.root / remote).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(local, volume.root / remote)

        yield Batch()


class FakeCall:
    """A spawned call: ``get(timeout=0)`` answers from ``answers`` in turn (bytes, an exception to raise, or
    "running"), then keeps giving the last one."""

    def __init__(self, object_id: str, answers: list[Any]) -> None:
        self.object_id = object_id
        self.answers = answers

    def get(self, timeout: float | None = None) -> Any:
        from modal.exception import TimeoutError as ModalTimeout

        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, str) and answer == "running":
            raise ModalTimeout("still running")
        if isinstance(answer, BaseException):
            raise answer
        return answer


@dataclass
class Modal:
    """What the fake saw: payloads, settings, events in order; ``script`` picks each job's poll answers."""

    shipped: list[bytes] = field(default_factory=list)
    settings: list[Any] = field(default_factory=list)
    secret_names: list[Any] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    prefetched: list[Any] = field(default_factory=list)
    secrets: set[str] = field(default_factory=lambda: {"huggingface", "wandb"})
    # job index -> list of answers before the result ("running", KeyboardInterrupt(), ...)
    script: dict[int, list[Any]] = field(default_factory=dict)
    detach: list[bool] = field(default_factory=list)


def on_volume(mount: Path) -> list[str]:
    """Launcher overrides for CPU containers whose outputs volume is the local folder ``mount``."""
    return ["hydra.launcher.gpu=none", f"hydra.launcher.volumes.outputs.path={mount}"]


def install(monkeypatch: pytest.MonkeyPatch, mount: Path, cache: Path | None = None) -> Modal:
    from hydra_plugins.stylekit_launcher import _needs
    from stylekit.remote import app as remote_app
    from stylekit.remote import worker

    seen = Modal()
    hf_volume = FakeVolume(cache or mount.parent / "hf-cache")

    class Function:
        def spawn(self, payload: bytes) -> FakeCall:
            from stylekit.remote.worker import loads

            index = loads(payload).index
            seen.shipped.append(payload)
            seen.events.append(f"spawn {index}")
            answers = list(seen.script.get(index, []))
            if not any(isinstance(a, BaseException) for a in answers):
                result = worker.run_payload(payload)
            else:
                result = b""
            return FakeCall(f"fc-{index}", [*answers, result] if result else answers)

        def map(
            self, payloads: list[bytes], order_outputs: bool = True, return_exceptions: bool = True
        ) -> Any:
            for payload in payloads:
                seen.shipped.append(payload)
                yield worker.run_payload(payload)

    class Prefetch:
        def remote(self, requests: list[dict], cache_root: str, volume_name: str) -> list[str]:
            seen.events.append("prefetch")
            seen.prefetched.append(requests)
            for request in requests:
                marker = hf_volume.root / worker.prefetch_marker(request["repo"], request["revision"])
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("{}")
            return [r["repo"] for r in requests]

    class App:
        @contextlib.contextmanager
        def run(self, detach: bool = False) -> Iterator[None]:
            seen.detach.append(detach)
            seen.events.append("app start")
            yield

    def build_remote(settings: Any, spec: Any = None, secret_names: Any = None) -> Any:
        seen.settings.append(settings)
        seen.secret_names.append(secret_names)
        return remote_app.Remote(
            app=App(), worker=Function(), outputs=FakeVolume(mount), prefetch=Prefetch(), hf_cache=hf_volume
        )

    monkeypatch.setattr(remote_app, "build_remote", build_remote)
    monkeypatch.setattr(worker, "_commit", lambda name: None)
    monkeypatch.setattr(_needs, "modal_secret_exists", lambda name: name in seen.secrets)
    return seen
