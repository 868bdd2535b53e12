"""The model-family protocol: everything that differs between FLUX, SDXL and Qwen-Image-Edit lives behind it.

A family is a small dataclass built by Hydra from `conf/model/<name>.yaml` (`_target_`). The rest of stylekit
asks it for hub ids, resolution rules, LoRA targets and loaded diffusers components, and never branches on the
family's name. Adding a base model means one module here and one YAML file.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import AbstractContextManager, nullcontext
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
DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZE = ("none", "nf4", "int8")
OFFLOAD = ("none", "model", "sequential")


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

    if dtype not in DTYPES:
        raise UsageError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
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
    resolution: int = 1024
    native_area: int = 1024 * 1024
    lora_targets: list[str] | None = None
    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pipeline:
            self.pipeline = next(iter(self.inpaint_pipeline_classes))
        self._check_choice("pipeline", self.pipeline, tuple(self.inpaint_pipeline_classes))
        self._check_choice("quantize", self.quantize, QUANTIZE)
        self._check_choice("offload", self.offload, OFFLOAD)
        self._check_choice("dtype", self.dtype, DTYPES)
        if self.resolution % self.resolution_multiple:
            raise UsageError(
                f"model.resolution={self.resolution} must be a multiple of {self.resolution_multiple} "
                f"for {self.family}"
            )

    @staticmethod
    def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise UsageError(f"model.{key}={value!r} is not one of: {', '.join(allowed)}")

    # ---- what to load -------------------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.pretrained.startswith(TINY_PREFIX)

    def source(self, task: str = "train") -> str:
        """The hub id or folder for `task` ("train" or "inpaint"), tiny models materialized."""
        chosen = self.inpaint_pretrained if task == "inpaint" and self.inpaint_pretrained else self.pretrained
        return resolve_source(chosen)

    def pipeline_class_name(self, task: str = "train") -> str:
        return self.train_pipeline_class if task == "train" else self.inpaint_pipeline_classes[self.pipeline]

    def inference_defaults(self) -> dict[str, Any]:
        """The model authors' published sampling settings for the chosen pipeline (yaml values win)."""
        return dict(self.inference)

    def call_context(self, pipe: DiffusionPipeline) -> AbstractContextManager[None]:
        """Wraps every pipeline call; families whose pipelines need run-time adjustments override it."""
        return nullcontext()

    @property
    def lora_target_modules(self) -> list[str]:
        return list(self.lora_targets) if self.lora_targets else list(self.default_lora_targets)

    # ---- loading ------------------------------------------------------------------------------------------
    def runtime(self, device: str | None = None) -> Runtime:
        return resolve_runtime(self.dtype, device)

    def _from_pretrained_kwargs(self, runtime: Runtime) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"torch_dtype": runtime.dtype}
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
        runtime = runtime or self.runtime()
        cls = _diffusers_class(self.pipeline_class_name(task))
        source = self.source(task)
        kwargs = self._from_pretrained_kwargs(runtime)
        quantization = self.quantization_config(runtime)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        log.info("Loading %s from %s (%s, %s)", cls.__name__, source, runtime.device, runtime.dtype)
        try:
            pipe = cls.from_pretrained(source, **kwargs)
        except OSError as error:
            raise UsageError(
                f"could not load {self.family} weights from {source!r}: {str(error).splitlines()[0]} "
                "(check the model id, `huggingface-cli login` for gated models, or HF_HUB_OFFLINE)"
            ) from error
        self.place(pipe, runtime)
        return pipe

    # ---- training: the loop in stylekit/train asks for these ------------------------------------------------
    def load_encoders(self, runtime: Runtime | None = None) -> DiffusionPipeline:
        """The training pipeline without its denoiser: VAE, tokenizers and text encoders, to fill the cache."""
        runtime = runtime or self.runtime()
        cls = _diffusers_class(self.pipeline_class_name("train"))
        source = self.source("train")
        pipe = cls.from_pretrained(
            source, **{self.denoiser_name: None}, **self._from_pretrained_kwargs(runtime)
        )
        return pipe.to(runtime.device)

    def load_denoiser(self, runtime: Runtime | None = None) -> torch.nn.Module:
        """The network LoRAs attach to, quantized when model.quantize asks (CUDA only)."""
        import importlib

        from diffusers import DiffusionPipeline

        runtime = runtime or self.runtime()
        source = self.source("train")
        library, class_name = DiffusionPipeline.load_config(source, revision=self.revision)[
            self.denoiser_name
        ]
        cls = getattr(importlib.import_module(library), class_name)
        kwargs = self._from_pretrained_kwargs(runtime) | {"subfolder": self.denoiser_name}
        quantization = self.quantization_config(runtime)
        if quantization is not None:
            from diffusers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization.quant_kwargs)
        denoiser = cls.from_pretrained(source, **kwargs)
        return denoiser if quantization is not None else denoiser.to(runtime.device)

    def sample_timesteps(self, n: int, generator: torch.Generator, trainer: Any) -> torch.Tensor:
        """Noise levels in (0, 1) for a training batch: rectified-flow sampling (FLUX, Qwen-Image); families
        trained on another schedule override it."""
        from stylekit.models import flow

        return flow.sample_sigmas(n, generator, trainer.timestep_sampling, trainer.shift)

    def pipeline_with(self, denoiser: torch.nn.Module, encoders: DiffusionPipeline) -> DiffusionPipeline:
        """A full training-class pipeline from already loaded parts (validation samples, LoRA checks)."""
        cls = _diffusers_class(self.pipeline_class_name("train"))
        return cls(**{**encoders.components, self.denoiser_name: denoiser})

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
            "inpaint_pretrained": self.inpaint_pretrained or self.pretrained,
            "pipeline": self.pipeline,
        }
