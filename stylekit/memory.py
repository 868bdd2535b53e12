"""GPU memory per family, computed from the real architectures (stylekit.models.published), not guessed.

Exact: the bytes of every weight tensor in the chosen dtype and quantization (bitsandbytes' own storage: packed
4-bit weights, per-block absmax, double-quantized statistics, int8 row scales; the layers it leaves alone), of the
LoRA weights and their gradients (trained in fp32), and of the optimizer's state tensors, as each optimizer
allocates them. Estimated, and labelled so everywhere: activations and the CUDA runtime's own share, which
depend on kernels, sequence lengths and the allocator (`python -m bench.gpu` measures real peaks).

`python -m stylekit.memory` prints the README's hardware table.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version as _dist_version
from typing import Any

from stylekit.errors import UsageError
from stylekit.models import published
from stylekit.schema import Model, Optimizer, choices

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTIZE = choices(Model, "quantize")
OPTIMIZERS = choices(Optimizer, "name")
MODES = ("train", "inpaint", "inpaint_offload")

# bitsandbytes' constants (bitsandbytes.functional.quantize_4bit, nn.Params4bit, optim.Optimizer2State).
NF4_BLOCK = 64  # weights per fp32 absmax
NESTED_BLOCK = 256  # absmax values per fp32 second-level absmax under double quantization
NF4_CODE_BYTES = 16 * 4  # each layer's own 16-value NF4 code table (fp32)
ADAM8BIT_BLOCK = 256
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit state
BNB_SHARED_QMAP_BYTES = 256 * 4  # one dynamic map per device, shared by all layers / parameters

# The family defaults stylekit trains and edits with (conf/model, conf/lora, conf/trainer).
DEFAULT_RANK = 16
DEFAULT_RESOLUTION = 1024
DENOISER = {family: components[0] for family, components in published.COMPONENTS.items()}
# The component the edit pipeline's denoiser is published as (FLUX edits with FLUX.1-Fill-dev by default).
INPAINT_DENOISER = {"flux": "transformer_fill", "sdxl": "unet", "qwen_edit": "transformer"}


# ---------------------------------------------------------------------------------------------------------
# Census: every parameter of a published component, from its meta-device build
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Census:
    """Every parameter of one component: (name, numel, kind) with kind "linear_weight", "linear_bias" or "other";
    linear weights also keep (in_features, out_features). `keep_fp32` are the class's keep-in-fp32 rules."""

    params: tuple[tuple[str, int, str], ...]
    linears: tuple[tuple[str, int, int], ...]
    keep_fp32_fp16: tuple[str, ...] = ()  # transformers: only when loading in fp16 (regex search)
    keep_fp32_always: tuple[str, ...] = ()  # diffusers: any dtype (a dotted name component); never quantized

    @property
    def numel(self) -> int:
        return sum(n for _, n, _ in self.params)


def _census_key(family: str, component: str) -> str:
    digest = hashlib.sha256(published._read(family, component).encode())
    for part in (family, component, _dist_version("diffusers"), _dist_version("transformers")):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


@cache
def census(family: str, component: str) -> Census:
    """The component's parameters, counted once from its meta build and cached on disk (building the real
    architectures needs diffusers and transformers, seconds of imports that `stylekit doctor` should pay once)."""
    from stylekit.paths import cache_root

    path = cache_root() / "census" / f"{family}-{component}-{_census_key(family, component)}.json"
    try:
        return _census_from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        pass
    result = _count(family, component)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(result)}")
        tmp.write_text(json.dumps(_census_to_json(result)))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the recount next time
    return result


def _count(family: str, component: str) -> Census:
    return census_of(published.build_on_meta(family, component))


def census_of(model: Any) -> Census:
    """The census of a built model (on any device, the meta device included)."""
    import torch

    linear_params: dict[str, str] = {}
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
            linear_params[f"{name}.weight" if name else "weight"] = "linear_weight"
            if module.bias is not None:
                linear_params[f"{name}.bias" if name else "bias"] = "linear_bias"
    params = tuple(
        (name, p.numel(), linear_params.get(name, "other")) for name, p in model.named_parameters()
    )
    fp16_only = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if _is_transformers(model) else ()
    always = (
        tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if _is_transformers(model) else ()
    )
    if not _is_transformers(model):
        always = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    return Census(params, tuple(linears), tuple(sorted(fp16_only)), tuple(sorted(always)))


def _is_transformers(model: Any) -> bool:
    return type(model).__module__.startswith("transformers")


def _census_to_json(c: Census) -> dict[str, Any]:
    return {
        "params": c.params,
        "linears": c.linears,
        "keep_fp32_fp16": c.keep_fp32_fp16,
        "keep_fp32_always": c.keep_fp32_always,
    }


