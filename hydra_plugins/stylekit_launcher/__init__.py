"""stylekit's Hydra launcher plugin: ``hydra/launcher=modal`` runs each job in a Modal container.

Hydra imports every module under ``hydra_plugins`` at start-up, so nothing here imports modal (or anything
heavy) at module level. ``hydra_plugins`` itself has no ``__init__.py``: it is a namespace package shared with
other plugins.
"""
