"""Hydra's own launcher test suites against ``hydra/launcher=modal`` with ``backend=local``, and one live sweep.

``backend=local`` sends each job through the same payload bytes and the same worker a Modal container runs, in
this process, so the suites check the launcher's Hydra contract (sweep dirs, overrides, ``.hydra/`` files,
custom resolvers, job names, working dirs). The integration suite runs each app as a subprocess from a temp
dir, so plugin discovery has to work from the installed package; at ~2 s a subprocess (Hydra plus the modal
import) it is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ["hydra.launcher.backend=local"]


@pytest.fixture(autouse=True)
def default_version_base(hydra_restore_singletons: None) -> None:
    """Hydra's suites expect the default version base (jobs chdir into their run dir). Tests that ran earlier
    in the session may have left version_base=1.3 in Hydra's process-wide singleton; start from none."""
    from hydra.core.singleton import Singleton
    from hydra.version import VersionBase

    Singleton._instances.pop(VersionBase, None)


@pytest.mark.parametrize("launcher_name, overrides", [("modal", LOCAL)])
class TestModalLauncherLocal(LauncherTestSuite):
    pass


@pytest.mark.slow
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": [{"override hydra/launcher": "modal"}, "_self_"]}, ["-m", *LOCAL])],
)
class TestModalLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.modal
@pytest.mark.timeout(3600)
def test_tiny_sweep_runs_on_modal_and_comes_back(tmp_path: Path) -> None:
    """Two tiny-FLUX trainings in two Modal containers; LoRAs, samples and logs land in the local sweep dir.

    CPU containers and no secrets: the tiny model is built in the container, so this costs cents. The first
    run builds the image (torch included), which takes minutes.
    """
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(photos / f"{i}.png")
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "-m",
        "hydra/launcher=modal",
        "hydra.launcher.gpu=none",
        "hydra.launcher.secrets=[]",
        "hydra.launcher.timeout=1800",
        "hydra.launcher.app_name=stylekit-test",
        "hydra.launcher.volumes.outputs.name=stylekit-test-outputs",
        "hydra.launcher.volumes.hf_cache.name=stylekit-test-cache",
        "experiment=tiny_smoke",
        "trainer.max_steps=2",
        f"data.dataset_dir={photos}",
        f"hydra.sweep.dir={sweep}",
        "lora.rank=4,8",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
        assert list(run.rglob("*.png")), "validation samples came back"
