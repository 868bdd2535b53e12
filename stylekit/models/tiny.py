"""Tiny random-weight stand-ins for the real FLUX.1, SDXL and Qwen-Image-Edit checkpoints.

Each folder is an ordinary diffusers pipeline folder (``model_index.json`` plus one sub-folder per
component) built from the same classes as the real checkpoint, so ``Pipeline.from_pretrained(folder)``
runs the real loading code offline. Weights are random but reproducible from a seed; tokenizers are
built here from a small vocabulary because nothing may be fetched from the hub.

Latent geometry follows the real models (VAE downsamples 8x, FLUX/Qwen latents have 16 channels,
SDXL has 4) so code that reasons about latent shapes behaves as it would on the real checkpoints.

Usage: ``python -m stylekit.models.tiny NAME OUT_DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

from stylekit.errors import UsageError
from stylekit.paths import cache_root

TINY_NAMES = ("flux", "flux_fill", "sdxl", "sdxl_inpaint", "qwen_edit")
# The shallow tier: each denoiser at the real checkpoint's widths with one or two blocks, fed by text encoders of
# the widths it needs (~1 GB a folder). Catches dimension mix-ups that tiny configs with equal sizes hide.
SHALLOW_PREFIX = "shallow_"
SHALLOW_NAMES = ("shallow_flux", "shallow_flux_fill", "shallow_sdxl", "shallow_qwen_edit")
NAMES = TINY_NAMES + SHALLOW_NAMES


# Real FLUX.1 / SDXL / Qwen-Image VAEs all downsample by 8: four resolution levels (three halvings).
_VAE_LEVELS = 4

# Words given whole-word entries in the tiny vocabularies so common prompts are not all single characters.
_COMMON_WORDS = (
    *("a", "an", "the", "of", "in", "on", "and", "with", "photo", "painting", "style", "portrait"),
    *("cat", "dog", "red", "blue", "green", "sky", "tree", "house", "person", "woman", "man", "face"),
    *("car", "city", "night", "light", "dark"),
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    # alphabet() comes from a hash set, so its order varies between runs; ids must not.
    return sorted(ByteLevel.alphabet())


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Train BPE merges until every word is a single token; ties break on the pair text so ids are stable.

    Training (rather than writing merges per word) keeps the merge ranks consistent, so encoding each
    word with the finished tokenizer gives the same single token.
    """
    from collections import Counter

    pending = [list(word) for word in dict.fromkeys(tuple(word) for word in words) if len(word) > 1]
    merges: list[tuple[str, str]] = []
    while pending:
        counts = Counter(pair for word in pending for pair in zip(word, word[1:], strict=False))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pending = [word for word in (_apply_merge(word, best) for word in pending) if len(word) > 1]
    return merges


