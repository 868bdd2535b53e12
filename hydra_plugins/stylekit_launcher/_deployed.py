"""Inpaint jobs on the deployed ``Inpainter`` (``stylekit modal deploy``): a warm pipeline.

The job itself runs here (its run dir, ``.hydra/`` and log are local); each (image, mask) pair goes to the
deployed class as bytes and the files it wrote come back into the job's ``output_dir``.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stylekit.remote.worker import is_model_override, override_key, quote

log = logging.getLogger(__name__)

# Overrides this machine handles (which files, where results go) or that the call cannot carry.
_LOCAL_KEYS = ("image", "mask", "output_dir", "lora_weights", "hydra")


def lora_entries(config: DictConfig, updates: dict[str, Any]) -> list[str] | str | None:
    """The job's ``lora_weights`` as the container must see them: uploaded local files at their volume path,
    every other entry (a path already on the volume, a Hub id, a typo) exactly as given, so that it loads or
    fails there as it would in the job's own container."""
    if "lora_weights" in updates:
        return updates["lora_weights"]
    value = OmegaConf.select(config, "lora_weights", default=None)
    if isinstance(value, ListConfig):
        return [str(v) for v in OmegaConf.to_container(value, resolve=True)]
    return None if value is None else str(value)


def call_overrides(overrides: list[str], lora_weights: list[str] | str | None) -> list[str]:
    """The job's overrides that shape one edit, with LoRA paths pointing at their uploaded copies."""
    kept = [
        o
        for o in overrides
        if not is_model_override(o) and override_key(o).split(".")[0].split("/")[0] not in _LOCAL_KEYS
    ]
    if lora_weights:
        entries = [lora_weights] if isinstance(lora_weights, str) else list(lora_weights)
        kept.append("lora_weights=[" + ",".join(quote(str(e)) for e in entries) + "]")
    return kept


class DeployedInpaint:
    """Task function of one inpaint job whose edits run on the deployed ``Inpainter``."""

    def __init__(self, inpainter_cls: Any, overrides: list[str], lora_weights: list[str] | str | None = None):
        self.inpainter_cls = inpainter_cls
        self.model_overrides = shlex.join(o for o in overrides if is_model_override(o))
        self.overrides = call_overrides(overrides, lora_weights)

    def __call__(self, cfg: DictConfig) -> dict[str, Any]:
        from stylekit.inpaint.images import find_pairs

        service = self.inpainter_cls(model_overrides=self.model_overrides)
        out = Path(str(cfg.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        for image, mask in find_pairs(cfg.get("image"), cfg.get("mask")):
            log.info("Editing %s on the deployed Inpainter", image)
            files = service.edit_files.remote(
                image.read_bytes(), mask.read_bytes(), self.overrides, image.name
            )
            for name, data in files.items():
                (out / name).write_bytes(data)
                written.append(str(out / name))
        return {"outputs": written}
