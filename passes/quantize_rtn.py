"""QuantizeRTN: scalar round-to-nearest with per-group scales (no calibration data needed)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from mgvq_compile.algorithms.rtn import rtn_quantize, uniform_levels
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import LinearLayer
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.passes._common import quantize_layers
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["QuantizeRTNConfig", "QuantizeRTN"]

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclasses.dataclass(frozen=True)
class QuantizeRTNConfig(PassConfig):
    VERSION = 1
    bits: int = 2
    group_size: int = 128  # columns per scale; a layer whose width it does not divide gets one scale per row

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise RecipeError(
                f"rtn supports 1 to 8 bits per weight, got {self.bits}", "pass an integer --bits from 1 to 8"
            )
        if self.group_size < 1:
            raise RecipeError(f"rtn group_size must be positive, got {self.group_size}")


@register_pass
class QuantizeRTN(Pass):
    name = "quantize-rtn"
    config_class = QuantizeRTNConfig
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        bits = self.config.bits

        def quantize(weight: np.ndarray, layer: LinearLayer) -> VQWeight:
            m, n = weight.shape
            group = self.config.group_size if n % self.config.group_size == 0 else n
            codes, scales = rtn_quantize(weight, bits, group)
            return VQWeight(m, n, 1, (VQGroup(0, n, bits, uniform_levels(bits), codes),), None, scales, group)

        quantized, metrics = quantize_layers(ctx, f"rtn {bits}-bit", quantize)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
