"""The real SmolLM2-135M at 2 bits through the custom op: ORT's logits are torch's with the same weights.

Its first two layers (14 linear layers, the shapes of all 30) keep the test short; the one-token step of
the whole model, its file size and its session's memory are in benchmarks/kernels.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from _models import load_smollm2_fast
from mgvq_compile.cli import main
from mgvq_compile.models.smollm2 import export_causal_lm_onnx
from mgvq_compile.runtime import create_session
from vq_helpers import dequantized_weights, rel_err, stored_vq_bytes

pytestmark = pytest.mark.real_model

SEQ_LEN = 8


def test_two_bit_smollm2_runs_on_the_custom_op_and_matches_torch(tmp_path):
    model = load_smollm2_fast(num_layers=2)
    export_causal_lm_onnx(model, tmp_path / "fp32.onnx", seq_len=SEQ_LEN)
    out = tmp_path / "out"
    assert main([str(tmp_path / "fp32.onnx"), "--method", "kmeans-vq", "--bits", "2", "-o", str(out), "-q"]) == 0

    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["quantized_layers"] == 14
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.domain == "mgvq" and n.op_type == "VQGemm" for n in proto.graph.node) == 14
    assert stored_vq_bytes(out / "model.onnx") == summary["stored_bytes"]
    assert summary["bits_per_weight"] == pytest.approx(summary["stored_bytes"] * 8 / summary["quantized_weights"])
    assert 2.0 <= summary["bits_per_weight"] < 2.01

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, SEQ_LEN), dtype=np.int64)
    (logits,) = create_session(out / "model.onnx", threads=2).run(["logits"], {"input_ids": ids})

    reference = copy.deepcopy(model)
    parameters = dict(reference.named_parameters())
    decoded = dequantized_weights(out)
    assert len(decoded) == 14
    for name, weight in decoded.items():
        assert parameters[name].shape == weight.shape, name
        parameters[name].data.copy_(torch.from_numpy(weight))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        float_logits = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert rel_err(logits, expected) < 1e-4
    assert rel_err(logits, float_logits) > 1e-2  # the weights really are the 2-bit ones
