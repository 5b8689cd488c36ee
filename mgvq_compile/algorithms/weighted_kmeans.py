"""Codebook fitting under a Hessian metric (method page, section 3).

``weighted_kmeans`` minimises sum_i sum_j w_ij (v_ij - c_j)^2 over the vectors' codes and the
codewords: the diagonal-Hessian metric, w_ij = diag(H_I) of the vector's column times diag(H_O) of
its row. ``refine_centroids`` then re-solves the codewords for fixed codes under the full input
Hessian, tr((W - C[codes]) H (W - C[codes])^T); ``refine_group_codebooks`` does so for every channel
group of a layer, each group's target carrying the other groups' error through H;
``alternate_codes_and_codebooks`` alternates that with re-rounding the codes (Lloyd steps under H).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

__all__ = [
    "weighted_kmeans",
    "weighted_assign",
    "weighted_distortion",
    "refine_centroids",
    "refine_group_codebooks",
    "alternate_codes_and_codebooks",
    "decode_groups",
    "hessian_loss",
    "layer_hessian_loss",
]

logger = logging.getLogger(__name__)

# Elements of one [rows, k] distance block: bounds memory for 2^16-entry codebooks.
_BLOCK_ELEMENTS = 1 << 24


def _full_weights(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    w = weights.to(torch.float32)
    if w.dim() == 1:
        w = w[:, None]
    if w.shape[0] != vectors.shape[0] or w.shape[1] not in (1, vectors.shape[1]):
        raise ValueError(f"weights {tuple(weights.shape)} do not match vectors {tuple(vectors.shape)}")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    return w.expand_as(vectors)


def _weighted_distances(v: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij (v_ij - c_kj)^2 for a block of rows: [rows, k] (float32)."""
    const = (w * v * v).sum(dim=1, keepdim=True)
    return torch.addmm(const, w, (centroids * centroids).T).addmm_(w * v, centroids.T, alpha=-2.0)


