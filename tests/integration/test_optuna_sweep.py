"""`-m hydra/sweeper=optuna`: Optuna studies through our conf/, Hydra's basic launcher and ours.

The fast tests run the sweeper in this process on a stand-in task (the trial's loss is a function of its
parameters), through the basic launcher and through `hydra/launcher=modal` with `backend=local` (the payload a
Modal container gets), so batches, job numbers, failures and the results file are checked in seconds. The slow
one runs `scripts/train.py` itself: 4 tiny-FLUX trainings (2 batches of 2) on 8 pictures, one held out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pictures import captioned_images

from stylekit.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
RANKS = {4, 8, 16, 32}  # conf/hydra/sweeper/search/lora.yaml
LR_RANGE = (1e-5, 1e-3)


# ---- in this process, a stand-in task --------------------------------------------------------------------------


def stand_in_loss(rank: int, lr: float) -> float:
    return abs(math.log10(lr) + 4.0) + rank / 100


def stand_in_task(cfg: DictConfig) -> float:
    """What `scripts/train.py` returns, without training: job #1 fails the way a bad trial does."""
    if HydraConfig.get().job.num == 1:
        raise UsageError("CUDA ran out of memory training flux (stand-in)")
    return stand_in_loss(int(cfg.lora.rank), float(cfg.optimizer.lr))


@pytest.fixture
def hydra_process_state(hydra_restore_singletons: None) -> Iterator[None]:
    """Hydra's app entry reconfigures logging for the whole process: put the root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run_app(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    app = hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")(stand_in_task)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", *args])
    app()


@pytest.mark.parametrize("launcher", ["basic", "modal-local"])
def test_optuna_batches_go_through_the_launcher_with_job_numbers_that_go_on(
    launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hydra_process_state: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sweep = tmp_path / "sweep"
    via = ["hydra/launcher=modal", "hydra.launcher.backend=local"] if launcher == "modal-local" else []
    monkeypatch.chdir(tmp_path)
    _run_app(monkeypatch, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
             f"hydra.sweep.dir={sweep}", "model=tiny_flux", "logger=none", *via)  # fmt: skip

    job_dirs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in job_dirs] == ["0", "1", "2", "3"]  # 2 batches: 0,1 then 2,3
    losses = []
    for job_dir in job_dirs:
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.startswith(("lora.rank=", "optimizer.lr=")))
        rank, lr = int(params["lora.rank"]), float(params["optimizer.lr"])
        assert rank in RANKS and LR_RANGE[0] <= lr <= LR_RANGE[1]
        assert f"lora.rank={rank}" in job_dir.name and "model=tiny_flux" in job_dir.name
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["sweep"]["dir"] == str(sweep)  # one sweep dir: one W&B group (tracking.run_group)
        if not job_dir.name.startswith("1_"):
            losses.append((stand_in_loss(rank, lr), rank, lr))
    # The failed trial was recorded as failed and the study went on to its second batch.
    logged = capsys.readouterr().out  # Hydra's own console handler (it replaced pytest's)
    assert "Failed experiment: " in logged and "CUDA ran out of memory training flux (stand-in)" in logged

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_loss, best_rank, best_lr = min(losses)
    assert results["best_value"] == pytest.approx(best_loss)
    assert results["best_params"] == {"lora.rank": best_rank, "optimizer.lr": pytest.approx(best_lr)}


def test_a_command_line_range_replaces_the_shipped_one_and_a_fixed_value_is_not_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hydra_process_state: None
) -> None:
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    _run_app(monkeypatch, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3",
             f"hydra.sweep.dir={sweep}", "logger=none", "lora.rank=16", "optimizer.lr=tag(log, interval(0.5, 0.9))")  # fmt: skip
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.lr"}
    assert 0.5 <= results["best_params"]["optimizer.lr"] <= 0.9
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        assert "lora.rank=16" in yaml.safe_load(overrides.read_text())


def test_on_modal_a_trial_the_schema_refuses_fails_alone_and_the_study_goes_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hydra_process_state: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    _run_app(monkeypatch, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=3",
             "hydra/launcher=modal", "hydra.launcher.backend=local", f"hydra.sweep.dir={sweep}", "logger=none",
             "lora.rank=choice(0, 8)", "optimizer.lr=tag(log, interval(1e-5, 1e-3))")  # fmt: skip
    logged = capsys.readouterr().out
    refused = [line for line in logged.splitlines() if "lora.rank=0 must be a whole number >= 1" in line]
    assert refused and all("Failed experiment" in line or "Not starting job #" in line for line in refused)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["lora.rank"] == 8  # rank 0 never ran, the others did
    ran = [p for p in sweep.glob("*/.hydra/overrides.yaml") if "lora.rank=0" not in p.read_text()]
    assert ran and not [p for p in sweep.glob("*/.hydra/overrides.yaml") if "lora.rank=0" in p.read_text()]


def test_a_study_in_sqlite_storage_goes_on_where_the_last_sweep_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hydra_process_state: None
) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.chdir(tmp_path)
    for sweep in ("first", "second"):
        _run_app(monkeypatch, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
                 f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / sweep}", "logger=none")  # fmt: skip
    study = optuna.load_study(study_name="stylekit_lora", storage=storage)
    assert len(study.trials) == 4  # the second sweep added its 2 trials to the first one's


# ---- scripts/train.py, real trainings ---------------------------------------------------------------------------


def _sweep(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    images = captioned_images(tmp_path / "images", count=8)
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep}",
        "model=tiny_flux", "logger=none", f"data.dataset_dir={images}", "trainer.max_steps=2",
        "trainer.validation_prompts=[a photo of sks]", f"trainer.checkpoint_root={tmp_path / 'checkpoints'}",
        f"trainer.cache_dir={tmp_path / 'cache'}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return done, sweep


def _trials(sweep: Path) -> list[dict]:
    """Each job dir's number, overrides and the validation loss its run returned."""
    trials = []
    for summary in sorted(sweep.glob("*/summary.json")):
        job_dir = summary.parent
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.startswith(("lora.rank=", "optimizer.lr=")))
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        trials.append(
            {
                "dir": job_dir.name,
                "num": hydra_cfg["job"]["num"],
                "sweep_dir": hydra_cfg["sweep"]["dir"],
                "rank": int(params["lora.rank"]),
                "lr": float(params["optimizer.lr"]),
                "loss": json.loads(summary.read_text())["validation_loss"],
            }
        )
    return trials


