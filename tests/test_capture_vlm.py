"""One-graph capture of tiny random-weight VLMs: adapters equal the HF forward, ORT equals torch,
weights keep their module paths, captures are byte-for-byte deterministic."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from mgvq_compile.capture.tiny_vlms import ARCHITECTURES, tiny_vlm
from mgvq_compile.capture.vlm import CaptureSpec, capture_vlm, vlm_adapter, weight_modules
from mgvq_compile.errors import CaptureError

# Parameter-name prefixes of the vision side (tower + projector) and of the language side, per arch.
VISION = {
    "qwen2_vl": ("model.visual.",),
    "qwen2_5_vl": ("model.visual.",),
    "llava_onevision": ("model.vision_tower.", "model.multi_modal_projector."),
    "internvl": ("model.vision_tower.", "model.multi_modal_projector."),
    "smolvlm": ("model.vision_model.", "model.connector."),
    "paligemma": ("model.vision_tower.", "model.multi_modal_projector."),
}
LANGUAGE = ("model.language_model.", "model.text_model.", "lm_head.")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@functools.lru_cache(maxsize=None)
def _captured(arch: str):
    """(model, example inputs, reference logits, graph, spec, adapter feeds), once per session."""
    model, inputs = tiny_vlm(arch)
    graph, spec = capture_vlm(model, inputs)
    feeds = {name: inputs[name].numpy() for name in spec.input_names}
    return model, inputs, _reference(model, inputs), graph, spec, feeds


def _used_linear_weights(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> set[str]:
    """Weights of the nn.Linear modules the forward calls, less any tied to the input embeddings (a tied
    lm_head is a Gather table too, so the exporter keeps ``Transpose(weight)`` for its MatMul)."""
    used: set[str] = set()
    handles = [
        mod.register_forward_hook(lambda _m, _i, _o, name=name: used.add(f"{name}.weight"))
        for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    ]
    try:
        _reference(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    embedding = model.get_input_embeddings().weight
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name for name in used if params[name].data_ptr() != embedding.data_ptr()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_equals_hf_forward_and_backpropagates_into_both_towers(arch):
    model, inputs = tiny_vlm(arch)
    reference = _reference(model, inputs)
    adapter = vlm_adapter(model, inputs)
    logits = adapter(**adapter.graph_inputs())
    assert logits.shape == reference.shape
    assert _rel(logits.detach().numpy(), reference.numpy()) < 1e-5

    (logits.float() ** 2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    vision = [n for n, g in grads.items() if n.startswith(VISION[arch]) and g is not None and g.abs().sum() > 0]
    language = [n for n, g in grads.items() if n.startswith(LANGUAGE) and g is not None and g.abs().sum() > 0]
    assert any(".layers." in n or ".blocks." in n or ".layer." in n for n in vision), vision
    assert any(".layers." in n for n in language), language


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_graph_in_onnxruntime_equals_torch(arch):
    _model, _inputs, reference, graph, spec, feeds = _captured(arch)
    assert isinstance(spec, CaptureSpec)
    assert spec.input_names == ["pixel_values", "input_ids"]
    assert [v.name for v in graph.graph.inputs] == spec.input_names
    assert [v.name for v in graph.graph.outputs] == ["logits"] == spec.output_names
    assert spec.input_shapes == {name: tuple(array.shape) for name, array in feeds.items()}
    assert spec.notes
    session = ort.InferenceSession(ir.to_proto(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], feeds)
    assert logits.shape == tuple(reference.shape)
    assert _rel(logits, reference.numpy()) < 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weights_keep_module_paths_and_feed_matmuls_directly(arch):
    model, inputs, _ref, graph, _spec, _feeds = _captured(arch)
    names = set(graph.graph.initializers)
    params = {name for name, _ in model.named_parameters()}
    assert any(n.startswith(VISION[arch]) for n in names & params)
    assert any(n.startswith(LANGUAGE) for n in names & params)

    weights = weight_modules(graph)
    # Every nn.Linear weight is a MatMul/Gemm weight operand, as an initializer named by its module path.
    linear = _used_linear_weights(model, inputs)
    missing = linear - set(weights)
    assert not missing, sorted(missing)
    assert any(n.startswith(VISION[arch]) for n in weights)
    assert any(n.startswith(LANGUAGE) for n in weights)

    # No weight reaches a MatMul/Gemm through a Transpose node left in the graph.
    for node in graph.graph.all_nodes():
        if node.op_type == "Transpose" and node.inputs[0].name in linear:
            consumers = {use.node.op_type for use in node.outputs[0].uses()}
            assert not consumers & {"MatMul", "Gemm"}, node.inputs[0].name


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=() if a == "qwen2_5_vl" else pytest.mark.slow) for a in ARCHITECTURES],
)
def test_capture_is_deterministic(arch):
    _model, _inputs, _ref, graph, _spec, _feeds = _captured(arch)
    model, inputs = tiny_vlm(arch)  # a fresh model with the same seed
    again, _ = capture_vlm(model, inputs)
    first, second = ir.to_proto(graph), ir.to_proto(again)
    assert first.SerializeToString() == second.SerializeToString(), _first_difference(first, second)


def _first_difference(a, b) -> str:
    """Where two ModelProtos first differ, for the assertion message."""
    for x, y in zip(a.graph.node, b.graph.node):
        if x.SerializeToString() != y.SerializeToString():
            return f"node {x.name!r} ({x.op_type}) differs from {y.name!r} ({y.op_type})"
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        if x.SerializeToString() != y.SerializeToString():
            return f"initializer {x.name!r} differs from {y.name!r}"
    return f"{len(a.graph.node)} vs {len(b.graph.node)} nodes; graph inputs, outputs or metadata differ"


def test_capture_vlm_rejects_models_without_an_adapter():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(CaptureError, match="no VLM capture adapter"):
        capture_vlm(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_tiny_vlm_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_vlm("not_a_vlm")


def test_tiny_vlm_is_seeded():
    (a, inputs_a), (b, inputs_b) = tiny_vlm("internvl", seed=3), tiny_vlm("internvl", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(inputs_a[k], inputs_b[k]) for k in inputs_a)
