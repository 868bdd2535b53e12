"""``hydra/sweeper=optuna`` with stylekit's search space: the Optuna plugin's own schema, plus our defaults.

A file ``conf/hydra/sweeper/optuna.yaml`` cannot do this: it shadows the plugin's ConfigStore entry of the same
name, and Hydra then refuses it ("automatically matched schema contains a defaults list"). So the entry is
replaced by the plugin's dataclass with one more defaults entry, ``optional search: lora``, which merges
``conf/hydra/sweeper/search/lora.yaml`` (search space, trial counts, sampler seed) over the plugin's values.
Optional: a Hydra app without our conf/ in its search path gets the plugin's own defaults, unchanged.

When: Hydra's plugin scan executes every plugin module again, in an order that follows ``sys.path``, so the
Optuna plugin's own registration may run after ours. Hydra builds its config search path only after that scan,
and before it composes anything: that is where the entry is (re)placed.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
except ImportError:  # the plugin is a locked dependency; without it there is nothing to extend
    OptunaSweeperConf = None  # type: ignore[assignment,misc]

# The file under conf/hydra/sweeper/search/ that `hydra/sweeper=optuna` starts from.
DEFAULT_SEARCH = "lora"

if OptunaSweeperConf is not None:

    @dataclass
    class StylekitOptunaConf(OptunaSweeperConf):
        defaults: list[Any] = field(
            default_factory=lambda: [{"sampler": "tpe"}, "_self_", {"optional search": DEFAULT_SEARCH}]
        )


def register() -> None:
    if OptunaSweeperConf is not None:
        ConfigStore.instance().store(
            group="hydra/sweeper", name="optuna", node=StylekitOptunaConf, provider="stylekit"
        )


class OptunaDefaults(SearchPathPlugin):
    """Not a search path change: the hook Hydra calls after its plugin scan, before composing."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register()
