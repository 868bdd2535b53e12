"""``stylekit modal check`` (``make modal-check``): does Modal work for this account and this checkout?

In a few minutes and a few cents, with the user's own account: deploy the Inpainter (CPU, its own app name),
train a 2-job tiny sweep in two CPU containers and copy it back, edit one photo on the deployed Inpainter with a
LoRA that sweep left on the volume, and ask a GPU container whether torch can use its GPU. Each step prints
pass/fail and its time; then the cost Modal's billing report gives for the check's apps.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylekit.remote import package_root
from stylekit.remote.commands import deploy_argv, deploy_env, require_credentials

CHECK_APP = "stylekit-check"
# The cheapest GPU that answers "can torch use a GPU in this image?"; any other type works the same way.
CHECK_GPU = "T4"


@dataclass
class Step:
    name: str
    run: Callable[[], str]  # returns a short detail; raises on failure


@dataclass
class Outcome:
    name: str
    passed: bool
    seconds: float
    detail: str


@dataclass
class CheckPlan:
    """The commands the check runs, from one place so that the edit reads the LoRA the sweep wrote."""

    root: Path
    stamp: str
    python: str = sys.executable
    common: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.common = [
            "hydra/launcher=modal",
            "hydra.launcher.gpu=none",
            f"hydra.launcher.app_name={CHECK_APP}",
        ]

    @property
    def sweep_dir(self) -> str:
        return f"outputs/modal-check/{self.stamp}/sweep"

    @property
    def edit_dir(self) -> str:
        return f"outputs/modal-check/{self.stamp}/edit"

    def sweep_argv(self) -> list[str]:
        return [
            self.python, "scripts/train.py", "-m", *self.common, "experiment=tiny_smoke", "model=tiny_flux",
            "logger=none", "trainer.max_steps=2", "data.dataset_dir=assets/demo/train", "lora.rank=4,8",
            f"hydra.sweep.dir={self.sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
        ]  # fmt: skip

    def volume_lora(self) -> str:
        """The first sweep job's LoRA where it stays: on the outputs volume, not uploaded again."""
        return f"/workspace/{self.sweep_dir}/0/lora"

    def edit_argv(self) -> list[str]:
        return [
            self.python, "scripts/inpaint.py", "-m", *self.common, "hydra.launcher.use_deployed=true",
            "model=tiny_flux", "prompt=a sks cat", "image=assets/demo/base/chelsea.jpg",
            "mask=assets/demo/masks/chelsea.png", f"lora_weights=[{self.volume_lora()}]",
            f"hydra.sweep.dir={self.edit_dir}",
        ]  # fmt: skip


def _run(argv: list[str], root: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"`{' '.join(argv[1:4])} ...` exited {done.returncode}:\n" + "\n".join(tail))


def steps(plan: CheckPlan) -> list[Step]:
    root = plan.root

    def deploy() -> str:
        _run(deploy_argv(), root, deploy_env(gpu="none", app_name=CHECK_APP))
        return f"app {CHECK_APP} deployed (modal deploy -m stylekit.remote.app)"

    def sweep() -> str:
        _run(plan.sweep_argv(), root)
        loras = sorted((root / plan.sweep_dir).glob("*/lora/pytorch_lora_weights.safetensors"))
        if len(loras) != 2:
            raise RuntimeError(f"expected 2 LoRAs back in {plan.sweep_dir}, found {len(loras)}")
        return f"2 jobs trained and copied back to {plan.sweep_dir}"

    def edit() -> str:
        _run(plan.edit_argv(), root)
        edited = sorted((root / plan.edit_dir).glob("*/*_edited.png"))
        if not edited:
            raise RuntimeError(f"no *_edited.png came back under {plan.edit_dir}")
        return f"{edited[0].relative_to(root)} (LoRA read from the volume)"

    def gpu() -> str:
        info = gpu_container_report()
        if not info.get("cuda_available"):
            raise RuntimeError(f"torch cannot use the {CHECK_GPU}: {info}")
        return f"{info.get('device')} torch {info.get('torch')} CUDA {info.get('torch_cuda')} driver {info.get('driver')}"

    return [
        Step("deploy the Inpainter", deploy),
        Step("tiny 2-job sweep, copied back", sweep),
        Step("edit on the deployed Inpainter with a LoRA from the volume", edit),
        Step(f"GPU container ({CHECK_GPU}): nvidia-smi and torch.cuda", gpu),
    ]


def gpu_container_report() -> dict[str, Any]:
    import modal

    from stylekit.remote import image_spec
    from stylekit.remote.app import build_image
    from stylekit.remote.worker import gpu_probe

    app = modal.App(f"{CHECK_APP}-gpu", include_source=False)
    probe = app.function(image=build_image(image_spec()), gpu=CHECK_GPU, timeout=600)(gpu_probe)
    with app.run():
        return probe.remote()


def run_steps(steps: list[Step], echo: Callable[[str], None] = print) -> list[Outcome]:
    """Each step in order, timed; a failed step is reported and the next ones still run."""
    outcomes = []
    for step in steps:
        start = time.perf_counter()
        try:
            detail, passed = step.run(), True
        except Exception as error:
            detail, passed = f"{type(error).__name__}: {error}", False
        outcome = Outcome(step.name, passed, time.perf_counter() - start, detail)
        echo(f"{'PASS' if passed else 'FAIL'}  {outcome.seconds:6.1f}s  {step.name}: {detail}")
        outcomes.append(outcome)
    return outcomes


def reported_cost(since: dt.datetime) -> str:
    """What Modal's billing report says the check's apps cost (it reports whole hours, so it may lag)."""
    try:
        import modal

        rows = modal.billing.workspace_billing_report(start=since, resolution="h")
    except Exception as error:
        return f"not available ({type(error).__name__}: {error}); see `modal billing report`"
    costs = [row for row in rows if CHECK_APP in str(getattr(row, "description", ""))]
    if not costs:
        return "not reported yet (Modal bills whole hours): `modal billing report --for today` shows it later"
    return f"${sum(float(row.cost) for row in costs):.4f} for apps {CHECK_APP}*"


def main(echo: Callable[[str], None] = print) -> int:
    require_credentials()
    root = package_root()
    since = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    plan = CheckPlan(root=root, stamp=time.strftime("%Y-%m-%d_%H-%M-%S"))
    echo(f"stylekit modal check: app {CHECK_APP}, outputs under {root / 'outputs/modal-check' / plan.stamp}")
    outcomes = run_steps(steps(plan), echo)
    echo(f"cost: {reported_cost(since)}")
    failed = [o for o in outcomes if not o.passed]
    echo("all steps passed" if not failed else f"{len(failed)} of {len(outcomes)} steps failed")
    return 1 if failed else 0
