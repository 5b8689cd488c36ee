"""Runs an ONNX graph (``onnx_ir.Model``) in torch, so that calibration gets activations and gradients.

Weights are leaf tensors (``requires_grad`` for the trainable ones), so ``loss.backward()`` after
:meth:`GraphExecutor.run` fills their ``.grad`` and the ``.grad`` of any value named in ``keep``.
One converter per op type and opset lives in :mod:`mgvq_compile.calibration.ops` (see ``register_op``).
Model-local functions are inlined first (into a clone: the caller's model is left as is); ``If`` runs
its branch subgraph; ``Loop`` and ``Scan`` are not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from mgvq_compile.calibration.ops import Converter, find_converter, register_op, tensor_to_torch, torch_dtype
from mgvq_compile.errors import CalibrationError, UnsupportedOpError

__all__ = ["GraphExecutor", "check_supported", "register_op"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_CONTROL_FLOW = {"If"}  # run by the executor itself (they need subgraphs); see _Runner.if_node


@register_op("If")
def _if_placeholder(node, x, opset):  # registered so that check_supported accepts If
    raise RuntimeError("If is run by GraphExecutor, not as a plain converter")


def _opset(model: ir.Model, domain: str) -> int:
    imports = model.opset_imports
    if domain in ("", "ai.onnx"):
        return int(imports.get("", imports.get("ai.onnx", 1)))
    return int(imports.get(domain, 1))


def check_supported(model: ir.Model) -> None:
    """Raise :class:`UnsupportedOpError` for the first node (graph order, subgraphs included) that has no
    converter for the model's opset of its domain."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        opset = _opset(model, node.domain)
        if find_converter(node.domain, node.op_type, opset) is None:
            raise UnsupportedOpError(node.op_type, node.domain, opset, node.name or "(unnamed)")


@dataclass(frozen=True)
class _Step:
    node: ir.Node
    convert: Converter
    opset: int
    inputs: tuple[str, ...]  # "" for a missing optional input
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # values no later step needs, dropped after this one (saves memory)


def _outer_names(node: ir.Node) -> set[str]:
    """Names of values a node's subgraphs read from enclosing scopes."""
    names: set[str] = set()
    for attribute in node.attributes.values():
        graphs = []
        if attribute.type == ir.AttributeType.GRAPH:
            graphs = [attribute.value]
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs = list(attribute.value)
        for graph in graphs:
            local = {v.name for v in graph.inputs} | set(graph.initializers)
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                local |= {v.name for v in inner.outputs if v is not None}
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                names |= {v.name for v in inner.inputs if v is not None and v.name and v.name not in local}
            names |= {v.name for v in graph.outputs if v.name not in local}
    return names


def _plan(model: ir.Model, graph: ir.Graph, protected: set[str]) -> list[_Step]:
    nodes = list(graph)
    reads = [
        {v.name for v in node.inputs if v is not None and v.name} | _outer_names(node) for node in nodes
    ]
    last_use: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            last_use[name] = i
    release: dict[int, list[str]] = {}
    for name, i in last_use.items():
        if name not in protected:
            release.setdefault(i, []).append(name)
    steps = []
    for i, node in enumerate(nodes):
        opset = _opset(model, node.domain)
        steps.append(_Step(
            node, find_converter(node.domain, node.op_type, opset), opset,
            tuple(v.name if v is not None else "" for v in node.inputs),
            tuple(v.name if v is not None else "" for v in node.outputs),
            tuple(release.get(i, ())),
        ))
    return steps


