"""`hydra/sweeper=optuna` composes our search space; the Modal launcher and the validation set suit a search."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modal_fakes
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _sweeper(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/sweeper=optuna", *overrides], return_hydra_config=True)
    return cfg.hydra.sweeper


def _distributions(sweeper: Any) -> dict[str, Any]:
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    searched, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert fixed == {}
    return searched


# ---- the shipped search -----------------------------------------------------------------------------------------


def test_hydra_sweeper_optuna_searches_rank_as_a_choice_and_lr_on_a_log_scale() -> None:
    from optuna.distributions import CategoricalDistribution, LogUniformDistribution

    sweeper = _sweeper()
    assert sweeper._target_.endswith("OptunaSweeper")  # the plugin's sweeper, our values
    assert sweeper.direction == "minimize" and sweeper.study_name == "stylekit_lora"
    assert sweeper.n_trials == 16 and sweeper.n_jobs == 1 and sweeper.max_failure_rate == 1.0
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 42
    space = _distributions(sweeper)
    assert space == {
        "lora.rank": CategoricalDistribution([4, 8, 16, 32]),
        "optimizer.lr": LogUniformDistribution(1e-5, 1e-3),
    }


def test_sweeper_settings_and_the_sampler_are_overridden_as_usual() -> None:
    sweeper = _sweeper("hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=4", "hydra/sweeper/sampler=random")
    assert sweeper.n_trials == 20 and sweeper.n_jobs == 4
    assert sweeper.sampler._target_ == "optuna.samplers.RandomSampler" and sweeper.sampler.seed == 42
    assert "lora.rank" in sweeper.params


def test_the_grid_sweep_keeps_hydras_basic_sweeper_without_a_search_space() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper") and cfg.hydra.sweeper.params is None


def test_our_defaults_survive_the_optuna_plugin_registering_its_own_after_ours() -> None:
    """Hydra's plugin scan runs each plugin module again in sys.path order: the Optuna plugin's registration may
    come last. Ours is placed again when Hydra builds the config search path."""
    import hydra_plugins.hydra_optuna_sweeper.config as plugin_config

    importlib.reload(plugin_config)
    assert _sweeper().study_name == "stylekit_lora"


def test_a_hydra_app_without_our_conf_gets_the_plugins_own_defaults(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("app", overrides=["hydra/sweeper=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper.study_name is None and cfg.hydra.sweeper.params is None


# ---- the Modal launcher -----------------------------------------------------------------------------------------


def test_the_optuna_plugin_and_our_sweeper_defaults_pass_the_image_check() -> None:
    from hydra_plugins.stylekit_launcher._modules import missing_from_image
    from stylekit.remote import image_spec

    modules = {
        "hydra_plugins.hydra_optuna_sweeper.config",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper",
        "hydra_plugins.stylekit_launcher.optuna_defaults",
        "optuna.samplers._tpe.sampler",
    }
    assert missing_from_image(modules, image_spec().packages, ROOT / "uv.lock") == []


def _task(cfg: Any) -> float:
    return float(cfg.x)


def test_a_payload_composed_under_optuna_passes_the_image_check_and_runs(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hydra.core.utils import JobStatus

    from hydra_plugins.stylekit_launcher._modules import referenced_modules

    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    returns = launch(
        _task, [["+x=1"], ["+x=2"]], "hydra/sweeper=optuna", *modal_fakes.on_volume(tmp_path / "volume")
    )
    assert [r.status for r in returns] == [JobStatus.COMPLETED] * 2
    assert [r.return_value for r in returns] == [1.0, 2.0]
    # The shipped config holds the sweeper's node, so the check did look at the plugin's modules.
    assert "hydra_plugins.hydra_optuna_sweeper.config" in referenced_modules(seen.shipped[0])


def test_a_detached_launch_under_optuna_is_refused_before_anything_starts(
    launch: Callable[..., list[JobReturn]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    with pytest.raises(SystemExit) as stopped:
        launch(
            _task, [["+x=1"]], "hydra/sweeper=optuna", "hydra.launcher.detach=true", "hydra.launcher.gpu=none"
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "hydra.launcher.detach=true" in err and "hydra/sweeper=optuna" in err
    assert seen.shipped == []


def test_a_dry_run_under_optuna_prints_the_first_batch_and_stops(
    launch: Callable[..., list[JobReturn]], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        launch(_task, [["+x=1"], ["+x=2"]], "hydra/sweeper=optuna", "hydra.launcher.dry_run=true")
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "+x=1" in out and "+x=2" in out and "stopping here" in out


def test_the_manifest_keeps_every_batch_of_a_sweep(tmp_path: Path) -> None:
    from hydra_plugins.stylekit_launcher._jobs import Job
    from hydra_plugins.stylekit_launcher._sweep import MANIFEST, write_manifest

    class Call:
        def __init__(self, index: int) -> None:
            self.object_id = f"fc-{index}"

    def batch(indices: list[int]) -> None:
        jobs = [
            Job(i, [f"+x={i}"], OmegaConf.create({}), str(tmp_path), str(i), tmp_path / str(i))
            for i in indices
        ]
        write_manifest(tmp_path, jobs, [Call(i) for i in indices], "vol", "/workspace", "stylekit")

    batch([0, 1])
    batch([2, 3])
    entries = json.loads((tmp_path / MANIFEST).read_text())["jobs"]
    assert [(e["index"], e["call_id"]) for e in entries] == [(i, f"fc-{i}") for i in range(4)]


# ---- the validation set -----------------------------------------------------------------------------------------


def _folder(tmp_path: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((48, 80, 3)) * 255).astype("uint8")).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"picture {i}")
    return tmp_path


@pytest.mark.parametrize("count", [8, 3])  # a held-out image; too few, so training images
def test_validation_views_do_not_depend_on_the_seed_that_draws_training_crops_and_flips(
    tmp_path: Path, count: int
) -> None:
    from stylekit.data.dataset import prepare_samples
    from stylekit.train.run import _split_validation, _validation_views

    data = OmegaConf.create(
        {"mode": "resize", "dataset_dir": str(_folder(tmp_path, count)), "resolution": 32, "crop": "random",
         "random_flip": 0.5, "caption_dropout": 0.5, "repeats": 2}
    )  # fmt: skip
    views = []
    for seed in range(4):
        samples = prepare_samples(data, multiple=16, seed=seed)
        _, val = _split_validation(samples, 1)
        views.append(_validation_views(val, samples, data, 16))
    assert all(v == views[0] for v in views[1:])
    assert all(not view.flip and view.caption for view in views[0])
    if count == 8:
        assert [view.record.path.name for view in views[0]] == ["img7.png"]


def test_a_diverged_run_fails_instead_of_returning_nan() -> None:
    from stylekit.errors import UsageError
    from stylekit.train.run import _check_finite

    cfg = OmegaConf.create({"optimizer": {"lr": 1.0}, "lora": {"rank": 4}})
    _check_finite(0.5, cfg)
    for loss in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="training diverged.*optimizer.lr=1.0"):
            _check_finite(loss, cfg)
