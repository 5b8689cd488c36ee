"""Plain k-means for vector codebooks: k-means++ initialisation, then Lloyd steps."""

from __future__ import annotations

import torch

__all__ = ["kmeans_plus_plus_init", "assign_nearest", "assign_in_metric", "kmeans"]

_CHUNK = 65536


def assign_nearest(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) for each row of ``vectors``."""
    centroid_sq = (centroids * centroids).sum(dim=1)[None, :]
    out = torch.empty(vectors.shape[0], dtype=torch.int64)
    for start in range(0, vectors.shape[0], _CHUNK):
        chunk = vectors[start : start + _CHUNK]
        # ||v||^2 is the same for every centroid, so it does not change the argmin.
        distances = torch.addmm(centroid_sq, chunk, centroids.T, alpha=-2.0)
        out[start : start + _CHUNK] = distances.argmin(dim=1)
    return out


def assign_in_metric(vectors: torch.Tensor, centroids: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid under (v - c)^T M (v - c), M SPD [d, d]: with M = L L^T this is the
    Euclidean distance between v L and c L."""
    chol = torch.linalg.cholesky(metric.to(torch.float64)).to(vectors.dtype)
    return assign_nearest(vectors @ chol, centroids.to(vectors.dtype) @ chol)


def kmeans_plus_plus_init(vectors: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid is drawn with probability proportional to D(v)^2."""
    n = vectors.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [vectors[first]]
    nearest_sq = ((vectors - vectors[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(nearest_sq.sum())
        if total <= 0.0:  # fewer distinct vectors than centroids: repeat existing points
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(nearest_sq / total, 1, generator=generator))
        centroids.append(vectors[pick])
        nearest_sq = torch.minimum(nearest_sq, ((vectors - vectors[pick]) ** 2).sum(dim=1))
    return torch.stack(centroids)


def kmeans(
    vectors: torch.Tensor,
    k: int,
    *,
    iterations: int,
    seed: int,
    init_sample: int = 4096,
    fit_sample: int = 16384,
) -> torch.Tensor:
    """Fit ``k`` centroids to ``vectors`` [N, d]; returns [k, d] float32 (sums in float64).

    Seeding uses at most ``init_sample`` vectors and the Lloyd steps at most ``fit_sample``
    (uniform sub-samples drawn from ``seed``), which bounds the time on very large layers.
    """
    generator = torch.Generator().manual_seed(seed)
    data = vectors.to(torch.float32)
    n = data.shape[0]
    if n <= k:  # every vector gets its own codeword; the rest repeat the first vector
        padding = data[:1].expand(k - n, -1)
        return torch.cat([data, padding]).to(torch.float32)
    if n > fit_sample:
        data = data[torch.randperm(n, generator=generator)[:fit_sample]]
    seed_set = data if data.shape[0] <= init_sample else data[
        torch.randperm(data.shape[0], generator=generator)[:init_sample]
    ]
    centroids = kmeans_plus_plus_init(seed_set, k, generator)
    for _ in range(iterations):
        assignment = assign_nearest(data, centroids)
        sums = torch.zeros(k, data.shape[1], dtype=torch.float64).index_add_(0, assignment, data.to(torch.float64))
        counts = torch.bincount(assignment, minlength=k).to(torch.float64)
        filled = counts > 0
        updated = centroids.clone()
        updated[filled] = (sums[filled] / counts[filled, None]).to(torch.float32)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.to(torch.float32)
