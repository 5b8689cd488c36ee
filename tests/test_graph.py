"""Loading ONNX files: weights that exporters compute (Transpose, Constant) become initializers, and
weights the exporter's optimizer renamed get their parameter names back."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mgvq_compile.graph import expose_linear_weights, find_linear_layers, load_onnx


def _unfolded_model() -> onnx.ModelProto:
    """x -> MatMul(Transpose(fc1.weight)) -> Relu -> MatMul(Constant fc2.weight) -> Relu
    -> MatMul(Transpose(tied.weight)) -> + Gather(tied.weight) -> Relu -> MatMul(head.weight) -> y."""
    rng = np.random.default_rng(0)
    fc1 = rng.standard_normal((24, 16)).astype(np.float32)  # nn.Linear layout: [out, in]
    fc2 = rng.standard_normal((24, 20)).astype(np.float32)  # MatMul layout: [in, out]
    tied = rng.standard_normal((12, 20)).astype(np.float32)
    head = rng.standard_normal((12, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["fc1.weight"], ["fc1_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "fc1_t"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Constant", [], ["fc2.weight"], value=numpy_helper.from_array(fc2)),
        helper.make_node("MatMul", ["a1", "fc2.weight"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Transpose", ["tied.weight"], ["tied_t"]),
        helper.make_node("MatMul", ["a2", "tied_t"], ["h3"]),
        helper.make_node("Gather", ["tied.weight", "index"], ["row"], axis=1),
        helper.make_node("Add", ["h3", "row"], ["h3r"]),
        helper.make_node("Relu", ["h3r"], ["a3"]),
        helper.make_node("MatMul", ["a3", "head.weight"], ["h4"]),
        helper.make_node("Identity", ["h4"], ["y"]),
    ]
    inits = [numpy_helper.from_array(fc1, "fc1.weight"), numpy_helper.from_array(tied, "tied.weight"),
             numpy_helper.from_array(head, "head.weight"), numpy_helper.from_array(np.array(3, np.int64), "index")]
    graph = helper.make_graph(nodes, "unfolded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_load_onnx_folds_computed_weights_into_initializers_exactly(tmp_path):
    proto = _unfolded_model()
    # As a file our capture wrote: parameter names, and the exporter's record with the wrapper's prefix.
    head = helper.make_tensor_value_info("head.weight", TensorProto.FLOAT, [12, 4])
    head.metadata_props.add(key="pkg.onnxscript.optimizer.folded_from", value="['captured.head.weight']")
    proto.graph.value_info.append(head)
    path = tmp_path / "unfolded.onnx"
    onnx.save(proto, str(path))
    assert [layer.weight for layer in find_linear_layers(ir.load(str(path)))] == ["head.weight"]

    model = load_onnx(path)
    layers = find_linear_layers(model)
    # fc1's Transpose folds under its parameter's name; the Constant becomes an initializer; the tied weight
    # (also gathered) keeps its Transpose, so it is not a layer.
    assert [(layer.weight, layer.weight_is_transposed, layer.out_features, layer.in_features) for layer in layers] == [
        ("fc1.weight", False, 24, 16), ("fc2.weight", False, 20, 24), ("head.weight", False, 4, 12)]
    assert [node.op_type for node in model.graph].count("Transpose") == 1
    assert "Constant" not in [node.op_type for node in model.graph]
    assert expose_linear_weights(model) == 0  # nothing left to fold

    folded = tmp_path / "folded.onnx"
    ir.save(model, str(folded))
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(path, x))


def test_load_onnx_finds_every_linear_of_torch_exports_by_parameter_name(tmp_path):
    """The exports users bring: the default (dynamo, optimized: weights folded into ``val_N`` constants)
    and the two without constant folding (``Transpose(W) -> MatMul``)."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(16, 32)
            self.down = torch.nn.Linear(32, 8, bias=False)
            self.out = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.down(torch.relu(self.up(x))))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 5, 16)
    expected = [("up.weight", 32, 16), ("down.weight", 8, 32), ("out.weight", 4, 8)]
    for options in (dict(dynamo=True), dict(dynamo=True, optimize=False), dict(dynamo=False, do_constant_folding=False)):
        path = tmp_path / "net.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], **options)
        model = load_onnx(path)
        found = [(layer.weight, layer.out_features, layer.in_features) for layer in find_linear_layers(model)]
        assert found == expected, options
        ir.save(model, str(tmp_path / "loaded.onnx"))
        np.testing.assert_array_equal(_run(tmp_path / "loaded.onnx", x.numpy()), _run(path, x.numpy()))
