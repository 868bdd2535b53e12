"""The model-family protocol: everything that differs between FLUX, SDXL and Qwen-Image-Edit lives behind it.

A family is a small dataclass built by Hydra from `conf/model/<name>.yaml` (`_target_`). The rest of stylekit
asks it for hub ids, resolution rules, LoRA targets and loaded diffusers components, and never branches on the
family's name. Adding a base model means one module here and one YAML file.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from stylekit.errors import CudaRequiredError, UsageError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
# Image and text stream projections of MM-DiT joint-attention blocks (FLUX, Qwen-Image).
JOINT_ATTENTION_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a family's weights live."""

    device: str
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_runtime(dtype: str = "auto", device: str | None = None) -> Runtime:
    """bf16 on CUDA, float32 on CPU for `auto`. An explicit bf16/fp16 is honoured on CPU too: slow, but it is how
    tests and smoke runs reach the dtype paths a CUDA run takes."""
    import torch

    device = device or ("cuda" if cuda_available() else "cpu")
    by_name = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # Under several processes accelerate names each rank's CPU "cpu:<index>", which is still the CPU.
    if torch.device(device).type == "cpu":
        if dtype == "auto":
            log.warning(
                "No CUDA device: running on CPU in float32. CPU is for smoke runs on the tiny models."
            )
            return Runtime(device, torch.float32)
        log.warning("Running on CPU in %s (model.dtype=%s): slow; CPU is for smoke runs on the tiny models.",
                    dtype, dtype)  # fmt: skip
    return Runtime(device, by_name[dtype])


_DTYPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """`module.dtype`, looked up once per module. diffusers answers `.dtype` by walking every submodule (~5 us
    each, thousands once a LoRA is attached): milliseconds on every training step. Loaded denoisers are not
    cast afterwards, so the first answer stays right."""
    dtype = _DTYPES.get(module)
    if dtype is None:
        dtype = _DTYPES[module] = module.dtype
    return dtype


def resolve_source(source: str) -> str:
    """A hub id or local folder as given; `tiny:<name>` becomes the locally built tiny model's folder."""
    if source.startswith(TINY_PREFIX):
        from stylekit.models.tiny import tiny_path

        return str(tiny_path(source[len(TINY_PREFIX) :]))
    return source


