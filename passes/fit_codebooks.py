"""FitCodebooks: one codebook per (layer, channel group), by k-means weighted with the Hessian
diagonals (method page, section 3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.weighted_kmeans import weighted_kmeans
from mgvq_compile.graph import weight_matrix
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.pipeline.manager import save_atomic_torch

__all__ = ["FitCodebooksConfig", "FitCodebooks", "vector_weights"]


@dataclasses.dataclass(frozen=True)
class FitCodebooksConfig(PassConfig):
    VERSION = 2
    iterations: int = 10
    fit_sample: int = 16384


def vector_weights(h_in_diag: torch.Tensor, h_out_diag: torch.Tensor | None, m: int, d: int) -> torch.Tensor:
    """Weight of each coordinate of each vector: diag(H_I) of its column times diag(H_O) of its row."""
    columns = torch.clamp(h_in_diag.to(torch.float32), min=0)
    rows = torch.ones(m) if h_out_diag is None else torch.clamp(h_out_diag.to(torch.float32), min=0)
    rows = rows / rows.mean().clamp(min=1e-30)
    return (rows[:, None] * columns[None, :]).reshape(-1, d)


@register_pass
class FitCodebooks(Pass):
    name = "fit-codebooks"
    config_class = FitCodebooksConfig
    requires = ("stats", "allocation")
    provides = ("codebooks",)

    def run(self, ctx) -> PassResult:
        cfg = self.config
        stats, allocation = ctx.artifacts["stats"], ctx.artifacts["allocation"]
        codebooks: dict[str, list[np.ndarray]] = {}
        for layer in ctx.progress([l for l in ctx.layers if l.key in allocation], desc="codebooks"):
            checkpoint = ctx.checkpoint_path(layer)
            if checkpoint is not None and checkpoint.exists():
                codebooks[layer.key] = torch.load(checkpoint, weights_only=False)
                continue
            plan = allocation[layer.key]
            d, m = plan.vector_dim, layer.out_features
            w = torch.from_numpy(weight_matrix(ctx.models[layer.graph], layer))[:, plan.perm]
            layer_stats = stats[layer.key]
            h = layer_stats.h_i if layer_stats.h_i is not None else layer_stats.h_x
            h_o = layer_stats.h_o
            h_o_diag = None if h_o is None else (torch.diagonal(h_o) if h_o.dim() == 2 else h_o)
            diag = torch.diagonal(h)[plan.perm]
            books = []
            for index, ((start, stop), bits) in enumerate(zip(zip(plan.bounds, plan.bounds[1:]), plan.bits)):
                vectors = w[:, start:stop].reshape(-1, d)
                weights = vector_weights(diag[start:stop], h_o_diag, m, d)
                book = weighted_kmeans(vectors, weights, 1 << (bits * d), iterations=cfg.iterations,
                                       seed=ctx.layer_seed(layer) + index, fit_sample=cfg.fit_sample)
                books.append(book.numpy().astype(np.float16))
            codebooks[layer.key] = books
            if checkpoint is not None:
                save_atomic_torch(books, checkpoint)
        return PassResult({"codebooks": codebooks}, {"layers": len(codebooks)})
