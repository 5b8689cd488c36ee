"""Each tiny VLM: captured, calibrated (with gradients), quantized at 2 bits with kmeans-vq, written with
mgvq.VQGemm nodes (the default form), and run in ORT with the custom-op library, whose output equals
torch with the same dequantized weights."""

from __future__ import annotations

import json

import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import mgvq_compile
from mgvq_compile.capture.tiny_vlms import ARCHITECTURES, tiny_vlm
from mgvq_compile.calibration.executor import GraphExecutor
from mgvq_compile.capture.vlm import capture_vlm
from mgvq_compile.runtime import create_session
from vq_helpers import dequantized_weights, rel_err

GRADIENT_RECIPE = (
    "mgvq_recipe: 1\nmethod: kmeans-vq-calibrated\npasses:\n"
    "- pass: collect-stats\n  gradients: true\n- pass: quantize-kmeans-vq\n  bits: 2\n- pass: fuse-vq-gemm\n"
)


LANGUAGE_MODULES = (".language_model.", ".text_model.")
VISION_MODULES = (".visual.", ".vision_tower.", ".vision_model.", ".multi_modal_projector.", ".connector.")



def check_executor_against_ort_and_autograd(model, inputs, graph, feed, labels):
    """The calibration executor on the captured graph: forward equals ORT, weight gradients equal torch's."""
    session = ort.InferenceSession(ir.to_proto(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], feed)
    executor = GraphExecutor(graph)
    logits = executor.run(feed)["logits"]
    assert rel_err(logits.detach().numpy(), ort_logits) < 1e-4
    loss = lambda out: torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-100)  # noqa: E731
    loss(logits).backward()
    model.zero_grad()
    loss(model(**inputs, use_cache=False).logits).backward()
    params = dict(model.named_parameters())
    layouts = {}
    for node in graph.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            layouts[node.inputs[1].name] = not transposed
    compared = {"vision": 0, "text": 0}
    for name, stored_transposed in layouts.items():
        if name not in params or params[name].grad is None or executor.weights[name].grad is None:
            continue
        got = executor.weights[name].grad
        got = got.T if stored_transposed else got
        assert rel_err(got.numpy(), params[name].grad.numpy()) < 1e-4, name
        compared["text" if any(k in name for k in LANGUAGE_MODULES) else "vision"] += 1
    assert compared["vision"] > 0 and compared["text"] > 0, compared
    model.zero_grad()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vlm_compiles_and_runs_in_ort(tmp_path, arch):
    model, inputs = tiny_vlm(arch)
    graph, spec = capture_vlm(model, inputs)
    feed = {name: inputs[name].numpy() for name in spec.input_names}
    with torch.no_grad():
        reference_logits = model(**inputs, use_cache=False).logits
    labels = torch.randint(0, reference_logits.shape[-1], reference_logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    labels[..., :2] = -100
    check_executor_against_ort_and_autograd(model, inputs, graph, feed, labels)
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

    session = create_session(out / "model.onnx")
    (ort_logits,) = session.run(["logits"], feed)

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in dequantized_weights(out).items():
            params[name].copy_(torch.from_numpy(weight))
        torch_logits = model(**inputs, use_cache=False).logits.numpy()
    assert rel_err(ort_logits, torch_logits) < 1e-4
    assert rel_err(ort_logits, reference_logits.numpy()) > 1e-3  # the weights really changed