def weighted_assign(vectors: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Code (int64 [N]) of the codeword nearest to each vector in its own weighted metric."""
    v = vectors.to(torch.float32)
    w = _full_weights(weights, v)
    c = centroids.to(torch.float32)
    out = torch.empty(v.shape[0], dtype=torch.int64)
    chunk = max(1, _BLOCK_ELEMENTS // max(1, c.shape[0]))
    for start in range(0, v.shape[0], chunk):
        stop = start + chunk
        out[start:stop] = _weighted_distances(v[start:stop], w[start:stop], c).argmin(dim=1)
    return out


def weighted_distortion(
    vectors: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor | None = None
) -> float:
    """sum_i sum_j w_ij (v_ij - c_{code_i, j})^2 (codes default to ``weighted_assign``), in float64."""
    if codes is None:
        codes = weighted_assign(vectors, weights, centroids)
    v = vectors.to(torch.float64)
    w = _full_weights(weights, vectors).to(torch.float64)
    return float((w * (v - centroids.to(torch.float64)[codes]) ** 2).sum())


def _plus_plus_init(v: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means++: next centroid drawn with probability proportional to its weighted D^2."""
    n = v.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    picks = [first]
    nearest = (w * (v - v[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0.0:  # fewer distinct (weighted) vectors than centroids: repeat points
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        picks.append(pick)
        nearest = torch.minimum(nearest, (w * (v - v[pick]) ** 2).sum(dim=1))
    return v[picks].clone()


def weighted_kmeans(
    vectors: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    iterations: int = 25,
    seed: int = 0,
    init_sample: int = 4096,
    fit_sample: int = 32768,
    plus_plus_limit: int = 4096,
) -> torch.Tensor:
    """Fit ``k`` codewords [k, d] (float32) to ``vectors`` [N, d] with ``weights`` [N, d] or [N].

    Seeding is weighted k-means++ on at most ``init_sample`` vectors (when ``k`` exceeds
    ``plus_plus_limit`` or the seeding sample, distinct random vectors instead: the sequential
    k-means++ loop would cost k passes); at most ``iterations`` Lloyd steps run on at most
    ``fit_sample`` vectors (never fewer than ``k``). Sub-samples are uniform, drawn from ``seed``.
    A codeword that loses all its vectors keeps its previous value.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    generator = torch.Generator().manual_seed(seed)
    data = vectors.to(torch.float32)
    w = _full_weights(weights, data).contiguous()
    n = data.shape[0]
    if n <= k:
        padding = data[:1].expand(k - n, -1)
        return torch.cat([data, padding]).clone()
    sample = max(fit_sample, k)
    if n > sample:
        keep = torch.randperm(n, generator=generator)[:sample]
        data, w = data[keep], w[keep]
    seed_n = max(init_sample, k)
    if data.shape[0] > seed_n:
        keep = torch.randperm(data.shape[0], generator=generator)[:seed_n]
        seed_v, seed_w = data[keep], w[keep]
    else:
        seed_v, seed_w = data, w
    if k <= plus_plus_limit and k < seed_v.shape[0]:
        centroids = _plus_plus_init(seed_v, seed_w, k, generator)
    else:
        centroids = seed_v[torch.randperm(seed_v.shape[0], generator=generator)[:k]].clone()
    wv = (w * data).to(torch.float64)
    w64 = w.to(torch.float64)
    for step in range(iterations):
        codes = weighted_assign(data, w, centroids)
        num = torch.zeros(k, data.shape[1], dtype=torch.float64).index_add_(0, codes, wv)
        den = torch.zeros(k, data.shape[1], dtype=torch.float64).index_add_(0, codes, w64)
        filled = den > 0  # per coordinate: a zero-weight coordinate keeps its value
        updated = centroids.clone()
        updated[filled] = (num[filled] / den[filled]).to(torch.float32)
        if torch.equal(updated, centroids):
            logger.debug("weighted k-means converged after %d steps", step)
            break
        centroids = updated
    return centroids


def hessian_loss(
    w_target: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor, h: torch.Tensor, d: int
) -> float:
    """tr((W - C[codes]) H (W - C[codes])^T) in float64; codes [m, n_g/d] index rows of C [k, d]."""
    return layer_hessian_loss(w_target, [codes], [centroids], h, d)


def decode_groups(codes: list[torch.Tensor], codebooks: list[torch.Tensor], m: int) -> torch.Tensor:
    """Q [m, n] float64 of a layer whose group g (groups in column order) is C_g[codes_g]."""
    return torch.cat([c.to(torch.float64)[k.to(torch.int64)].reshape(m, -1) for k, c in zip(codes, codebooks)], dim=1)


def layer_hessian_loss(
    w_target: torch.Tensor, codes: list[torch.Tensor], codebooks: list[torch.Tensor], h: torch.Tensor, d: int
) -> float:
    """tr(E H E^T) over a whole layer, E = W - Q, Q = :func:`decode_groups` of the codes."""
    err = w_target.to(torch.float64) - decode_groups(codes, codebooks, w_target.shape[0])
    return float(((err @ h.to(torch.float64)) * err).sum())


def refine_centroids(
    w_target: torch.Tensor,
    codes: torch.Tensor,
    h: torch.Tensor,
    d: int,
    k: int,
    *,
    centroids: torch.Tensor | None = None,
    iterations: int = 30,
    damping: float = 1e-4,
) -> torch.Tensor:
    """Codewords [k, d] (float32) minimising tr((W - C[codes]) H (W - C[codes])^T) for fixed codes.

    The loss is quadratic in C, so this solves its normal equations
    (sum_r P_r^T H P_r + delta I) dC = sum_r P_r^T H (W_r - P_r C0)^T by block-Jacobi preconditioned
    conjugate gradients (at most ``iterations`` steps, each one [m, n_g] x [n_g, n_g] product), where
    P_r selects row r's codewords and C0 = ``centroids`` (default: the plain mean of each codeword's
    vectors). The ridge delta = ``damping`` * mean diagonal of the system pulls toward C0, so the
    loss never exceeds that of C0 (also checked); codewords no vector uses are returned unchanged.
    """
    m, n_g = w_target.shape
    if n_g % d or codes.shape != (m, n_g // d):
        raise ValueError(f"codes {tuple(codes.shape)} do not fit W {tuple(w_target.shape)} with d={d}")
    flat = codes.reshape(-1).to(torch.int64)
    w64 = w_target.to(torch.float64)
    h64 = h.to(torch.float64)
    blocks = w64.reshape(m, n_g // d, d).reshape(-1, d)
    counts = torch.bincount(flat, minlength=k)
    if centroids is None:
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat, blocks)
        c0 = sums / counts.clamp(min=1)[:, None].to(torch.float64)
    else:
        c0 = centroids.to(torch.float64).clone()
    used = counts > 0
    if not bool(used.any()):
        return c0.to(torch.float32)

    def scatter(x: torch.Tensor) -> torch.Tensor:  # [m, n_g] -> [k, d]: sum_r P_r^T x_r
        return torch.zeros(k, d, dtype=torch.float64).index_add_(0, flat, x.reshape(-1, d))

    def gather(c: torch.Tensor) -> torch.Tensor:  # [k, d] -> [m, n_g]: P_r c for every row
        return c[flat].reshape(m, n_g)

    # Block-Jacobi preconditioner: per codeword, sum over its uses of the d x d diagonal block of H.
    nb = n_g // d
    diag_blocks = h64.reshape(nb, d, nb, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, d, d]
    per_block = torch.zeros(nb, k, dtype=torch.float64)
    per_block.index_put_(
        (torch.arange(nb).repeat(m), flat), torch.ones(flat.numel(), dtype=torch.float64), accumulate=True
    )
    precond = torch.einsum("ap,ajl->pjl", per_block, diag_blocks)
    scale = float(precond.diagonal(dim1=1, dim2=2)[used].mean())
    if scale <= 0.0:
        return c0.to(torch.float32)
    delta = damping * scale
    eye = torch.eye(d, dtype=torch.float64)
    precond_inv = torch.linalg.inv(precond + delta * eye)
    mask = used[:, None].to(torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (scatter(gather(x) @ h64) + delta * x) * mask

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pjl,pl->pj", precond_inv, r) * mask

    residual = scatter((w64 - gather(c0)) @ h64) * mask
    delta_c = torch.zeros_like(c0)
    z = precondition(residual)
    direction = z.clone()
    rz = float((residual * z).sum())
    tolerance = 1e-12 * max(rz, 1e-300)
    for _ in range(iterations):
        if rz <= tolerance:
            break
        a_dir = apply(direction)
        curvature = float((direction * a_dir).sum())
        if curvature <= 0.0:
            break
        alpha = rz / curvature
        delta_c += alpha * direction
        residual -= alpha * a_dir
        z = precondition(residual)
        rz_next = float((residual * z).sum())
        direction = z + (rz_next / rz) * direction
        rz = rz_next
    refined = (c0 + delta_c).to(torch.float32)
    start = c0.to(torch.float32)
    before = hessian_loss(w_target, codes, start, h64, d)
    after = hessian_loss(w_target, codes, refined, h64, d)
    if not after <= before:  # only rounding could do this; keep the better codebook
        logger.debug("centroid refinement did not lower the loss (%g -> %g); kept the input", before, after)
        return start
    return refined


def refine_group_codebooks(
    w_target: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    bounds: list[int],
    h: torch.Tensor,
    d: int,
    *,
    iterations: int = 30,
) -> list[torch.Tensor]:
    """Codebooks of a layer's channel groups re-solved for fixed codes under the full ``h`` [n, n].

    Minimises tr(E H E^T), E = W - Q, Q's group g = C_g[codes_g] over columns bounds[g]:bounds[g+1], one
    group after another (Gauss-Seidel). With the other groups' error E_r fixed, the loss in C_g is
    tr((T_g - Q_g) H_gg (T_g - Q_g)^T) + const with T_g = W_g + E_r H_rg H_gg^-1, so each group is a
    :func:`refine_centroids` problem on that target. No step raises the loss: a group keeps its codebook
    when the refined one (rounded to the float16 it is stored in) is not better.
    ``h`` must be positive definite (damp it first); codebooks come back as float16-exact float32.
    """
    w64 = w_target.to(torch.float64)
    h64 = h.to(torch.float64)
    m = w64.shape[0]
    books = [c.to(torch.float32).clone() for c in codebooks]

    def decoded(g: int) -> torch.Tensor:
        return books[g].to(torch.float64)[codes[g].to(torch.int64)].reshape(m, -1)

    error = torch.cat([w64[:, a:b] - decoded(g) for g, (a, b) in enumerate(zip(bounds, bounds[1:]))], dim=1)
    for g, (a, b) in enumerate(zip(bounds, bounds[1:])):
        own = slice(a, b)
        rest = torch.ones(w64.shape[1], dtype=torch.bool)
        rest[own] = False
        h_gg = h64[own, own]
        target = w64[:, own]
        if bool(rest.any()):
            coupling = error[:, rest] @ h64[rest][:, own]  # [m, n_g]
            target = target + torch.cholesky_solve(coupling.T, torch.linalg.cholesky(h_gg)).T
        k = books[g].shape[0]
        refined = refine_centroids(target, codes[g], h_gg, d, k, centroids=books[g], iterations=iterations)
        refined = refined.to(torch.float16).to(torch.float32)
        if hessian_loss(target, codes[g], refined, h_gg, d) < hessian_loss(target, codes[g], books[g], h_gg, d):
            books[g] = refined
            error[:, own] = w64[:, own] - decoded(g)
    return books


def alternate_codes_and_codebooks(
    w_target: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    bounds: list[int],
    h: torch.Tensor,
    d: int,
    round_codes: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    *,
    rounds: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Lloyd steps under the full ``h``: re-solve the codebooks for the codes, re-round the codes for the
    codebooks (``round_codes(codebooks) -> codes``, e.g. BlockLDLQ), ``rounds`` refinements in all.

    Refinement with the codes held fixed bends a codeword toward the few vectors that dominate the loss
    (outlier input channels) however many other vectors use it; re-rounding lets those move to other
    codewords. A re-rounding is kept only when it lowers the layer loss (BlockLDLQ is greedy), else the
    loop stops. Returns (codes, codebooks, the layer loss after each kept step, the input's first).
    """
    losses = [layer_hessian_loss(w_target, codes, codebooks, h, d)]
    for index in range(rounds):
        codebooks = refine_group_codebooks(w_target, codes, codebooks, bounds, h, d)
        losses.append(layer_hessian_loss(w_target, codes, codebooks, h, d))
        if index == rounds - 1:
            break
        rerounded = round_codes(codebooks)
        loss = layer_hessian_loss(w_target, rerounded, codebooks, h, d)
        if not loss < losses[-1]:
            break
        codes = rerounded
        losses.append(loss)
    return codes, codebooks, losses
