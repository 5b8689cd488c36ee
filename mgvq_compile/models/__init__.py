"""Real trained models shipped in PyPI packages: loaders and fixed-shape ONNX exports."""

from mgvq_compile.models.smollm2 import GGUF_FILE, export_causal_lm_onnx, load_smollm2, smollm2_gguf_path
from mgvq_compile.models.whisper_ct2 import (
    DECODER_PROMPT,
    SAMPLE_RATE,
    export_whisper_onnx,
    greedy_decode,
    load_whisper_tiny_en,
    load_whisper_tokenizer,
    read_ct2_model,
    whisper_feature_extractor,
)

__all__ = [
    "GGUF_FILE",
    "smollm2_gguf_path",
    "load_smollm2",
    "export_causal_lm_onnx",
    "DECODER_PROMPT",
    "SAMPLE_RATE",
    "read_ct2_model",
    "load_whisper_tiny_en",
    "load_whisper_tokenizer",
    "whisper_feature_extractor",
    "greedy_decode",
    "export_whisper_onnx",
]
