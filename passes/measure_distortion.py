"""MeasureDistortion: how fast this model's compensated error falls with each bit, for AssignBits' D(b).

The method page's allocation prices a b-bit group at 2^(-2b), a 4x drop per bit. Measured on real
layers after BlockLDLQ compensation the drop is model-specific and not constant (benchmarks/distortion.py:
Whisper tiny.en 6.8 / 4.8 / 3.2 from 1->2 to 3->4 bits, SmolLM2-135M 4.8 / 4.0), and the 4x law made the
allocation lose to uniform widths on Whisper at 3 bits. This pass samples a few layers spread over the
model, quantizes each at every allowed width (one group, one codebook fitted as FitCodebooks does,
rounded and refined as Compensate does, both with their default settings) and keeps the geometric mean
over the sampled layers of the proxy loss ratio loss(b) / loss(b + 1). The weights, statistics and seed
are all it depends on, so compiles at different budgets share it in the artifact cache.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import torch

from mgvq_compile.algorithms.allocation import HIGH_RATE_STEP, measured_steps
from mgvq_compile.algorithms.statistics import LayerStatistics, proxy_loss, restrict_rows
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import LinearLayer, weight_matrix
from mgvq_compile.passes._common import MAX_CODE_BITS, per_layer_checkpointed
from mgvq_compile.passes.assign_bits import LayerAllocation
from mgvq_compile.passes.compensate import CompensateConfig, compensate_layer
from mgvq_compile.passes.fit_codebooks import FitCodebooksConfig, fit_layer_codebooks, group_vectors
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass

__all__ = ["MeasureDistortionConfig", "MeasureDistortion", "DistortionCurve", "layer_role", "sample_layers",
           "layer_losses_by_width"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistortionCurve:
    """The measured loss model: ``steps[k - 1]`` = loss(k) / loss(k + 1) from 1 bit (HIGH_RATE_STEP below
    the narrowest measured width, where no group can be), and the per-layer losses it came from."""

    vector_dim: int
    widths: tuple[int, ...]
    steps: tuple[float, ...]
    losses: dict[str, dict[int, float]]

    def to_report(self) -> dict:
        return {"vector_dim": self.vector_dim, "widths": list(self.widths), "steps": [round(s, 4) for s in self.steps],
                "sampled_layers": {name: {str(b): loss for b, loss in by_width.items()} for name, by_width in self.losses.items()}}


@dataclasses.dataclass(frozen=True)
class MeasureDistortionConfig(PassConfig):
    VERSION = 1
    layers: int = 16  # sampled layers, spread over layer roles and depth (sample_layers)
    vector_dim: int = 2  # must match assign-bits' (set both with --set '*.vector_dim=N')
    allowed_bits: tuple[int, ...] = (1, 2, 3, 4)
    # Output rows per sampled layer: a seeded subset, for layers too large to quantize 4 times (0 = all).
    # Whisper tiny.en seed 0: all rows give steps 6.72 / 4.92 / 3.34 (the 64-layer benchmark: 6.8 / 4.8 /
    # 3.2), 256 rows 6.94 / 4.34 / 3.74, so all rows is the default.
    rows: int = 0

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise RecipeError(f"measure-distortion rows must be >= 0 (0: all rows), got {self.rows}")
        if self.layers < 1:
            raise RecipeError(f"measure-distortion layers must be positive, got {self.layers}",
                              "sample at least one layer, or drop the pass and set assign-bits.distortion=high-rate")
        if len(set(self.allowed_bits)) < 2:
            raise RecipeError(f"measure-distortion needs two or more allowed widths, got {list(self.allowed_bits)}",
                              "with a single width there is nothing to allocate: use assign-bits.uniform=true")
        if any(b < 1 or b * self.vector_dim > MAX_CODE_BITS for b in self.allowed_bits):
            raise RecipeError(f"allowed_bits {list(self.allowed_bits)} with d={self.vector_dim} exceed {MAX_CODE_BITS}-bit codes")


def layer_role(layer: LinearLayer) -> str:
    """The layer's name with its block numbers blanked: q_proj of every block shares one role."""
    return re.sub(r"\d+", "#", layer.key)


