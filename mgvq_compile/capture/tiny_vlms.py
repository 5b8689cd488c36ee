"""Tiny random-weight VLMs of each supported architecture, for tests (structure only, never accuracy).

Each builder returns an eval-mode fp32 model (eager attention) and example inputs: a random image in the
layout the architecture's processor produces, and a prompt holding exactly the number of image tokens the
image yields. Nothing is downloaded: the models come from small configs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import transformers

__all__ = ["randomize", "ARCHITECTURES", "tiny_vlm"]

logger = logging.getLogger(__name__)

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl", "smolvlm", "paligemma")

_VOCAB = 320
_IMAGE_TOKEN = 300
_TEXT = dict(
    vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, use_cache=False, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_SIGLIP = dict(
    model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False,
)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every 1-D parameter (norm weights near 1, biases near 0), so that the
    exporter's constant deduplication cannot merge equal-valued weights such as all-ones norms."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if ("norm" in name or "ln" in name) and not name.endswith("bias") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(cls: type, config: transformers.PretrainedConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return randomize(model, seed)


def _prompt(g: torch.Generator, n_image: int, text_len: int = 8, before: int = 3,
            start: list[int] | None = None, end: list[int] | None = None) -> torch.Tensor:
    """[text][start][image tokens][end][text] as a (1, seq) int64 tensor."""
    text = torch.randint(5, _IMAGE_TOKEN - 10, (text_len,), generator=g).tolist()
    ids = text[:before] + (start or []) + [_IMAGE_TOKEN] * n_image + (end or []) + text[before:]
    return torch.tensor([ids], dtype=torch.long)


def _qwen_vl(version: str, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    text = dict(_TEXT, model_type=f"{version}_text", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    patch, temporal, merge = 7, 2, 2
    if version == "qwen2_vl":
        side = 28
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch,
                      temporal_patch_size=temporal, spatial_merge_size=merge)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        # 8x8 patches in windows of 2x2 merged tokens: the window permutation is not the identity.
        side = 56
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge, window_size=28,
                      fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(text_config=text, vision_config=vision, image_token_id=_IMAGE_TOKEN,
                        video_token_id=_IMAGE_TOKEN + 1, vision_start_token_id=_IMAGE_TOKEN + 2,
                        vision_end_token_id=_IMAGE_TOKEN + 3)
    model = _build(model_cls, config, seed)
    g = torch.Generator().manual_seed(seed)
    grid = side // patch
    # The processor's layout: one row per patch, channels x temporal x patch x patch values.
    pixel_values = torch.randn(grid * grid, 3 * temporal * patch * patch, generator=g)
    input_ids = _prompt(g, grid * grid // (merge * merge), start=[_IMAGE_TOKEN + 2], end=[_IMAGE_TOKEN + 3])
    return model, {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, grid, grid]], dtype=torch.long),
        "mm_token_type_ids": (input_ids == _IMAGE_TOKEN).to(torch.int32),
    }


def _llava_onevision(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    # One 16x32 pinpoint: the image is tiled into two 16x16 crops plus the resized base image.
    config = transformers.LlavaOnevisionConfig(
        text_config=dict(_TEXT, model_type="qwen2"), vision_config=dict(_SIGLIP),
        image_token_index=_IMAGE_TOKEN, video_token_index=_IMAGE_TOKEN + 1, image_grid_pinpoints=[[16, 32]],
    )
    model = _build(transformers.LlavaOnevisionForConditionalGeneration, config, seed)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(1, 3, 3, 16, 16, generator=g)
    n_image = 16 + 4 * (8 + 1)  # base 4x4 + the 4x8 tiled grid with one newline per row
    return model, {
        "input_ids": _prompt(g, n_image),
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor([[16, 32]], dtype=torch.long),
    }


def _internvl(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=(16, 16), patch_size=(4, 4))
    config = transformers.InternVLConfig(text_config=dict(_TEXT, model_type="qwen2"), vision_config=vision,
                                         image_token_id=_IMAGE_TOKEN, image_seq_length=4,
                                         tie_word_embeddings=False)
    model = _build(transformers.InternVLForConditionalGeneration, config, seed)
    g = torch.Generator().manual_seed(seed)
    return model, {
        "input_ids": _prompt(g, 4),  # 4x4 patches, pixel-shuffled by 0.5
        "pixel_values": torch.randn(1, 3, 16, 16, generator=g),
    }


def _smolvlm(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    vision = {k: v for k, v in _SIGLIP.items() if k not in ("model_type", "vision_use_head")}
    config = transformers.SmolVLMConfig(text_config=dict(_TEXT, model_type="llama"), vision_config=vision,
                                        image_token_id=_IMAGE_TOKEN, scale_factor=2)
    model = _build(transformers.SmolVLMForConditionalGeneration, config, seed)
    g = torch.Generator().manual_seed(seed)
    return model, {
        "input_ids": _prompt(g, 4),  # 4x4 patches, pixel-shuffled by 2
        "pixel_values": torch.randn(1, 1, 3, 16, 16, generator=g),
    }


def _paligemma(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    text = dict(_TEXT, model_type="gemma", num_key_value_heads=1, head_dim=16)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=dict(_SIGLIP), vocab_size=_VOCAB,
                                          image_token_index=_IMAGE_TOKEN, projection_dim=64, hidden_size=64,
                                          tie_word_embeddings=False)
    model = _build(transformers.PaliGemmaForConditionalGeneration, config, seed)
    g = torch.Generator().manual_seed(seed)
    # The image comes first; [image tokens][prefix] are read bidirectionally, the suffix causally.
    n_image, prefix, suffix = 16, 4, 4
    input_ids = _prompt(g, n_image, text_len=prefix + suffix, before=0)
    token_type_ids = torch.cat([torch.zeros(n_image + prefix), torch.ones(suffix)]).long()[None]
    return model, {
        "input_ids": input_ids,
        "pixel_values": torch.randn(1, 3, 16, 16, generator=g),
        "token_type_ids": token_type_ids,
    }


_BUILDERS: dict[str, Callable[[int], tuple[torch.nn.Module, dict[str, torch.Tensor]]]] = {
    "qwen2_vl": lambda seed: _qwen_vl("qwen2_vl", seed),
    "qwen2_5_vl": lambda seed: _qwen_vl("qwen2_5_vl", seed),
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
}


def tiny_vlm(arch: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random-weight ``arch`` VLM (eval, fp32, eager attention) and example inputs for its forward."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return _BUILDERS[arch](seed)
