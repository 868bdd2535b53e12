"""The Modal launcher plugin, offline: config -> Modal options, the image, dry runs, both backends' job paths.

Nothing here contacts Modal. ``backend=local`` runs the real worker in this process; the Modal backend's path
(container dirs, input uploads, the copy back) runs against a stand-in for ``Function.map`` and ``Volume`` that
calls the same worker on the same payload bytes, with a temp dir standing in for the outputs volume.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import modal_fakes
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from modal_fakes import FakeVolume
from omegaconf import OmegaConf

from stylekit.remote import ModalSettings, VolumeSpec, container_env, gpu_option, image_spec, python_version

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
# Run a script as `python script args...` and report whether modal got imported on the way.
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
print("MODAL_IMPORTED=" + str("modal" in sys.modules))
"""


def _probe(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- start-up stays free of modal ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--help"], ["--cfg", "job"], ["hydra/launcher=modal", "--cfg", "hydra"]])
def test_help_and_cfg_do_not_import_modal(flags: list[str]) -> None:
    out = _probe(str(ROOT / "scripts" / "train.py"), *flags)
    assert "MODAL_IMPORTED=False" in out


def test_hydra_help_lists_the_modal_launcher() -> None:
    out = _probe(str(ROOT / "scripts" / "train.py"), "--hydra-help")
    assert any(line.startswith("hydra/launcher:") and "modal" in line for line in out.splitlines())


# ---- config -> Modal options ----------------------------------------------------------------------------------


def _launcher_conf(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from hydra_plugins.stylekit_launcher.modal_launcher import _settings

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=modal", *overrides], return_hydra_config=True)
    return _settings(OmegaConf.to_container(cfg.hydra.launcher))


def test_launcher_config_becomes_modal_function_options() -> None:
    import modal

    from stylekit.remote.app import build_image, function_options

    conf = _launcher_conf(
        "hydra.launcher.gpu=[H100,A100-80GB]",
        "hydra.launcher.timeout=7200",
        "hydra.launcher.retries=3",
        "hydra.launcher.max_containers=6",
        "hydra.launcher.cpu=8",
        "hydra.launcher.memory=65536",
        "hydra.launcher.secrets=[huggingface]",
        "hydra.launcher.volumes.outputs.name=my-runs",
        "+hydra.launcher.env.FOO=bar",
    )
    options = function_options(conf, build_image(image_spec()))
    assert options["gpu"] == ["H100", "A100-80GB"]
    assert (options["timeout"], options["retries"], options["max_containers"]) == (7200, 3, 6)
    assert (options["cpu"], options["memory"]) == (8.0, 65536)
    assert [repr(s) for s in options["secrets"]] == ["modal.Secret.from_name('huggingface')"]
    assert {path: repr(v) for path, v in options["volumes"].items()} == {
        "/cache": "modal.Volume.from_name('stylekit-hf-cache')",
        "/workspace": "modal.Volume.from_name('my-runs')",
    }
    assert options["env"]["HF_HOME"] == "/cache/huggingface" and options["env"]["FOO"] == "bar"
    # Modal accepts them as they are, without contacting anything.
    app = modal.App("stylekit-test", include_source=False)
    from stylekit.remote.worker import run_payload

    assert app.function(**options)(run_payload) is not None


def test_launcher_defaults_and_a_bad_key() -> None:
    conf = _launcher_conf()
    assert (conf.gpu, conf.backend, conf.dry_run, conf.app_name) == ("H100", "modal", False, "stylekit")
    assert conf.secrets is None  # only what the jobs need
    assert (conf.use_deployed, conf.detach, conf.processes) == (False, False, None)
    with pytest.raises(Exception, match="gpus"):
        _launcher_conf("hydra.launcher.gpus=A10G")


@pytest.mark.parametrize(
    "gpu, expected",
    [("L40S", "L40S"), (["A10G"], "A10G"), (["H100", "L40S"], ["H100", "L40S"]), ("none", None)],
)
def test_gpu_option(gpu: Any, expected: Any) -> None:
    assert gpu_option(gpu) == expected


def test_container_env_puts_the_caches_on_the_cache_volume() -> None:
    settings = ModalSettings(env={"HF_HUB_ENABLE_HF_TRANSFER": "1"})
    settings.volumes.hf_cache = VolumeSpec("c", "/hf/")
    env = container_env(settings)
    assert env["HF_HOME"] == "/hf/huggingface" and env["STYLEKIT_CACHE_DIR"] == "/hf/stylekit"
    assert env["HF_HUB_ENABLE_HF_TRANSFER"] == "1"


def test_image_is_built_from_uv_lock_with_the_callers_python(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    from stylekit.remote.app import build_image

    calls: dict[str, Any] = {}
    real_slim, real_sync = modal.Image.debian_slim, modal.Image.uv_sync

    def debian_slim(python_version: str | None = None, **kw: Any) -> Any:
        calls["python"] = python_version
        return real_slim(python_version=python_version, **kw)

    def uv_sync(self: Any, uv_project_dir: str = "./", **kw: Any) -> Any:
        calls["uv"] = (uv_project_dir, kw)
        return real_sync(self, uv_project_dir, **kw)

    monkeypatch.setattr(modal.Image, "debian_slim", staticmethod(debian_slim))
    monkeypatch.setattr(modal.Image, "uv_sync", uv_sync)
    spec = image_spec()
    assert isinstance(build_image(spec), modal.Image)
    assert calls["python"] == python_version() == f"{sys.version_info.major}.{sys.version_info.minor}"
    project, kw = calls["uv"]
    assert (Path(project) / "uv.lock").is_file() and (Path(project) / "pyproject.toml").is_file()
    assert kw["frozen"] is True and "--no-dev" in kw["extra_options"]
    assert spec.packages == ("stylekit", "hydra_plugins.stylekit_launcher")
    assert spec.data_dirs == ("conf", "scripts")


# ---- dry run ------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_contacts_nothing(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    data.mkdir()
    (data / "a.png").write_bytes(b"png")
    sweep = tmp_path / "sweep"
    out = _probe(
        str(ROOT / "scripts" / "train.py"),
        "-m",
        "hydra/launcher=modal",
        "hydra.launcher.dry_run=true",
        "hydra.launcher.gpu=[H100,A100-80GB]",
        f"hydra.sweep.dir={sweep}",
        f"data.dataset_dir={data}",
        "lora.rank=4,8",
    )
    assert "MODAL_IMPORTED=False" in out
    assert "dry run: 2 job(s), backend=modal" in out
    jobs = [line for line in out.splitlines() if line.startswith("#")]
    assert len(jobs) == 2 and "lora.rank=4" in jobs[0] and "lora.rank=8" in jobs[1]
    assert "['H100', 'A100-80GB']" in out and "stylekit-outputs -> /workspace" in out
    assert "uploads data.dataset_dir" in out and "/workspace/.inputs/" in out
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]  # no job ran


# ---- launching in-process -----------------------------------------------------------------------------------


def _task(cfg: Any) -> int:
    if cfg.get("fail"):
        raise ValueError("boom from the task")
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "result.txt").write_text(str(cfg.x))
    if cfg.get("image"):
        (out / "seen.txt").write_text(Path(cfg.image).read_text())
    return int(cfg.x) * 2


JOBS = [["+x=1"], ["+x=2", "+fail=true"], ["+x=3"]]


def test_local_backend_keeps_the_others_when_one_job_fails(launch: Callable[..., list[JobReturn]]) -> None:
    returns = launch(_task, JOBS, "hydra.launcher.backend=local")
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
    assert (returns[0].return_value, returns[2].return_value) == (2, 6)
    with pytest.raises(RuntimeError, match="(?s)job #1.*Traceback.*ValueError: boom from the task"):
        _ = returns[1].return_value
    for ret in (returns[0], returns[2]):
        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        assert (run_dir / "result.txt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


def test_modal_backend_path_runs_on_the_volume_and_copies_back(
    launch: Callable[..., list[JobReturn]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mount = tmp_path / "volume"
    seen = modal_fakes.install(monkeypatch, mount)
    shipped, settings = seen.shipped, seen.settings
    monkeypatch.setenv("STYLEKIT_TEST_TOKEN", "t0k")
    photo = tmp_path / "photo.txt"
    photo.write_text("pixels")
    # As Hydra's sweeper does, every job gets every task override.
    jobs = [[*job, f"+image={photo}"] for job in JOBS]
    returns = launch(
        _task,
        jobs,
        f"hydra.launcher.volumes.outputs.path={mount}",
        "hydra.launcher.gpu=none",
        "hydra.launcher.inputs=[image]",
        "hydra.job.env_copy=[STYLEKIT_TEST_TOKEN]",
    )
    assert len(shipped) == 3
    assert settings[0].env["STYLEKIT_TEST_TOKEN"] == "t0k"  # Hydra's env_copy reaches the containers
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
    with pytest.raises(RuntimeError, match="ValueError: boom from the task"):
        _ = returns[1].return_value
    sweep = tmp_path / "sweep"
    for ret, x in ((returns[0], 1), (returns[2], 3)):
        local = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        assert local.parent == sweep  # localized: this machine's sweep dir, not the volume
        assert (local / "result.txt").read_text() == str(x)
        assert (local / "seen.txt").read_text() == "pixels"  # read from the uploaded copy
        assert (local / ".hydra" / "overrides.yaml").is_file() and (local / "probe.log").is_file()
    # The job ran on the volume (a mirror of the launch dir), and read the upload, not the local file.
    uploads = list((mount / ".inputs").glob("*/photo.txt"))
    assert len(uploads) == 1
    on_volume = mount / "_abs" / sweep.relative_to("/")
    assert (on_volume / "0" / "result.txt").is_file()
    config = OmegaConf.load(on_volume / "0" / ".hydra" / "config.yaml")
    assert config.image == str(uploads[0])


# ---- pieces ---------------------------------------------------------------------------------------------


def test_container_dir_mirrors_the_launch_dir(tmp_path: Path) -> None:
    from hydra_plugins.stylekit_launcher._jobs import container_dir

    assert (
        container_dir("outputs/train/multirun/x", "/workspace", tmp_path)
        == "/workspace/outputs/train/multirun/x"
    )
    assert container_dir(str(tmp_path / "runs" / "a"), "/workspace", tmp_path) == "/workspace/runs/a"
    assert container_dir("/elsewhere/b", "/workspace", tmp_path) == "/workspace/_abs/elsewhere/b"


def test_inputs_upload_once_per_content_and_lora_scales_survive(tmp_path: Path, monkeypatch) -> None:
    from hydra_plugins.stylekit_launcher import _transfer as transfer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"1")
    (tmp_path / "style.safetensors").write_bytes(b"w")
    cfg = OmegaConf.create(
        {
            "data": {"dataset_dir": "data"},
            "lora_weights": ["style.safetensors:0.8", "hub/missing.safetensors"],
        }
    )
    staged, updates = transfer.plan_inputs(cfg, ["data.dataset_dir", "lora_weights", "image"], "/workspace")
    assert [s.key for s in staged] == ["data.dataset_dir", "lora_weights"]
    dataset = updates["data.dataset_dir"]
    assert dataset.startswith("/workspace/.inputs/") and dataset.endswith("/data")
    assert updates["lora_weights"][0].endswith("/style.safetensors:0.8")
    assert updates["lora_weights"][1] == "hub/missing.safetensors"  # not a local file: left alone
    # A null key whose task reads a default folder ships that folder; a key the config lacks stays absent.
    (tmp_path / "data" / "base_images").mkdir()
    (tmp_path / "data" / "base_images" / "p.png").write_bytes(b"p")
    nulls = OmegaConf.create({"image": None})
    _, defaults = transfer.plan_inputs(nulls, ["image=data/base_images", "mask=data/masks"], "/workspace")
    assert list(defaults) == ["image"] and defaults["image"].endswith("/base_images")
    assert transfer.plan_inputs(OmegaConf.create({}), ["image=data/base_images"], "/workspace") == ([], {})
    volume = FakeVolume(tmp_path / "vol")
    transfer.upload(volume, staged)
    transfer.upload(volume, staged)  # already there: no second copy (copytree would fail)
    before = staged[0].volume_path
    (tmp_path / "data" / "b.png").write_bytes(b"2")
    assert transfer.plan_inputs(cfg, ["data.dataset_dir"], "/workspace")[0][0].volume_path != before


def test_task_in_a_script_is_found_again_undecorated(tmp_path: Path) -> None:
    from stylekit.remote.worker import TaskRef

    script = tmp_path / "scripts" / "job.py"
    script.parent.mkdir()
    script.write_text(
        "import hydra\n"
        "@hydra.main(version_base='1.3', config_path=None, config_name=None)\n"
        "def main(cfg):\n    return 'ran ' + str(cfg)\n"
        "if __name__ == '__main__':\n    raise SystemExit('must not run as main')\n"
    )
    task = TaskRef(qualname="main", script="scripts/job.py").load(tmp_path)
    assert task({"a": 1}) == "ran {'a': 1}"


def test_main_script_task_ships_as_a_path_inside_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from stylekit.remote.worker import TaskRef

    main = types.ModuleType("__main__")
    main.__file__ = str(ROOT / "scripts" / "train.py")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def task(cfg: Any) -> None: ...

    task.__module__, task.__qualname__ = "__main__", "main"
    ref = TaskRef.of(task, script_root=ROOT)
    assert (ref.script, ref.qualname, ref.pickled) == ("scripts/train.py", "main", None)
    loaded = ref.load(ROOT)  # what the container does with /root/project
    assert loaded.__name__ == "main" and loaded.__code__.co_name == "main"  # hydra.main's wrapper peeled off


def test_plain_run_is_restarted_as_multirun_only_for_a_script(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_plugins.stylekit_launcher._run_mode import relaunch_argv

    script = str(ROOT / "scripts" / "inpaint.py")
    monkeypatch.setattr(sys, "argv", [script, "prompt=x"])
    monkeypatch.setattr(sys, "orig_argv", ["python", script, "prompt=x"])
    assert relaunch_argv("inpaint") == [sys.executable, script, "prompt=x", "--multirun"]
    assert relaunch_argv("train") is None  # not the job this process runs
    monkeypatch.setattr(sys, "argv", [script, "-m", "prompt=x"])
    assert relaunch_argv("inpaint") is None


def test_deployed_inpaint_sends_edit_overrides_and_writes_what_comes_back(tmp_path: Path) -> None:
    from hydra_plugins.stylekit_launcher._deployed import DeployedInpaint

    (tmp_path / "photo.jpg").write_bytes(b"image")
    (tmp_path / "photo_mask.png").write_bytes(b"mask")
    calls: list[tuple] = []

    class Method:
        def remote(self, *args: Any) -> dict[str, bytes]:
            calls.append(args)
            return {"photo_edited.png": b"edited"}

    class Inpainter:
        def __init__(self, model_overrides: str) -> None:
            calls.append(("model", model_overrides))
            self.edit_files = Method()

    overrides = [
        "model=flux",
        "model.dtype=bf16",
        "prompt=red scarf",
        f"image={tmp_path}",
        "seed=3",
        "lora_weights=x",
    ]
    task = DeployedInpaint(Inpainter, overrides, lora_weights=["/workspace/.inputs/h/s.safetensors:0.5"])
    cfg = OmegaConf.create({"image": str(tmp_path / "photo.jpg"), "mask": str(tmp_path / "photo_mask.png")})
    cfg.output_dir = str(tmp_path / "out")
    result = task(cfg)
    assert calls[0] == ("model", "model=flux model.dtype=bf16")
    image, mask, sent, name = calls[1]
    assert (image, mask, name) == (b"image", b"mask", "photo.jpg")
    assert sent == ["prompt=red scarf", "seed=3", "lora_weights=['/workspace/.inputs/h/s.safetensors:0.5']"]
    assert (tmp_path / "out" / "photo_edited.png").read_bytes() == b"edited"
    assert result == {"outputs": [str(tmp_path / "out" / "photo_edited.png")]}


def test_inpaint_session_refuses_overrides_it_owns() -> None:
    from stylekit.remote.worker import InpaintSession

    session = InpaintSession("model=tiny_flux", project_dir=ROOT)
    with pytest.raises(ValueError, match="model.dtype"):
        session.edit_files(b"", b"", ["model.dtype=fp32"])


def test_an_inpaint_session_with_a_bad_model_setting_stops_in_one_line_before_loading() -> None:
    from stylekit.errors import UsageError
    from stylekit.remote.worker import InpaintSession

    session = InpaintSession("model=tiny_qwen_edit model.pipeline=nope model.dtype=fp8", project_dir=ROOT)
    with pytest.raises(UsageError) as caught:
        session.load()
    assert str(caught.value).splitlines() == [
        "model.pipeline='nope' must be one of: edit_plus, edit_inpaint or null",
        "model.dtype='fp8' must be one of: auto, bf16, fp16, fp32",
    ]


@pytest.mark.slow
def test_inpainter_edits_only_the_masked_region_through_function_local() -> None:
    """The deployable class itself, run here with Modal's ``.local()`` (enter hooks included) on tiny FLUX."""
    import warnings

    import numpy as np
    from PIL import Image

    from stylekit.remote.app import Inpainter

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        return buffer.getvalue()

    photo = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8")
    mask = np.zeros((48, 64), "uint8")
    mask[10:30, 20:40] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = Inpainter(model_overrides="model=tiny_flux").edit.local(
            png(photo), png(mask), ["prompt=red"]
        )
    result = np.asarray(Image.open(io.BytesIO(edited)).convert("RGB"))
    assert result.shape == photo.shape
    assert (result[mask == 0] == photo[mask == 0]).all()
    assert (result[mask > 0] != photo[mask > 0]).any()