def prompt_kwargs(prompt: str | dict[str, Any], device: Any) -> dict[str, Any]:
    """Pipeline keyword arguments for a prompt given as text or as tensors from `sampling_inputs`."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in prompt.items()}


def check_hub_access(source: str, revision: str | None = None) -> None:
    """A local folder, a cached snapshot or a reachable hub repo passes; anything else is the user's one line
    naming the model id and what to do (gated licence, HF_TOKEN, HF_HUB_OFFLINE)."""
    from pathlib import Path

    if Path(source).is_dir():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "model_index.json", revision=revision), str):
        return
    page = f"https://huggingface.co/{source}"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{source} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: unset "
            f"HF_HUB_OFFLINE to download it (gated models: accept the licence at {page} and set HF_TOKEN), or "
            "point the model at a local folder"
        )
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(source)
    except GatedRepoError:
        raise UsageError(
            f"{source} is gated: accept its licence at {page} with your account, then `hf auth login` or "
            "set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise UsageError(
            f"{source} was not found on the Hugging Face hub: check the model id (private repos need HF_TOKEN)"
        ) from None
    except Exception as error:  # no network, proxy, hub outage: huggingface_hub raises many kinds
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"cannot reach the Hugging Face hub to fetch {source} ({first}): check the network, or download it "
            "where there is one and set HF_HUB_OFFLINE=1"
        ) from None


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


@dataclass
class ModelFamily:
    """Base of every family. Subclasses set the class-level facts and, where needed, override the hooks."""

    # Facts about the architecture, not settings.
    family: ClassVar[str]
    resolution_multiple: ClassVar[int]
    denoiser_name: ClassVar[str]  # the pipeline component LoRAs attach to
    train_pipeline_class: ClassVar[str]
    inpaint_pipeline_classes: ClassVar[dict[str, str]]  # model.pipeline value -> diffusers class name
    default_lora_targets: ClassVar[tuple[str, ...]]
    # Key prefix of the kohya/ComfyUI-format LoRA copy (trainer.lora_format=comfyui).
    comfyui_prefix: ClassVar[str] = "lora_unet_"
    # Whether training samples need a control (source) image, as edit models do.
    needs_control: ClassVar[bool] = False
    # Pixel grid of training buckets and tiles when it is coarser than what the pipelines accept
    # (resolution_multiple, which inpainting crops use); None: resolution_multiple.
    train_multiple: ClassVar[int | None] = None
    # trainer.gradient_checkpointing=auto: on where a real model at its native resolution needs it to fit.
    gradient_checkpointing_default: ClassVar[bool] = False
    # Families whose published weights overflow in float16 (black or NaN images): model.dtype=fp16 warns.
    fp16_overflows: ClassVar[bool] = False
    # Whether some LoRA weights get no gradient in a training step. DDP then has to search the autograd graph
    # for them on every step (find_unused_parameters), which costs time, so only families that need it say so.
    ddp_find_unused_parameters: ClassVar[bool] = False

    pretrained: str
    inpaint_pretrained: str | None = None
    pipeline: str = ""
    revision: str | None = None
    variant: str | None = None
    dtype: str = "auto"
    quantize: str = "none"
    offload: str = "none"
    # None: CUDA when there is one. "cpu" forces the CPU, which a real (non-tiny) model needs to be told.
    device: str | None = None
    resolution: int = 1024
    native_area: int = 1024 * 1024
    lora_targets: list[str] | None = None
    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pipeline:
            self.pipeline = next(iter(self.inpaint_pipeline_classes))
        # Values are checked by stylekit.schema (model.pipeline among inpaint_pipeline_classes, the dtype,
        # resolution a multiple of resolution_multiple) before a family is built from a config.

    # ---- what to load -------------------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.pretrained.startswith(TINY_PREFIX)

    def source(self, task: str = "train") -> str:
        """The hub id or folder for `task` ("train" or "inpaint"), tiny models materialized."""
        return resolve_source(self.inpaint_id() if task == "inpaint" else self.pretrained)

    def inpaint_id(self) -> str:
        """The hub id (or tiny:/folder name) of the weights edits run on, as configured."""
        return self.inpaint_pretrained or self.pretrained

    def pipeline_class_name(self, task: str = "train") -> str:
        return self.train_pipeline_class if task == "train" else self.inpaint_pipeline_classes[self.pipeline]

    def inference_defaults(self) -> dict[str, Any]:
        """The model authors' published sampling settings for the chosen pipeline (yaml values win)."""
        return dict(self.inference)

    def native_size(self, crop_w: int, crop_h: int) -> tuple[int, int]:
        """The (width, height) a crop is edited at: its aspect at about `native_area` pixels, in the family's
        multiples. Families whose pipelines recompute the size themselves return a size their rule keeps."""
        from stylekit.inpaint.masks import native_size

        return native_size(crop_w, crop_h, self.native_area, self.resolution_multiple)

    def masked_pixels_reach_model(self, pipe: DiffusionPipeline, strength: float) -> bool:
        """Whether the pipeline sees the pixels under the mask (so a pre step on them matters). Pipelines that
        start the masked region from pure noise at strength 1 and get no other view of it override this."""
        return True

    def call_context(self, pipe: DiffusionPipeline) -> AbstractContextManager[None]:
        """Wraps every pipeline call; families whose pipelines need run-time adjustments override it."""
        return nullcontext()

    @property
    def bucket_multiple(self) -> int:
        """The pixel multiple of training buckets and tiles."""
        return self.train_multiple or self.resolution_multiple

    def control_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (w, h) a training sample of output `size` has its control image encoded at: the size the
        pipeline conditions on at inference. The output size unless the pipeline resizes its condition image."""
        return size

    @property
    def lora_target_modules(self) -> list[str]:
        return list(self.lora_targets) if self.lora_targets else list(self.default_lora_targets)

    # ---- loading ------------------------------------------------------------------------------------------
    def runtime(self, device: str | None = None) -> Runtime:
        runtime = resolve_runtime(self.dtype, device or self.device)
        if self.fp16_overflows and self.dtype == "fp16":
            log.warning(
                "model.dtype=fp16 with %s: its activations overflow float16 and give black or NaN images; "
                "use model.dtype=bf16 (or auto)", self.family,
            )  # fmt: skip
        return runtime

    def check_runnable(self, task: str = "train") -> None:
        """Stop in one line, before any download, when the model cannot run here or cannot be fetched."""
        if self.is_tiny:
            return
        if self.device is None and not cuda_available():
            raise UsageError(
                f"model={self.family} ({self.source(task)}) needs a CUDA GPU and this machine has none: use "
                f"model=tiny_{self.family} for a smoke run, a machine with a GPU, or hydra/launcher=modal "
                "(model.device=cpu forces the CPU: hours per step)"
            )
        check_hub_access(self.source(task), self.revision)

    def _from_pretrained_kwargs(self, runtime: Runtime) -> dict[str, Any]:
        # `dtype`, not the deprecated `torch_dtype` (a FutureWarning on every load in diffusers >= 0.36).
        kwargs: dict[str, Any] = {"dtype": runtime.dtype}
        if self.revision:
            kwargs["revision"] = self.revision
        if self.variant:
            kwargs["variant"] = self.variant
        return kwargs

    def quantization_config(self, runtime: Runtime) -> Any:
        """diffusers' bitsandbytes config for the denoiser, or None. CUDA only: diffusers refuses without it."""
        if self.quantize == "none":
            return None
        if not runtime.is_cuda:
            raise CudaRequiredError(
                f"model.quantize={self.quantize} needs a CUDA GPU (bitsandbytes quantization); "
                "use model.quantize=none on this machine"
            )
        from diffusers import PipelineQuantizationConfig

        if self.quantize == "nf4":
            backend = "bitsandbytes_4bit"
            kwargs = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": runtime.dtype,
                "bnb_4bit_use_double_quant": True,
            }
        else:
            backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
        return PipelineQuantizationConfig(
            quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=[self.denoiser_name]
        )

    def load_pipeline(self, task: str = "train", runtime: Runtime | None = None) -> DiffusionPipeline:
        """The family's real diffusers pipeline for `task`, from a hub id or a local folder."""
        self.check_runnable(task)
        runtime = runtime or self.runtime()
        cls = _diffusers_class(self.pipeline_class_name(task))
        source = self.source(task)
        kwargs = self._from_pretrained_kwargs(runtime)
        quantization = self.quantization_config(runtime)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        log.info("Loading %s from %s (%s, %s)", cls.__name__, source, runtime.device, runtime.dtype)
        with self._load_errors(source):
            pipe = cls.from_pretrained(source, **kwargs)
        self.place(pipe, runtime)
        return pipe

    @contextmanager
    def _load_errors(self, source: str) -> Iterator[None]:
        """A missing file, a half-downloaded snapshot or a refused download as the user's one line."""
        try:
            yield
        except OSError as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(
                f"could not load {self.family} weights from {source!r}: {first} (check the model id; gated "
                f"models: accept the licence at https://huggingface.co/{source} and set HF_TOKEN; offline: "
                "HF_HUB_OFFLINE=1 needs a cached copy)"
            ) from None

    # ---- training: the loop in stylekit/train asks for these ------------------------------------------------
    def load_encoders(self, runtime: Runtime | None = None, **components: Any) -> DiffusionPipeline:
        """The training pipeline without its denoiser: VAE, tokenizers and text encoders, to fill the cache.
        `components` are already loaded ones to use instead of the checkpoint's (a family's fp32 VAE)."""
        runtime = runtime or self.runtime()
        cls = _diffusers_class(self.pipeline_class_name("train"))
        source = self.source("train")
        with self._load_errors(source):
            pipe = cls.from_pretrained(
                source, **{self.denoiser_name: None}, **components, **self._from_pretrained_kwargs(runtime)
            )
        return pipe.to(runtime.device)

    def load_denoiser(self, runtime: Runtime | None = None) -> torch.nn.Module:
        """The network LoRAs attach to, quantized when model.quantize asks (CUDA only)."""
        import importlib

        from diffusers import DiffusionPipeline

        runtime = runtime or self.runtime()
        source = self.source("train")
        with self._load_errors(source):
            library, class_name = DiffusionPipeline.load_config(source, revision=self.revision)[
                self.denoiser_name
            ]
        cls = getattr(importlib.import_module(library), class_name)
        kwargs = self._from_pretrained_kwargs(runtime) | {"subfolder": self.denoiser_name}
        quantization = self.quantization_config(runtime)
        if quantization is not None:
            from diffusers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization.quant_kwargs)
        with self._load_errors(source):
            denoiser = cls.from_pretrained(source, **kwargs)
        return denoiser if quantization is not None else denoiser.to(runtime.device)

    def sample_timesteps(self, n: int, generator: torch.Generator, trainer: Any) -> torch.Tensor:
        """Noise levels in (0, 1) for a training batch: rectified-flow sampling (FLUX, Qwen-Image); families
        trained on another schedule override it."""
        from stylekit.models import flow

        return flow.sample_sigmas(
            n,
            generator,
            trainer.timestep_sampling,
            float(trainer.shift),
            logit_mean=float(trainer.get("logit_mean", 0.0)),
            logit_std=float(trainer.get("logit_std", 1.0)),
        )

    def pipeline_with(
        self, denoiser: torch.nn.Module, encoders: DiffusionPipeline, text_encoders: bool = True
    ) -> DiffusionPipeline:
        """A full training-class pipeline from already loaded parts (validation samples, LoRA checks).

        `text_encoders=False` leaves them out: the pipeline then samples from prompt tensors encoded beforehand
        (`sampling_inputs`), and the text encoders (T5-XXL, Qwen2.5-VL: 9-16 GB) never come back onto the GPU.
        """
        cls = _diffusers_class(self.pipeline_class_name("train"))
        components = {**encoders.components, self.denoiser_name: denoiser}
        if not text_encoders:
            components |= {name: None for name in components if name.startswith("text_encoder")}
        return cls(**components)

    def sampling_inputs(self, pipe: DiffusionPipeline, prompt: str, control: Any = None) -> dict[str, Any]:
        """The prompt tensors `sample` passes to the pipeline instead of the prompt text (negative ones too
        where the family samples with CFG), encoded once with the text encoders of `pipe`."""
        raise NotImplementedError(f"{type(self).__name__} does not encode sampling prompts")

    def place(self, pipe: DiffusionPipeline, runtime: Runtime) -> None:
        """Move the pipeline onto the device, or let diffusers offload it (CUDA only)."""
        if self.offload != "none" and not runtime.is_cuda:
            log.warning("model.offload=%s needs CUDA; ignored on CPU.", self.offload)
        elif self.offload == "model":
            pipe.enable_model_cpu_offload()
            return
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload()
            return
        # Quantized modules too: diffusers moves bitsandbytes weights itself and leaves them where they belong.
        pipe.to(runtime.device)

    def describe(self) -> dict[str, Any]:
        """What identifies the base model, for LoRA metadata, PNG text and logs."""
        return {
            "family": self.family,
            "pretrained": self.pretrained,
            "inpaint_pretrained": self.inpaint_id(),
            "pipeline": self.pipeline,
        }
