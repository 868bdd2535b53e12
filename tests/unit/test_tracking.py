"""Trackers keep metrics in the run dir, W&B runs offline under it, and secrets never reach a file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from stylekit.errors import UsageError
from stylekit.tracking import (
    NullTracker,
    ScrubFilter,
    WandbTracker,
    hydra_config,
    looks_secret,
    make_tracker,
    resolve_mode,
    run_group,
    run_name,
    scrub,
    scrub_text,
)

ROOT = Path(__file__).resolve().parents[2]
SENTINELS = {
    "HF_TOKEN": "hf-sentinel-1234567890",
    "WANDB_API_KEY": "wk-sentinel-1234567890",
    "MODAL_TOKEN_SECRET": "ms-sentinel-1234567890",
}
SWEEP_DIR = "/x/outputs/train/multirun/2025-01-02_03-04-05"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Forced offline W&B whose caches and staging live in tmp_path; returns the run dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path / "run"


@pytest.fixture
def fake_multirun():
    """HydraConfig as a multirun job #3 with overrides `+hf_token=...,lora.rank=16` sees it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["lora.rank=16", f"+hf_token={SENTINELS['HF_TOKEN']}", f"hydra.sweep.dir={SWEEP_DIR}"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_wandb_offline_run_lives_in_the_run_dir_and_no_secret_reaches_disk(
    offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_multirun
) -> None:
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    config = {
        "lr": 1e-4,
        "marker": "config-marker-42",
        "hub": {"hf_token": "literal-token-not-in-env", "url": f"https://u:{SENTINELS['HF_TOKEN']}@host"},
        "modal": {"secret_value": SENTINELS["MODAL_TOKEN_SECRET"]},
        "list": [SENTINELS["WANDB_API_KEY"]],
    }
    tracker = make_tracker({"backend": "wandb", "project": "p", "mode": "auto"}, offline, config, None)
    assert isinstance(tracker, WandbTracker)
    tracker.log({"loss": 0.5, "note": f"token {SENTINELS['HF_TOKEN']}"}, step=1)
    tracker.log({"loss": 0.25}, step=2)
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    tracker.log_images("samples", [red, blue], step=2, captions=["a", SENTINELS["HF_TOKEN"]])
    (offline / "lora.safetensors").write_bytes(b"weights")
    tracker.log_artifact(offline / "lora.safetensors", "lora", "model")
    tracker.summary({"final_loss": 0.25})
    tracker.finish()
    tracker.finish()  # idempotent

    rows = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert json.loads((offline / "summary.json").read_text()) == {"final_loss": 0.25}
    (run,) = (offline / "wandb").glob("offline-run-*")
    assert len(list((run / "files" / "media").rglob("*.png"))) == 2
    assert not (run / "files" / "wandb-metadata.json").exists()  # argv/host/env metadata stays off

    (record,) = run.glob("*.wandb")
    raw = _when_flushed(record, b"config-marker-42")
    # The grep below means something only if the config, group and name are stored as plain bytes.
    assert b"config-marker-42" in raw
    assert b"2025-01-02_03-04-05" in raw  # group: the sweep dir's name
    assert b"3_+hf_token=***,lora.rank=16" in raw  # name: job num + overrides, value masked
    assert b"literal-token-not-in-env" not in raw  # masked by its key's name
    for path in _files(tmp_path):  # the run dir and W&B's caches/staging in tmp_path
        data = path.read_bytes()
        for value in SENTINELS.values():
            assert value.encode() not in data, f"{value} leaked into {path}"


def _when_flushed(record: Path, marker: bytes, timeout: float = 60.0) -> bytes:
    """The .wandb file's bytes once W&B's writer process has flushed the run into it (it can lag finish()
    on a loaded machine)."""
    deadline = time.monotonic() + timeout
    raw = record.read_bytes()
    while marker not in raw and time.monotonic() < deadline:
        time.sleep(0.5)
        raw = record.read_bytes()
    return raw


