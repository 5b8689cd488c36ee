"""Tiny random-weight transformers models (structure only, never accuracy) and their captures."""

from __future__ import annotations

import functools

import torch
import transformers

from mgvq_compile.capture.torch_capture import capture_module


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every parameter (norm weights near 1, biases near 0), so that the
    exporter's constant deduplication cannot merge equal-valued weights such as all-ones norms."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name or "ln" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="eager",
    )
    model = randomize(transformers.LlamaForCausalLM(config), seed)
    inputs = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))}
    return model, inputs


def tiny_whisper(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        vocab_size=96, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=20, max_target_positions=32, use_cache=False, attn_implementation="eager",
        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = randomize(transformers.WhisperForConditionalGeneration(config), seed)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_features": torch.randn(1, 16, 40, generator=g),
        "decoder_input_ids": torch.randint(0, 96, (1, 6), generator=g),
    }
    return model, inputs


@functools.lru_cache(maxsize=None)
def captured(name: str):
    """(model, example inputs, onnx_ir.Model) for a tiny model, captured once per test session."""
    model, inputs = {"llama": tiny_llama, "whisper": tiny_whisper}[name]()
    graph = capture_module(model, inputs, extra_kwargs={"use_cache": False})
    return model, inputs, graph
