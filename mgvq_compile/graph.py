"""IR helpers: loading ONNX files, finding quantizable layers, tagging their modality, fingerprints."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from mgvq_compile.errors import InputError

__all__ = [
    "LinearLayer",
    "load_onnx",
    "expose_linear_weights",
    "restore_weight_names",
    "opset_of",
    "find_linear_layers",
    "input_modalities",
    "tag_modalities",
    "attention_query_key_layers",
    "model_fingerprint",
    "weight_matrix",
    "with_weights",
]

logger = logging.getLogger(__name__)

_VISION_INPUTS = re.compile(r"pixel|image|vision|video", re.IGNORECASE)
_AUDIO_INPUTS = re.compile(r"input_features|audio|mel|speech|wav", re.IGNORECASE)
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_EXPORTER_NAME = re.compile(r"val_\d+")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DEFAULT_SKIP = (r"(^|[./_])lm_head([./_]|$)", r"embed_tokens", r"(^|[./_])wte([./_]|$)")


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """A MatMul/Gemm whose weight is a 2-D float initializer: y = x W^T with W of shape m x n."""

    graph: str
    node: str
    weight: str  # initializer name
    op_type: str  # "MatMul" or "Gemm"
    weight_is_transposed: bool  # True when the initializer holds W (m x n), False when it holds W^T
    out_features: int
    in_features: int
    activation: str  # name of the value that carries x

    @property
    def key(self) -> str:
        return self.weight if self.graph == "model" else f"{self.graph}:{self.weight}"


def load_onnx(path: str | Path) -> ir.Model:
    """Load an ONNX file (external data next to it is read lazily) with errors that say what to fix."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}", "check the path; MODEL must be an .onnx file")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an ONNX file", "pass the .onnx file inside it")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise InputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})",
            "re-export the model; the file may be truncated or not an ONNX protobuf",
        ) from exc
    if not proto.graph.node:
        raise InputError(f"{path} holds no graph nodes", "re-export the model; the file looks empty or corrupt")
    missing = _missing_external_files(proto, path.parent)
    if missing:
        raise InputError(
            f"{path} refers to external data files that are missing: {', '.join(sorted(missing))}",
            "keep the weights file(s) next to the .onnx file, as exported",
        )
    model = ir.serde.deserialize_model(proto)
    _set_base_dir(model, path.parent)
    restore_weight_names(model)
    expose_linear_weights(model)
    return model


def restore_weight_names(model: ir.Model, prefix: str = "") -> None:
    """Give initializers their module paths back, without ``prefix``.

    torch's exporter folds ``Transpose(weight)`` into new constants named ``val_N`` and records the source
    in their metadata; a folded MatMul weight takes its source's name (it holds W^T, as MatMul's B input
    does). Captures through a wrapper module also strip the wrapper attribute's ``prefix`` from every name.
    Without a ``prefix`` (an ONNX file as given) only the exporter's own ``val_N`` names are replaced: a file
    that our capture wrote already has parameter names, while its records still carry the wrapper's prefix.
    """
    graph = model.graph
    renames = {name: name[len(prefix):] for name in graph.initializers if prefix and name.startswith(prefix)}
    final_names = {renames.get(name, name) for name in graph.initializers}
    for name, value in list(graph.initializers.items()):
        sources = value.metadata_props.get(_FOLDED_FROM)
        if name in renames or not sources or not (prefix or _EXPORTER_NAME.fullmatch(name)):
            continue
        try:
            parsed = ast.literal_eval(sources)
        except (ValueError, SyntaxError):
            continue
        # Only constants folded from one parameter (prefixed name) take its name back.
        if isinstance(parsed, list) and len(parsed) == 1 and str(parsed[0]).startswith(prefix):
            candidate = str(parsed[0])[len(prefix):]
            if candidate not in final_names:
                renames[name] = candidate
                final_names.discard(name)
                final_names.add(candidate)
    for old, new in renames.items():
        value = graph.initializers.pop(old)
        value.name = new
        graph.initializers[new] = value


_WEIGHT_SLOTS = {("MatMul", 1), ("Gemm", 1), ("Transpose", 0)}


def _only_feeds_weight_slots(value: ir.Value) -> bool:
    uses = value.uses()
    return bool(uses) and all((use.node.op_type, use.idx) in _WEIGHT_SLOTS and use.node.domain in ("", "ai.onnx")
                              for use in uses)


def _replace_with_initializer(graph: ir.Graph, node: ir.Node, tensor: ir.TensorProtocol, name: str) -> None:
    """Put an initializer ``name`` holding ``tensor`` where ``node``'s output was, and drop ``node``."""
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    ir.convenience.replace_all_uses_with(node.outputs[0], value)
    graph.remove(node, safe=True)
    graph.register_initializer(value)


