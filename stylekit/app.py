"""What every entry point shares: run a task function, turning user errors into one line and exit code 2.

Kept free of torch/diffusers imports so `--help`, `--cfg job` and `--info` stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stylekit.errors import UsageError

log = logging.getLogger("stylekit")

# task name -> (module, function); the module is imported only when the task runs.
TASKS: dict[str, tuple[str, str]] = {
    "train": ("stylekit.train.run", "run"),
    "inpaint": ("stylekit.inpaint.run", "run"),
}


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# What the last task in this process produced, for front ends that print a summary (stylekit.cli).
LAST_RUNS: list[dict[str, Any]] = []


def conf_dir() -> Path:
    """The Hydra config folder: conf/ beside the package in a checkout, stylekit/conf in a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "train.yaml").exists():
            return candidate
    raise FileNotFoundError(f"stylekit's conf/ folder is missing (looked beside {package})")


def run_task(name: str, cfg: DictConfig) -> Any:
    """Run task `name` on `cfg` and return its metric (what Hydra sweepers optimize)."""
    module_name, function_name = TASKS[name]
    if importlib.util.find_spec(module_name) is None:
        print(f"stylekit: '{name}' is not implemented yet in this version of stylekit.", file=sys.stderr)
        sys.exit(1)
    task = getattr(importlib.import_module(module_name), function_name)
    start = time.perf_counter()
    try:
        result = task(cfg)
        LAST_RUNS.append({"task": name, "result": result, "seconds": time.perf_counter() - start,
                          "output_dir": _output_dir(cfg)})  # fmt: skip
        return result
    except UsageError as error:
        # In a sweep the launcher records the failed job and the other jobs go on.
        if _is_multirun():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


def _output_dir(cfg: DictConfig) -> str | None:
    try:
        return str(cfg.get("output_dir"))
    except Exception:  # an unresolvable ${hydra:...} outside a Hydra app
        return None
