"""Front ends that turn torch / transformers models into ONNX graphs (``onnx_ir.Model``)."""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

__all__ = ["capture_torch_model"]

logger = logging.getLogger(__name__)


def capture_torch_model(model: Any, example_inputs: dict[str, Any]) -> dict[str, ir.Model]:
    """Capture a torch module as named graphs: a VLM (a config with ``vision_config``) through its
    architecture adapter, anything else with ``torch.onnx.export(dynamo=True)`` to a ``logits`` output."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vision_config", None) is not None:
        from mgvq_compile.capture.vlm import capture_vlm

        graph, spec = capture_vlm(model, example_inputs)
        logger.info("captured %s for inputs %s: %s", type(model).__name__, spec.input_shapes, spec.notes)
        return {"model": graph}
    from mgvq_compile.capture.torch_capture import capture_module

    return {"model": capture_module(model, example_inputs, output_names=["logits"])}
