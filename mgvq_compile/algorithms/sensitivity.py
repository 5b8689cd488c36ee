"""Channel sensitivities and channel groups (method page, section 2).

A channel is an input column c of W [m, n]. Local sensitivity s_c = (H_I)_cc * |W[:, c]|^2 is the
optimal-brain-surgeon saliency under the gradient-weighted Hessian. Global sensitivity says how strongly
the end loss reacts to error in the whole layer (see :func:`global_sensitivity`), so the bit budget can
move between layers and not only between the groups of one layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgvq_compile.errors import InputError

__all__ = ["local_sensitivity", "global_sensitivity", "channel_groups", "group_sensitivities"]


def local_sensitivity(w: torch.Tensor, h_i: torch.Tensor) -> torch.Tensor:
    """s_c = (H_I)_cc * ||W[:, c]||^2 for every input column c: float64 [n]."""
    w64 = w.to(torch.float64)
    if h_i.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"H_I {tuple(h_i.shape)} does not match W {tuple(w.shape)}")
    return h_i.to(torch.float64).diagonal() * (w64 * w64).sum(dim=0)


def _mean_diagonal(h: torch.Tensor) -> float:
    """Mean of the diagonal of a full [k, k] Hessian, or of a diagonal stored as a vector [k]."""
    diag = h.diagonal() if h.dim() == 2 else h
    return float(diag.to(torch.float64).mean())


def global_sensitivity(h_i: torch.Tensor, h_o: torch.Tensor, w: torch.Tensor, scale: float = 1.0) -> float:
    """scale * mean(diag H_O) * mean(diag H_I) * ||W||_F^2 / (m n): the end-loss weight of one quantized weight.

    Why this form: with the Fisher F ~ scale * (H_O (x) H_I), an error E whose entries are independent
    with variance sigma^2 costs E[vec(E)^T F vec(E)] = sigma^2 * scale * tr(H_O) tr(H_I). A quantizer at
    b bits leaves sigma^2 ~ (||W||_F^2 / (m n)) 2^(-2b) (error relative to the mean weight energy), so the
    layer's expected loss is m n * [this value] * 2^(-2b): a per-weight sensitivity, which the allocation
    then multiplies by the number of weights of each group. ``h_o`` may be full [m, m] or its diagonal [m].

    ``scale`` is the Kronecker scale (:func:`mgvq_compile.algorithms.statistics.kronecker_scale`, about
    the number of tokens the layer saw): H_I and H_O are normalised averages, so without it a layer that
    reads 1500 audio frames per sample and one that reads 48 text tokens would be weighed as if each saw
    one token, and layers across a model with different sequence lengths could not be compared.
    """
    m, n = w.shape
    if h_i.shape != (n, n) or h_o.shape not in ((m, m), (m,)):
        raise ValueError(f"H_I {tuple(h_i.shape)} / H_O {tuple(h_o.shape)} do not match W {tuple(w.shape)}")
    if not scale > 0.0:
        raise ValueError(f"the Kronecker scale must be positive, got {scale}")
    energy = float((w.to(torch.float64) ** 2).sum()) / (m * n)
    return scale * _mean_diagonal(h_o) * _mean_diagonal(h_i) * energy


def channel_groups(scores: torch.Tensor, groups: int, d: int) -> tuple[torch.Tensor, list[int]]:
    """Permutation (int64 [n], most sensitive first) and group bounds [0, ..., n] over permuted columns.

    Columns are sorted by descending score (ties keep column order), then cut into ``groups``
    contiguous groups whose widths are multiples of d and differ by at most d (the wider groups come
    first). Fewer groups are made when n/d < ``groups``.
    """
    n = int(scores.shape[0])
    if d <= 0 or n % d:
        raise InputError(
            f"{n} input channels cannot be cut into vectors of d={d}",
            "choose a vector dimension that divides the layer's input width, or leave the layer unquantized",
        )
    if groups <= 0:
        raise InputError(f"the number of channel groups must be positive, got {groups}")
    perm = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices.to(torch.int64)
    vectors = n // d
    count = min(groups, vectors)
    base, extra = divmod(vectors, count)
    bounds = [0]
    for g in range(count):
        bounds.append(bounds[-1] + (base + (1 if g < extra else 0)) * d)
    return perm, bounds


def group_sensitivities(
    scores: torch.Tensor, perm: torch.Tensor, bounds: Sequence[int], global_value: float
) -> list[float]:
    """S_g = global * mean local score of group g / mean local score of the layer.

    Local scores are normalised by their layer mean so that the global term alone sets the layer's
    scale (its H_I and weight energy are already in it) and the local term only splits it: a layer
    with equal local scores gives every group S_g = global.
    """
    permuted = scores.to(torch.float64)[perm]
    layer_mean = float(permuted.mean())
    out = []
    for start, stop in zip(bounds, bounds[1:]):
        group_mean = float(permuted[start:stop].mean())
        out.append(global_value * (group_mean / layer_mean if layer_mean > 0 else 1.0))
    return out