class GraphExecutor:
    """Executes ``model``'s main graph in torch on ``device`` (forward; backward through torch autograd).

    ``self.weights`` maps every initializer name to its tensor on ``device``; the floating ones named in
    ``trainable`` (default: all floating initializers) are leaf tensors with ``requires_grad=True``.
    """

    def __init__(self, model: ir.Model, *, device: str | torch.device = "cpu", trainable: Iterable[str] | None = None):
        if model.functions:
            model = model.clone()  # initializer tensors are shared, not copied
            common_passes.InlinePass()(model)
            logger.debug("inlined the model's functions")
        check_supported(model)
        self.model = model
        self.device = torch.device(device)
        graph = model.graph
        wanted = None if trainable is None else set(trainable)
        if wanted is not None and (unknown := sorted(wanted - set(graph.initializers))):
            raise CalibrationError(
                f"trainable names that are not initializers of the graph: {', '.join(unknown[:10])}",
                "pass initializer names (GraphExecutor(...).weights lists them)",
            )
        self.weights: dict[str, torch.Tensor] = {}
        for name, value in graph.initializers.items():
            tensor = tensor_to_torch(value.const_value).to(self.device)
            if value.const_value.dtype in _FLOAT_TYPES and (wanted is None or name in wanted):
                tensor.requires_grad_(True)
            self.weights[name] = tensor
        self.input_names = [v.name for v in graph.inputs if v.name not in self.weights]
        self.optional_input_names = [v.name for v in graph.inputs if v.name in self.weights]
        self.output_names = [v.name for v in graph.outputs]
        self._inputs = {v.name: v for v in graph.inputs}
        self._steps = _plan(model, graph, set(self.output_names))
        self._produced = {name for step in self._steps for name in step.outputs if name}
        self._subplans: dict[int, list[_Step]] = {}

    def zero_grad(self) -> None:
        """Forget the weights' gradients (``.grad = None``)."""
        for tensor in self.weights.values():
            tensor.grad = None

    def run(
        self,
        feeds: Mapping[str, np.ndarray | torch.Tensor],
        *,
        keep: Iterable[str] = (),
        on_node: Callable[[ir.Node, list, list], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Graph outputs by name, plus the intermediate values named in ``keep``.

        Kept values that require grad retain it: after ``loss.backward()`` their ``.grad`` is dL/dvalue.
        ``on_node(node, inputs, outputs)`` is called after each node of the main graph.
        """
        keep = list(keep)
        known = set(self._produced) | set(self.weights) | set(self.input_names)
        if missing := [name for name in keep if name not in known]:
            raise CalibrationError(
                f"values to keep that the graph does not compute: {', '.join(missing[:10])}",
                "name node outputs, graph inputs or initializers of the graph",
            )
        env: dict[str, torch.Tensor | None] = dict(self.weights)
        env.update(self._bind_feeds(feeds))
        self._execute(self._steps, env, set(keep), on_node)
        result = {name: env[name] for name in self.output_names}
        for name in keep:
            tensor = env[name]
            if tensor is not None and tensor.requires_grad and not tensor.is_leaf:
                tensor.retain_grad()
            result[name] = tensor
        return result

    def _bind_feeds(self, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = ", ".join(f"{name} {_describe(self._inputs[name])}" for name in self.input_names) or "(none)"
        allowed = set(self.input_names) | set(self.optional_input_names)
        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in allowed]
        if missing or unknown:
            raise CalibrationError(
                "calibration feed does not match the graph inputs"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                f"the graph inputs are: {inputs}",
            )
        bound = {}
        for name, value in feeds.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, copy=True))
            self._check_feed(name, tensor)
            bound[name] = tensor.to(self.device)
        return bound

    def _check_feed(self, name: str, tensor: torch.Tensor) -> None:
        value = self._inputs[name]
        expected = _torch_dtype_or_none(value.dtype)
        if expected is not None and expected != tensor.dtype:
            raise CalibrationError(
                f"graph input {name!r} is {value.dtype.name.lower()} but the feed is {tensor.dtype}",
                f"cast the feed to {expected}",
            )
        if value.shape is not None:
            dims = list(value.shape)
            ok = len(dims) == tensor.dim() and all(
                not isinstance(d, int) or d == s for d, s in zip(dims, tensor.shape))
            if not ok:
                raise CalibrationError(
                    f"graph input {name!r} has shape {_describe(value)} but the feed has {tuple(tensor.shape)}",
                    "feeds must match the graph's fixed dimensions (re-export with dynamic shapes to vary them)",
                )

    def _execute(self, steps: list[_Step], env: dict, protected: set[str],
                 on_node: Callable[[ir.Node, list, list], None] | None) -> None:
        for step in steps:
            node = step.node
            inputs = [env[name] if name else None for name in step.inputs]
            try:
                if node.op_type in _CONTROL_FLOW and node.domain in ("", "ai.onnx"):
                    outputs = self._run_if(node, inputs, env, protected)
                else:
                    outputs = step.convert(node, inputs, step.opset)
            except (CalibrationError, KeyError) as exc:
                if isinstance(exc, KeyError):
                    raise CalibrationError(f"node {node.name!r} ({node.op_type}) reads {exc} before it is computed",
                                           "the graph is not topologically sorted") from exc
                raise
            except Exception as exc:
                shapes = ", ".join(f"{tuple(t.shape)}:{t.dtype}" if t is not None else "None" for t in inputs)
                raise CalibrationError(
                    f"executing node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type}, opset {step.opset}) "
                    f"on inputs [{shapes}] failed: {type(exc).__name__}: {exc}",
                    "check that the calibration feeds have the shapes and dtypes the graph expects",
                ) from exc
            for name, tensor in zip(step.outputs, outputs):
                if name:
                    if tensor is not None and tensor.device != self.device:
                        tensor = tensor.to(self.device)  # constants made on the CPU by converters
                    env[name] = tensor
            if on_node is not None:
                on_node(node, inputs, outputs)
            for name in step.release:
                if name not in protected and name not in self.weights:
                    env.pop(name, None)

    def _run_if(self, node: ir.Node, inputs: list, env: dict, protected: set[str]) -> list:
        branch = node.attributes["then_branch" if bool(inputs[0].reshape(-1)[0]) else "else_branch"].value
        steps = self._subplans.get(id(branch))
        if steps is None:
            outer = {v.name for v in branch.outputs}
            steps = self._subplans[id(branch)] = _plan(self.model, branch, outer)
        scope = dict(env)  # the branch sees the enclosing values; its own values stay local
        scope.update({name: tensor_to_torch(v.const_value).to(self.device) for name, v in branch.initializers.items()})
        self._execute(steps, scope, set(protected) | set(env), None)
        return [scope[v.name] for v in branch.outputs]


def _torch_dtype_or_none(dtype: ir.DataType | None) -> torch.dtype | None:
    try:
        return None if dtype is None else torch_dtype(dtype)
    except NotImplementedError:
        return None


def _describe(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = "[" + ", ".join(str(d) for d in value.shape) + "]" if value.shape is not None else "[?]"
    return f"{dtype}{shape}"
