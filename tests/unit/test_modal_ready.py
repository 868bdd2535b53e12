"""Modal, ready for a real account: each defect a first real run would hit, checked offline.

Nothing here contacts Modal. Jobs run through the real launcher and the real worker on the real payload bytes;
``modal_fakes`` stands in for ``Function.spawn``, ``FunctionCall.get``, ``Volume`` and the secret lookup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modal_fakes
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from modal_fakes import FakeVolume
from omegaconf import OmegaConf

from stylekit.remote import ModalSettings, gpu_count, gpu_option, image_spec, process_count, resources

ROOT = Path(__file__).resolve().parents[2]


def _task(cfg: Any) -> int:
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "result.txt").write_text(str(cfg.x))
    return int(cfg.x) * 2


_on_volume = modal_fakes.on_volume


# ---- 1. deploy ------------------------------------------------------------------------------------------------


def test_deployed_functions_name_a_module_the_image_holds() -> None:
    """`modal deploy` records each function's module; the container imports it from the image's sources."""
    from modal.cli.import_refs import import_file_or_module, parse_import_ref

    from stylekit.remote.commands import deploy_argv

    docs = (ROOT / "docs" / "modal.md").read_text() + (ROOT / "README.md").read_text()
    # Every `modal deploy` the docs tell a user to type (not `stylekit modal deploy`) uses module mode.
    deploys = re.findall(r"(?<!stylekit )\bmodal deploy\s+(\S+)\s+([\w.]+)", docs)
    assert deploys and all(d == ("-m", "stylekit.remote.app") for d in deploys), deploys
    argv = deploy_argv()
    assert argv[-3:] == ["deploy", "-m", "stylekit.remote.app"]
    module = import_file_or_module(parse_import_ref(argv[-1], use_module_mode=True, command="modal deploy"))
    packages = image_spec().packages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functions = module.app.registered_functions
    assert {"deployment_info", "Inpainter.*"} <= set(functions)
    for name, function in functions.items():
        recorded = function._get_source_info().module_name
        assert any(recorded == p or recorded.startswith(p + ".") for p in packages), (name, recorded)
    # What the old documented form records: a top-level module `app` that no container has.
    by_path = parse_import_ref(str(ROOT / "stylekit" / "remote" / "app.py"), command="modal deploy")
    assert by_path.use_module_mode is False and Path(by_path.file_or_module).stem == "app"


# ---- 2. secrets -----------------------------------------------------------------------------------------------


def test_a_job_without_wandb_or_gated_models_gets_no_secrets(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    seen.secrets = set()  # an account with no secrets at all
    returns = launch(_task, [["+x=1"]], *_on_volume(tmp_path / "volume"))
    assert [r.status for r in returns] == [JobStatus.COMPLETED]
    assert seen.secret_names == [[]]


def _job(tmp_path: Path, **config: Any) -> Any:
    from hydra_plugins.stylekit_launcher._jobs import Job

    return Job(0, [], OmegaConf.create(config), str(tmp_path), "0", tmp_path / "0")


def test_secrets_follow_what_the_jobs_use_and_a_missing_one_is_named_with_its_create_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hydra_plugins.stylekit_launcher._needs import needed_secrets
    from stylekit.errors import UsageError

    flux = {
        "pretrained": "black-forest-labs/FLUX.1-dev",
        "inpaint_pretrained": "black-forest-labs/FLUX.1-Fill-dev",
    }
    sdxl = {"pretrained": "stabilityai/stable-diffusion-xl-base-1.0"}
    settings = ModalSettings()
    everything = {"huggingface", "wandb"}.__contains__
    wandb_auto = {"backend": "wandb", "mode": "auto"}
    assert needed_secrets([_job(tmp_path, model=flux, logger=wandb_auto)], settings, everything) == [
        "huggingface",
        "wandb",
    ]
    assert (
        needed_secrets([_job(tmp_path, model=sdxl, logger={"backend": "none"})], settings, everything) == []
    )
    offline = {"backend": "wandb", "mode": "offline"}
    assert needed_secrets([_job(tmp_path, model=sdxl, logger=offline)], settings, everything) == []
    # auto without the secret: offline runs, said once; online without it: stop before any container.
    assert needed_secrets([_job(tmp_path, model=sdxl, logger=wandb_auto)], settings, lambda n: False) == []
    assert "written offline" in caplog.text
    online = {"backend": "wandb", "mode": "online"}
    with pytest.raises(UsageError, match=r"'wandb' does not exist.*modal secret create wandb WANDB_API_KEY="):
        needed_secrets([_job(tmp_path, model=sdxl, logger=online)], settings, lambda n: False)
    with pytest.raises(
        UsageError, match=r"'huggingface' does not exist \(black-forest-labs/FLUX.1-dev is gated"
    ):
        needed_secrets([_job(tmp_path, model=flux)], settings, lambda n: n == "wandb")
    # The config names them.
    named = ModalSettings(hf_secret="hf-team", secrets=None)
    assert needed_secrets([_job(tmp_path, model=flux)], named, {"hf-team"}.__contains__) == ["hf-team"]
    explicit = ModalSettings(secrets=["mine"])
    assert needed_secrets([_job(tmp_path, model=sdxl)], explicit, {"mine"}.__contains__) == ["mine"]


def test_missing_secret_stops_the_launch_with_exit_2_before_any_container(
    launch: Callable[..., list[JobReturn]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    seen.secrets = {"wandb"}
    with pytest.raises(SystemExit) as stopped:
        launch(
            _task,
            [["+x=1", "+model.pretrained=black-forest-labs/FLUX.1-dev"]],
            *_on_volume(tmp_path / "volume"),
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modal secret create huggingface HF_TOKEN=" in err[0]
    assert seen.events == [] and seen.shipped == []


# ---- 3 + 4. the deployed Inpainter --------------------------------------------------------------------------


class _Deployed:
    """modal.Function.from_name / modal.Cls.from_name for a deployed app, recording what the launcher asks."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.options: list[dict[str, Any]] = []
        self.calls: list[tuple[str, list[str]]] = []

    def function_from_name(self, app: str, name: str) -> Any:
        deployed = self

        class Info:
            def remote(self) -> dict[str, str]:
                return {"fingerprint": deployed.fingerprint, "app": app}

        assert name == "deployment_info"
        return Info()

    def cls_from_name(self, app: str, name: str) -> Any:
        deployed = self

        class Method:
            def __init__(self, model: str) -> None:
                self.model = model

            def remote(self, image: bytes, mask: bytes, overrides: list[str], name: str) -> dict[str, bytes]:
                deployed.calls.append((self.model, overrides))
                return {f"{Path(name).stem}_edited.png": b"edited"}

        class Cls:
            def with_options(self, **options: Any) -> Any:
                deployed.options.append(options)
                return self

            def __call__(self, model_overrides: str = "") -> Any:
                instance = type("Instance", (), {})()
                instance.edit_files = Method(model_overrides)
                return instance

        return Cls()


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(path)
    return path


