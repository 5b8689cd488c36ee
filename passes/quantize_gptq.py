"""QuantizeGPTQ: scalar GPTQ (per-group scales, optional act-order) under a calibration Hessian.

``hessian="input"`` uses H_X (the ``gptq`` method); ``hessian="importance"`` uses the token-importance
weighted H_I, which needs gradient statistics (the ``vlmq`` method, method page section 6).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.gptq import gptq_quantize
from mgvq_compile.algorithms.rtn import uniform_levels
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import LinearLayer
from mgvq_compile.passes._common import layer_hessian, quantize_in_stages
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["QuantizeGPTQConfig", "QuantizeGPTQ"]


@dataclasses.dataclass(frozen=True)
class QuantizeGPTQConfig(PassConfig):
    VERSION = 2  # 2: encoder_stage
    bits: int = 2
    group_size: int = 128  # columns per scale; a layer whose width it does not divide gets one scale per row
    act_order: bool = False
    hessian: str = "input"  # "input" (H_X) or "importance" (H_I)
    block_size: int = 128
    damp_rel: float = 0.01
    # The modality encoder is quantized first and the language side on statistics collected again with
    # the encoder quantized, as compensate.encoder_stage does for mgvq (the same cut, so the methods
    # compare on the same statistics); nothing on a text-only model.
    encoder_stage: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise RecipeError(f"gptq supports 1 to 8 bits per weight, got {self.bits}", "pass an integer --bits from 1 to 8")
        if self.hessian not in ("input", "importance"):
            raise RecipeError(f"quantize-gptq hessian must be 'input' or 'importance', got {self.hessian!r}")


@register_pass
class QuantizeGPTQ(Pass):
    name = "quantize-gptq"
    config_class = QuantizeGPTQConfig
    requires = ("stats",)
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        cfg = self.config

        def quantize_on(stats: dict):
            def quantize(weight: np.ndarray, layer: LinearLayer) -> VQWeight:
                m, n = weight.shape
                group = cfg.group_size if n % cfg.group_size == 0 else n
                h = layer_hessian(stats, layer, cfg.hessian)
                result = gptq_quantize(
                    torch.from_numpy(weight), h, bits=cfg.bits, group_size=group, act_order=cfg.act_order,
                    block_size=cfg.block_size, damp_rel=cfg.damp_rel,
                )
                perm = None if result.perm is None else result.perm.numpy().astype(np.int32)
                codes = result.codes.numpy()
                return VQWeight(m, n, 1, (VQGroup(0, n, cfg.bits, uniform_levels(cfg.bits), codes),), perm,
                                result.scales.numpy(), group)
            return quantize

        quantized, metrics = quantize_in_stages(ctx, f"gptq {cfg.bits}-bit ({cfg.hessian} Hessian)", quantize_on,
                                                ctx.artifacts["stats"], encoder_stage=cfg.encoder_stage)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
