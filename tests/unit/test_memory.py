"""The memory arithmetic (stylekit.memory) against what the libraries really allocate: bitsandbytes' quantized
storage, each optimizer's state after a step, transformers' keep-in-fp32 rule, diffusers' bitsandbytes layer
replacement, and the README's hardware table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from stylekit import memory
from stylekit.models import published

ROOT = Path(__file__).resolve().parents[2]


def _bytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("numel", [1000, 4097, 64 * 3072])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_what_bitsandbytes_stores(numel: int, double_quant: bool) -> None:
    import bitsandbytes.functional as bnb_functional
    import torch

    weight = torch.randn(numel, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    stored = [packed, state.absmax, state.code]
    if double_quant:
        stored += [state.state2.absmax, state.offset]  # state2.code is bitsandbytes' shared dynamic map
    assert memory.nf4_bytes(numel, double_quant) == _bytes(stored)


def test_int8_bytes_equal_what_bitsandbytes_stores() -> None:
    import bitsandbytes.functional as bnb_functional
    import torch

    weight = torch.randn(300, 200, dtype=torch.float16)  # (out, in)
    codes, row_scales, _ = bnb_functional.int8_vectorwise_quant(weight)
    assert memory.int8_bytes(200, 300) == _bytes([codes, row_scales])


# LoRA tensor shapes of one FLUX attention projection at rank 1 (lora_A 1 x 3072 stays under bitsandbytes'
# 4096-value threshold for 8-bit state) and rank 4 (over it), with an odd width to exercise partial blocks.
LORA_SHAPES = [[(1, 3072), (3072, 1)], [(4, 3072), (3072, 4)], [(4, 1000), (3001, 4)]]


@pytest.mark.parametrize("optimizer", memory.OPTIMIZERS)
@pytest.mark.parametrize("shapes", LORA_SHAPES)
def test_optimizer_state_bytes_equal_what_the_optimizer_allocates(optimizer: str, shapes: list) -> None:
    import torch

    from stylekit.train.optim import make_optimizer

    params = []
    for index, shape in enumerate(shapes):
        # peft's init: lora_A random, lora_B zero (Prodigy keeps no copy of all-zero starting weights).
        value = torch.randn(shape) if index % 2 == 0 else torch.zeros(shape)
        params.append(torch.nn.Parameter(value))
    cfg = OmegaConf.create({"name": optimizer, "lr": 1.0 if optimizer == "prodigy" else 1e-4})
    opt = make_optimizer(params, cfg)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, seen = [], set()
    for p in params:
        for key, value in opt.state[p].items():
            # Scalars the optimizers keep on the CPU whatever the device (AdamW's step, Prodigy's step) and
            # bitsandbytes' quantization maps, shared by every parameter, are counted once below.
            if not torch.is_tensor(value) or key == "step" or key.startswith("qmap"):
                continue
            tensors.append(value)
        for key in ("qmap1", "qmap2"):
            if key in opt.state[p] and id(opt.state[p][key]) not in seen:
                seen.add(id(opt.state[p][key]))
                tensors.append(opt.state[p][key])
    assert memory.optimizer_state_bytes(shapes, optimizer) == _bytes(tensors)


def test_fp16_keeps_the_t5_feed_forward_output_in_fp32_as_transformers_loads_it(tmp_path: Path) -> None:
    """transformers keeps T5's `wo` layers in fp32 when asked for fp16 (not bf16); the arithmetic follows."""
    import torch
    from transformers import T5EncoderModel

    from stylekit.models import tiny

    folder = tiny.tiny_path("flux") / "text_encoder_2"
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        model = T5EncoderModel.from_pretrained(folder, torch_dtype=dtype)
        loaded = _bytes(list(model.parameters()))
        assert memory.weight_bytes(memory.census_of(model), name) == loaded
    fp16 = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.float16)
    assert {p.dtype for n, p in fp16.named_parameters() if ".wo." in n} == {torch.float32}


def test_published_t5_is_bigger_in_fp16_than_in_bf16_by_its_wo_layers() -> None:
    census = memory.census("flux", "text_encoder_2")
    wo = sum(n for name, n, _ in census.params if re.search("wo", name))
    assert wo == 24 * 4096 * 10240
    assert memory.weight_bytes(census, "fp16") - memory.weight_bytes(census, "bf16") == 2 * wo


@pytest.mark.parametrize("family", ["flux", "sdxl", "qwen_edit"])
def test_bitsandbytes_quantizes_exactly_the_linear_layers_the_arithmetic_counts(family: str) -> None:
    """diffusers' own replacement (the one its BitsAndBytesConfig runs) on the meta-built denoiser swaps every
    nn.Linear the census lists and nothing else: convolutions, norms and embeddings stay in the model dtype."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    denoiser = memory.DENOISER[family]
    census = memory.census(family, denoiser)
    model = published.build_on_meta(family, denoiser)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    replace_with_bnb_linear(
        model, modules_to_not_convert=list(census.keep_fp32_always), quantization_config=config
    )
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized == {name for name, _, _ in census.linears}


def test_flux_transformer_weights_are_the_published_file_size() -> None:
    # FLUX.1-dev's flux1-dev.safetensors / the diffusers transformer folder: 23,802,816,640 bytes of bf16 tensors.
    assert memory.weight_bytes(memory.census("flux", "transformer"), "bf16") == 23_802_816_640


def test_quantization_shrinks_the_denoiser_but_not_below_its_unquantized_layers() -> None:
    census = memory.census("qwen_edit", "transformer")
    bf16 = memory.weight_bytes(census, "bf16")
    linear = sum(n for _, n, kind in census.params if kind == "linear_weight")
    others = census.numel - linear
    nf4, int8 = memory.weight_bytes(census, "bf16", "nf4"), memory.weight_bytes(census, "bf16", "int8")
    assert 2 * others + linear // 2 < nf4 < 2 * others + linear * 0.6
    assert 2 * others + linear < int8 < bf16
    assert bf16 == 2 * census.numel


def test_training_budget_adds_lora_gradients_and_optimizer_state() -> None:
    base = memory.budget("flux", "train", optimizer="adamw", rank=16)
    lora = 16 * 3_385_344
    assert base.lora == 2 * 4 * lora  # fp32 weights and gradients
    assert base.optimizer_state == 2 * 4 * lora  # AdamW's two fp32 moments
    smaller = memory.budget("flux", "train", optimizer="adamw8bit", rank=16)
    assert smaller.optimizer_state < base.optimizer_state / 3
    assert memory.budget("flux", "train", rank=32).lora == 2 * base.lora


def test_readme_hardware_table_is_the_computed_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert memory.markdown_table() in readme, "regenerate it: python -m stylekit.memory"


def test_bad_choices_name_the_key() -> None:
    from stylekit.errors import UsageError

    with pytest.raises(UsageError, match="optimizer='sgd'"):
        memory.optimizer_state_bytes([(1, 1)], "sgd")
    with pytest.raises(UsageError, match="quantize='nf8'"):
        memory.weight_bytes(memory.census("sdxl", "vae"), "bf16", "nf8")


def test_doctor_shows_the_computed_budgets() -> None:
    from typer.testing import CliRunner

    from stylekit import cli

    result = CliRunner().invoke(cli.app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flux_train = memory.table()["flux"]["train bf16"]
    assert f"{flux_train.exact / memory.GIB:.1f} / ~{flux_train.total / memory.GIB:.0f}" in result.output
    assert "estimated activations" in result.output
