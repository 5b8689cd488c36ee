"""Compensate (MGVQ module 2): round each layer toward the gradient-aware Newton-shifted target with
BlockLDLQ feedback, each vector taking the nearest codeword of its channel group's codebook."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.gptq import block_ldlq, newton_shifted_target
from mgvq_compile.algorithms.kmeans import assign_nearest
from mgvq_compile.algorithms.statistics import kronecker_scale
from mgvq_compile.graph import LinearLayer
from mgvq_compile.passes._common import quantize_layers
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["CompensateConfig", "Compensate"]


@dataclasses.dataclass(frozen=True)
class CompensateConfig(PassConfig):
    VERSION = 1
    lam: float = 0.05  # Newton step toward -H_O^-1 G H_I^-1; 0 = plain second-order rounding
    vector_dim: int = 4
    damp_rel: float = 0.01


@register_pass
class Compensate(Pass):
    name = "compensate"
    config_class = CompensateConfig
    requires = ("stats", "allocation", "codebooks")
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        cfg = self.config
        d = cfg.vector_dim
        stats, allocation, codebooks = (ctx.artifacts[k] for k in ("stats", "allocation", "codebooks"))

        def quantize(weight: np.ndarray, layer: LinearLayer) -> VQWeight | None:
            if layer.key not in allocation:
                return None
            plan, books = allocation[layer.key], codebooks[layer.key]
            m, n = weight.shape
            layer_stats = stats[layer.key]
            h = layer_stats.h_i if layer_stats.h_i is not None else layer_stats.h_x
            w = torch.from_numpy(weight).to(torch.float64)
            if cfg.lam > 0 and layer_stats.gradient is not None:
                # The Newton step uses the Fisher's own scale: (s H_O)^-1 G H_I^-1.
                step = cfg.lam / kronecker_scale(layer_stats)
                w = newton_shifted_target(w, layer_stats.gradient, h, layer_stats.h_o, lam=step, damp_rel=cfg.damp_rel)
            perm = plan.perm
            block_group = np.repeat(np.arange(len(plan.bits)), np.diff(plan.bounds) // d)
            centroid_sets = [torch.from_numpy(b.astype(np.float32)) for b in books]
            codes = torch.empty(m, n // d, dtype=torch.int64)

            def assign(targets: torch.Tensor, block: int) -> torch.Tensor:
                book = centroid_sets[block_group[block]]
                chosen = assign_nearest(targets.to(torch.float32), book)
                codes[:, block] = chosen
                return book[chosen].to(targets.dtype)

            block_ldlq(w[:, perm], h[perm][:, perm], assign, d=d, damp_rel=cfg.damp_rel)
            groups = []
            for index, ((start, stop), bits) in enumerate(zip(zip(plan.bounds, plan.bounds[1:]), plan.bits)):
                groups.append(VQGroup(start, stop, bits, books[index], codes[:, start // d : stop // d].numpy()))
            return VQWeight(m, n, d, tuple(groups), perm.numpy().astype(np.int32))

        quantized, metrics = quantize_layers(ctx, f"compensate (lam={cfg.lam})", quantize)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
