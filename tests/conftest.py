"""Shared test set-up: offline hub, offline W&B, tiny models cached once per checkout, CUDA/Modal/hub markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Before anything imports huggingface_hub or wandb: no network, ever, and no writes to the user's caches.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("STYLEKIT_CACHE_DIR", str(ROOT / ".stylekit-cache"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_modal_credentials() -> bool:
    return bool(os.environ.get("MODAL_TOKEN_ID")) or (Path.home() / ".modal.toml").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_modal = pytest.mark.skip(reason="needs Modal credentials (modal token new)")
    # Everything else runs offline; a test marked `hub` reaches the Hugging Face hub only when asked to.
    skip_hub = pytest.mark.skip(reason="needs the Hugging Face hub: STYLEKIT_TEST_HUB=1 pytest -m hub")
    hub = os.environ.get("STYLEKIT_TEST_HUB") == "1"
    cuda = modal = None
    for item in items:
        if "gpu" in item.keywords:
            cuda = _has_cuda() if cuda is None else cuda
            if not cuda:
                item.add_marker(skip_gpu)
        if "modal" in item.keywords:
            modal = _has_modal_credentials() if modal is None else modal
            if not modal:
                item.add_marker(skip_modal)
        if "hub" in item.keywords and not hub:
            item.add_marker(skip_hub)


@pytest.fixture
def conf_dir() -> Path:
    return CONF_DIR
