"""Checkpoints that survive kill -9, full disks and Ctrl-C, and the resume logic that finds them.

A checkpoint is a directory `root/checkpoint-<step:08d>` holding whatever the training loop wrote plus a
`COMPLETE` marker written last. It is built under a temp name and renamed into place, so a directory with
the final name and the marker is always whole; anything else is ignored and, when stale, cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from stylekit.errors import UsageError
from stylekit.io import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_FINAL = re.compile(r"checkpoint-(\d+)")
# Temp dirs being built, and old dirs moved aside while a same-step checkpoint replaces them.
_TMP = re.compile(r"\.tmp-checkpoint-(\d+)-(\d+)")
_OLD = re.compile(r"\.old-checkpoint-(\d+)-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def is_complete(path: Path) -> bool:
    """True when `path` is a checkpoint directory whose writer finished (the COMPLETE marker exists)."""
    return path.is_dir() and (path / COMPLETE).is_file()


def checkpoint_step(path: Path) -> int | None:
    match = _FINAL.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    # Data must be on disk before the marker and the rename claim the checkpoint is whole.
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    # Marker first: a deletion cut short by kill -9 must not leave a dir that still looks complete.
    with contextlib.suppress(FileNotFoundError):
        (path / COMPLETE).unlink()
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows; leave such dirs alone
    if pid == os.getpid():
        # Containers restart with the same small pids; a dir with our pid existing before we saved is stale.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


class CheckpointManager:
    """Saves checkpoints atomically under `root` and keeps the newest `keep` of them."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._cleanup_stale()

    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Have `write(dir)` fill a fresh directory, then publish it as the checkpoint for `step`.

        If `write` (or syncing to disk) fails, the partial directory is removed, earlier checkpoints are
        untouched, and the error propagates.
        """
        tmp = self.root / f".tmp-checkpoint-{step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)  # our own leftover from an earlier failed attempt at this step
        tmp.mkdir()
        try:
            write(tmp)
            _fsync_tree(tmp)
            atomic_write_text(tmp / COMPLETE, json.dumps({"step": step, "time": time.time()}) + "\n")
            final = self._publish(tmp, step)
        except BaseException:
            # BaseException too: a second Ctrl-C mid-save must not leave a half-written dir behind.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep_also=final)
        log.info("saved checkpoint %s", final)
        return final

    def _publish(self, tmp: Path, step: int) -> Path:
        final = self.root / checkpoint_name(step)
        aside = None
        if final.exists():
            # A rename cannot replace a non-empty dir; move the old one aside and drop it once the new
            # one is in place. _cleanup_stale restores it if we die in between.
            aside = self.root / f".old-checkpoint-{step}-{os.getpid()}"
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
            raise
        fsync_dir(self.root)
        if aside is not None:
            _remove(aside)
        return final

    def _prune(self, keep_also: Path) -> None:
        # The dir just saved always stays, even when it is not the newest (a resume from an older one).
        others = [p for p in self.checkpoints() if p != keep_also]
        for path in others[: max(0, len(others) - (self.keep - 1))]:
            log.info("removing old checkpoint %s (trainer.keep_checkpoints=%d)", path, self.keep)
            _remove(path)

    def _cleanup_stale(self) -> None:
        for path in self.root.iterdir():
            tmp, old = _TMP.fullmatch(path.name), _OLD.fullmatch(path.name)
            match = tmp or old
            if match is None or _pid_alive(int(match.group(2))):
                continue
            final = self.root / checkpoint_name(int(match.group(1)))
            if old and not final.exists() and is_complete(path):
                log.warning("restoring %s, moved aside by a save that did not finish", final)
                os.replace(path, final)
            else:
                log.info("removing %s, left by a save that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint to resume from for `trainer.resume` ("auto", "never" or a checkpoint dir), or None."""
    if resume is None or resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(Path(root))
    return check_resume(resume)


def check_resume(resume: str | None) -> Path | None:
    """The checkpoint an explicit `trainer.resume=PATH` names, or None for auto/never; UsageError when PATH is not
    a complete checkpoint. Needs no checkpoint root, so a mistyped path fails before the data is even read."""
    if resume is None or resume in ("auto", "never"):
        return None
    path = Path(resume).expanduser()
    if is_complete(path):
        return path
    if not path.exists():
        raise UsageError(
            f"trainer.resume={resume}: no such directory; pass a checkpoint-NNNNNNNN dir, or auto"
        )
    inner = latest_checkpoint(path)
    hint = f"e.g. trainer.resume={inner}" if inner else "or trainer.resume=auto / never"
    raise UsageError(
        f"trainer.resume={resume} is not a complete checkpoint (no {COMPLETE} marker); "
        f"pass a checkpoint-NNNNNNNN dir, {hint}"
    )


class GracefulExit:
    """Turns SIGTERM/SIGINT into a request to stop, so the loop can save a checkpoint and exit cleanly.

        with GracefulExit() as stop:
            for step in ...:
                ...optimizer step...
                if stop.stop_requested:
                    manager.save(step, write); break

    A second Ctrl-C while stopping raises KeyboardInterrupt: someone pressing it twice wants out now.
    Repeated SIGTERMs just keep the request (schedulers send SIGKILL after their grace period anyway).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self._stop = False
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def stop_requested(self) -> bool:
        return self._stop

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self._signum).name if self._signum is not None else None

    def request_stop(self) -> None:
        """Ask for a stop without a signal (tests, time limits)."""
        self._stop = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self._stop:
            name = signal.Signals(signum).name
            log.warning(
                "%s received: stopping after this step and saving a checkpoint (Ctrl-C again quits now)", name
            )
        self._stop = True
        self._signum = signum

    def __enter__(self) -> GracefulExit:
        # Python only lets the main thread set handlers; elsewhere (a launcher running jobs in threads)
        # this is a no-op and the default behaviour (die on the signal) stays.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, previous in self._previous.items():
            # None means the handler was not installed from Python; the default is the closest we can restore.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


FINISHED = "finished.json"


def record_finished(root: Path, step: int, lora: Path) -> None:
    """Note in the run's checkpoint root where the finished run put its LoRA, so a rerun can point at it."""
    atomic_write_text(
        Path(root) / FINISHED, json.dumps({"step": step, "lora": str(Path(lora).resolve())}) + "\n"
    )


def finished_lora(root: Path) -> Path | None:
    """The LoRA a finished run of this identity saved (see record_finished), or None when unknown or gone."""
    try:
        lora = Path(json.loads((Path(root) / FINISHED).read_text())["lora"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return lora if lora.is_file() else None
