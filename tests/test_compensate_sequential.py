"""Compensate in stages: later layers' statistics come from the model whose earlier layers are quantized."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mgvq_compile.api import _new_context
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import load_onnx, weight_matrix, with_weights
from mgvq_compile.passes.collect_stats import CollectStats, CollectStatsConfig
from mgvq_compile.passes._common import encoder_stage_end, sequential_stages, statistics_on_quantized_inputs
from mgvq_compile.passes.compensate import CompensateConfig
from test_mgvq import _compile_mgvq, _mlp_with_calibration, _save_anonymous_with_calibration, run_cli


def test_stages_are_consecutive_and_nearly_equal():
    layers = list(range(7))
    assert sequential_stages(layers, 1) == [layers]
    assert sequential_stages(layers, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert sequential_stages(layers, 10) == [[i] for i in layers]  # never an empty stage
    with pytest.raises(RecipeError, match="sequential_stages"):
        CompensateConfig(sequential_stages=0)
    assert sequential_stages(layers, 1, cut=3) == [[0, 1, 2], [3, 4, 5, 6]]  # the encoder's end is a cut too
    assert sequential_stages(layers, 3, cut=2) == [[0, 1], [2, 3, 4], [5, 6]]  # already one
    assert sequential_stages(layers, 3, cut=4) == [[0, 1], [2, 3], [4], [5, 6]]
    assert sequential_stages(layers, 1, cut=7) == [layers]


@pytest.mark.parametrize("modalities, end", [
    (["audio", "audio", "text", "audio", "text"], 2),  # Whisper: encoder, then the decoder (cross k/v read audio)
    (["vision", "vision", "vision", "text"], 3),  # a VLM: vision tower and projector, then the language model
    (["text", "text"], 0),  # a language model: nothing to stage
    (["other", "other"], 0),  # no text layer at all
    (["text", "vision", "text"], 0),
])
def test_the_encoder_stage_ends_at_the_first_text_layer(modalities, end):
    layers = [SimpleNamespace(key=f"w{i}") for i in range(len(modalities))]
    assert encoder_stage_end(layers, {layer.key: m for layer, m in zip(layers, modalities)}) == end


def test_an_encoder_decoder_compiles_its_encoder_first(tmp_path):
    """Tiny Whisper: the decoder's layers are rounded on statistics of the model whose encoder is quantized."""
    model, calib_dir, _truth = _save_anonymous_with_calibration(tmp_path, "whisper")
    small_codebooks = ("--set", "assign-bits.vector_dim=2")  # tiny layers cannot pay for d = 4's at 2 bits
    _out, staged = _compile_mgvq(tmp_path, model, calib_dir, "staged", *small_codebooks)
    _out, single = _compile_mgvq(tmp_path, model, calib_dir, "single", *small_codebooks,
                                 "--set", "compensate.encoder_stage=false")
    stages = [layer["sequential_stage"] for layer in staged["layers"]]
    modalities = [layer["modality"] for layer in staged["layers"]]
    encoder = modalities.index("text")
    assert encoder > 0 and set(modalities[:encoder]) == {"audio"}
    assert stages == [1] * encoder + [2] * (len(stages) - encoder)
    assert "sequential_stage" not in single["layers"][0]
    pairs = list(zip(staged["layers"], single["layers"]))
    assert all(a["proxy_loss"] == b["proxy_loss"] for a, b in pairs[:encoder])  # the encoder: float statistics
    # The decoder's layers that read the encoder's output (cross-attention keys and values, "audio") or
    # come after it see the quantized encoder; its first self-attention reads text only and is unchanged.
    cross = [i for i, (a, _b) in enumerate(pairs) if i >= encoder and a["modality"] == "audio"]
    assert cross and all(pairs[i][0]["proxy_loss"] != pairs[i][1]["proxy_loss"] for i in cross + [len(pairs) - 1])
    assert [a["bits"] for a, _b in pairs] == [b["bits"] for _a, b in pairs]  # one allocation


@pytest.mark.parametrize("method, quantize_pass", [("gptq", "quantize-gptq"), ("gptvq", "quantize-gptvq")])
def test_baselines_quantize_an_encoder_first_too(tmp_path, method, quantize_pass):
    """The baselines take the same encoder cut as mgvq, so all methods compare on the same statistics."""
    model, calib_dir, _truth = _save_anonymous_with_calibration(tmp_path, "whisper")
    reports = {}
    for name, options in (("staged", ()), ("single", ("--set", f"{quantize_pass}.encoder_stage=false"))):
        out = tmp_path / f"{method}-{name}"
        assert run_cli(model, "--method", method, "--calib", calib_dir, "-o", out, "--work-dir", tmp_path / "work",
                       *options) == 0
        reports[name] = json.loads((out / "report.json").read_text())["layers"]
    modalities = [layer["modality"] for layer in reports["staged"]]
    encoder = modalities.index("text")
    assert [layer["sequential_stage"] for layer in reports["staged"]] == [1] * encoder + [2] * (len(modalities) - encoder)
    pairs = list(zip(reports["staged"], reports["single"]))
    errors = [(a["relative_weight_error"], b["relative_weight_error"]) for a, b in pairs]
    assert all(a == b for a, b in errors[:encoder])  # the encoder: the float model's statistics either way
    # Cross-attention keys and values read the quantized encoder's output directly.
    cross = [i for i, (a, _b) in enumerate(pairs) if i >= encoder and a["modality"] == "audio"]
    assert cross and all(errors[i][0] != errors[i][1] for i in cross)


