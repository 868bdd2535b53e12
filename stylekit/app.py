"""What every entry point shares: run a task function, turning user errors into one line and exit code 2.

Kept free of torch/diffusers imports so `--help`, `--cfg job` and `--info` stay fast.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
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


def hydra_app(task: str) -> Callable[[], Any]:
    """The command line of `task` for `stylekit finetune|inpaint` (what scripts/train.py does): Hydra's app on
    conf/<task>.yaml, whose composition errors (`model=nope`, a mistyped key, an override that does not
    parse) are one line and exit code 2, like every other usage error."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=task)
    def main(cfg: DictConfig) -> Any:
        return run_task(task, cfg)

    def app() -> Any:
        with one_line_composition_errors():
            return main()

    return app


@contextlib.contextmanager
def one_line_composition_errors() -> Iterator[None]:
    """While Hydra runs, its config composition errors print as one line and exit 2 (HYDRA_FULL_ERROR=1 keeps
    Hydra's own report). Hydra reports every error through hydra._internal.utils.run_and_report and exits 1;
    the wrapper sees the composition errors first. tests/unit/test_schema.py fails if Hydra changes this."""
    from hydra._internal import utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    report = hydra_utils.run_and_report

    def run_and_report(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {composition_error_line(error)}", file=sys.stderr)
                sys.exit(UsageError.exit_code)
            except Exception as error:
                # A usage error raised inside Hydra's machinery (a launcher's settings, a sweep job's bad value)
                # arrives wrapped in Hydra's own exception: it is still the user's one line.
                usage = _usage_error_in(error)
                if usage is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {usage}", file=sys.stderr)
                sys.exit(usage.exit_code)

        return report(guarded)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = report


def _usage_error_in(error: BaseException) -> UsageError | None:
    """The UsageError Hydra wrapped (`raise ... from`), if that is what this is. Only explicit causes count: a
    crash while handling a usage error is a crash, with its traceback."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UsageError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


_MISSING = object()


def _options_with_key(full_key: str) -> list[str]:
    """The options of the key's config group whose yaml sets it (data.tile_size: tile)."""
    from omegaconf import OmegaConf

    group, _, key = full_key.partition(".")
    folder = conf_dir() / group
    if not key or not folder.is_dir():
        return []
    found = []
    for option in sorted(folder.glob("*.yaml")):
        try:
            node: Any = OmegaConf.to_container(OmegaConf.load(option), resolve=False)
        except Exception:  # a yaml that does not load is Hydra's to report
            continue
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is not _MISSING:
            found.append(option.stem)
    return found


def composition_error_line(error: Exception) -> str:
    """Hydra's multi-line composition error as one line naming the key or group and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        return f"{group}={choice} is not an option of {group}; pick one of: {', '.join(error.options)}"
    cause = error.__cause__
    parent = getattr(cause, "parent_node", None)
    full_key = getattr(cause, "full_key", None)
    if full_key and parent is not None and "not in struct" in str(cause):
        from stylekit.schema import unknown_key_line

        options = _options_with_key(full_key)
        if options:
            group = full_key.split(".", 1)[0]
            picks = " or ".join(f"{group}={option}" for option in options)
            return f"{full_key} is a setting of {picks} only; add {picks.split(' or ')[0]} to use it"
        return unknown_key_line(full_key, [str(k) for k in parent if k != "hydra"])
    lines = [line.strip().rstrip(".") for line in str(error).splitlines()]
    if isinstance(cause, OmegaConfBaseException):
        # Hydra prints the reason (a value of the wrong type) on a line of its own: keep it.
        lines += [str(cause).splitlines()[0].strip().rstrip(".")] if str(cause).strip() else []
    lines = [line for line in lines if line and "hydra.cc/docs" not in line]
    if isinstance(error, OverrideParseException):
        return f"an override does not parse ({'; '.join(lines)}); quote values with special characters: key='(a,b)'"
    return "; ".join(lines)