def expose_linear_weights(model: ir.Model) -> int:
    """Rewrite the main graph so each linear layer's weight is an initializer feeding its MatMul/Gemm, as
    :func:`find_linear_layers` expects; returns how many nodes were folded away. Exports without constant
    folding (``torch.onnx.export(..., optimize=False)`` or ``do_constant_folding=False``) compute a
    MatMul's weight as ``Transpose(W)``, and some exporters keep weights in Constant nodes. A 2-D float
    Constant that only feeds weight inputs becomes an initializer; ``Transpose`` of a 2-D float initializer
    used nowhere else becomes that initializer transposed, under the original name, so the report
    keeps the parameter's name. Other nodes, tied weights and initializers that are also graph inputs
    (overridable at run time) are left as they are. The results are exactly equal."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
            continue
        output = node.outputs[0]
        if node.op_type == "Constant" and "value" in node.attributes and len(node.attributes) == 1:
            tensor = node.attributes["value"].as_tensor()
            if len(tensor.shape) == 2 and tensor.dtype in _FLOAT_TYPES and _only_feeds_weight_slots(output):
                _replace_with_initializer(graph, node, tensor, output.name)
                folded += 1
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.outputs[0].is_graph_output():
            continue
        source = _initializer(graph, node.inputs[0])
        if (source is None or source.is_graph_input() or len(source.uses()) != 1
                or source.const_value.dtype not in _FLOAT_TYPES or len(source.const_value.shape) != 2
                or not _only_feeds_weight_slots(node.outputs[0])):
            continue
        perm = node.attributes.get_ints("perm", None) or (1, 0)
        array = np.ascontiguousarray(source.const_value.numpy().transpose(perm))
        name = source.name
        graph.initializers.pop(name)
        _replace_with_initializer(graph, node, ir.Tensor(array, dtype=source.const_value.dtype, name=name), name)
        folded += 1
    if folded:
        logger.info("folded %d Constant/Transpose nodes into weight initializers", folded)
    return folded


def _missing_external_files(proto: onnx.ModelProto, base: Path) -> set[str]:
    missing = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and not (base / location).exists():
                missing.add(location)
    return missing


def _set_base_dir(model: ir.Model, base: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base)


def opset_of(model: ir.Model, domain: str = "") -> int:
    return int(model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0)))


def _initializer(graph: ir.Graph, value: ir.Value | None) -> ir.Value | None:
    if value is not None and value.is_initializer() and value.const_value is not None:
        return value
    return None


def find_linear_layers(
    model: ir.Model, graph_name: str = "model", *, skip: Iterable[str] = _DEFAULT_SKIP
) -> list[LinearLayer]:
    """Every MatMul/Gemm with a 2-D float initializer weight, in graph order, minus skipped names.

    Embeddings and the LM head are skipped by default (method page, section 7), as is any weight
    that also feeds another node (a tied embedding) and any MatMul whose output is a graph output.
    """
    skip_patterns = [re.compile(p) for p in skip]
    graph = model.graph
    layers = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2:
            continue
        weight = _initializer(graph, node.inputs[1])
        if weight is None or weight.const_value.dtype not in _FLOAT_TYPES:
            continue
        shape = tuple(weight.const_value.shape)
        if len(shape) != 2 or any(p.search(weight.name) for p in skip_patterns):
            continue
        if len(weight.uses()) != 1 or node.outputs[0].is_graph_output():
            continue
        transposed = False
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None and attrs.get_float("beta", 1.0) != 1.0:
                continue
            transposed = bool(attrs.get_int("transB", 0))
        m, n = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        layers.append(
            LinearLayer(graph_name, node.name or "", weight.name, node.op_type, transposed, m, n, node.inputs[0].name)
        )
    return layers


def weight_matrix(model: ir.Model, layer: LinearLayer) -> np.ndarray:
    """W (float32, m x n) of a layer, whatever the layout of its initializer."""
    array = model.graph.initializers[layer.weight].const_value.numpy().astype(np.float32)
    return array if layer.weight_is_transposed else np.ascontiguousarray(array.T)


def with_weights(model: ir.Model, weights: dict[str, np.ndarray], layers: Iterable[LinearLayer]) -> ir.Model:
    """A copy of ``model`` whose layers named in ``weights`` (layer key -> W, m x n) hold those weights, in
    their initializers' layout and dtype; every other initializer is shared with ``model``, not copied."""
    copy = model.clone()
    for layer in layers:
        if layer.key not in weights:
            continue
        value = copy.graph.initializers[layer.weight]
        array = weights[layer.key] if layer.weight_is_transposed else weights[layer.key].T
        value.const_value = ir.tensor(np.ascontiguousarray(array).astype(value.const_value.numpy().dtype), name=layer.weight)
    return copy


