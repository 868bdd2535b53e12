"""CLI start-up: `python -m bench.cli_bench` (or `python -m bench`).

How long `scripts/train.py --help`, `scripts/train.py --cfg job` and the same for scripts/inpaint.py take to
answer, against a bare `python -c "import hydra"` in the same run: the floor for any Hydra app on this
interpreter. The entry points import nothing heavy (torch, diffusers) until a task runs, so they should cost
little more than Hydra itself composing the config.

Each command runs REPEATS times, interleaved with the baseline so both see the same machine load; the least
wall time of each is kept (start-up is all there is to these commands, and the minimum is the least disturbed
by other jobs). Peak RSS is the child process's own (wait4), also the least over the repeats.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 7
BASELINE = [sys.executable, "-c", "import hydra"]
CASES = {
    "scripts/train.py --help": ["scripts/train.py", "--help"],
    "scripts/train.py --cfg job": ["scripts/train.py", "--cfg", "job"],
    "scripts/inpaint.py --help": ["scripts/inpaint.py", "--help"],
    "scripts/inpaint.py --cfg job": ["scripts/inpaint.py", "--cfg", "job", "prompt=x"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")
    return env


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of `command`, which must succeed."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> list[dict[str, Any]]:
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in ["baseline", *CASES]}
    with tempfile.TemporaryDirectory(prefix="stylekit-cli-bench-") as tmp:
        # Hydra writes nothing for --help / --cfg; run from a scratch dir anyway so a stray outputs/ lands there.
        commands = {"baseline": BASELINE} | {
            name: [sys.executable, str(ROOT / args[0]), *args[1:]] for name, args in CASES.items()
        }
        for command in commands.values():  # warm-up: the OS file cache, .pyc files
            timed(command, Path(tmp))
        for _ in range(REPEATS):
            for name, command in commands.items():
                seconds, rss = timed(command, Path(tmp))
                best[name] = [min(best[name][0], seconds), min(best[name][1], rss)]
    base_seconds, base_rss = best["baseline"]
    return [
        {
            "bench": "cli",
            "case": f"{name} start-up",
            "seconds": seconds,
            "baseline": 'python -c "import hydra"',
            "baseline_seconds": base_seconds,
            "ratio": seconds / base_seconds,
            "peak_rss_mib": rss,
            "baseline_peak_rss_mib": base_rss,
        }
        for name, (seconds, rss) in best.items()
        if name != "baseline"
    ]


if __name__ == "__main__":
    from bench.__main__ import format_table

    print(format_table(main()))
