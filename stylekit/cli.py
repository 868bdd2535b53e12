"""`stylekit`: a front door to the same Hydra apps as scripts/train.py and scripts/inpaint.py.

    stylekit finetune model=flux data=tile trainer.max_steps=2000
    stylekit inpaint model=qwen_edit prompt="floral dress" image=photo.jpg mask=mask.png
    stylekit edit --original_image photo.jpg --mask_image mask.png --prompt "floral dress"
    stylekit doctor
    stylekit modal check | deploy | collect SWEEP_DIR | clean --older-than 30

Everything after the command that looks like `key=value` is a Hydra override, exactly as for the scripts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stylekit.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Fine-tune LoRAs on your photos and edit images only where a mask says.",
)

# The options users reach for first, shown in --help with their defaults.
FINETUNE_HELP = """Train a LoRA. Overrides are Hydra's key=value; most used (defaults):

\b
  model=flux        flux|sdxl|qwen_edit|tiny_flux|tiny_sdxl|tiny_qwen_edit
  data=resize       resize (aspect buckets) | tile (large textures)
  data.dataset_dir=data/input_images   data.trigger=""
  data.resolution=1024 (model's)       data.tile_size=<resolution>
  lora.rank=16   lora.alpha=16   optimizer.lr=1e-4   trainer.max_steps=1000
  trainer.resume=auto   logger=wandb (offline w/o credentials) | none
  -m with comma lists sweeps: lora.rank=4,8,16 optimizer.lr=1e-4,3e-4
"""

INPAINT_HELP = """Edit the masked region of images. Hydra key=value overrides; most used:

\b
  model=qwen_edit   qwen_edit|qwen_edit_v1|flux|sdxl|sdxl_inpainting|tiny_*
  prompt=...   image=PATH   mask=PATH   (files or folders)
  lora_weights=[path:1.0,...]   num_inference_steps=(model's)   seed=0
  num_images=1   inpaint/preprocess=none|grayscale   inpaint.context=0.5
  inpaint.mask.grow=0   inpaint.mask.feather=8   save_comparison=false
  output_dir=(run dir)   skip_existing=false
"""

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
# Denoising steps of `stylekit edit`, as its specification gives them (inpaint uses the model's own default).
EDIT_STEPS = 50


def _config_file_overrides(path: Path) -> list[str]:
    """A YAML file of settings as overrides: `model: flux` picks a group option, nested keys set values."""
    from omegaconf import OmegaConf

    from stylekit.app import conf_dir

    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:
        raise UsageError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of settings at the top level")
    groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    overrides: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            overrides.append(f"{prefix}={_override_value(value)}")

    for key, value in data.items():
        if key in groups and isinstance(value, str):
            overrides.append(f"{key}={value}")
        else:
            walk(str(key), value)
    return overrides


def _override_value(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value) if any(c in value for c in " ,=[]{}()'\"") else value
    return str(value)


def _run(task: str, overrides: list[str]) -> None:
    from rich.console import Console

    from stylekit.app import LAST_RUNS, hydra_app

    console = Console(stderr=True, soft_wrap=True)
    sys.argv = [f"stylekit {task}", *overrides]
    try:
        hydra_app(task)()
    except UsageError as error:  # raised while building overrides, before Hydra runs
        console.print(f"error: {error}", markup=False)
        raise typer.Exit(2) from None
    for run in LAST_RUNS:
        _summary(console, run)


def _summary(console: Any, run: dict) -> None:
    result, where = run["result"], run.get("output_dir")
    if run["task"] == "train":
        lora = Path(where or ".") / "lora" / "pytorch_lora_weights.safetensors"
        console.print(f"[green]done[/] in {run['seconds']:.0f}s: LoRA {lora}, samples in {Path(where or '.') / 'samples'}"
                      f", validation loss {result:.4f}")  # fmt: skip
    else:
        written = (result or {}).get("outputs", []) if isinstance(result, dict) else []
        console.print(f"[green]done[/] in {run['seconds']:.0f}s: {len(written)} image(s) written to {where}")
        for path in written[:10]:
            console.print(f"  {path}", markup=False)


ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML file of settings, applied first.")]
MultirunOption = Annotated[bool, typer.Option("--multirun", "-m", help="Sweep comma-separated values.")]


def _run_with_options(task: str, ctx: typer.Context, config: Path | None, multirun: bool) -> None:
    try:
        overrides = (_config_file_overrides(config) if config else []) + list(ctx.args)
    except UsageError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    _run(task, (["--multirun"] if multirun else []) + overrides)


@app.command(context_settings=CONTEXT, help=FINETUNE_HELP)
def finetune(ctx: typer.Context, config: ConfigOption = None, multirun: MultirunOption = False) -> None:
    _run_with_options("train", ctx, config, multirun)


@app.command(context_settings=CONTEXT, help=INPAINT_HELP)
def inpaint(ctx: typer.Context, config: ConfigOption = None, multirun: MultirunOption = False) -> None:
    _run_with_options("inpaint", ctx, config, multirun)


@app.command(context_settings=CONTEXT)
def edit(
    ctx: typer.Context,
    original_image: Annotated[
        Path, typer.Option("--original_image", "--original-image", help="The photo to edit.")
    ],
    mask_image: Annotated[
        Path,
        typer.Option("--mask_image", "--mask-image", help="White (or opaque alpha) where it may change."),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="What the masked region should become.")],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "--output_dir", help="Where <name>_edited.png goes; default: beside the original."
        ),
    ] = None,
) -> None:
    """Qwen-Image-Edit an image, held to the mask, in 50 steps: writes <original_name>_edited.png.

    Extra key=value Hydra overrides are forwarded (e.g. model=tiny_qwen_edit num_inference_steps=2).
    """
    for label, path in (("--original_image", original_image), ("--mask_image", mask_image)):
        if not path.is_file():
            typer.echo(f"error: {label} {path}: no such file", err=True)
            raise typer.Exit(2)
    destination = output_dir or original_image.resolve().parent
    extra = list(ctx.args)
    model = [] if any(arg.startswith("model=") for arg in extra) else ["model=qwen_edit"]
    # The edit command's specification: 50 denoising steps unless the user asks for another number.
    steps = (
        []
        if any(arg.startswith("num_inference_steps=") for arg in extra)
        else [f"num_inference_steps={EDIT_STEPS}"]
    )
    overrides = [
        *model,
        *steps,
        f"image={_override_value(str(original_image.resolve()))}",
        f"mask={_override_value(str(mask_image.resolve()))}",
        f"prompt={_override_value(prompt)}",
        f"output_dir={_override_value(str(Path(destination).resolve()))}",
        *extra,
    ]
    _run("inpaint", overrides)


@app.command()
def doctor() -> None:
    """Check this machine: Python, torch, CUDA and free VRAM, which families fit, credentials, HF cache."""
    from stylekit.doctor import report

    report()


modal_app = typer.Typer(
    no_args_is_help=True,
    help="Modal: check the account end to end, deploy the Inpainter, collect detached sweeps, clean old runs.",
)
app.add_typer(modal_app, name="modal")


def _modal_command(command: Any, *args: Any) -> Any:
    """Run a modal sub-command; usage problems (no credentials, a bad path) are one line and exit code 2."""
    try:
        return command(*args)
    except UsageError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@modal_app.command("check")
def modal_check() -> None:
    """Deploy, edit with a tiny model and a LoRA from the volume, run a 2-job tiny sweep, probe a GPU; each step
    prints pass/fail and its time, then the cost Modal reports. A few minutes, a few cents."""
    from stylekit.remote.check import main as check

    raise typer.Exit(_modal_command(check))


@modal_app.command("deploy")
def modal_deploy(
    gpu: Annotated[str | None, typer.Option(help="GPU type, or a fallback list 'H100,A100-80GB'.")] = None,
    app_name: Annotated[str | None, typer.Option("--app", help="App name (default stylekit).")] = None,
) -> None:
    """Deploy the warm Inpainter (modal deploy -m stylekit.remote.app)."""
    from stylekit.remote.commands import deploy

    raise typer.Exit(_modal_command(deploy, gpu, app_name))


@modal_app.command("collect")
def modal_collect(
    sweep_dir: Annotated[
        Path, typer.Argument(help="The sweep dir a Modal launch wrote (.stylekit-modal.json).")
    ],
) -> None:
    """Copy back the finished jobs of a detached or interrupted sweep; list the ones still running."""
    from stylekit.remote.commands import collect

    counts = _modal_command(collect, sweep_dir)
    typer.echo(", ".join(f"{n} {state}" for state, n in counts.items()))


@modal_app.command("clean")
def modal_clean(
    older_than: Annotated[float, typer.Option("--older-than", help="Days since last change.")] = 30,
    yes: Annotated[bool, typer.Option("--yes", help="Remove; without it, only list.")] = False,
    volume: Annotated[str | None, typer.Option(help="Outputs volume (default stylekit-outputs).")] = None,
) -> None:
    """List (with --yes remove) runs, checkpoints and uploaded .inputs on the outputs volume older than N days."""
    from stylekit.remote.commands import clean

    _modal_command(clean, older_than, yes, volume)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
