"""Checkpoints survive failed writes, kill -9 leftovers and signals; atomic writes keep the old file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stylekit.errors import UsageError
from stylekit.io import atomic_write_bytes, atomic_write_text
from stylekit.train.checkpoint import COMPLETE, CheckpointManager, GracefulExit, resolve_resume

ROOT = Path(__file__).resolve().parents[2]


def _writer(payload: str):
    def write(path: Path) -> None:
        (path / "state.json").write_text(payload)
        (path / "lora").mkdir()
        (path / "lora" / "weights.bin").write_bytes(b"\0" * 64)

    return write


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_latest_and_prune_keep_n(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        saved = manager.save(step, _writer(f'{{"step": {step}}}'))
        assert saved.name == f"checkpoint-{step:08d}"
        assert (saved / COMPLETE).is_file()
    assert _names(tmp_path) == ["checkpoint-00000020", "checkpoint-00000030"]
    assert manager.latest() == tmp_path / "checkpoint-00000030"
    assert json.loads((manager.latest() / "state.json").read_text()) == {"step": 30}


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(5, _writer("old"))
    manager.save(5, _writer("new"))
    assert _names(tmp_path) == ["checkpoint-00000005"]
    assert (tmp_path / "checkpoint-00000005" / "state.json").read_text() == "new"


def test_saving_an_older_step_after_resume_keeps_the_new_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(200, _writer("200"))
    saved = manager.save(60, _writer("60"))
    assert saved.is_dir() and _names(tmp_path) == ["checkpoint-00000060"]


def test_failed_write_leaves_previous_checkpoint_and_no_temp_dir(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    good = manager.save(1, _writer("good"))

    def disk_full(path: Path) -> None:
        (path / "state.json").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        manager.save(2, disk_full)
    assert info.value.errno == errno.ENOSPC
    assert _names(tmp_path) == ["checkpoint-00000001"]
    assert manager.latest() == good and (good / "state.json").read_text() == "good"


def test_leftovers_of_a_killed_save_are_ignored_and_cleaned(tmp_path: Path) -> None:
    CheckpointManager(tmp_path, keep=3).save(1, _writer("ok"))
    dead_pid = 2**22 + 12345  # above Linux's pid_max default, so never alive
    stale = tmp_path / f".tmp-checkpoint-9-{dead_pid}"
    stale.mkdir()
    (stale / COMPLETE).write_text("")
    (tmp_path / "checkpoint-00000007").mkdir()  # incomplete: no marker
    # A same-step replacement cut between its two renames: the old dir must come back.
    aside = tmp_path / f".old-checkpoint-4-{dead_pid}"
    aside.mkdir()
    (aside / COMPLETE).write_text("")

    manager = CheckpointManager(tmp_path, keep=3)
    assert not stale.exists() and not aside.exists()
    assert (tmp_path / "checkpoint-00000004" / COMPLETE).is_file()
    assert manager.latest() == tmp_path / "checkpoint-00000004"
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-00000004"


def test_resolve_resume_modes_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None  # nothing yet, not even the dir
    saved = CheckpointManager(root, keep=2).save(3, _writer("x"))
    assert resolve_resume("auto", root) == saved
    assert resolve_resume("never", root) is None
    assert resolve_resume(None, root) is None
    assert resolve_resume(str(saved), tmp_path / "elsewhere") == saved

    with pytest.raises(UsageError, match=r"trainer\.resume=.*no such directory"):
        resolve_resume(str(tmp_path / "missing"), root)
    with pytest.raises(UsageError, match=r"trainer\.resume=.*checkpoint-00000003"):
        resolve_resume(str(root), root)  # the parent dir: the message points at the checkpoint inside
    (saved / COMPLETE).unlink()
    with pytest.raises(UsageError, match=r"trainer\.resume=.*not a complete checkpoint"):
        resolve_resume(str(saved), root)


def test_sigterm_sets_the_flag_and_handlers_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with GracefulExit() as stop:
        assert not stop.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM is not fatal either
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_ctrl_c_while_stopping_raises_keyboard_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt), GracefulExit() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.stop_requested
        os.kill(os.getpid(), signal.SIGINT)


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from stylekit.train.checkpoint import CheckpointManager, GracefulExit

    manager = CheckpointManager(Path(sys.argv[1]), keep=2)
    step = 0
    with GracefulExit() as stop:
        print("ready", flush=True)
        while True:
            step += 1
            time.sleep(0.005)  # the optimizer step
            if stop.stop_requested:
                manager.save(step, lambda d: (d / "state.json").write_text(json.dumps({"step": step})))
                break
    """
)


def test_child_loop_saves_a_checkpoint_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait()
    latest = CheckpointManager(tmp_path, keep=2).latest()
    assert latest is not None
    assert json.loads((latest / "state.json").read_text())["step"] >= 1


def test_atomic_write_replaces_and_keeps_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(target, "newer")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["summary.json"]
