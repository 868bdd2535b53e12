"""``hydra/launcher=modal``: the launcher's config, registered in Hydra's ConfigStore."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from stylekit.remote import ModalSettings

BACKENDS = ("modal", "local")

# Config keys whose values are local files or folders a remote job reads: they are uploaded to the outputs
# volume (once per content) and the job sees the uploaded copy. "key=default": the path read when key is null.
DEFAULT_INPUTS = [
    "data.dataset_dir",
    "data.hf_dataset",  # a local dataset is uploaded; a hub id (no such local path) is left for the job to fetch
    "data.control_dir",
    "data.class_dir",
    "image=data/base_images",
    "mask=data/masks",
    "lora_weights",
]


@dataclass
class ModalLauncherConf(ModalSettings):
    _target_: str = "hydra_plugins.stylekit_launcher.modal_launcher.ModalLauncher"
    # modal: Modal containers. local: the same payload through the same worker, in this process (tests, debugging).
    backend: str = "modal"
    # Print each job's overrides, GPU, volumes and paths, and run nothing (Modal is not contacted).
    dry_run: bool = False
    # Inpaint jobs send their edits to the deployed Inpainter (`stylekit modal deploy`) instead of starting a
    # container each; this launch's gpu/timeout/volumes/secrets apply through with_options.
    use_deployed: bool = False
    # Start the jobs and return; `stylekit modal collect <sweep dir>` copies back the finished ones later.
    detach: bool = False
    inputs: list[str] = field(default_factory=lambda: list(DEFAULT_INPUTS))


# Stored under package ``hydra`` so that choosing the launcher also installs the run-mode callback: Hydra hands
# jobs to a launcher only in multirun mode, and the callback turns a plain run into a one-job multirun. A plain
# dict at the top: a dataclass there would become the type of the whole ``hydra`` node.
ConfigStore.instance().store(
    group="hydra/launcher",
    name="modal",
    node={
        "launcher": ModalLauncherConf,
        "callbacks": {
            "stylekit_modal_run_mode": {
                "_target_": "hydra_plugins.stylekit_launcher._run_mode.RunModeRelaunch"
            }
        },
    },
    package="hydra",
    provider="stylekit",
)
