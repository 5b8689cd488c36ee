"""Glue shared by the quantizer passes: per-layer checkpointing and error metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mgvq_compile.graph import LinearLayer, weight_matrix, with_weights
from mgvq_compile.pipeline.context import CompileContext
from mgvq_compile.pipeline.manager import save_atomic_torch
from mgvq_compile.vqgemm import VQWeight

__all__ = ["per_layer_checkpointed", "quantize_layers", "quantize_in_stages", "sequential_stages", "encoder_stage_end",
           "statistics_on_quantized_inputs", "layer_hessian", "check_vq_bits", "MAX_CODE_BITS",
           "vector_dim_for_budget"]

MAX_CODE_BITS = 16  # widest code a VQ-GEMM vector may take (b * d)

logger = logging.getLogger(__name__)


def vector_dim_for_budget(bits: float) -> int:
    """The vector dimension at a budget of ``bits`` per weight: the largest of 4, 2, 1 whose codes at the
    budget's whole bits are at most 8 bits wide (256 codewords per layer), so a layer's fp16 codebook stays
    a small part of the budget. With d = 4 at 3 bits the 4096-codeword codebooks made Whisper tiny store
    4.0 bits per weight (gptvq)."""
    return next(d for d in (4, 2, 1) if int(bits) * d <= 8)


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


def quantize_in_stages(
    ctx: CompileContext,
    desc: str,
    quantize_on: Callable[[dict], Callable[[np.ndarray, LinearLayer], Any]],
    stats: dict,
    *,
    encoder_stage: bool,
    stages: int = 1,
    match_float_outputs: bool = False,
) -> tuple[dict[str, VQWeight], dict[str, dict]]:
    """:func:`quantize_layers` over the layers cut into ``stages`` consecutive stages, plus a cut at the
    modality encoder's end when ``encoder_stage``. The first stage is quantized by ``quantize_on(stats)``;
    each later one by ``quantize_on`` of statistics collected again from the model whose earlier stages
    hold their quantized weights (as GPTQ quantizes block by block on quantized inputs)."""
    cut = encoder_stage_end(ctx.layers, ctx.modalities) if encoder_stage else 0
    staged = sequential_stages(ctx.layers, stages, cut)
    quantized: dict[str, VQWeight] = {}
    metrics: dict[str, dict] = {}
    dense: dict[str, np.ndarray] = {}  # the quantized layers' W, for the later stages' statistics
    for index, stage in enumerate(staged):
        if index > 0:
            stats = statistics_on_quantized_inputs(ctx, stage, dense, match_float_outputs)
        stage_desc = desc + (f", stage {index + 1}/{len(staged)}" if len(staged) > 1 else "")
        done, done_metrics = quantize_layers(ctx, stage_desc, quantize_on(stats), layers=stage)
        quantized.update(done)
        if index + 1 < len(staged):
            dense.update({key: q.dequantize() for key, q in done.items()})
        for key, metric in done_metrics.items():
            metrics[key] = {**metric, "sequential_stage": index + 1} if len(staged) > 1 else metric
    return quantized, metrics


def statistics_on_quantized_inputs(ctx: CompileContext, stage: list[LinearLayer], dense: dict[str, np.ndarray],
                                   with_float_inputs: bool = False) -> dict:
    """Statistics of ``stage``'s layers on copies of the graphs whose layers in ``dense`` (key -> W)
    hold those weights (and, ``with_float_inputs``, their cross moment with the float model's inputs)."""
    from mgvq_compile.passes.collect_stats import CollectStats

    if all((path := ctx.checkpoint_path(layer)) is not None and path.exists() for layer in stage):
        return {}  # every layer of the stage resumes from its checkpoint
    models = {name: with_weights(model, dense, [layer for layer in ctx.layers if layer.graph == name])
              for name, model in ctx.models.items()}
    return CollectStats(ctx.artifacts["stats_config"]).collect(
        ctx, models, stage, reference_models=ctx.models if with_float_inputs else None)


def sequential_stages(layers: list, count: int, cut: int = 0) -> list[list]:
    """``layers`` (graph order) cut into ``count`` consecutive stages of nearly equal size (fewer when
    there are fewer layers), and also before ``layers[cut]`` when 0 < cut < len(layers)."""
    bounds = set(np.linspace(0, len(layers), min(count, max(len(layers), 1)) + 1).round().astype(int).tolist())
    if 0 < cut < len(layers):
        bounds.add(cut)
    bounds = sorted(bounds)
    return [layers[start:stop] for start, stop in zip(bounds, bounds[1:])]


def encoder_stage_end(layers: list[LinearLayer], modalities: dict[str, str]) -> int:
    """The number of leading layers (graph order) that read no text: the modality encoder whose outputs the
    language side reads. 0 when the first layer reads text or no layer does (nothing to stage)."""
    for index, layer in enumerate(layers):
        if modalities.get(layer.key) == "text":
            return index
    return 0


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