def sample_layers(layers: list[LinearLayer], count: int, vector_dim: int) -> list[LinearLayer]:
    """``count`` layers (all, if fewer are eligible: width divisible by d) spread over roles and depth.

    Roles share the count round-robin in the model's order; a role with c picks takes the layers at
    depth fractions (i + (j + 1/2) / R) / c of its list, i < c, with j its index among the R roles, so
    single picks of different roles sit at different depths instead of all at the first block.
    """
    eligible = [layer for layer in layers if layer.in_features % vector_dim == 0]
    if len(eligible) <= count:
        return eligible
    roles: dict[str, list[LinearLayer]] = {}
    for layer in eligible:
        roles.setdefault(layer_role(layer), []).append(layer)
    picks = {role: 0 for role in roles}
    for index in range(count):
        open_roles = [role for role in roles if picks[role] < len(roles[role])]
        picks[open_roles[index % len(open_roles)]] += 1
    chosen = set()
    for j, (role, members) in enumerate(roles.items()):
        c = picks[role]
        offset = (j + 0.5) / len(roles)
        chosen.update(members[min(int((i + offset) * len(members) / c), len(members) - 1)].key for i in range(c))
    return [layer for layer in eligible if layer.key in chosen]


def layer_losses_by_width(weight: np.ndarray, layer_stats: LayerStatistics, widths: tuple[int, ...], vector_dim: int,
                          seed: int, fit: FitCodebooksConfig, compensate: CompensateConfig,
                          rows: int | None = None) -> dict[int, float]:
    """The proxy loss tr(E H_X E^T) / tr(W H_X W^T) of the layer compensated at each uniform width, on
    ``rows`` output rows drawn with ``seed`` (all rows if None or more): rounding, feedback and refinement
    treat rows alike, so a subset estimates the ratio at a fraction of the cost."""
    m, n = weight.shape
    if rows is not None and rows < m:
        chosen = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:rows].sort().values
        weight, layer_stats = np.ascontiguousarray(weight[chosen.numpy()]), restrict_rows(layer_stats, chosen)
    losses = {}
    for bits in widths:
        plan = LayerAllocation(torch.arange(n), vector_dim, [0, n], [bits], [1.0], 1.0)
        books = fit_layer_codebooks(group_vectors(weight, plan, layer_stats), fit, seed)
        quantized, _metrics = compensate_layer(weight, plan, books, layer_stats, compensate)
        losses[bits] = proxy_loss(torch.from_numpy(weight), torch.from_numpy(quantized.dequantize()), layer_stats.h_x)
    return losses


@register_pass
class MeasureDistortion(Pass):
    name = "measure-distortion"
    config_class = MeasureDistortionConfig
    requires = ("stats",)
    provides = ("distortion_curve",)

    def run(self, ctx) -> PassResult:
        cfg = self.config
        widths = tuple(sorted(set(cfg.allowed_bits)))
        sampled = sample_layers(ctx.layers, cfg.layers, cfg.vector_dim)
        if not sampled:
            raise RecipeError(f"no layer has a width divisible by the vector dimension {cfg.vector_dim}", "lower vector_dim")
        fit, compensate = FitCodebooksConfig(), CompensateConfig()
        losses = per_layer_checkpointed(ctx, sampled, "distortion", lambda layer: layer_losses_by_width(
            weight_matrix(ctx.models[layer.graph], layer), ctx.artifacts["stats"][layer.key], widths, cfg.vector_dim,
            ctx.layer_seed(layer), fit, compensate, rows=cfg.rows or None))
        measured = measured_steps(list(losses.values()), widths)
        steps = (HIGH_RATE_STEP,) * (widths[0] - 1) + measured
        logger.info("measured distortion steps %s (bits %s) on %d layers",
                    ", ".join(f"{s:.2f}" for s in measured), "->".join(map(str, widths)), len(sampled))
        curve = DistortionCurve(cfg.vector_dim, widths, steps, losses)
        return PassResult({"distortion_curve": curve}, {"steps": [round(s, 3) for s in steps], "layers": len(sampled)})
