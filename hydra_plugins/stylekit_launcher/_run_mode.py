"""A plain run (no ``-m``) with ``hydra/launcher=modal``: restart it as a one-job multirun.

Hydra only hands multirun jobs to a launcher; without this, ``python scripts/inpaint.py hydra/launcher=modal``
would silently load the model on this machine.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class RunModeRelaunch(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        argv = relaunch_argv(str(config.hydra.job.name))
        if argv is None:
            raise SystemExit(
                "hydra/launcher=modal runs multirun jobs: add -m (--multirun), e.g. "
                "python scripts/inpaint.py -m hydra/launcher=modal prompt=... image=... mask=..."
            )
        log.info("hydra/launcher=modal: running as a one-job multirun (add -m to skip this restart)")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)


def relaunch_argv(job_name: str) -> list[str] | None:
    """The same command with ``--multirun``, when this process is plainly ``python <script>.py ...``.

    Anything else (a test harness, a console script whose name is not the job's) gets None: re-executing it
    could run something other than this job.
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.suffix != ".py" or not script.is_file() or script.stem != job_name:
        return None
    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:
        return None
    return [sys.executable, *sys.orig_argv[1:], "--multirun"]