@pytest.mark.slow
def test_an_optuna_sweep_of_tiny_trainings_reports_the_trial_with_the_lowest_validation_loss(
    tmp_path: Path,
) -> None:
    done, sweep = _sweep(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "No held-out validation images" not in output  # 8 pictures: one is held out

    trials = _trials(sweep)
    # Two batches of two: job numbers (and so the job dirs) go on across batches.
    assert sorted(t["num"] for t in trials) == [0, 1, 2, 3]
    for trial in trials:
        assert trial["dir"].startswith(f"{trial['num']}_") and f"lora.rank={trial['rank']}" in trial["dir"]
        assert trial["rank"] in RANKS and LR_RANGE[0] <= trial["lr"] <= LR_RANGE[1]
        assert trial["sweep_dir"] == str(sweep)  # one sweep dir: one W&B group (tracking.run_group)

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    lowest = min(t["loss"] for t in trials)
    assert results["best_value"] == pytest.approx(lowest, rel=1e-9)
    # Two steps barely move the weights: several trials may share the lowest loss.
    tied = [
        {"lora.rank": t["rank"], "optimizer.lr": t["lr"]}
        for t in trials
        if t["loss"] == pytest.approx(lowest, rel=1e-9)
    ]
    assert results["best_params"] in tied
    assert re.search(r"Study name: stylekit_lora", output)
