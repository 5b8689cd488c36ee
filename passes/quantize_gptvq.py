"""QuantizeGPTVQ: vector quantization with a Hessian-weighted k-means codebook per layer, GPTQ-style
error feedback (BlockLDLQ with d-column blocks) under H_X and GPTVQ's codebook update; uniform bits (the
``gptvq`` method)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.gptq import block_ldlq, feedback_factor
from mgvq_compile.algorithms.hessian import damp
from mgvq_compile.algorithms.kmeans import assign_nearest
from mgvq_compile.algorithms.weighted_kmeans import refine_group_codebooks, weighted_kmeans
from mgvq_compile.graph import LinearLayer
from mgvq_compile.passes._common import check_vq_bits, layer_hessian, quantize_in_stages
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["QuantizeGPTVQConfig", "QuantizeGPTVQ"]


@dataclasses.dataclass(frozen=True)
class QuantizeGPTVQConfig(PassConfig):
    VERSION = 3  # 2: encoder_stage; 3: codebook_update
    bits: int = 2
    vector_dim: int = 4
    iterations: int = 10
    fit_sample: int = 16384
    hessian: str = "input"
    damp_rel: float = 0.01
    # The modality encoder is quantized first and the language side on statistics collected again with
    # the encoder quantized, as compensate.encoder_stage does for mgvq (the same cut, so the methods
    # compare on the same statistics); nothing on a text-only model.
    encoder_stage: bool = True
    # GPTVQ's codebook update (van Baalen et al., 2024): after rounding, the codewords are re-solved for
    # the fixed codes to minimise the layer's output error tr((W - Q) H (W - Q)^T), once. Off: the
    # k-means codebook as fitted (this pass before 2026-11-24).
    codebook_update: bool = True

    def __post_init__(self) -> None:
        check_vq_bits("gptvq", self.bits, self.vector_dim)


@register_pass
class QuantizeGPTVQ(Pass):
    name = "quantize-gptvq"
    config_class = QuantizeGPTVQConfig
    requires = ("stats",)
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        cfg = self.config
        d, k = cfg.vector_dim, 1 << (cfg.bits * cfg.vector_dim)

        def quantize_on(stats: dict):
            def quantize(weight: np.ndarray, layer: LinearLayer) -> VQWeight | None:
                m, n = weight.shape
                if n % d:
                    return None
                h = layer_hessian(stats, layer, cfg.hessian)
                w = torch.from_numpy(weight)
                column_weight = torch.clamp(torch.diagonal(h).to(torch.float32), min=0)
                vectors = w.reshape(-1, d)
                weights = column_weight.repeat(m).reshape(-1, d)
                codebook = weighted_kmeans(vectors, weights, k, iterations=cfg.iterations, seed=ctx.layer_seed(layer),
                                           fit_sample=cfg.fit_sample).to(torch.float16).to(torch.float32)
                codes = torch.empty(m, n // d, dtype=torch.int64)

                def assign(targets: torch.Tensor, block: int) -> torch.Tensor:
                    chosen = assign_nearest(targets.to(torch.float32), codebook)
                    codes[:, block] = chosen
                    return codebook[chosen].to(targets.dtype)

                h_damped = damp(h, cfg.damp_rel)[0]  # one damping for the rounding and the codebook update
                block_ldlq(w.to(torch.float64), h, assign, d=d, feedback=feedback_factor(h_damped, d)[0])
                if cfg.codebook_update:
                    (codebook,) = refine_group_codebooks(w, [codes], [codebook], [0, n], h_damped, d)
                group = VQGroup(0, n, cfg.bits, codebook.numpy().astype(np.float16), codes.numpy())
                return VQWeight(m, n, d, (group,))
            return quantize

        quantized, metrics = quantize_in_stages(ctx, f"gptvq {cfg.bits}-bit d={d}", quantize_on, ctx.artifacts["stats"],
                                                encoder_stage=cfg.encoder_stage)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
