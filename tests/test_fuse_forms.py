"""The custom-node form (the default) and the decomposed form (portable) of FuseVQGemm compute the same
function, and a layer the kernels cannot take stays decomposed inside a custom-form model."""

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

import mgvq_compile
from mgvq_compile.calibration.executor import GraphExecutor
from onnx_builders import mlp_model, save_mlp


def test_custom_form_matches_decomposed_form(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32)
    common = dict(method="kmeans-vq", bits=2, resume=False, progress=False)
    mgvq_compile.compile(str(mlp), output=tmp_path / "dec", portable=True, **common)
    custom = mgvq_compile.compile(str(mlp), output=tmp_path / "cus", **common)
    model = ir.load(tmp_path / "cus" / "model.onnx")
    assert sum(n.domain == "mgvq" and n.op_type == "VQGemm" for n in model.graph) == 3
    assert model.opset_imports["mgvq"] == 1
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    (y_dec,) = ort.InferenceSession(str(tmp_path / "dec" / "model.onnx")).run(None, {"x": x})
    with torch.no_grad():
        y_cus = GraphExecutor(model).run({"x": x})["logits"].numpy()
    assert np.linalg.norm(y_cus - y_dec) / np.linalg.norm(y_dec) < 1e-5
    assert custom.report["summary"]["stored_bytes"] > 0


def test_layer_the_kernels_cannot_take_stays_decomposed(tmp_path, caplog):
    from onnx import numpy_helper

    from mgvq_compile.runtime import create_session

    proto = mlp_model(0, hidden=64, inputs=32)
    bias = next(t for t in proto.graph.initializer if t.name == "fc2.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias)[None, :], "fc2.bias"))  # [1, m]: no VQGemm bias
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, str(path))
    common = dict(method="kmeans-vq", bits=2, resume=False, progress=False)
    with caplog.at_level(logging.WARNING):
        mgvq_compile.compile(str(path), output=tmp_path / "cus", **common)
    assert "fc2.weight stays in the decomposed form" in caplog.text and "shape (1, 64)" in caplog.text
    model = ir.load(tmp_path / "cus" / "model.onnx")
    assert sorted(n.op_type for n in model.graph if n.domain == "mgvq") == ["VQGemm", "VQGemm"]
    assert any(n.op_type == "Gemm" for n in model.graph)
    mgvq_compile.compile(str(path), output=tmp_path / "dec", portable=True, **common)
    x = np.random.default_rng(1).standard_normal((2, 8, 32)).astype(np.float32)
    (y_cus,) = create_session(tmp_path / "cus" / "model.onnx").run(None, {"x": x})
    (y_dec,) = ort.InferenceSession(str(tmp_path / "dec" / "model.onnx")).run(None, {"x": x})
    assert np.linalg.norm(y_cus - y_dec) / np.linalg.norm(y_dec) < 1e-5


def test_weights_the_kernels_cannot_read_are_named():
    from mgvq_compile.passes.fuse_vq_gemm import custom_form_obstacle

    x = ir.Value(name="x")
    w = ir.Value(name="w")
    matmul = ir.node("MatMul", [x, w])
    assert custom_form_obstacle(matmul, 8, ir.DataType.FLOAT) is None
    assert custom_form_obstacle(matmul, 8, ir.DataType.FLOAT16) is None
    message = custom_form_obstacle(matmul, 8, ir.DataType.BFLOAT16)
    assert message is not None and "BFLOAT16" in message and "float32 or float16" in message
    bias = ir.Value(name="b", shape=ir.Shape([8]))
    assert custom_form_obstacle(ir.node("Gemm", [x, w, bias]), 8, ir.DataType.FLOAT) is None
    assert "not (9,)" in custom_form_obstacle(ir.node("Gemm", [x, w, bias]), 9, ir.DataType.FLOAT)
