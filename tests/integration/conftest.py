"""Set-up shared by the integration tests, which run the tiny models in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread per module: tiny models gain nothing from intra-op threads, which on a busy 2-core
    runner make steps up to ~30x slower and let float sums differ between processes."""
    import torch

    from stylekit.inpaint import run as inpaint_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    inpaint_run.clear_pipeline_cache()  # a module's cached pipeline is not the next module's
