"""Where stylekit keeps things that outlive a run: tiny models and encoded latents/embeddings."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "STYLEKIT_CACHE_DIR"


def cache_root() -> Path:
    """$STYLEKIT_CACHE_DIR, else the user cache dir (~/.cache/stylekit on Linux)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("stylekit"))
