"""Fixtures shared by the unit tests of the Modal launcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, RunMode


@pytest.fixture
def launch(hydra_restore_singletons: None, tmp_path: Path) -> Iterator[Callable[..., list[JobReturn]]]:
    """Launch jobs through the plugin as Hydra's sweeper would; returns their JobReturns."""
    from hydra._internal.callbacks import Callbacks

    def _launch(task: Callable[..., Any], jobs: list[list[str]], *overrides: str) -> list[JobReturn]:
        with initialize(version_base="1.3", config_path=None, job_name="probe"):
            loader = GlobalHydra.instance().config_loader()
            cfg = loader.load_configuration(
                config_name=None,
                overrides=["hydra/launcher=modal", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                run_mode=RunMode.MULTIRUN,
            )
            HydraConfig.instance().set_config(cfg)
            context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=context, task_function=task, config=cfg
            )
            return list(launcher.launch(jobs, initial_job_idx=0))

    yield _launch
