"""split_static_part: the static part once plus the dynamic part equals the whole graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mgvq_compile.graph_split import split_static_part
from mgvq_compile.runtime import create_session


def _two_input_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w_static = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w_static")
    w_out = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w_out")
    nodes = [
        helper.make_node("MatMul", ["x", "w_static"], ["encoded"]),  # static: from x only
        helper.make_node("Relu", ["encoded"], ["keys"]),
        helper.make_node("Shape", ["keys"], ["keys_shape"]),  # an int64 value crosses the cut too
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Add", ["y", "one"], ["y1"]),  # dynamic: from y
        helper.make_node("Mul", ["keys", "y1"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "keys_shape"], ["mixed_shaped"]),
        helper.make_node("MatMul", ["mixed_shaped", "w_out"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
        [w_static, w_out],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_static_part_once_then_dynamic_part_equals_the_whole_graph():
    model = _two_input_graph()
    onnx.checker.check_model(model)
    static, dynamic, frontier = split_static_part(model, ["x"])
    assert sorted(frontier) == ["keys", "keys_shape"]
    assert {n.op_type for n in static.graph.node} == {"MatMul", "Relu", "Shape"}
    assert "x" not in {i.name for i in dynamic.graph.input}
    assert [init.name for init in static.graph.initializer] == ["w_static"]
    whole, first, second = (create_session(m.SerializeToString()) for m in (model, static, dynamic))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    cached = dict(zip(frontier, first.run(frontier, {"x": x})))
    for _ in range(3):
        y = rng.standard_normal((2, 4)).astype(np.float32)
        (expected,) = whole.run(None, {"x": x, "y": y})
        (got,) = second.run(None, {"y": y, **cached})
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_a_cut_through_a_value_of_unknown_type_is_refused():
    model = _two_input_graph()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.domain, relu.op_type = "custom.unknown", "Mystery"  # shape inference cannot type its output
    model.opset_import.append(helper.make_opsetid("custom.unknown", 1))
    with pytest.raises(ValueError, match="no element type"):
        split_static_part(model, ["x"])
