"""Capture of a torch module as an ONNX graph with ``torch.onnx.export(dynamo=True)``."""

from __future__ import annotations

import ast
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import torch

from mgvq_compile.errors import CaptureError

__all__ = ["capture_module", "restore_weight_names"]

logger = logging.getLogger(__name__)

_ROOT = "captured"
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


class _NamedInputs(torch.nn.Module):
    """Takes the example inputs positionally (in their dict order) and returns plain tensors."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str], extra_kwargs: dict[str, Any]):
        super().__init__()
        setattr(self, _ROOT, module)
        self.names = list(names)
        self.extra_kwargs = extra_kwargs

    def forward(self, *inputs: torch.Tensor):
        out = getattr(self, _ROOT)(**dict(zip(self.names, inputs)), **self.extra_kwargs)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def restore_weight_names(model: ir.Model, prefix: str = f"{_ROOT}.") -> None:
    """Give initializers their module paths back.

    The exporter prefixes names with the wrapper's attribute, and the optimizer folds
    ``Transpose(weight)`` into new constants named ``val_N``; those record their source in metadata.
    A folded MatMul weight takes its source's name (it holds W^T, as MatMul's B input does).
    """
    graph = model.graph
    renames = {}
    taken = set(graph.initializers)
    for name, value in list(graph.initializers.items()):
        new = name[len(prefix):] if name.startswith(prefix) else name
        sources = value.metadata_props.get(_FOLDED_FROM)
        if sources and not name.startswith(prefix):
            try:
                parsed = ast.literal_eval(sources)
            except (ValueError, SyntaxError):
                parsed = []
            if len(parsed) == 1:
                candidate = str(parsed[0])
                candidate = candidate[len(prefix):] if candidate.startswith(prefix) else candidate
                if candidate not in taken and candidate not in renames.values():
                    new = candidate
        if new != name:
            renames[name] = new
    for old, new in renames.items():
        value = graph.initializers.pop(old)
        value.name = new
        graph.initializers[new] = value


def capture_module(
    module: torch.nn.Module,
    example_kwargs: dict[str, torch.Tensor],
    *,
    output_names: Sequence[str] = ("logits",),
    extra_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> ir.Model:
    """Export ``module(**example_kwargs)`` to an ``onnx_ir.Model`` whose inputs are named as the kwargs.

    The capture covers the example inputs' shapes (fixed), unless ``dynamic_shapes`` says otherwise.
    """
    module = module.eval()
    wrapper = _NamedInputs(module, list(example_kwargs), dict(extra_kwargs or {}))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, tuple(example_kwargs.values()), input_names=list(example_kwargs),
                output_names=list(output_names), dynamo=True, optimize=True, verbose=False,
                dynamic_shapes=dynamic_shapes,
            )
    except Exception as exc:
        raise CaptureError(
            f"torch.onnx.export could not capture {type(module).__name__}: {type(exc).__name__}: {str(exc)[:500]}",
            "fix the shapes of the example inputs, use attn_implementation='eager', or add a capture adapter "
            "(mgvq_compile.capture.vlm) that precomputes data-dependent index tensors",
        ) from exc
    model = program.model
    restore_weight_names(model)
    logger.info("captured %s: %d nodes, %d initializers", type(module).__name__, len(model.graph), len(model.graph.initializers))
    return model
