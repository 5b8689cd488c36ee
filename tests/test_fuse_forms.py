"""The custom-node and decomposed forms of FuseVQGemm compute the same function."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

import mgvq_compile
from mgvq_compile.calibration.executor import GraphExecutor
from onnx_builders import save_mlp


def test_custom_form_matches_decomposed_form(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32)
    common = dict(method="kmeans-vq", bits=2, resume=False, progress=False)
    mgvq_compile.compile(str(mlp), output=tmp_path / "dec", form="decomposed", **common)
    custom = mgvq_compile.compile(str(mlp), output=tmp_path / "cus", form="custom", **common)
    model = ir.load(tmp_path / "cus" / "model.onnx")
    assert sum(n.domain == "mgvq" and n.op_type == "VQGemm" for n in model.graph) == 3
    assert model.opset_imports["mgvq"] == 1
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    (y_dec,) = ort.InferenceSession(str(tmp_path / "dec" / "model.onnx")).run(None, {"x": x})
    with torch.no_grad():
        y_cus = GraphExecutor(model).run({"x": x})["logits"].numpy()
    assert np.linalg.norm(y_cus - y_dec) / np.linalg.norm(y_dec) < 1e-5
    assert custom.report["summary"]["stored_bytes"] > 0
