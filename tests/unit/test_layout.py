"""The top-level layout a clone shows: outputs/ and data/ exist with READMEs, and what runs and users put
there is never committed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KEPT = ["outputs/README.md", "data/README.md", "data/input_images/.gitkeep", "data/base_images/.gitkeep",
        "data/masks/.gitkeep"]  # fmt: skip

pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_layout_folders_are_in_the_repository() -> None:
    tracked = set(_git("ls-files", *KEPT).stdout.split())
    assert tracked == set(KEPT)


@pytest.mark.parametrize(
    "path",
    ["outputs/train/runs/2026-01-01_00-00-00/lora/pytorch_lora_weights.safetensors",
     "outputs/checkpoints/train-abc/checkpoint-00000001/state.pt", "outputs/demo/chelsea_edited.png",
     "data/input_images/me.jpg", "data/input_images/me.txt", "data/base_images/photo.jpg", "data/masks/photo.png",
     "data/my_set/a.png", "data/notes.txt"],
)  # fmt: skip
def test_what_runs_write_and_users_put_there_is_ignored(path: str) -> None:
    assert _git("check-ignore", "--no-index", path).stdout.split() == [path]


def test_the_readmes_are_not_ignored() -> None:
    assert _git("check-ignore", "--no-index", *KEPT).stdout.split() == []


def test_the_default_paths_of_the_commands_are_the_documented_folders() -> None:
    conf = ROOT / "conf"
    assert yaml.safe_load((conf / "data" / "resize.yaml").read_text())["dataset_dir"] == "data/input_images"
    checkpoints = yaml.safe_load((conf / "trainer" / "default.yaml").read_text())["checkpoint_root"]
    readme = (ROOT / "outputs" / "README.md").read_text()
    assert f"`{checkpoints.removeprefix('outputs/')}/" in readme
    for task in ("train", "inpaint"):
        hydra = yaml.safe_load((conf / f"{task}.yaml").read_text())["hydra"]
        for mode in ("run", "sweep"):
            assert hydra[mode]["dir"].startswith("outputs/${task_name}/")
    assert "`train/runs/" in readme and "`train/multirun/" in readme and "`inpaint/runs/" in readme
    for folder in ("input_images", "base_images", "masks"):
        assert f"`{folder}/`" in (ROOT / "data" / "README.md").read_text()
