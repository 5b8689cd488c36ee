"""QuantizeKMeansVQ: plain k-means vector quantization, uniform bits, one codebook per layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.kmeans import assign_nearest, kmeans
from mgvq_compile.graph import LinearLayer
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.passes._common import check_vq_bits, quantize_layers
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["QuantizeKMeansVQConfig", "QuantizeKMeansVQ"]


@dataclasses.dataclass(frozen=True)
class QuantizeKMeansVQConfig(PassConfig):
    VERSION = 1
    bits: int = 2  # bits per weight: each vector of d weights takes a (bits*d)-bit code
    # d = 2 (16 codewords at 2 bits, 64 at 3), as mgvq at 3 bits: the CPU kernel's fast paths, and a codebook that
    # costs little. d = 4 (256 / 4096 codewords), measured on SmolLM2 and Whisper tiny.en (seed 0,
    # benchmarks/results/accuracy-kmeans-d{2,4}.md): 2.03-2.06 bits stored at 2 bits, 3.5-4.0 at 3 bits,
    # a 13.5-minute SmolLM2 compile at 3 bits, and 5-14x slower VQGemm (tables of 256, or decoding).
    vector_dim: int = 2
    iterations: int = 10
    init_sample: int = 4096  # vectors seen by k-means++ seeding
    fit_sample: int = 16384  # vectors seen by the Lloyd steps (all vectors are assigned at the end)

    def __post_init__(self) -> None:
        check_vq_bits("kmeans-vq", self.bits, self.vector_dim)


@register_pass
class QuantizeKMeansVQ(Pass):
    name = "quantize-kmeans-vq"
    config_class = QuantizeKMeansVQConfig
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        cfg = self.config
        d, k = cfg.vector_dim, 1 << (cfg.bits * cfg.vector_dim)

        def quantize(weight: np.ndarray, layer: LinearLayer) -> VQWeight | None:
            m, n = weight.shape
            if n % d:
                return None
            vectors = torch.from_numpy(weight.reshape(-1, d))
            centroids = kmeans(
                vectors, k, iterations=cfg.iterations, seed=ctx.layer_seed(layer),
                init_sample=cfg.init_sample, fit_sample=cfg.fit_sample,
            )
            codebook = centroids.numpy().astype(np.float16)
            codes = assign_nearest(vectors, torch.from_numpy(codebook.astype(np.float32)))
            group = VQGroup(0, n, cfg.bits, codebook, codes.numpy().reshape(m, n // d))
            return VQWeight(m, n, d, (group,))

        quantized, metrics = quantize_layers(ctx, f"k-means VQ {cfg.bits}-bit d={d}", quantize)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
