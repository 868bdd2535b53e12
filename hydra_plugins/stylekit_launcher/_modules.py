"""Before anything ships: every module a job's payload needs must exist in the Modal image.

The payload (Hydra's context with its callbacks, the singleton state, the task) is pickled by reference to
modules. A module installed here but absent from uv.lock (a Hydra sweeper or callback plugin added with pip)
would fail to unpickle in every container; here it fails once, locally, in one line.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import sys
import sysconfig
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

from stylekit.errors import UsageError


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.modules: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.modules.add(module)
        return super().find_class(module, name)


def referenced_modules(data: bytes) -> set[str]:
    """Every module the pickled ``data`` imports when it is loaded."""
    import io

    import cloudpickle  # noqa: F401  (pickled closures reference its helpers)

    unpickler = _RecordingUnpickler(io.BytesIO(data))
    unpickler.load()
    return unpickler.modules


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def locked_packages(lock_file: Path) -> frozenset[str]:
    data = tomllib.loads(lock_file.read_text())
    return frozenset(_normalize(p["name"]) for p in data.get("package", []))


@cache
def _is_stdlib(top: str) -> bool:
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(top)
    origin = getattr(spec, "origin", None) or ""
    return origin in ("built-in", "frozen") or origin.startswith(sysconfig.get_paths()["stdlib"])


@cache
def _top_level_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once per process


@cache
def _distributions(module: str) -> list[str]:
    """The installed distributions providing ``module`` (for namespace packages such as hydra_plugins, the
    ones whose files hold its sub-package)."""
    top = module.split(".")[0]
    names = _top_level_distributions().get(top, [])
    if "." not in module or len(names) <= 1:
        return names
    from importlib.metadata import distribution

    sub = "/".join(module.split(".")[:2]) + "/"
    return [n for n in names if any(str(f).startswith(sub) for f in distribution(n).files or [])]


def _own_or_stdlib(module: str, top: str, own_packages: tuple[str, ...]) -> bool:
    if module == "__main__" or any(module == p or module.startswith(p + ".") for p in own_packages):
        return True
    return _is_stdlib(top)


def missing_from_image(modules: set[str], own_packages: tuple[str, ...], lock_file: Path) -> list[str]:
    """Lines naming each module the image lacks, with the distribution to add to uv.lock."""
    locked = locked_packages(lock_file)
    problems = []
    for module in sorted(modules):
        top = module.split(".")[0]
        if _own_or_stdlib(module, top, own_packages):
            continue
        dists = _distributions(".".join(module.split(".")[:2]))
        if any(_normalize(d) in locked for d in dists):
            continue
        if dists:
            problems.append(f"{module} (from {dists[0]}, not in uv.lock: uv add {dists[0]})")
        else:
            where = getattr(sys.modules.get(module), "__file__", None) or "a local file"
            problems.append(f"{module} ({where}, part of no locked package)")
    return problems


def check_payload_modules(payload: bytes, own_packages: tuple[str, ...], lock_file: Path) -> None:
    problems = missing_from_image(referenced_modules(payload), own_packages, lock_file)
    if problems:
        raise UsageError(
            "the Modal image cannot load this sweep: it needs "
            + "; ".join(problems)
            + ". Add the package to the project (uv add) or drop the plugin from the command"
        )
