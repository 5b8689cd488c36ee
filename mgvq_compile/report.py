"""The compile report: per layer and model-wide numbers, bits counted from the bytes stored."""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import torch

from mgvq_compile.algorithms.statistics import proxy_loss
from mgvq_compile.graph import weight_matrix
from mgvq_compile.pipeline.context import CompileContext

__all__ = ["REPORT_VERSION", "build_report", "tool_versions"]

REPORT_VERSION = 2


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mgvq-compile", "torch", "onnx", "onnxruntime", "onnx-ir", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


_COMMON_METRICS = ("skipped", "relative_weight_error")


def _pass_metrics(metric: Mapping[str, Any]) -> dict[str, Any]:
    """A quantizer pass's own per-layer numbers (e.g. proxy loss before compensation, codebook scope)."""
    return {k: _finite(v) if isinstance(v, float) else v for k, v in metric.items() if k not in _COMMON_METRICS}


def build_report(
    ctx: CompileContext,
    dense_weights: Mapping[str, np.ndarray],
    stored_bytes: Mapping[str, Mapping[str, int]],
    *,
    method: str,
    seed: int,
    timings: Mapping[str, float],
    resumed: list[str],
    files: Mapping[str, int],
) -> dict[str, Any]:
    """``dense_weights``: each quantized layer's original W; ``stored_bytes``: per layer, bytes per
    stored role as read back from the written files."""
    quantized = ctx.artifacts.get("quantized", {})
    metrics = ctx.artifacts.get("quant_metrics", {})
    stats = ctx.artifacts.get("stats", {})
    allocation = ctx.artifacts.get("allocation", {})
    layers = []
    total_weights = total_bytes = total_index_bytes = 0
    for layer in ctx.layers:
        entry: dict[str, Any] = {
            "name": layer.key,
            "graph": layer.graph,
            "node": layer.node,
            "op_type": layer.op_type,
            "shape": [layer.out_features, layer.in_features],
            "modality": ctx.modalities.get(layer.key, "other"),
            "quantized": layer.key in quantized,
        }
        weight = quantized.get(layer.key)
        if weight is not None:
            count = layer.out_features * layer.in_features
            by_role = dict(stored_bytes.get(layer.key, {}))
            nbytes = sum(by_role.values())
            index_bytes = by_role.get("codes", 0)
            entry.update(
                vector_dim=weight.vector_dim,
                group_bounds=weight.group_bounds,
                bits=[g.bits for g in weight.groups],
                codebook_sizes=[int(g.codebook.shape[0]) for g in weight.groups],
                scale_group_size=weight.scale_group_size or None,
                stored_bytes=by_role,
                bits_per_weight=nbytes * 8 / count,
                index_bits_per_weight=index_bytes * 8 / count,
                relative_weight_error=metrics.get(layer.key, {}).get("relative_weight_error"),
                proxy_loss=None,
            )
            entry.update(_pass_metrics(metrics.get(layer.key, {})))
            if layer.key in allocation:
                plan = allocation[layer.key]
                entry.update(sensitivity=[float(s) for s in plan.sensitivity],
                             global_sensitivity=float(plan.global_sensitivity))
            if layer.key in stats:
                w = torch.from_numpy(dense_weights[layer.key])
                q = torch.from_numpy(weight.dequantize())
                entry["proxy_loss"] = _finite(proxy_loss(w, q, stats[layer.key].h_x))
            total_weights += count
            total_bytes += nbytes
            total_index_bytes += index_bytes
        layers.append(entry)
    return {
        "report_version": REPORT_VERSION,
        "method": method,
        "seed": seed,
        "summary": {
            "layers": len(ctx.layers),
            "quantized_layers": len(quantized),
            "quantized_weights": total_weights,
            "stored_bytes": total_bytes,
            "bits_per_weight": total_bytes * 8 / total_weights if total_weights else None,
            "index_bits_per_weight": total_index_bytes * 8 / total_weights if total_weights else None,
            "files": dict(files),
        },
        "distortion": ctx.artifacts["distortion_curve"].to_report() if "distortion_curve" in ctx.artifacts else None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "resumed_passes": resumed,
        "tool_versions": tool_versions(),
        "layers": layers,
    }