def _deployed_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fingerprint: str | None = None) -> Any:
    import modal

    from stylekit.remote import source_fingerprint

    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    deployed = _Deployed(fingerprint or source_fingerprint())
    monkeypatch.setattr(modal.Function, "from_name", staticmethod(deployed.function_from_name))
    monkeypatch.setattr(modal.Cls, "from_name", staticmethod(deployed.cls_from_name))
    from stylekit.remote import app as remote_app

    def volumes(settings: Any) -> dict[str, FakeVolume]:
        return {
            settings.volumes.hf_cache.path: FakeVolume(tmp_path / "hf-cache"),
            settings.volumes.outputs.path: FakeVolume(tmp_path / "volume"),
        }

    monkeypatch.setattr(remote_app, "volumes", volumes)
    return seen, deployed


def _inpaint_job(tmp_path: Path, lora: str) -> list[str]:
    photo, mask = _png(tmp_path / "photo.png"), _png(tmp_path / "photo_mask.png")
    return [
        "+task_name=inpaint",
        "+prompt=red",
        f"+image={photo}",
        f"+mask={mask}",
        f"+output_dir={tmp_path / 'edits'}",
        f"+lora_weights={lora}",
    ]


def test_deployed_edits_pass_lora_entries_that_are_not_local_files_through(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen, deployed = _deployed_setup(monkeypatch, tmp_path)
    entries = ["/workspace/outputs/train/multirun/x/0/lora", "someone/style-lora:0.7", "typo.safetensors"]
    job = _inpaint_job(tmp_path, "[" + ",".join(entries) + "]")
    returns = launch(_task, [job], "hydra.launcher.use_deployed=true", *_on_volume(tmp_path / "volume"))
    assert [r.status for r in returns] == [JobStatus.COMPLETED]
    ((_, overrides),) = deployed.calls
    sent = [o for o in overrides if o.startswith("lora_weights=")]
    assert sent == ["lora_weights=[" + ",".join(f"'{e}'" for e in entries) + "]"]
    assert (tmp_path / "edits" / "photo_edited.png").read_bytes() == b"edited"


def test_deployed_inpainter_is_opt_in_takes_the_launch_options_and_uploads_only_loras(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen, deployed = _deployed_setup(monkeypatch, tmp_path)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"weights")
    job = _inpaint_job(tmp_path, str(lora))
    options = [
        "hydra.launcher.gpu=L40S",
        "hydra.launcher.timeout=1234",
        f"hydra.launcher.volumes.outputs.path={tmp_path / 'volume'}",
    ]
    launch(_task, [job], "hydra.launcher.use_deployed=true", *options)
    (applied,) = deployed.options
    assert (applied["gpu"], applied["timeout"], applied["secrets"]) == ("L40S", 1234, [])
    assert applied["memory"] >= 64 * 1024 and set(applied["volumes"]) == {"/cache", str(tmp_path / "volume")}
    from stylekit.remote.app import call_options

    assert call_options(ModalSettings(gpu="H100,A100-80GB"), [])["gpu"] == "H100"  # one type per call
    uploads = [p.name for p in (tmp_path / "volume" / ".inputs").glob("*/*")]
    assert uploads == ["style.safetensors"]  # images travel as bytes; nothing else goes to the volume
    # Without the flag the same job runs in its own container, deployed app or not.
    deployed.calls.clear()
    launch(_task, [[*job, "+x=1"]], *_on_volume(tmp_path / "volume"))
    assert deployed.calls == [] and len(seen.shipped) == 1


def test_a_deployment_of_other_sources_is_refused(
    launch: Callable[..., list[JobReturn]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, deployed = _deployed_setup(monkeypatch, tmp_path, fingerprint="0.0.9+weeksold")
    with pytest.raises(SystemExit) as stopped:
        launch(
            _task,
            [_inpaint_job(tmp_path, "[]")],
            "hydra.launcher.use_deployed=true",
            *_on_volume(tmp_path / "volume"),
        )
    assert stopped.value.code == 2
    assert "runs stylekit 0.0.9+weeksold" in capsys.readouterr().err and deployed.calls == []


# ---- 5. GPU ---------------------------------------------------------------------------------------------------


def test_a_job_that_asked_for_a_gpu_stops_at_once_when_torch_cannot_use_it(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho '| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    modal_fakes.install(monkeypatch, tmp_path / "volume")
    start = time.perf_counter()
    (ret,) = launch(
        _task,
        [["+x=1"]],
        "hydra.launcher.gpu=H100",
        f"hydra.launcher.volumes.outputs.path={tmp_path / 'volume'}",
    )
    assert ret.status == JobStatus.FAILED
    with pytest.raises(RuntimeError) as error:
        _ = ret.return_value
    message = str(error.value)
    assert f"CUDA {torch.version.cuda}" in message and "535.104.05 (supports CUDA up to 12.2)" in message
    assert not list((tmp_path / "volume").rglob("result.txt"))  # the task never started
    assert time.perf_counter() - start < 30


# ---- 6. volume commit -----------------------------------------------------------------------------------------


def test_the_volume_is_committed_with_no_open_files_inside_it(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from stylekit.remote import worker

    mount = (tmp_path / "volume").resolve()
    modal_fakes.install(monkeypatch, mount)
    seen_at_commit: list[tuple[str, list[str]]] = []

    def commit(name: str) -> None:
        fds = Path("/proc/self/fd")
        open_paths = []
        for fd in fds.iterdir():
            with __import__("contextlib").suppress(OSError):
                target = os.readlink(fd)
                if target.startswith(str(mount)):
                    open_paths.append(target)
        seen_at_commit.append((os.getcwd(), open_paths))

    monkeypatch.setattr(worker, "_commit", commit)
    (ret,) = launch(_task, [["+x=1"]], *_on_volume(mount))
    assert ret.status == JobStatus.COMPLETED
    ((cwd, open_paths),) = seen_at_commit
    assert not Path(cwd).resolve().is_relative_to(mount), cwd
    assert open_paths == []
    # What was written before the commit is what comes back.
    assert (Path(ret.hydra_cfg.hydra.runtime.output_dir) / "probe.log").is_file()


# ---- 7. one download per model --------------------------------------------------------------------------------


def test_a_first_sweep_downloads_each_model_once_before_the_jobs_start(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    jobs = [[f"+x={x}", "+model.pretrained=someone/open-model"] for x in (1, 2, 3)]
    launch(_task, jobs, *_on_volume(tmp_path / "volume"))
    assert seen.events[:3] == ["app start", "prefetch", "spawn 0"]
    assert seen.prefetched == [[{"repo": "someone/open-model", "revision": None, "variant": None}]]
    seen.events.clear()
    launch(_task, jobs, *_on_volume(tmp_path / "volume"))  # the cache holds it now
    assert "prefetch" not in seen.events


def test_the_prefetch_function_runs_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    from stylekit.remote.app import build_remote

    recorded: dict[str, dict[str, Any]] = {}
    real = modal.App.function

    def function(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorded[kwargs.get("name", "")] = kwargs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modal.App, "function", function)
    build_remote(ModalSettings(gpu="H100:2"), image_spec(), [])
    assert recorded["run_job"]["gpu"] == "H100:2" and recorded["prefetch"].get("gpu") is None


# ---- 8. interruption, detach, collect -------------------------------------------------------------------------


def test_ctrl_c_still_copies_back_every_finished_job(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    seen.script = {1: [KeyboardInterrupt(), "running"]}
    with pytest.raises(KeyboardInterrupt):
        launch(_task, [["+x=1"], ["+x=2"], ["+x=3"]], *_on_volume(tmp_path / "volume"))
    sweep = tmp_path / "sweep"
    assert (sweep / "0" / "result.txt").read_text() == "1"
    assert (sweep / "2" / "result.txt").read_text() == "3"
    assert not (sweep / "1").exists()
    manifest = json.loads((sweep / ".stylekit-modal.json").read_text())
    assert [job["call_id"] for job in manifest["jobs"]] == ["fc-0", "fc-1", "fc-2"]


def test_a_timed_out_job_is_finished_and_a_lost_connection_is_an_interruption() -> None:
    from modal.exception import ConnectionError as ModalConnectionError
    from modal.exception import FunctionTimeoutError

    from hydra_plugins.stylekit_launcher._sweep import _poll

    finished, output = _poll(modal_fakes.FakeCall("a", [FunctionTimeoutError("ran past its timeout")]))
    assert finished and isinstance(output, FunctionTimeoutError)  # not polled forever as "still running"
    assert _poll(modal_fakes.FakeCall("b", ["running"])) == (False, None)
    with pytest.raises(ModalConnectionError):
        _poll(modal_fakes.FakeCall("c", [ModalConnectionError("connection lost")]))


def test_a_detached_sweep_returns_at_once_and_collect_fetches_it_later(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hydra_plugins.stylekit_launcher._sweep import collect

    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    seen.script = {1: ["running"]}
    returns = launch(
        _task, [["+x=1"], ["+x=2"]], "hydra.launcher.detach=true", *_on_volume(tmp_path / "volume")
    )
    assert seen.detach == [True] and [r.status for r in returns] == [JobStatus.UNKNOWN] * 2
    sweep = tmp_path / "sweep"
    assert not (sweep / "0").exists()  # nothing waited for
    calls = {
        "fc-0": modal_fakes.FakeCall("fc-0", [seen_result(seen, 0)]),
        "fc-1": modal_fakes.FakeCall("fc-1", ["running"]),
    }
    lines: list[str] = []
    counts = collect(sweep, FakeVolume(tmp_path / "volume"), calls.__getitem__, lines.append)
    assert counts == {"finished": 1, "failed": 0, "running": 1}
    assert (sweep / "0" / "result.txt").read_text() == "1"
    assert any("#1" in line and "still running" in line for line in lines)


def seen_result(seen: modal_fakes.Modal, index: int) -> bytes:
    from stylekit.remote.worker import loads, run_payload

    payload = next(p for p in seen.shipped if loads(p).index == index)
    return run_payload(payload)


def test_collect_without_a_manifest_is_a_usage_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stylekit import cli

    result = CliRunner().invoke(cli.app, ["modal", "collect", str(tmp_path)])
    assert result.exit_code == 2 and ".stylekit-modal.json does not exist" in result.output


# ---- 9. the smaller ones ------------------------------------------------------------------------------------


def test_a_plugin_the_image_lacks_fails_here_in_one_line(
    launch: Callable[..., list[JobReturn]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "stylekit_probe_callback.py").write_text(
        "from hydra.experimental.callback import Callback\nclass Probe(Callback):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(plugins))
    seen = modal_fakes.install(monkeypatch, tmp_path / "volume")
    with pytest.raises(SystemExit) as stopped:
        launch(
            _task,
            [["+x=1"]],
            "+hydra.callbacks.probe._target_=stylekit_probe_callback.Probe",
            *_on_volume(tmp_path / "volume"),
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stylekit_probe_callback" in err[0] and "part of no locked package" in err[0]
    assert seen.shipped == []


def test_locked_packages_and_own_sources_pass_the_image_check() -> None:
    from hydra_plugins.stylekit_launcher._modules import missing_from_image

    modules = {"omegaconf.dictconfig", "hydra.core.utils", "stylekit.remote.worker", "collections", "torch"}
    modules |= {"hydra_plugins.stylekit_launcher.modal_launcher", "cloudpickle.cloudpickle", "_codecs"}
    assert missing_from_image(modules, image_spec().packages, ROOT / "uv.lock") == []


def test_editing_tool_settings_in_pyproject_leaves_the_dependency_layer_alone(tmp_path: Path) -> None:
    from stylekit.remote.app import lock_context

    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    before = lock_context(tmp_path)
    text = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(
        text.replace("line-length = 110", "line-length = 100") + "\n[tool.x]\ny = 1\n"
    )
    after = lock_context(tmp_path)
    assert (
        after == before
        and (after / "pyproject.toml").read_bytes() == (before / "pyproject.toml").read_bytes()
    )
    layer = (after / "pyproject.toml").read_text()
    assert "line-length" not in layer and "testpaths" not in layer and "torch>=" in layer
    (tmp_path / "pyproject.toml").write_text(text.replace('"numpy>=1.26"', '"numpy>=2.0"'))
    assert lock_context(tmp_path) != before  # a dependency change does rebuild


def test_the_image_syncs_from_the_lock_layer_with_a_pinned_uv(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    from stylekit.remote.app import UV_VERSION, build_image

    calls: dict[str, Any] = {}
    real_sync = modal.Image.uv_sync

    def uv_sync(self: Any, uv_project_dir: str = "./", **kw: Any) -> Any:
        calls["uv"] = (uv_project_dir, kw)
        return real_sync(self, uv_project_dir, **kw)

    monkeypatch.setattr(modal.Image, "uv_sync", uv_sync)
    build_image(image_spec())
    project, kw = calls["uv"]
    assert kw["uv_version"] == UV_VERSION and UV_VERSION.count(".") == 2
    assert '["tool"."ruff"]' not in (Path(project) / "pyproject.toml").read_text()
    assert (Path(project) / "uv.lock").read_bytes() == (ROOT / "uv.lock").read_bytes()


def test_copy_back_downloads_several_files_at_once(tmp_path: Path) -> None:
    from hydra_plugins.stylekit_launcher._transfer import download

    volume = FakeVolume(tmp_path / "vol", read_delay=0.2)
    run = tmp_path / "vol" / "run"
    (run / "samples").mkdir(parents=True)
    for i in range(8):
        (run / "samples" / f"{i}.png").write_bytes(bytes([i]))
    start = time.perf_counter()
    assert download(volume, "run", tmp_path / "local") == 8
    elapsed = time.perf_counter() - start
    assert volume.most_at_once > 1 and elapsed < 8 * 0.2
    assert (tmp_path / "local" / "samples" / "7.png").read_bytes() == b"\x07"
    assert not list((tmp_path / "local").rglob("*.part"))


def test_cpu_and_memory_requests_fit_loading_flux_per_gpu() -> None:
    assert resources(ModalSettings(gpu="H100")) == (8.0, 64 * 1024)
    assert resources(ModalSettings(gpu="H100:4")) == (32.0, 4 * 64 * 1024)
    assert resources(ModalSettings(gpu="none")) == (None, None)
    assert resources(ModalSettings(gpu="H100", cpu=4, memory=1024)) == (4, 1024)


def test_a_gpu_fallback_list_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_plugins.stylekit_launcher.config import ModalLauncherConf

    monkeypatch.setenv("STYLEKIT_MODAL_GPU", "H100, A100-80GB")
    assert gpu_option(ModalLauncherConf().gpu) == ["H100", "A100-80GB"]
    monkeypatch.delenv("STYLEKIT_MODAL_GPU")
    assert gpu_option(ModalLauncherConf().gpu) == "H100"


def test_clean_lists_then_removes_only_old_runs_checkpoints_and_inputs(tmp_path: Path) -> None:
    from stylekit.remote.commands import clean

    root = tmp_path / "vol"
    old = time.time() - 40 * 86400
    for path in ("outputs/train/multirun/2025-01-01_00-00-00", "outputs/checkpoints/train-abc", ".inputs/h1",
                 "outputs/inpaint/runs/2025-01-02_00-00-00", "outputs/train/multirun/fresh", "notes"):  # fmt: skip
        (root / path).mkdir(parents=True)
        (root / path / "f").write_text("x")
        if "fresh" not in path:
            os.utime(root / path, (old, old))
    volume = FakeVolume(root)
    lines: list[str] = []
    listed = clean(30, yes=False, volume=volume, echo=lines.append)
    assert sorted(listed) == [".inputs/h1", "outputs/checkpoints/train-abc",
                              "outputs/inpaint/runs/2025-01-02_00-00-00", "outputs/train/multirun/2025-01-01_00-00-00"]  # fmt: skip
    assert volume.removed == [] and lines[-1] == "add --yes to remove them"
    clean(30, yes=True, volume=volume, echo=lines.append)
    assert sorted(volume.removed) == sorted(listed)
    assert (root / "outputs/train/multirun/fresh").is_dir() and (root / "notes").is_dir()


# ---- multi-GPU jobs -------------------------------------------------------------------------------------------


def test_gpu_counts_become_processes_per_job() -> None:
    from stylekit.errors import UsageError
    from stylekit.remote.worker import rank_command

    assert (gpu_count("H100:4"), gpu_count("H100"), gpu_count("none")) == (4, 1, 0)
    assert gpu_count(["H100:2", "A100-80GB:2"]) == 2
    with pytest.raises(UsageError, match="same count"):
        gpu_count("H100:4,A100-80GB")
    assert process_count(ModalSettings(gpu="H100:4")) == 4
    assert process_count(ModalSettings(gpu="none", processes=2)) == 2
    gpu = rank_command(4, gpus=4)
    assert gpu[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"] and "--num_processes=4" in gpu
    assert gpu[-2:] == ["--module", "stylekit.remote.ranks"]
    cpu = rank_command(2, gpus=0)
    assert "torch.distributed.run" in cpu and "--nproc_per_node=2" in cpu


DDP_SCRIPT = """
import json, os
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    state = PartialState(cpu=True)
    total = torch.tensor([float(state.process_index + 1)])
    dist.all_reduce(total)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"world": state.num_processes, "sum": total.item(), "backend": dist.get_backend()}))
    return {"rank": state.process_index, "world": state.num_processes}

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_a_job_runs_as_two_gloo_processes_with_one_run_dir(tmp_path: Path) -> None:
    """The container entry for multi-GPU jobs, on CPUs: the local backend starts 2 processes (gloo)."""
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_SCRIPT)
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(script), "-m", "hydra/launcher=modal", "hydra.launcher.backend=local",
         "hydra.launcher.gpu=none", "hydra.launcher.processes=2", f"hydra.sweep.dir={sweep}", "+x=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = [p for p in sweep.iterdir() if p.is_dir()]
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r == {"world": 2, "sum": 3.0, "backend": "gloo"} for r in reports)
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "ddp_job.log").is_file()
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "ddp_job.log", "rank0.json", "rank1.json"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_tiny_training_as_two_processes_brings_back_one_run_dir_and_one_lora(tmp_path: Path) -> None:
    """What ``hydra.launcher.gpu=H100:2`` runs in the container, on 2 CPU processes (gloo): a real training job."""
    from stylekit.models.tiny import tiny_path

    # Built here, by one process: built by two DDP ranks at once, the tiny folder lost its text encoders.
    tiny_path("flux")
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", "hydra/launcher=modal", "hydra.launcher.backend=local",
         "hydra.launcher.gpu=none", "hydra.launcher.processes=2", "experiment=tiny_smoke", "trainer.max_steps=2",
         "trainer.validate_every=2", "trainer.checkpoint_every=2", "data.dataset_dir=assets/demo/train",
         "data.trigger=sks", "logger=none", "trainer.resume=never", f"trainer.checkpoint_root={tmp_path / 'ckpt'}",
         f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"],
        cwd=ROOT, capture_output=True, text=True, timeout=1100, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["job", "multirun.yaml"]
    run = sweep / "job"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list(run.glob("*.log"))) == 1 and (run / ".hydra" / "config.yaml").is_file()
    assert list((run / "ranks").iterdir()) == [run / "ranks" / "1"]  # rank 1 kept its metrics beside rank 0's


# ---- the live check -------------------------------------------------------------------------------------------


def test_modal_check_without_credentials_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stylekit.cli", "modal", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no Modal credentials: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET), "
        "then try again"
    ]
    assert time.perf_counter() - start < 60  # no network wait


@pytest.mark.parametrize("command", [["deploy", "--gpu", "L40S"], ["clean", "--yes"], ["check"]])
def test_modal_commands_need_credentials_first(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    from typer.testing import CliRunner

    from stylekit import cli
    from stylekit.remote import commands

    monkeypatch.setattr(commands, "has_credentials", lambda: False)
    result = CliRunner().invoke(cli.app, ["modal", *command])
    assert result.exit_code == 2 and "no Modal credentials: run `modal token new`" in result.output


def test_deploy_runs_modal_in_module_mode_with_the_chosen_gpu_and_app() -> None:
    from stylekit.remote.commands import deploy_argv, deploy_env

    assert deploy_argv()[1:] == ["-m", "modal", "deploy", "-m", "stylekit.remote.app"]
    env = deploy_env(gpu="H100,A100-80GB", app_name="team-inpaint")
    assert (env["STYLEKIT_MODAL_GPU"], env["STYLEKIT_MODAL_APP"]) == ("H100,A100-80GB", "team-inpaint")


def test_the_check_edits_with_the_lora_its_sweep_left_on_the_volume() -> None:
    from hydra_plugins.stylekit_launcher._jobs import container_dir
    from stylekit.remote.check import CheckPlan

    plan = CheckPlan(root=ROOT, stamp="t")
    sweep = plan.sweep_argv()
    assert (
        "lora.rank=4,8" in sweep
        and "hydra.launcher.gpu=none" in sweep
        and "hydra.sweep.subdir=${hydra.job.num}" in sweep
    )
    first_job = container_dir(plan.sweep_dir, "/workspace", ROOT) + "/0"
    edit = plan.edit_argv()
    assert f"lora_weights=[{first_job}/lora]" in edit and "hydra.launcher.use_deployed=true" in edit


def test_check_steps_report_pass_fail_and_time_and_go_on_after_a_failure() -> None:
    from stylekit.remote.check import Step, run_steps

    def broken() -> str:
        raise RuntimeError("no GPU")

    lines: list[str] = []
    outcomes = run_steps(
        [Step("a", lambda: "fine"), Step("b", broken), Step("c", lambda: "ok")], lines.append
    )
    assert [o.passed for o in outcomes] == [True, False, True]
    assert lines[0].startswith("PASS") and "a: fine" in lines[0]
    assert lines[1].startswith("FAIL") and "RuntimeError: no GPU" in lines[1]
    assert all("s  " in line for line in lines)


@pytest.mark.modal
@pytest.mark.timeout(3600)
def test_modal_check_passes_with_a_real_account() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stylekit.cli", "modal", "check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("PASS") == 4
