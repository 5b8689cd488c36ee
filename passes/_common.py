"""Glue shared by the quantizer passes: per-layer checkpointing and error metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mgvq_compile.graph import LinearLayer, weight_matrix
from mgvq_compile.pipeline.context import CompileContext
from mgvq_compile.pipeline.manager import save_atomic_torch
from mgvq_compile.vqgemm import VQWeight

__all__ = ["per_layer_checkpointed", "quantize_layers", "layer_hessian", "check_vq_bits", "MAX_CODE_BITS"]

MAX_CODE_BITS = 16  # widest code a VQ-GEMM vector may take (b * d)

logger = logging.getLogger(__name__)


def per_layer_checkpointed(ctx: CompileContext, layers: list[LinearLayer], desc: str,
                           compute: Callable[[LinearLayer], Any]) -> dict[str, Any]:
    """``compute(layer)`` for each layer, keyed by layer key; each result is checkpointed, so a killed
    pass resumes at the first layer it had not finished."""
    results: dict[str, Any] = {}
    for layer in ctx.progress(layers, desc=desc):
        checkpoint = ctx.checkpoint_path(layer)
        if checkpoint is not None and checkpoint.exists():
            results[layer.key] = torch.load(checkpoint, weights_only=False)
            continue
        results[layer.key] = compute(layer)
        if checkpoint is not None:
            save_atomic_torch(results[layer.key], checkpoint)
    return results


def quantize_layers(
    ctx: CompileContext,
    desc: str,
    quantize: Callable[[np.ndarray, LinearLayer], VQWeight | tuple[VQWeight, dict] | None],
    layers: list[LinearLayer] | None = None,
) -> tuple[dict[str, VQWeight], dict[str, dict]]:
    """Apply ``quantize`` to every layer's W (float32 m x n) (or to ``layers`` only), with per-layer
    resume and metrics.

    ``quantize`` returns None for a layer it cannot handle; that layer stays dense and is reported.
    It may return ``(weight, extra_metrics)`` to add its own per-layer numbers to the report.
    """

    def quantize_with_metrics(layer: LinearLayer) -> tuple[VQWeight | None, dict]:
        weight = weight_matrix(ctx.models[layer.graph], layer)
        result = quantize(weight, layer)
        metric = {"skipped": result is None}
        if isinstance(result, tuple):
            result, extra = result
            metric.update(extra)
        if result is not None:
            error = result.dequantize() - weight
            metric["relative_weight_error"] = float(np.linalg.norm(error) / max(np.linalg.norm(weight), 1e-30))
        return result, metric

    quantized: dict[str, VQWeight] = {}
    metrics: dict[str, dict] = {}
    layers = ctx.layers if layers is None else layers
    for key, (result, metric) in per_layer_checkpointed(ctx, layers, desc, quantize_with_metrics).items():
        metrics[key] = metric
        if result is not None:
            quantized[key] = result
    for layer in layers:
        if layer.key not in quantized:
            logger.warning("layer %s (%dx%d) left dense: %s", layer.key, layer.out_features, layer.in_features, desc)
    return quantized, metrics


def layer_hessian(stats: dict, layer: LinearLayer, kind: str) -> torch.Tensor:
    """The layer's input Hessian H_X (``kind="input"``) or importance Hessian H_I (``"importance"``)."""
    from mgvq_compile.errors import CalibrationError

    layer_stats = stats[layer.key]
    if kind == "input":
        return layer_stats.h_x
    h_i = layer_stats.h_i
    if h_i is None:
        raise CalibrationError(
            f"layer {layer.key} has no importance Hessian H_I: the statistics were collected without gradients",
            "collect statistics with gradients (collect-stats gradients: true) and labels",
        )
    return h_i


def check_vq_bits(method: str, bits: int, vector_dim: int) -> None:
    """Refuse a bit width whose codes (bits * d) would be wider than :data:`MAX_CODE_BITS`."""
    from mgvq_compile.errors import RecipeError

    if vector_dim < 1:
        raise RecipeError(f"{method} vector_dim must be positive, got {vector_dim}")
    allowed = [b for b in range(1, 9) if b * vector_dim <= MAX_CODE_BITS]
    if bits not in allowed:
        raise RecipeError(
            f"{method} with d={vector_dim} supports {', '.join(map(str, allowed))} bits per weight, got {bits}",
            f"pass --bits {' or '.join(map(str, allowed))} (codes are bits*d <= {MAX_CODE_BITS} wide)",
        )
