"""FitCodebooks: codebooks by k-means weighted with the Hessian diagonals (method page, section 3).

Scope "layer-group" (the default): one codebook per (layer, channel group). Scope "modality": one
codebook per (modality, bits) shared by every group of every layer of that modality, fitted on a sample
of all their vectors (each layer's weights scaled to mean 1, so no layer owns the codebook by the size
of its Hessian). The file still stores a copy per group (the op reads one per group), and the budget
counts those copies."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.allocation import code_bits
from mgvq_compile.algorithms.statistics import LayerStatistics
from mgvq_compile.algorithms.weighted_kmeans import weighted_kmeans
from mgvq_compile.graph import weight_matrix
from mgvq_compile.errors import RecipeError
from mgvq_compile.passes._common import per_layer_checkpointed
from mgvq_compile.passes.assign_bits import LayerAllocation
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass

__all__ = ["SCOPES", "FitCodebooksConfig", "FitCodebooks", "vector_weights", "group_vectors", "fit_layer_codebooks"]

SCOPES = ("layer-group", "modality")


@dataclasses.dataclass(frozen=True)
class FitCodebooksConfig(PassConfig):
    VERSION = 3
    iterations: int = 10
    fit_sample: int = 16384  # vectors the Lloyd steps see per codebook
    scope: str = "layer-group"  # or "modality"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise RecipeError(f"fit-codebooks scope {self.scope!r} is not one of {', '.join(SCOPES)}")


def vector_weights(h_in_diag: torch.Tensor, h_out_diag: torch.Tensor | None, m: int, d: int) -> torch.Tensor:
    """Weight of each coordinate of each vector: diag(H_I) of its column times diag(H_O) of its row."""
    columns = torch.clamp(h_in_diag.to(torch.float32), min=0)
    rows = torch.ones(m) if h_out_diag is None else torch.clamp(h_out_diag.to(torch.float32), min=0)
    rows = rows / rows.mean().clamp(min=1e-30)
    return (rows[:, None] * columns[None, :]).reshape(-1, d)


def group_vectors(weight: np.ndarray, plan: LayerAllocation, layer_stats: LayerStatistics):
    """(bits, vectors [N, d], weights [N, d]) of each channel group of a layer (float32 m x n) and its plan."""
    d, m = plan.vector_dim, weight.shape[0]
    w = torch.from_numpy(weight)[:, plan.perm]
    h = layer_stats.input_hessian
    h_o = layer_stats.h_o
    h_o_diag = None if h_o is None else (torch.diagonal(h_o) if h_o.dim() == 2 else h_o)
    diag = torch.diagonal(h)[plan.perm]
    for (start, stop), bits in zip(zip(plan.bounds, plan.bounds[1:]), plan.bits):
        yield bits, w[:, start:stop].reshape(-1, d), vector_weights(diag[start:stop], h_o_diag, m, d)


def fit_layer_codebooks(groups, cfg: FitCodebooksConfig, seed: int) -> list[np.ndarray]:
    """One float16 codebook of 2^(b*d) codewords per group of :func:`group_vectors`, the g-th seeded seed + g."""
    return [weighted_kmeans(vectors, weights, 1 << code_bits(bits, vectors.shape[1]), iterations=cfg.iterations,
                            seed=seed + index, fit_sample=cfg.fit_sample).numpy().astype(np.float16)
            for index, (bits, vectors, weights) in enumerate(groups)]


@register_pass
class FitCodebooks(Pass):
    name = "fit-codebooks"
    config_class = FitCodebooksConfig
    requires = ("stats", "allocation")
    provides = ("codebooks", "codebook_scope")

    def run(self, ctx) -> PassResult:
        layers = [layer for layer in ctx.layers if layer.key in ctx.artifacts["allocation"]]
        codebooks = self._per_layer_group(ctx, layers) if self.config.scope == "layer-group" else self._per_modality(ctx, layers)
        return PassResult({"codebooks": codebooks, "codebook_scope": self.config.scope},
                          {"layers": len(codebooks), "scope": self.config.scope})

    @staticmethod
    def _groups(ctx, layer):
        plan = ctx.artifacts["allocation"][layer.key]
        weight = weight_matrix(ctx.models[layer.graph], layer)
        return group_vectors(weight, plan, ctx.artifacts["stats"][layer.key])

    def _per_layer_group(self, ctx, layers) -> dict[str, list[np.ndarray]]:
        return per_layer_checkpointed(
            ctx, layers, "codebooks",
            lambda layer: fit_layer_codebooks(self._groups(ctx, layer), self.config, ctx.layer_seed(layer)))

    def _per_modality(self, ctx, layers) -> dict[str, list[np.ndarray]]:
        cfg = self.config
        pools: dict[tuple[str, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in ctx.progress(layers, desc="codebook samples"):
            generator = torch.Generator().manual_seed(ctx.layer_seed(layer))
            modality = ctx.modalities.get(layer.key, "other")
            for bits, vectors, weights in self._groups(ctx, layer):
                take = torch.randperm(vectors.shape[0], generator=generator)[: cfg.fit_sample]
                weights = weights / weights.mean().clamp(min=1e-30)
                pools.setdefault((modality, bits, vectors.shape[1]), []).append((vectors[take], weights[take]))
        shared = {}
        for index, (key, parts) in enumerate(sorted(pools.items())):
            _modality, bits, d = key
            vectors, weights = torch.cat([v for v, _ in parts]), torch.cat([w for _, w in parts])
            book = weighted_kmeans(vectors, weights, 1 << code_bits(bits, d), iterations=cfg.iterations,
                                   seed=ctx.options.seed * 1_000_003 + index, fit_sample=cfg.fit_sample)
            shared[key] = book.numpy().astype(np.float16)
        codebooks = {}
        for layer in layers:
            plan, modality = ctx.artifacts["allocation"][layer.key], ctx.modalities.get(layer.key, "other")
            codebooks[layer.key] = [shared[(modality, bits, plan.vector_dim)] for bits in plan.bits]
        return codebooks
