"""Split a graph into the part that depends only on some inputs and the rest, for repeated runs.

Greedy decoding runs an encoder-decoder graph once per generated token with the same audio or image
features; the encoder's work does not change between steps. :func:`split_static_part` cuts the graph
at the values computed from the static inputs alone (for Whisper: the encoder output's cross-attention
keys and values), so the static part runs once and the rest once per step, computing the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

__all__ = ["split_static_part"]

VQ_DOMAIN = "mgvq"


def _reachable(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """Values computed (transitively) from ``sources``; nodes are in topological order."""
    reached = set(sources)
    for node in graph.node:
        if any(name in reached for name in node.input if name):
            reached.update(name for name in node.output if name)
    return reached


def _needed_nodes(graph: onnx.GraphProto, outputs: Sequence[str], stop: set[str]) -> list[onnx.NodeProto]:
    """Nodes needed to compute ``outputs`` when the values in ``stop`` are given, in graph order."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    keep: set[int] = set()
    pending = [name for name in outputs if name not in stop]
    while pending:
        name = pending.pop()
        index = producer.get(name)
        if index is None or index in keep:
            continue
        keep.add(index)
        pending.extend(value for value in graph.node[index].input if value and value not in stop)
    return [node for i, node in enumerate(graph.node) if i in keep]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value that shape inference or the mgvq ops (output type = activation type) give."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]
             if v.type.tensor_type.elem_type}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.domain == VQ_DOMAIN and node.input[0] in types:
            types.setdefault(node.output[0], types[node.input[0]])
    return types


def _submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    used = {value for node in nodes for value in node.input if value}
    initializers = [init for init in model.graph.initializer if init.name in used]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def split_static_part(
    model: onnx.ModelProto, static_inputs: Sequence[str]
) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """(static model, dynamic model, frontier names).

    The static model maps ``static_inputs`` to the frontier: the values computed from the static inputs
    alone that the rest of the graph reads. The dynamic model takes the frontier and the other inputs to
    the graph's outputs. Running the static model once and the dynamic model per step gives what the
    whole graph gives. Raises ValueError when a frontier value's element type cannot be found.
    """
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    graph_inputs = [v for v in graph.input if v.name not in initializer_names]
    dynamic_names = {v.name for v in graph_inputs} - set(static_inputs)
    from_static = _reachable(graph, set(static_inputs))
    from_dynamic = _reachable(graph, dynamic_names)
    static_only = from_static - from_dynamic
    frontier: list[str] = []
    for node in graph.node:
        if any(name in from_dynamic for name in node.input if name):
            frontier += [name for name in node.input if name in static_only and name not in frontier]
    frontier += [v.name for v in graph.output if v.name in static_only and v.name not in frontier]
    types = _elem_types(model)
    missing = [name for name in frontier if name not in types]
    if missing:
        raise ValueError(f"no element type known for {missing[:3]}: cannot cut the graph there")
    frontier_info = [helper.make_tensor_value_info(name, types[name], None) for name in frontier]
    static_model = _submodel(model, _needed_nodes(graph, frontier, set(static_inputs)),
                             [v for v in graph_inputs if v.name in static_inputs], frontier_info, "static_part")
    outputs = [v.name for v in graph.output]
    dynamic_model = _submodel(model, _needed_nodes(graph, outputs, set(frontier) | dynamic_names),
                              [v for v in graph_inputs if v.name in dynamic_names] + frontier_info,
                              list(graph.output), "dynamic_part")
    return static_model, dynamic_model, frontier
