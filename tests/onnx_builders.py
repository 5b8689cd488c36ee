"""Tiny ONNX models built with onnx.helper (not by our capture), for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_model(seed: int = 0, *, hidden: int = 64, inputs: int = 32, outputs: int = 16, opset: int = 17) -> onnx.ModelProto:
    """x[batch, seq, inputs] -> MatMul -> Add -> Relu -> Gemm(transB=1) on a flattened view -> logits."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32)  # MatMul layout: [n, m]
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)  # Gemm transB: [m, n]
    b2 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w3 = (rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "fc1.bias"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["a1"], name="relu1"),
        helper.make_node("Reshape", ["a1", "flat_shape"], ["a1f"], name="flatten"),
        helper.make_node("Gemm", ["a1f", "fc2.weight", "fc2.bias"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "head.weight"], ["h3"], name="head_mm"),
        helper.make_node("Reshape", ["h3", "out_shape"], ["logits"], name="unflatten"),
    ]
    inits = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
        numpy_helper.from_array(w3, "head.weight"),
        numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([2, 8, outputs], np.int64), "out_shape"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 8, outputs])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    onnx.checker.check_model(model)
    return model


def save_mlp(path: Path, seed: int = 0, **kwargs) -> Path:
    onnx.save(mlp_model(seed, **kwargs), str(path))
    return path
