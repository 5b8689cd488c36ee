"""Capture of a torch module as an ONNX graph with ``torch.onnx.export(dynamo=True)``."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import torch

from mgvq_compile.errors import CaptureError
from mgvq_compile.graph import restore_weight_names

__all__ = ["capture_module"]

logger = logging.getLogger(__name__)

_ROOT = "captured"


@contextlib.contextmanager
def _transformers_checks_disabled():
    """transformers' runtime shape checks trace to ops the exporter cannot translate (aten._is_all_true);
    they hold for the example inputs, which the eager forward has already run on."""
    previous = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous


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


def _summary(exc: BaseException, limit: int = 800) -> str:
    """The exporter's own exception summary (its messages open with generic advice), shortened."""
    text = str(exc)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1].split("(Refer to the full stack trace", 1)[0]
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text[:limit]}"


def capture_module(
    module: torch.nn.Module,
    example_kwargs: dict[str, torch.Tensor],
    *,
    output_names: Sequence[str] = ("logits",),
    extra_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    opset: int = 18,
) -> ir.Model:
    """Export ``module(**example_kwargs)`` to an ``onnx_ir.Model`` whose inputs are named as the kwargs.

    The capture covers the example inputs' shapes (fixed), unless ``dynamic_shapes`` says otherwise.
    """
    module = module.eval()
    wrapper = _NamedInputs(module, list(example_kwargs), dict(extra_kwargs or {}))
    try:
        with warnings.catch_warnings(), torch.no_grad(), _transformers_checks_disabled():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, tuple(example_kwargs.values()), input_names=list(example_kwargs),
                output_names=list(output_names), dynamo=True, optimize=True, verbose=False,
                dynamic_shapes=dynamic_shapes, opset_version=opset,
            )
    except Exception as exc:
        raise CaptureError(
            f"torch.onnx.export could not capture {type(module).__name__}: {_summary(exc)}",
            "fix the shapes of the example inputs, use attn_implementation='eager', or add a capture adapter "
            "(mgvq_compile.capture.vlm) that precomputes data-dependent index tensors",
        ) from exc
    model = program.model
    restore_weight_names(model, prefix=f"{_ROOT}.")
    logger.info("captured %s: %d nodes, %d initializers", type(module).__name__, len(model.graph), len(model.graph.initializers))
    return model
