"""The calibration executor against ORT (forward) and torch eager autograd (weight gradients)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper, TensorProto

from mgvq_compile.calibration.executor import GraphExecutor
from mgvq_compile.errors import CalibrationError, UnsupportedOpError
from tiny_models import captured


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ort_run(model: ir.Model, feeds):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) for k, v in feeds.items()})


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_forward_matches_ort(name):
    _model, inputs, graph = captured(name)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        out = GraphExecutor(graph).run(feeds)
    (expected,) = ort_run(graph, feeds)
    assert rel(out["logits"].numpy(), expected) < 1e-4


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_weight_gradients_match_torch_autograd(name):
    model, inputs, graph = captured(name)
    logits = model(**inputs, use_cache=False).logits
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
    params = dict(model.named_parameters())

    executor = GraphExecutor(graph)
    out = executor.run({k: v.numpy() for k, v in inputs.items()})["logits"]
    torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="sum").backward()
    matmul_weights = {n.inputs[1].name for n in graph.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()}
    compared = 0
    for name_, tensor in executor.weights.items():
        if name_ not in params or params[name_].grad is None:
            continue
        expected = params[name_].grad
        got = tensor.grad.T if name_ in matmul_weights and tensor.dim() == 2 else tensor.grad
        assert got is not None and got.shape == expected.shape, name_
        assert rel(got.numpy(), expected.numpy()) < 1e-4, name_
        compared += 1
    assert compared >= 8  # every linear layer and norm of the tiny models


def test_keep_returns_intermediates_with_gradients():
    _model, inputs, graph = captured("llama")
    executor = GraphExecutor(graph)
    node = next(n for n in graph.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
    out = executor.run({k: v.numpy() for k, v in inputs.items()}, keep=[node.inputs[0].name, node.outputs[0].name])
    out["logits"].sum().backward()
    y = out[node.outputs[0].name]
    assert y.grad is not None and y.grad.shape == y.shape and torch.count_nonzero(y.grad) > 0
    x = out[node.inputs[0].name]
    expected_weight_grad = x.reshape(-1, x.shape[-1]).T @ y.grad.reshape(-1, y.shape[-1])
    assert rel(executor.weights[node.inputs[1].name].grad.numpy(), expected_weight_grad.detach().numpy()) < 1e-4


def test_standard_ops_graph_matches_ort():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1),
        helper.make_node("LayerNormalization", ["g", "ls", "lb"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "cb"),
        numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "gw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "gb"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "ls"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "lb"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        out = GraphExecutor(model).run({"x": x})["y"]
    assert rel(out.numpy(), ort_run(model, {"x": x})[0]) < 1e-5


def test_unsupported_op_and_bad_feeds_are_named():
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="the_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 7)]))
    with pytest.raises(UnsupportedOpError) as info:
        GraphExecutor(model)
    assert "Frobnicate" in str(info.value) and "opset 7" in str(info.value) and "the_node" in str(info.value)
    _model, inputs, graph = captured("llama")
    with pytest.raises(CalibrationError, match="missing: input_ids"):
        GraphExecutor(graph).run({"pixel_values": np.zeros(3)})
