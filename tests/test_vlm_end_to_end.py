"""Each tiny VLM: captured, calibrated (with gradients), quantized at 2 bits with kmeans-vq, written in
the decomposed form, and run by stock ORT, whose output equals torch with the same dequantized weights."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import mgvq_compile
from mgvq_compile.capture.tiny_vlms import ARCHITECTURES, tiny_vlm
from mgvq_compile.capture.vlm import capture_vlm
from vq_helpers import dequantized_weights

GRADIENT_RECIPE = (
    "mgvq_recipe: 1\nmethod: kmeans-vq-calibrated\npasses:\n"
    "- pass: collect-stats\n  gradients: true\n- pass: quantize-kmeans-vq\n  bits: 2\n- pass: fuse-vq-gemm\n"
)


LANGUAGE_MODULES = (".language_model.", ".text_model.")
VISION_MODULES = (".visual.", ".vision_tower.", ".vision_model.", ".multi_modal_projector.", ".connector.")


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vlm_compiles_and_runs_in_ort(tmp_path, arch):
    model, inputs = tiny_vlm(arch)
    graph, spec = capture_vlm(model, inputs)
    feed = {name: inputs[name].numpy() for name in spec.input_names}
    with torch.no_grad():
        reference_logits = model(**inputs, use_cache=False).logits
    labels = torch.randint(0, reference_logits.shape[-1], reference_logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    labels[..., :2] = -100
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GRADIENT_RECIPE)
    out = tmp_path / "out"
    result = mgvq_compile.compile(
        graph, recipe=recipe, calib=[{**feed, "labels": labels.numpy()}], output=out, seed=0, progress=False,
    )
    report = json.loads((out / "report.json").read_text())
    quantized = [layer for layer in report["layers"] if layer["quantized"]]
    assert quantized and result.report["summary"]["quantized_layers"] == len(quantized)
    assert all(layer["bits"] == [2] and layer["index_bits_per_weight"] == 2.0 for layer in quantized)

    modality = {layer["name"]: layer["modality"] for layer in report["layers"]}
    language = {n: m for n, m in modality.items() if any(k in n for k in LANGUAGE_MODULES)}
    vision = {n: m for n, m in modality.items() if any(k in n for k in VISION_MODULES)}
    assert len(language) + len(vision) == len(modality)
    assert language and vision
    assert set(language.values()) == {"text"}, language
    assert set(vision.values()) == {"vision"}, vision

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], feed)

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in dequantized_weights(out).items():
            params[name].copy_(torch.from_numpy(weight))
        torch_logits = model(**inputs, use_cache=False).logits.numpy()
    assert rel(ort_logits, torch_logits) < 1e-4
    assert rel(ort_logits, reference_logits.numpy()) > 1e-3  # the weights really changed