def test_null_tracker_writes_metrics_summary_and_images(tmp_path: Path) -> None:
    class Scalar:  # what a tensor or a numpy scalar looks like to json
        def item(self) -> float:
            return 1.5

    tracker = make_tracker({"backend": "none"}, tmp_path, {"lr": 1.0}, None)
    assert type(tracker) is NullTracker
    with tracker:
        tracker.log({"loss": Scalar()}, step=7)
        tracker.log_images("val/prompt 0", Image.new("RGB", (4, 4)), step=7)
        tracker.log_artifact(tmp_path / "x", "x", "model")
        tracker.summary({"a": 1})
        tracker.summary({"b": 2})
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 7 and row["loss"] == 1.5
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1, "b": 2}
    assert (tmp_path / "media" / "val_prompt_0" / "step-00000007-0.png").is_file()


def test_disabled_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bad logger.backend or logger.mode never gets here: tests/unit/test_schema.py.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert type(make_tracker({"backend": "wandb"}, tmp_path, {}, None)) is NullTracker


def test_scrub_masks_secret_keys_and_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINELS["HF_TOKEN"])
    monkeypatch.setenv("MODAL_TOKEN_ID", "x")  # too short to be a token: must not mangle text
    config = {
        "hf_token": "abc",
        "tokenizer": "t5",
        "api": {"apiKey": 1, "access_key": "k", "password": "p", "unset_token": None},
        "prompts": [f"a {SENTINELS['HF_TOKEN']} b", "x marks"],
        "max_tokens": 77,
    }
    assert scrub(config) == {
        "hf_token": "***",
        "tokenizer": "t5",
        "api": {"apiKey": "***", "access_key": "***", "password": "***", "unset_token": None},
        "prompts": ["a *** b", "x marks"],
        "max_tokens": 77,
    }
    assert config["hf_token"] == "abc"  # a copy, not in place
    assert scrub_text(f"Bearer {SENTINELS['HF_TOKEN']}") == "Bearer ***"
    for key in ("MODAL_TOKEN_SECRET", "wandb_api_key", "client_secret", "KEY"):
        assert looks_secret(key), key
    for key in ("tokenizer", "keep_checkpoints", "keyframes", "monkey"):
        assert not looks_secret(key), key

    record = logging.LogRecord("x", logging.INFO, "f", 1, "token=%s", (SENTINELS["HF_TOKEN"],), None)
    ScrubFilter().filter(record)
    assert record.getMessage() == "token=***"


def test_resolve_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only resolve_mode runs here, never wandb.init, so an online answer contacts nobody.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("online") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(UsageError, match="logger.mode=online"):
        resolve_mode("online")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password fake\n")
    assert resolve_mode("auto") == "online"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-for-mode-test")
    assert resolve_mode("auto") == "online"


def test_group_and_name_under_multirun(fake_multirun) -> None:
    hydra_cfg = hydra_config()
    assert run_group({"group": None}, hydra_cfg) == "2025-01-02_03-04-05"
    assert run_group({"group": "mine"}, hydra_cfg) == "mine"
    assert run_name(hydra_cfg) == "3_+hf_token=***,lora.rank=16"


def test_group_and_name_outside_hydra() -> None:
    assert hydra_config() is None
    assert run_group({"group": None}, None) is None
    assert run_group({"group": "mine"}, None) == "mine"
    assert run_name(None) is None


def test_an_offline_wandb_run_is_named_by_its_id_in_the_log_not_none(
    offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="stylekit.tracking"):
        tracker = make_tracker({"backend": "wandb", "project": "p", "mode": "offline"}, offline, {}, None)
        tracker.finish()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B run")]
    assert "W&B run None" not in line
    (run,) = (offline / "wandb").glob("offline-run-*")
    assert run.name.rsplit("-", 1)[1] in line  # the id W&B names the folder and `wandb sync` by
