"""The calibration executor against ORT (forward) and torch eager autograd (weight gradients)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _models import export_to_ir, load_smollm2_fast, parameter_sources, tiny_llama, tiny_whisper
from vq_helpers import rel_err
from mgvq_compile.calibration.executor import GraphExecutor, check_supported
from mgvq_compile.calibration.ops import register_op
from mgvq_compile.errors import CalibrationError, UnsupportedOpError

_TINY = {"llama": tiny_llama, "whisper": tiny_whisper}
_EXPORTS: dict[str, tuple] = {}


def exported(name: str):
    """(torch model, example inputs, onnx_ir.Model exported with optimize=True), once per session."""
    if name not in _EXPORTS:
        model, inputs = _TINY[name]()
        _EXPORTS[name] = (model, inputs, export_to_ir(model, inputs, ["logits"]))
    return _EXPORTS[name]



def ort_run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # faster to build
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) for k, v in feeds.items()})


def to_ir(nodes, inputs, outputs, initializers=(), opset=18, extra_opsets=(), functions=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, functions=list(functions)))


def numpy_feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


# --- forward against ONNX Runtime ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_forward_matches_ort_on_tiny_exports(name):
    _model, inputs, graph = exported(name)
    feeds = numpy_feeds(inputs)
    with torch.no_grad():
        out = GraphExecutor(graph).run(feeds)
    (expected, *_rest) = ort_run(graph, feeds)
    assert out["logits"].dtype == torch.float32 and tuple(out["logits"].shape) == expected.shape
    assert rel_err(out["logits"].numpy(), expected) < 1e-4


@pytest.mark.real_model
def test_real_smollm2_forward_matches_ort_and_gradients_match_torch():
    model = load_smollm2_fast()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # optimize=False exports faster and keeps every weight under its parameter name (Transpose -> MatMul).
    graph = export_to_ir(model, {"input_ids": ids}, ["logits"], optimize=False)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"]
    executor = GraphExecutor(graph, trainable=names)
    assert sum(t.requires_grad for t in executor.weights.values()) == len(names)
    logits = executor.run({"input_ids": ids.numpy()})["logits"]
    assert rel_err(logits.detach().numpy(), ort_run(graph, {"input_ids": ids.numpy()})[0]) < 1e-4

    labels = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    ce_loss(logits, labels).backward()
    model.zero_grad()
    ce_loss(model(input_ids=ids, use_cache=False).logits, labels).backward()
    params = dict(model.named_parameters())
    for name in names:
        assert rel_err(executor.weights[name].grad.numpy(), params[name].grad.numpy()) < 1e-4, name


def test_standard_ops_graph_matches_ort():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 0, 2, 1], strides=[2, 2], name="conv"),
        helper.make_node("Conv", ["c", "dw"], ["d"], pads=[1, 1, 1, 1], dilations=[2, 1], group=2, name="grouped"),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("LayerNormalization", ["g", "ls", "lb"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
        # 1-d stem as in Whisper: Conv1d with stride and groups, then Gelu
        helper.make_node("Conv", ["a", "aw", "ab"], ["ac"], pads=[1, 1], strides=[2], group=2),
        helper.make_node("Gelu", ["ac"], ["z"]),
    ]
    inits = {
        "cw": (4, 3, 3, 3), "cb": (4,), "dw": (4, 2, 3, 3), "gw": (10, 4 * 3 * 4), "gb": (10,), "ls": (10,),
        "lb": (10,), "aw": (8, 3, 3), "ab": (8,),
    }
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in inits.items()]
    model = to_ir(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 6, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        initializers, opset=20,
    )
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
             "a": rng.standard_normal((2, 6, 10)).astype(np.float32)}
    with torch.no_grad():
        out = GraphExecutor(model).run(feeds)
    expected = ort_run(model, feeds)
    assert rel_err(out["y"].numpy(), expected[0]) < 1e-5
    assert rel_err(out["z"].numpy(), expected[1]) < 1e-5


def test_decomposed_vq_graph_matches_ort_with_uint8_indices():
    """The decomposed VQ-GEMM form: gather codebook rows by uint8 index, reshape to W, scale, matmul."""
    rng = np.random.default_rng(1)
    out_f, in_f, dim, k = 6, 8, 2, 16
    codebook = rng.standard_normal((k, dim)).astype(np.float32)
    indices = rng.integers(0, k, (out_f, in_f // dim)).astype(np.uint8)
    nodes = [
        helper.make_node("Cast", ["idx"], ["idx64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "idx64"], ["rows"], axis=0),
        helper.make_node("Cast", ["idx"], ["idx32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["codebook", "idx32"], ["rows8"], axis=0),
        helper.make_node("Sub", ["rows", "rows8"], ["zero"]),
        helper.make_node("Add", ["rows", "zero"], ["rows2"]),
        helper.make_node("Reshape", ["rows2", "w_shape"], ["w"]),
        helper.make_node("Mul", ["w", "scale"], ["ws"]),
        helper.make_node("Slice", ["ws", "starts", "ends", "axes"], ["w_top"]),
        helper.make_node("Slice", ["ws", "starts2", "ends2", "axes"], ["w_bottom"]),
        helper.make_node("Concat", ["w_top", "w_bottom"], ["w_all"], axis=0),
        helper.make_node("Transpose", ["w_all"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    inits = [
        numpy_helper.from_array(codebook, "codebook"), numpy_helper.from_array(indices, "idx"),
        numpy_helper.from_array(i64([out_f, in_f]), "w_shape"),
        numpy_helper.from_array(rng.uniform(0.5, 2, (out_f, 1)).astype(np.float32), "scale"),
        numpy_helper.from_array(i64([0]), "starts"), numpy_helper.from_array(i64([3]), "ends"),
        numpy_helper.from_array(i64([3]), "starts2"), numpy_helper.from_array(i64([2**62]), "ends2"),
        numpy_helper.from_array(i64([0]), "axes"),
    ]
    model = to_ir(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, in_f])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, out_f])], inits, opset=21)
    x = rng.standard_normal((4, in_f)).astype(np.float32)
    executor = GraphExecutor(model)
    assert executor.weights["idx"].dtype == torch.uint8 and not executor.weights["idx"].requires_grad
    assert executor.weights["codebook"].requires_grad
    y = executor.run({"x": x})["y"]
    assert rel_err(y.detach().numpy(), ort_run(model, {"x": x})[0]) < 1e-6
    y.sum().backward()  # gradients reach the codebook through the gathers
    assert executor.weights["codebook"].grad is not None and executor.weights["codebook"].grad.abs().sum() > 0


def test_half_precision_and_int_values_keep_their_dtypes():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
        helper.make_node("Concat", ["n1", "n1"], ["shape2"], axis=0),
        helper.make_node("Reshape", ["x", "shape2"], ["x2"]),
        helper.make_node("LayerNormalization", ["x2", "scale"], ["y"], axis=-1),
    ]
    model = to_ir(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None),
         helper.make_tensor_value_info("shape2", TensorProto.INT64, None)],
        [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.linspace(0.5, 1.5, 4).astype(np.float16), "scale")], opset=18,
    )
    x = np.random.default_rng(2).standard_normal((4, 4)).astype(np.float16)
    out = GraphExecutor(model).run({"x": x})
    assert out["y"].dtype == torch.float16 and out["shape2"].dtype == torch.int64
    assert out["shape2"].tolist() == [4, 4] and not out["shape2"].requires_grad
    assert rel_err(out["y"].detach().float().numpy(), ort_run(model, {"x": x})[0].astype(np.float32)) < 2e-3


# --- backward against torch eager autograd --------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_weight_gradients_match_torch_autograd(name):
    model, inputs, graph = exported(name)
    params = dict(model.named_parameters())
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    ce_loss(logits, labels).backward()

    executor = GraphExecutor(graph)
    out = executor.run(numpy_feeds(inputs))["logits"]
    ce_loss(out, labels).backward()
    sources = parameter_sources(graph, set(params))
    compared, transposed = 0, 0
    for init_name, (param_name, is_transposed) in sources.items():
        expected = params[param_name].grad
        if expected is None:
            continue
        got = executor.weights[init_name].grad
        got = got.T if is_transposed else got
        assert got is not None and got.shape == expected.shape, init_name
        assert rel_err(got.numpy(), expected.numpy()) < 1e-4, (init_name, param_name)
        compared += 1
        transposed += is_transposed
    linear = sum(1 for n, p in params.items() if p.dim() == 2 and p.grad is not None and "embed" not in n)
    assert transposed >= linear - 1 and compared >= 10  # every linear layer (a tied head may merge) and more


def test_keep_returns_intermediates_with_gradients():
    _model, inputs, graph = exported("llama")
    executor = GraphExecutor(graph)
    node = next(n for n in graph.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    out = executor.run(numpy_feeds(inputs), keep=[x_name, y_name])
    out["logits"].sum().backward()
    y, x = out[y_name], out[x_name]
    assert y.grad is not None and y.grad.shape == y.shape and torch.count_nonzero(y.grad) > 0
    expected_weight_grad = x.reshape(-1, x.shape[-1]).T @ y.grad.reshape(-1, y.shape[-1])
    assert rel_err(executor.weights[node.inputs[1].name].grad.numpy(), expected_weight_grad.detach().numpy()) < 1e-4
    with pytest.raises(CalibrationError, match="not_a_value"):
        executor.run(numpy_feeds(inputs), keep=["not_a_value"])


def test_trainable_limits_the_leaves_that_require_grad():
    _model, inputs, graph = exported("llama")
    weight = next(n.inputs[1].name for n in graph.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
    executor = GraphExecutor(graph, trainable=[weight])
    assert [n for n, t in executor.weights.items() if t.requires_grad] == [weight]
    executor.run(numpy_feeds(inputs))["logits"].sum().backward()
    assert executor.weights[weight].grad is not None
    executor.zero_grad()
    assert executor.weights[weight].grad is None
    with pytest.raises(CalibrationError, match="nope"):
        GraphExecutor(graph, trainable=["nope"])


def test_on_node_sees_every_node():
    _model, inputs, graph = exported("whisper")
    seen = []
    with torch.no_grad():
        GraphExecutor(graph).run(numpy_feeds(inputs), on_node=lambda node, i, o: seen.append((node.op_type, len(o))))
    assert len(seen) == len(graph.graph) and ("Conv", 1) in seen


# --- errors -------------------------------------------------------------------------------------------


def test_unsupported_op_names_op_opset_and_node():
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="the_node")
    model = to_ir([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], extra_opsets=[("com.example", 7)])
    for call in (GraphExecutor, check_supported):
        with pytest.raises(UnsupportedOpError) as info:
            call(model)
        message = str(info.value)
        assert "Frobnicate" in message and "opset 7" in message and "the_node" in message
        assert info.value.op_type == "Frobnicate" and info.value.opset == 7 and info.value.node_name == "the_node"


def test_bad_feeds_name_the_inputs():
    _model, inputs, graph = exported("llama")
    executor = GraphExecutor(graph)
    with pytest.raises(CalibrationError, match="missing: input_ids") as info:
        executor.run({})
    assert "input_ids int64[2, 12]" in str(info.value)  # the hint lists the graph inputs
    with pytest.raises(CalibrationError, match="unknown: pixel_values"):
        executor.run({**numpy_feeds(inputs), "pixel_values": np.zeros(3, np.float32)})
    with pytest.raises(CalibrationError, match="int64"):
        executor.run({"input_ids": inputs["input_ids"].numpy().astype(np.int32)})
    with pytest.raises(CalibrationError, match="shape"):
        executor.run({"input_ids": inputs["input_ids"].numpy()[:1]})


# --- opsets, functions, subgraphs ----------------------------------------------------------------


def test_converters_are_chosen_by_opset():
    @register_op("Twice", "test.mgvq", since_version=1)
    def _v1(node, x, opset):
        return [x[0] * 2]

    @register_op("Twice", "test.mgvq", since_version=5)
    def _v5(node, x, opset):
        return [x[0] * 2 + opset]

    def run(opset: int) -> list[float]:
        model = to_ir([helper.make_node("Twice", ["x"], ["y"], domain="test.mgvq")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], extra_opsets=[("test.mgvq", opset)])
        return GraphExecutor(model).run({"x": np.ones(2, np.float32)})["y"].tolist()

    assert run(4) == [2.0, 2.0] and run(7) == [9.0, 9.0]


def test_model_functions_are_inlined_and_if_runs_its_branch():
    square = helper.make_function("local", "Square", ["a"], ["b"], [helper.make_node("Mul", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 18)])
    then_graph = helper.make_graph([helper.make_node("Add", ["sq", "bias"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["sq"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Square", ["x"], ["sq"], domain="local"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    model = to_ir(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                  [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.ones(3, np.float32), "bias")],
                  extra_opsets=[("local", 1)], functions=[square])
    executor = GraphExecutor(model)
    assert len(model.functions) == 1  # the caller's model is left as is
    x = np.array([1.0, 2.0, 3.0], np.float32)
    assert executor.run({"x": x})["y"].tolist() == [2.0, 5.0, 10.0]
    assert executor.run({"x": -x})["y"].tolist() == [-1.0, -4.0, -9.0]
    y = executor.run({"x": x})["y"]
    y.sum().backward()
    assert executor.weights["bias"].grad.tolist() == [1.0, 1.0, 1.0]