def _vocab_with_merges(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {token: index for index, token in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def _clip_tokenizer() -> Any:
    """Byte-level BPE laid out like OpenAI CLIP's: bytes, bytes + "</w>", merges, then the two specials."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    # CLIP marks the last symbol of each word with "</w>".
    merges = _bpe_merges([[*word[:-1], word[-1] + "</w>"] for word in _COMMON_WORDS])
    vocab = _vocab_with_merges(alphabet + [ch + "</w>" for ch in alphabet], merges)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> Any:
    """Unigram vocabulary laid out like T5's: <pad>, </s>, <unk>, then scored pieces."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    # Whole words score better than their characters, so Unigram prefers them as a real vocab would.
    pieces += [("▁" + word, -4.0) for word in _COMMON_WORDS]
    printable = [chr(code) for code in range(33, 127)]
    pieces += [("▁" + ch, -8.0) for ch in printable]
    pieces += [(ch, -10.0) for ch in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# Qwen2.5-VL's added tokens in their real order (ids 151643.. in the real vocab); True = special.
_QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
)

# ChatML with Qwen2-VL's vision placeholders; written for the tiny processor, not copied from Qwen.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The system prompts of the Qwen-Image pipelines' templates. The pipelines drop a fixed number of leading
# tokens (34 for text-to-image, 64 for edit) that equals the template prefix's length in the real
# vocabulary; giving each word here one token makes the tiny tokenizer count the prefix the same way.
_QWEN_TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\n"
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate "
    "a new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.\nuser\nassistant\nPicture 1: "
)


def _qwen_pretokens(text: str) -> list[str]:
    """Split `text` the way Qwen2's tokenizer does before BPE (regex split, then bytes to symbols)."""
    from transformers import Qwen2Tokenizer

    splitter = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    return [piece for piece, _offsets in splitter.pre_tokenize_str(text)]


def _qwen_tokenizer() -> Any:
    """Byte-level BPE with Qwen2.5-VL's chat and vision special tokens after the byte alphabet."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    words = _qwen_pretokens(_QWEN_TEMPLATE_TEXT + " " + " ".join(_COMMON_WORDS))
    merges = _bpe_merges([list(word) for word in words])
    vocab = _vocab_with_merges(_byte_alphabet(), merges)
    for token, _special in _QWEN_ADDED_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(token, special=special) for token, special in _QWEN_ADDED_TOKENS])
    return tokenizer


def _qwen_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token, _ in _QWEN_ADDED_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


# ---------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------


def _clip_text_config(
    tokenizer: Any, hidden_act: str, width: int = 32, intermediate_size: int = 64, heads: int = 2
) -> Any:
    """Two layers, the width (and projection) of `width`: 32 for the tiny models, CLIP-L/G's for the shallow."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(
    tokenizer: Any,
    seed: int,
    d_model: int = 32,
    d_kv: int = 8,
    d_ff: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    buckets: int = 8,
    max_distance: int = 32,
) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    # Gated-GELU feed-forward like T5 v1.1 / T5-XXL, which FLUX uses.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _qwen_text_encoder(tokenizer: Any, seed: int) -> Any:
    token_ids = _qwen_token_ids(tokenizer)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        # mrope splits each head's rotary half (head_dim/2 = 8) into temporal/height/width sections.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": token_ids["bos_token_id"],
        "eos_token_id": token_ids["eos_token_id"],
        "pad_token_id": token_ids["pad_token_id"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return _qwen_vl(token_ids, text_config, vision_config, seed)


def _qwen_vl(token_ids: dict[str, int], text_config: dict, vision_config: dict, seed: int) -> Any:
    """Qwen2.5-VL from its text and vision settings, with the tokenizer's vision token ids."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # The vision tower sees images resized to between 4 and 16 merged tokens whatever the input size, so
    # the pipelines' ~384x384 condition images stay cheap; the real processor allows ~12 MP.
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "merge_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(temporal_patch_size=2, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(temporal_patch_size=2, **pixels),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------------------
# VAEs, denoisers, schedulers
# ---------------------------------------------------------------------------------------------------------


def _autoencoder_kl(seed: int, latent_channels: int, **real_config: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * _VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * _VAE_LEVELS,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=64,
        **real_config,
    )


def _flux_vae(seed: int) -> Any:
    # Shift/scale and the absent quant convs match FLUX.1's autoencoder config.
    return _autoencoder_kl(
        seed,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def _sdxl_vae(seed: int) -> Any:
    return _autoencoder_kl(seed, latent_channels=4, scaling_factor=0.13025, force_upcast=True)


def _flux_transformer(seed: int, fill: bool) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    packed = 16 * 4  # 16 latent channels packed 2x2
    # FluxFillPipeline concatenates noisy latents, masked-image latents and the mask, which it reshapes
    # from (8x8 pixels per latent cell) x 2x2 packing into 256 channels: 64 + 64 + 256 = 384 like Fill-dev.
    in_channels = packed * 2 + (2 ** (_VAE_LEVELS - 1)) ** 2 * 4 if fill else packed
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def _sdxl_unet(seed: int, in_channels: int) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    # Same block types and conditioning as SDXL base (text_time embedding of 6 size/crop numbers plus the
    # pooled CLIP-G projection), at toy widths: 6 * 8 + 32 = 80 added-embedding inputs.
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 2, 2),
        norm_num_groups=8,
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    )


def _qwen_vae(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    # Real Qwen-Image VAE layout (three 2x downsamples, 16 latent channels) at base_dim 8 instead of 96;
    # the default latents_mean/std are the real statistics.
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)


def _qwen_transformer(seed: int) -> Any:
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _qwen_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def _sdxl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


# ---------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------


def _flux_pipeline(seed: int, fill: bool) -> Any:
    import torch
    from diffusers import FluxFillPipeline, FluxPipeline
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_act="quick_gelu"))
    pipeline_class = FluxFillPipeline if fill else FluxPipeline
    return pipeline_class(
        scheduler=_flux_scheduler(),
        vae=_flux_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, seed),
        tokenizer_2=tokenizer_2,
        transformer=_flux_transformer(seed, fill=fill),
    )


def _sdxl_pipeline(seed: int, inpaint: bool) -> Any:
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_act="quick_gelu"))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, hidden_act="gelu"))
    # The inpainting UNet takes noisy latents + mask + masked-image latents: 4 + 1 + 4 channels.
    unet = _sdxl_unet(seed, in_channels=9 if inpaint else 4)
    common = {
        "vae": _sdxl_vae(seed),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": _sdxl_scheduler(),
    }
    if inpaint:
        return StableDiffusionXLInpaintPipeline(**common, requires_aesthetics_score=False)
    return StableDiffusionXLPipeline(**common)


def _qwen_edit_pipeline(seed: int) -> Any:
    from diffusers import QwenImageEditPlusPipeline

    tokenizer = _qwen_tokenizer()
    return QwenImageEditPlusPipeline(
        scheduler=_qwen_scheduler(),
        vae=_qwen_vae(seed),
        text_encoder=_qwen_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        processor=_qwen_processor(tokenizer),
        transformer=_qwen_transformer(seed),
    )


# ---------------------------------------------------------------------------------------------------------
# The shallow tier: real widths, one or two blocks
# ---------------------------------------------------------------------------------------------------------

# Feed-forward width of the shallow text encoders: only their output width matters to the denoiser.
_SHALLOW_FF = 256


def _published_denoiser(family: str, component: str, seed: int, **depth: Any) -> Any:
    """The real checkpoint's denoiser config (stylekit/models/configs) with only its depth reduced."""
    import diffusers
    import torch

    from stylekit.models import published

    values = published.config(family, component) | depth
    cls = getattr(diffusers, values.pop("_class_name"))
    torch.manual_seed(seed)
    return cls.from_config(values)


def _shallow_clip(tokenizer: Any, width: int, hidden_act: str, seed: int, projection: bool = False) -> Any:
    """CLIP text encoder at a real width (64-wide heads as in CLIP-L/G) with two layers: SDXL reads the
    penultimate one."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _clip_text_config(
        tokenizer, hidden_act, width=width, intermediate_size=_SHALLOW_FF, heads=width // 64
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _shallow_t5(tokenizer: Any, seed: int) -> Any:
    """T5 encoder with T5-XXL's 4096-wide output (what FLUX's context embedder takes), one narrow layer."""
    return _t5_encoder(
        tokenizer, seed, d_model=4096, d_kv=64, d_ff=_SHALLOW_FF, num_layers=1, num_heads=2, buckets=32,
        max_distance=128,
    )  # fmt: skip


def _shallow_qwen_vl(tokenizer: Any, seed: int) -> Any:
    """Qwen2.5-VL with the 7B's text width (3584, 28 heads of 128, 4 KV heads, its mrope sections) in one
    layer, and a narrow vision tower that merges into that width."""
    ids = _qwen_token_ids(tokenizer)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 3584,
        "intermediate_size": _SHALLOW_FF,
        "num_hidden_layers": 1,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [0],
    }
    return _qwen_vl(ids, text_config, vision_config, seed)


def _shallow_flux_pipeline(seed: int, fill: bool) -> Any:
    from diffusers import FluxFillPipeline, FluxPipeline

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    component = "transformer_fill" if fill else "transformer"
    return (FluxFillPipeline if fill else FluxPipeline)(
        scheduler=_flux_scheduler(),
        vae=_flux_vae(seed),
        text_encoder=_shallow_clip(tokenizer, 768, "quick_gelu", seed),  # pooled: 768
        tokenizer=tokenizer,
        text_encoder_2=_shallow_t5(tokenizer_2, seed),  # joint attention: 4096
        tokenizer_2=tokenizer_2,
        transformer=_published_denoiser("flux", component, seed, num_layers=1, num_single_layers=1),
    )


def _shallow_sdxl_pipeline(seed: int) -> Any:
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    # Cross-attention 2048 = CLIP-L 768 + CLIP-G 1280 hidden states; added embeddings 2816 = 6 x 256 + 1280.
    unet = _published_denoiser(
        "sdxl", "unet", seed, layers_per_block=1, transformer_layers_per_block=[1, 1, 1]
    )
    return StableDiffusionXLPipeline(
        vae=_sdxl_vae(seed),
        text_encoder=_shallow_clip(tokenizer, 768, "quick_gelu", seed),
        text_encoder_2=_shallow_clip(tokenizer_2, 1280, "gelu", seed, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sdxl_scheduler(),
    )


def _shallow_qwen_edit_pipeline(seed: int) -> Any:
    from diffusers import QwenImageEditPlusPipeline

    tokenizer = _qwen_tokenizer()
    return QwenImageEditPlusPipeline(
        scheduler=_qwen_scheduler(),
        vae=_qwen_vae(seed),
        text_encoder=_shallow_qwen_vl(tokenizer, seed),  # joint attention: 3584
        tokenizer=tokenizer,
        processor=_qwen_processor(tokenizer),
        transformer=_published_denoiser("qwen_edit", "transformer", seed, num_layers=1),
    )


_BUILDERS = {
    "flux": lambda seed: _flux_pipeline(seed, fill=False),
    "flux_fill": lambda seed: _flux_pipeline(seed, fill=True),
    "sdxl": lambda seed: _sdxl_pipeline(seed, inpaint=False),
    "sdxl_inpaint": lambda seed: _sdxl_pipeline(seed, inpaint=True),
    "qwen_edit": _qwen_edit_pipeline,
    "shallow_flux": lambda seed: _shallow_flux_pipeline(seed, fill=False),
    "shallow_flux_fill": lambda seed: _shallow_flux_pipeline(seed, fill=True),
    "shallow_sdxl": _shallow_sdxl_pipeline,
    "shallow_qwen_edit": _shallow_qwen_edit_pipeline,
}


# ---------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise UsageError(f"unknown tiny model {name!r}; valid names: {', '.join(NAMES)}")


def _write_pipeline(name: str, folder: Path, seed: int) -> None:
    import torch
    from transformers.utils import logging as transformers_logging

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # transformers writes nothing from ranks > 0 of a running process group, which would publish a folder
        # with empty text encoders to every later run: a rank that builds the folder builds it in its own process.
        import subprocess

        command = [sys.executable, "-m", "stylekit.models.tiny", name, str(folder), "--seed", str(seed)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return
    pipeline = _BUILDERS[name](seed)
    if name.startswith(SHALLOW_PREFIX):
        # Hundreds of millions of parameters: stored in bf16, the dtype the shallow tier runs in, to halve the
        # folder (from_pretrained casts to whatever model.dtype asks).
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                # nn.Module's own cast: diffusers' override warns about keep-in-fp32 modules these classes lack.
                torch.nn.Module.to(component, torch.bfloat16)
    # transformers draws a progress bar per saved model; for a few hundred KB it is only noise.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def _is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _check_target(target: Path) -> None:
    """Refuse, before building anything, to overwrite something that is not an earlier pipeline folder."""
    replaceable = target.is_dir() and (_is_pipeline_folder(target) or not any(target.iterdir()))
    if target.exists() and not replaceable:
        raise UsageError(f"{target} exists and is not a pipeline folder; choose an empty or new directory")


def _replace_folder(staged: Path, target: Path) -> None:
    if not _is_pipeline_folder(target):
        os.replace(staged, target)  # renaming onto an empty directory (or nothing) is atomic
        return
    # Swap the old folder aside first so `target` never holds a half-written mix of both.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def build(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder `name` to `out_dir` (replacing an earlier one) and return its path."""
    _check_name(name)
    target = Path(out_dir).resolve()
    _check_target(target)
    staged = _staging_dir(target)
    try:
        _write_pipeline(name, staged, seed)
        _replace_folder(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


def _cache_key(name: str, seed: int) -> str:
    # Any change to this file or to the libraries that define the saved formats gives a new folder.
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for part in (name, str(seed), _dist_version("diffusers"), _dist_version("transformers")):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:12]


def _publish_once(staged: Path, target: Path) -> bool:
    """Rename `staged` to `target`; False when another process already published `target`."""
    try:
        os.rename(staged, target)
    except OSError:
        if not _is_pipeline_folder(target):
            raise
        return False  # the rival's folder came from the same key, so its contents equal ours
    return True


def tiny_path(name: str, seed: int = 0) -> Path:
    """Path of the cached tiny folder for `name`/`seed`, built on first use; safe under concurrent callers."""
    _check_name(name)
    target = cache_root() / "tiny" / f"{name}-{_cache_key(name, seed)}"
    if _is_pipeline_folder(target):
        return target
    staged = _staging_dir(target)
    try:
        _write_pipeline(name, staged, seed)
        published = _publish_once(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not published:
        shutil.rmtree(staged, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stylekit.models.tiny", description="Write a tiny random-weight pipeline folder."
    )
    parser.add_argument("name", help=f"one of: {', '.join(NAMES)}")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = build(args.name, args.out_dir, seed=args.seed)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