def test_statistics_of_a_model_with_replaced_weights_see_those_weights(tmp_path):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    model = load_onnx(mlp)
    feeds = [dict(np.load(path)) for path in sorted(calib_dir.glob("*.npz"))]
    ctx, _key, _dir = _new_context({"model": model}, feeds, 0, "data", "logits", "cpu", False, None, False)
    fc1, fc2, _head = ctx.layers
    w1 = weight_matrix(model, fc1)
    replaced = np.round(w1 * 4) / 4  # a coarse stand-in for a quantized fc1 (m x n)
    copy = with_weights(model, {fc1.key: replaced}, ctx.layers)
    np.testing.assert_array_equal(weight_matrix(copy, fc1), replaced)
    np.testing.assert_array_equal(weight_matrix(model, fc1), w1)  # the compile's own model is untouched
    stats = CollectStats(CollectStatsConfig(gradients=False)).collect(ctx, {"model": copy}, [fc2])
    assert list(stats) == [fc2.key]
    bias = model.graph.initializers["fc1.bias"].const_value.numpy()
    inputs = np.concatenate([np.maximum(f["x"] @ replaced.T + bias, 0).reshape(-1, w1.shape[0]) for f in feeds])
    np.testing.assert_allclose(stats[fc2.key].h_x.numpy(), inputs.T @ inputs, rtol=1e-4, atol=1e-3)
    # With the float model as reference, the cross moment pairs its fc2 inputs with the copy's.
    crossed = CollectStats(CollectStatsConfig(gradients=False)).collect(ctx, {"model": copy}, [fc2],
                                                                        reference_models={"model": model})
    float_inputs = np.concatenate([np.maximum(f["x"] @ w1.T + bias, 0).reshape(-1, w1.shape[0]) for f in feeds])
    np.testing.assert_allclose(crossed[fc2.key].input_cross_moment.numpy(), float_inputs.T @ inputs, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(crossed[fc2.key].h_x.numpy(), stats[fc2.key].h_x.numpy())


def test_sequential_compile_keeps_the_first_stage_and_requantizes_the_rest(tmp_path):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    _out, plain = _compile_mgvq(tmp_path, mlp, calib_dir, "plain")
    _out, staged = _compile_mgvq(tmp_path, mlp, calib_dir, "staged", "--set", "compensate.sequential_stages=3")
    first, *rest = [(a, b) for a, b in zip(plain["layers"], staged["layers"])]
    # Stage 1 sees the float model's statistics, as without stages; the others see quantized inputs.
    assert first[0]["proxy_loss"] == first[1]["proxy_loss"] and first[0]["bits"] == first[1]["bits"]
    assert all(a["proxy_loss"] != b["proxy_loss"] for a, b in rest)
    assert all(a["bits"] == b["bits"] for a, b in rest)  # the allocation is the float model's
    assert [layer["sequential_stage"] for layer in staged["layers"]] == [1, 2, 3]
    assert "sequential_stage" not in plain["layers"][0]
    assert staged["summary"]["bits_per_weight"] == plain["summary"]["bits_per_weight"] <= 2.0
    # Seeded: the staged compile is deterministic too.
    _out, again = _compile_mgvq(tmp_path, mlp, calib_dir, "again", "--set", "compensate.sequential_stages=3",
                                "--no-resume")
    assert json.dumps(again["layers"]) == json.dumps(staged["layers"])


def test_matching_float_outputs_moves_the_later_stages_targets_only(tmp_path):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    staged_args = ("--set", "compensate.sequential_stages=3")
    _out, staged = _compile_mgvq(tmp_path, mlp, calib_dir, "staged", *staged_args)
    _out, matched = _compile_mgvq(tmp_path, mlp, calib_dir, "matched", *staged_args,
                                  "--set", "compensate.match_float_outputs=true")
    first, *rest = list(zip(staged["layers"], matched["layers"]))
    assert first[0]["proxy_loss"] == first[1]["proxy_loss"]  # stage 1's inputs are the float model's
    assert "output_matching_shift_relative_norm" not in first[1]
    assert all(b["output_matching_shift_relative_norm"] > 0 and a["proxy_loss"] != b["proxy_loss"] for a, b in rest)
    assert matched["summary"]["bits_per_weight"] == staged["summary"]["bits_per_weight"]
    with pytest.raises(RecipeError, match="match_float_outputs needs sequential_stages"):
        CompensateConfig(match_float_outputs=True)


def test_statistics_on_quantized_inputs_replace_each_graphs_own_layers_only(tmp_path):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    graphs = {"a": load_onnx(mlp), "b": load_onnx(mlp)}  # a model of two graphs, as split models are
    feeds = [dict(np.load(path)) for path in sorted(calib_dir.glob("*.npz"))]
    ctx, _key, _dir = _new_context(graphs, feeds, 0, "data", "logits", "cpu", False, None, False)
    ctx.artifacts["stats_config"] = CollectStatsConfig(gradients=False)
    a_fc1 = next(layer for layer in ctx.layers if layer.graph == "a" and layer.weight == "fc1.weight")
    b_fc2 = next(layer for layer in ctx.layers if layer.graph == "b" and layer.weight == "fc2.weight")
    zeroed = np.zeros_like(weight_matrix(graphs["a"], a_fc1))
    stats = statistics_on_quantized_inputs(ctx, [b_fc2], {a_fc1.key: zeroed})
    # Graph b keeps its own fc1, so fc2 of b sees the float model's inputs, not graph a's zeroed fc1.
    reference = CollectStats(CollectStatsConfig(gradients=False)).collect(ctx, graphs, [b_fc2])
    np.testing.assert_array_equal(stats[b_fc2.key].h_x.numpy(), reference[b_fc2.key].h_x.numpy())
    assert stats[b_fc2.key].h_x.abs().sum() > 0
