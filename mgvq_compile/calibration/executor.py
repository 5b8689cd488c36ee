"""Runs an ONNX graph (``onnx_ir.Model``) in torch, so that calibration gets activations and gradients.

Weights are leaf tensors (``requires_grad`` for the trainable ones), so ``loss.backward()`` after
:meth:`GraphExecutor.run` fills their ``.grad`` and the ``.grad`` of any value named in ``keep``.
One converter per op type (and opset) lives in :mod:`mgvq_compile.calibration.ops`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from mgvq_compile.calibration.ops import find_converter, torch_dtype
from mgvq_compile.errors import CalibrationError, UnsupportedOpError

__all__ = ["GraphExecutor", "check_supported"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _opset(model: ir.Model, domain: str) -> int:
    if domain in ("", "ai.onnx"):
        return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
    return int(model.opset_imports.get(domain, 1))


def check_supported(model: ir.Model) -> None:
    """Raise :class:`UnsupportedOpError` for the first node (in graph order) without a converter."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        opset = _opset(model, node.domain)
        if find_converter(node.domain, node.op_type, opset) is None:
            raise UnsupportedOpError(node.op_type, node.domain, opset, node.name or "(unnamed)")


def _to_tensor(tensor: ir.TensorProtocol) -> torch.Tensor:
    array = tensor.numpy()
    if tensor.dtype == ir.DataType.BFLOAT16:
        return torch.from_numpy(np.asarray(array).view(np.uint16).astype(np.int32) << 16).view(torch.float32).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


class GraphExecutor:
    """Executes ``model``'s main graph in torch on ``device``."""

    def __init__(self, model: ir.Model, *, device: str | torch.device = "cpu", trainable: Iterable[str] | None = None):
        if model.functions:
            model = ir.from_proto(ir.to_proto(model))  # inline into a copy, leave the caller's model as is
            common_passes.InlinePass()(model)
        check_supported(model)
        self.model = model
        self.device = torch.device(device)
        wanted = None if trainable is None else set(trainable)
        self.weights: dict[str, torch.Tensor] = {}
        for name, value in model.graph.initializers.items():
            tensor = _to_tensor(value.const_value).to(self.device)
            if value.const_value.dtype in _FLOAT_TYPES and (wanted is None or name in wanted):
                tensor.requires_grad_(True)
            self.weights[name] = tensor
        self._plan = [
            (node, find_converter(node.domain, node.op_type, _opset(model, node.domain)), _opset(model, node.domain))
            for node in model.graph
        ]
        self.input_names = [v.name for v in model.graph.inputs if v.name not in self.weights]
        self.output_names = [v.name for v in model.graph.outputs]

    def zero_grad(self) -> None:
        for tensor in self.weights.values():
            tensor.grad = None

    def run(
        self,
        feeds: Mapping[str, np.ndarray | torch.Tensor],
        *,
        keep: Iterable[str] = (),
        on_node: Callable[[ir.Node, list, list], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.input_names]
        if missing or unknown:
            raise CalibrationError(
                "calibration feed does not match the graph inputs"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                f"the graph inputs are: {', '.join(self.input_names)}",
            )
        env: dict[str, torch.Tensor | None] = dict(self.weights)
        for name in self.input_names:
            value = feeds[name]
            env[name] = (value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))).to(self.device)
        keep = set(keep)
        for node, convert, opset in self._plan:
            inputs = [env[v.name] if v is not None and v.name != "" else None for v in node.inputs]
            try:
                outputs = convert(node, inputs, opset)
            except CalibrationError:
                raise
            except Exception as exc:
                raise CalibrationError(
                    f"executing node {node.name!r} ({node.op_type}) failed: {type(exc).__name__}: {exc}",
                    "check that the calibration feeds have the shapes and dtypes the graph expects",
                ) from exc
            for value, result in zip(node.outputs, outputs):
                if value is not None and value.name:
                    env[value.name] = result
            if on_node is not None:
                on_node(node, inputs, outputs)
        result = {name: env[name] for name in self.output_names}
        for name in keep:
            if name not in env:
                raise KeyError(f"value {name!r} is not computed by the graph")
            tensor = env[name]
            if tensor is not None and tensor.requires_grad and not tensor.is_leaf:
                tensor.retain_grad()
            result[name] = tensor
        return result