def input_modalities(model: ir.Model) -> dict[str, str]:
    """Modality of each graph input: 'vision', 'audio' or 'text' (integer token inputs)."""
    result = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        name = value.name or ""
        if _VISION_INPUTS.search(name):
            result[name] = "vision"
        elif _AUDIO_INPUTS.search(name):
            result[name] = "audio"
        elif value.dtype in (ir.DataType.INT64, ir.DataType.INT32) and "ids" in name:
            result[name] = "text"
    return result


def _value_graph(model: ir.Model) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        outs = [o.name for o in node.outputs if o is not None]
        for value in node.inputs:
            if value is not None:
                for out in outs:
                    dag.add_edge(value.name, out)
    return dag


def tag_modalities(model: ir.Model, layers: list[LinearLayer]) -> dict[str, str]:
    """Modality of each layer's activations by graph reachability from the inputs.

    A layer whose input is reachable from token inputs is 'text' (the language model, even where image
    features were merged into its sequence); otherwise it takes the modality of the (vision or audio)
    inputs that reach it, or 'other' when none does.
    """
    dag = _value_graph(model)
    reach: dict[str, set[str]] = {}
    for name, modality in input_modalities(model).items():
        if name in dag:
            reach.setdefault(modality, set()).update(nx.descendants(dag, name) | {name})
    tags = {}
    for layer in layers:
        reached = {mod for mod, values in reach.items() if layer.activation in values}
        if "text" in reached:
            tags[layer.key] = "text"
        elif reached:
            tags[layer.key] = sorted(reached)[0]
        else:
            tags[layer.key] = "other"
    return tags


_PRODUCTS = ("MatMul", "Gemm")
# Fused attention ops whose inputs 0 and 1 are the queries and keys (ONNX opset 23, ORT contrib ops).
_FUSED_ATTENTION = {("", "Attention"), ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "GroupQueryAttention")}


def _is_constant(value: ir.Value | None) -> bool:
    if value is None or value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _nearest_products(value: ir.Value | None) -> set[ir.Node]:
    """The MatMul/Gemm nodes met first walking up from ``value`` (through reshapes, transposes, rotary
    embeddings, norms, scaling), stopping at each."""
    found: set[ir.Node] = set()
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        node = current.producer()
        if node is None:
            continue
        if node.op_type in _PRODUCTS and node.domain in ("", "ai.onnx"):
            found.add(node)
        else:
            stack.extend(node.inputs)
    return found


def attention_query_key_layers(model: ir.Model, layers: Iterable[LinearLayer]) -> set[str]:
    """Keys of the layers whose outputs are the queries and keys of an attention: found by structure, so
    anonymous weight names (``val_12``, ``onnx::MatMul_7``) are covered.

    An attention's scores are a MatMul of two activations whose product reaches a Softmax through
    elementwise ops (scaling, masking); the projections feeding its two inputs are the query and key
    layers. Fused attention ops (opset 23 ``Attention``, ORT's ``MultiHeadAttention`` and
    ``GroupQueryAttention``) name their queries and keys as inputs 0 and 1.
    """
    graph = model.graph
    layer_of_node: dict[ir.Node, str] = {}
    for layer in layers:
        value = graph.initializers.get(layer.weight)
        if value is not None and len(value.uses()) == 1:
            layer_of_node[value.uses()[0].node] = layer.key
    query_key_inputs: list[ir.Value | None] = []
    for node in graph:
        if (node.domain, node.op_type) in _FUSED_ATTENTION:
            query_key_inputs += list(node.inputs[:2])
        elif node.op_type == "Softmax":
            for scores in _nearest_products(node.inputs[0]):
                if scores not in layer_of_node and not any(_is_constant(v) for v in scores.inputs[:2]):
                    query_key_inputs += list(scores.inputs[:2])
    return {layer_of_node[product] for value in query_key_inputs for product in _nearest_products(value)
            if product in layer_of_node}


def model_fingerprint(models: Mapping[str, ir.Model]) -> str:
    """A content hash of graphs and weights, so the same model (from any source) maps to one work dir."""
    digest = hashlib.sha256()
    for graph_name in sorted(models):
        model = models[graph_name]
        digest.update(graph_name.encode())
        digest.update(repr(sorted(model.opset_imports.items())).encode())
        for node in model.graph:
            digest.update(f"{node.domain}:{node.op_type}:{[v.name if v else '' for v in node.inputs]}".encode())
            digest.update(f"{[o.name for o in node.outputs]}:{sorted((k, str(a.value)) for k, a in node.attributes.items())}".encode())
        for name in sorted(model.graph.initializers):
            tensor = model.graph.initializers[name].const_value
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.tobytes())
    return digest.hexdigest()[:16]