def _census_from_json(data: dict[str, Any]) -> Census:
    return Census(
        tuple(tuple(p) for p in data["params"]),
        tuple(tuple(x) for x in data["linears"]),
        tuple(data["keep_fp32_fp16"]),
        tuple(data["keep_fp32_always"]),
    )


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def _kept_fp32(name: str, c: Census, dtype: str) -> bool:
    if any(pattern in name.split(".") for pattern in c.keep_fp32_always):
        return True
    # transformers matches its patterns anywhere in the name (core_model_loading's dtype plan), fp16 only.
    return dtype == "fp16" and any(re.search(pattern, name) for pattern in c.keep_fp32_fp16)


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Storage of one weight quantized by bitsandbytes to NF4 (Linear4bit): two weights a byte, an absmax per
    64-weight block (fp32, or uint8 plus an fp32 absmax per 256 of them and an fp32 offset when
    double-quantized), and the layer's own 16-value code table. The nested quantization's 256-value map is
    shared by all layers (BNB_SHARED_QMAP_BYTES, counted once per model)."""
    blocks = -(-numel // NF4_BLOCK)
    packed = (numel + 1) // 2
    # Double quantization: uint8 absmax, an fp32 absmax per 256 of them and one fp32 offset; else fp32 absmax.
    statistics = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 if double_quant else 4 * blocks
    return packed + statistics + NF4_CODE_BYTES


def int8_bytes(in_features: int, out_features: int) -> int:
    """LLM.int8 (Linear8bitLt): one byte a weight plus an fp32 scale per output row (SCB)."""
    return in_features * out_features + 4 * out_features


def weight_bytes(c: Census, dtype: str = "bf16", quantize: str = "none") -> int:
    """Bytes of every parameter of the component as loaded with `torch_dtype=dtype` and, for the denoiser,
    diffusers' bitsandbytes config: nn.Linear weights quantized (biases stay in `dtype`), every other layer
    (convolutions, norms, embeddings) and the keep-in-fp32 modules left as they are."""
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"dtype={dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE)}")
    shapes = {f"{name}.weight" if name else "weight": (i, o) for name, i, o in c.linears}
    total = 0
    quantized_any = False
    for name, numel, kind in c.params:
        if _kept_fp32(name, c, dtype):
            total += 4 * numel
        elif kind == "linear_weight" and quantize == "nf4":
            total += nf4_bytes(numel)
            quantized_any = True
        elif kind == "linear_weight" and quantize == "int8":
            total += int8_bytes(*shapes[name])
        else:
            total += DTYPE_BYTES[dtype] * numel
    return total + (BNB_SHARED_QMAP_BYTES if quantized_any else 0)


# ---------------------------------------------------------------------------------------------------------
# LoRA and optimizer state
# ---------------------------------------------------------------------------------------------------------


def lora_targets(c: Census, targets: tuple[str, ...] | list[str]) -> list[tuple[str, int, int]]:
    """The Linear layers a peft LoraConfig(target_modules=targets) wraps: names equal to or ending in
    "." + a target (peft's suffix rule)."""
    return [
        (name, i, o) for name, i, o in c.linears if any(name == t or name.endswith("." + t) for t in targets)
    ]


def lora_tensor_shapes(modules: list[tuple[str, int, int]], rank: int) -> list[tuple[int, int]]:
    """(rows, cols) of every LoRA tensor: lora_A (rank x in) and lora_B (out x rank) per wrapped Linear."""
    return [shape for _, i, o in modules for shape in ((rank, i), (o, rank))]


def lora_parameters(modules: list[tuple[str, int, int]], rank: int) -> int:
    return sum(rows * cols for rows, cols in lora_tensor_shapes(modules, rank))


def optimizer_state_bytes(shapes: list[tuple[int, int]], optimizer: str) -> int:
    """Bytes of the state `optimizer` allocates on the device for fp32 LoRA tensors of these shapes, with the
    hyper-parameters stylekit passes (stylekit.train.optim). The LoRA B matrices start at zero (peft's init)."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    total = 0
    for index, (rows, cols) in enumerate(shapes):
        numel = rows * cols
        is_lora_b = index % 2 == 1
        if optimizer == "adamw":
            # exp_avg + exp_avg_sq; the step counter is a CPU scalar (not fused, not capturable).
            total += 2 * 4 * numel
        elif optimizer == "adamw8bit":
            if numel < ADAM8BIT_MIN_SIZE:
                total += 2 * 4 * numel
            else:
                blocks = -(-numel // ADAM8BIT_BLOCK)
                total += 2 * numel + 2 * 4 * blocks  # two uint8 states + two fp32 absmax per 256 values
        elif optimizer == "prodigy":
            # s, exp_avg, exp_avg_sq, and p0: a copy of the starting weights, or one 0-d tensor when they are all
            # zero (the LoRA B matrices).
            total += 3 * 4 * numel + (4 if is_lora_b else 4 * numel)
        else:
            # transformers' Adafactor with beta1=None on 2-D tensors: factored second moment (a row and a
            # column) and the weights' RMS, a 0-d tensor on the device.
            total += 4 * (rows + cols) + 4
    if optimizer == "adamw8bit" and any(r * c >= ADAM8BIT_MIN_SIZE for r, c in shapes):
        total += 2 * BNB_SHARED_QMAP_BYTES  # the signed and unsigned dynamic maps, shared by all parameters
    return total


# ---------------------------------------------------------------------------------------------------------
# Activations: ESTIMATES
# ---------------------------------------------------------------------------------------------------------

# Rough multiples of one block's hidden-state tensor that a transformer block keeps for backward (q/k/v, attention
# output, the 4x MLP in and out, norms and modulations, the LoRA inputs), and that inference keeps alive at once.
# Estimates calibrated on nothing better than reading the blocks: bench/gpu.py measures real peaks.
_TRAIN_BLOCK_MULTIPLE = 40
_INFER_BLOCK_MULTIPLE = 12
# The CUDA context, cuBLAS/cuDNN workspaces and allocator slack a process holds beyond its tensors.
RUNTIME_OVERHEAD_GIB = 1.0


@dataclass(frozen=True)
class Geometry:
    """What activation memory scales with: sequence lengths and widths at a training resolution."""

    levels: tuple[tuple[int, int, int], ...]  # (tokens, width, blocks) per resolution level / stream


def geometry(family: str, resolution: int = DEFAULT_RESOLUTION) -> Geometry:
    """Tokens, widths and block counts from the published configs at `resolution` px (square)."""
    cfg = published.config(family, DENOISER[family])
    if family == "flux":
        image = (resolution // 16) ** 2
        text = 512  # T5 tokens per caption
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return Geometry(((image + text, width, cfg["num_layers"] + cfg["num_single_layers"]),))
    if family == "qwen_edit":
        target = (resolution // 16) ** 2
        control = 1024 * 1024 // 256  # the control image at the pipeline's ~1 MP condition area
        text = 384 * 384 // 28**2 + 128  # the vision tokens of the 384 px VL condition plus the instruction
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return Geometry(((target + control + text, width, cfg["num_layers"]),))
    latent = resolution // 8
    levels = []
    for index, (channels, layers) in enumerate(
        zip(cfg["block_out_channels"], cfg["transformer_layers_per_block"], strict=True)
    ):
        side = latent // 2**index
        # Each level runs its down blocks and one more up block, each a resnet and (from level 1) `layers`
        # transformer layers; the mid block adds the deepest level's once more.
        blocks = (2 * cfg["layers_per_block"] + 1) * (1 + layers)
        levels.append((side * side, channels, blocks))
    return Geometry(tuple(levels))


def activation_bytes(family: str, mode: str, resolution: int = DEFAULT_RESOLUTION) -> int:
    """ESTIMATE of activation memory, batch 1, bf16, gradient checkpointing on for training: each block keeps its
    input for backward and one block at a time holds its internals; inference holds one block's internals.
    Plus the VAE decoding a sample at `resolution` (validation samples and edits)."""
    g = geometry(family, resolution)
    if mode == "train":
        kept = sum(tokens * width * 2 * blocks for tokens, width, blocks in g.levels)
        block = max(tokens * width * 2 * _TRAIN_BLOCK_MULTIPLE for tokens, width, _ in g.levels)
        denoiser = kept + block
    else:
        denoiser = max(tokens * width * 2 * _INFER_BLOCK_MULTIPLE for tokens, width, _ in g.levels)
    vae = published.config(family, "vae")
    first_width = vae.get("block_out_channels", [vae.get("base_dim", 128)])[0]
    decode = resolution * resolution * first_width * 2 * 6  # a few full-resolution feature maps at once
    return max(denoiser, decode)


# ---------------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Peak device memory of one way to run a family, in bytes; `activations` and `runtime` are estimates."""

    family: str
    mode: str
    dtype: str
    quantize: str
    optimizer: str | None
    rank: int | None
    weights: int
    lora: int = 0  # LoRA weights + gradients (fp32)
    optimizer_state: int = 0
    activations: int = 0
    runtime: int = int(RUNTIME_OVERHEAD_GIB * GIB)
    parts: dict[str, int] = field(default_factory=dict)  # weights per component on the device at the peak

    @property
    def exact(self) -> int:
        return self.weights + self.lora + self.optimizer_state

    @property
    def total(self) -> int:
        return self.exact + self.activations + self.runtime


def _component_bytes(family: str, component: str, dtype: str, quantize: str) -> int:
    return weight_bytes(census(family, component), dtype, quantize)


def budget(
    family: str,
    mode: str = "train",
    dtype: str = "bf16",
    quantize: str = "none",
    optimizer: str = "adamw",
    rank: int = DEFAULT_RANK,
    targets: tuple[str, ...] | None = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> Budget:
    """Peak memory of training (`mode="train"`) or editing (`"inpaint"`, or `"inpaint_offload"` for
    model.offload=model) `family` with these settings.

    Training encodes the whole dataset first (text encoders + VAE), then moves the encoders off the GPU; the
    loop holds the denoiser, the VAE for validation samples, the LoRA, its gradients and the optimizer state.
    The peak is the larger phase. (This is the loop once validation samples use prompts encoded while caching,
    issue 10's defect 10; until then each validation brings the text encoders back beside the denoiser.)
    Editing holds every component (bitsandbytes quantizes only the denoiser, as
    stylekit asks it to); with model offload, the largest one at a time."""
    if family not in published.COMPONENTS:
        raise UsageError(f"family={family!r} is not one of {', '.join(published.COMPONENTS)}")
    if mode not in MODES:
        raise UsageError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    denoiser = DENOISER[family] if mode == "train" else INPAINT_DENOISER[family]
    encoders = published.COMPONENTS[family][1:]
    parts = {denoiser: _component_bytes(family, denoiser, dtype, quantize)}
    parts |= {name: _component_bytes(family, name, dtype, "none") for name in encoders}
    activations = activation_bytes(family, "train" if mode == "train" else "inpaint", resolution)
    common = {"family": family, "mode": mode, "dtype": dtype, "quantize": quantize}
    if mode == "inpaint":
        return Budget(**common, optimizer=None, rank=None, weights=sum(parts.values()),
                      activations=activations, parts=parts)  # fmt: skip
    if mode == "inpaint_offload":
        largest = max(parts, key=parts.get)
        return Budget(**common, optimizer=None, rank=None, weights=parts[largest],
                      activations=activations, parts={largest: parts[largest]})  # fmt: skip
    modules = lora_targets(census(family, denoiser), targets or default_targets(family))
    shapes = lora_tensor_shapes(modules, rank)
    lora = 2 * 4 * sum(r * c for r, c in shapes)  # fp32 weights + fp32 gradients
    loop = {denoiser: parts[denoiser], "vae": parts["vae"]}
    loop_exact = sum(loop.values()) + lora + optimizer_state_bytes(shapes, optimizer)
    encode_phase = sum(parts[name] for name in encoders)
    if encode_phase > loop_exact + activations:  # the encoders alone are the peak
        return Budget(**common, optimizer=optimizer, rank=rank, weights=encode_phase,
                      parts={n: parts[n] for n in encoders})  # fmt: skip
    return Budget(
        **common,
        optimizer=optimizer,
        rank=rank,
        weights=sum(loop.values()),
        lora=lora,
        optimizer_state=optimizer_state_bytes(shapes, optimizer),
        activations=activations,
        parts=loop,
    )


def default_targets(family: str) -> tuple[str, ...]:
    """The family's preset LoRA targets (conf/model/<family>.yaml: lora_targets: null)."""
    from stylekit.models.flux import FluxFamily
    from stylekit.models.qwen_edit import QwenEditFamily
    from stylekit.models.sdxl import SDXLFamily

    classes = {"flux": FluxFamily, "sdxl": SDXLFamily, "qwen_edit": QwenEditFamily}
    return tuple(classes[family].default_lora_targets)


# ---------------------------------------------------------------------------------------------------------
# The hardware table (README, stylekit doctor)
# ---------------------------------------------------------------------------------------------------------

# Columns: (title, mode, quantize, optimizer).
TABLE_COLUMNS = (
    ("train bf16", "train", "none", "adamw"),
    ("train nf4", "train", "nf4", "adamw8bit"),  # what the OOM message suggests: nf4 with adamw8bit
    ("inpaint bf16", "inpaint", "none", "adamw"),
    ("inpaint offload", "inpaint_offload", "none", "adamw"),
    ("inpaint nf4", "inpaint", "nf4", "adamw"),
)


@cache
def table() -> dict[str, dict[str, Budget]]:
    """family -> column title -> Budget, at the defaults (bf16, rank 16, 1024 px, batch 1)."""
    return {
        family: {
            title: budget(family, mode, "bf16", quantize, optimizer)
            for title, mode, quantize, optimizer in TABLE_COLUMNS
        }
        for family in published.COMPONENTS
    }


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def markdown_table() -> str:
    """The README's hardware table: exact weights + LoRA + optimizer, then the estimated total."""
    rows = table()
    header = "| family | " + " | ".join(title for title, *_ in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for family, budgets in rows.items():
        cells = [f"{gib(b.exact)} / ~{math.ceil(b.total / GIB)}" for b in budgets.values()]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    del argv
    print(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
