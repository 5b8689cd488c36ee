"""Streaming calibration statistics of one linear layer (method page, section 1).

For tokens t with inputs x_t (n) and output gradients g_t (m):
  H_X = sum_t x_t x_t^T,  G = sum_t g_t x_t^T,
  H_I = sum_t |g_t|^2 x_t x_t^T / sum_t |g_t|^2,  H_O = sum_t |x_t|^2 g_t g_t^T / sum_t |x_t|^2.
With ``token_importance=False`` every token weighs 1 in H_I (H_I = H_X / T: the ablation of the
importance weighting; H_O and G are unchanged).
Given the same tokens' inputs x^f_t in a reference model (the float model, when x_t comes from a partly
quantized one), also the cross moment C = sum_t w_t x^f_t x_t^T, with the token weights w_t of H_I (or 1).
Sums are accumulated in float32 and never stored per token.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "LayerStatistics", "new_statistics", "accumulate", "proxy_loss", "kronecker_scale", "restrict_rows",
    "gradient_signal_ratio", "gradient_cosine", "first_order_transfer",
]


@dataclasses.dataclass
class LayerStatistics:
    tokens: int
    h_x: torch.Tensor  # [n, n]
    h_x_by_modality: dict[str, torch.Tensor]
    gradient: torch.Tensor | None = None  # G [m, n]
    h_i_sum: torch.Tensor | None = None  # sum_t |g_t|^2 x_t x_t^T
    h_o_sum: torch.Tensor | None = None  # sum_t |x_t|^2 g_t g_t^T (full [m, m] or its diagonal [m])
    importance_total: float = 0.0  # sum of the token weights of H_I (sum_t |g_t|^2, or T)
    input_sq_total: float = 0.0
    fisher_trace: float = 0.0  # sum_t |g_t|^2 |x_t|^2 = tr of the empirical Fisher
    cross_sum: torch.Tensor | None = None  # sum_t w_t x^f_t x_t^T, weighted like input_hessian

    @property
    def _has_h_i(self) -> bool:
        return self.h_i_sum is not None and self.importance_total > 0.0

    @property
    def input_cross_moment(self) -> torch.Tensor | None:
        """C in the scale of ``input_hessian`` (so that W C H^-1 = W when the inputs agree)."""
        if self.cross_sum is None:
            return None
        return self.cross_sum / self.importance_total if self._has_h_i else self.cross_sum

    @property
    def h_i(self) -> torch.Tensor | None:
        return self.h_i_sum / self.importance_total if self._has_h_i else None

    @property
    def input_hessian(self) -> torch.Tensor:
        """The metric rounding minimises: H_I when gradients were collected, else H_X."""
        h_i = self.h_i
        return h_i if h_i is not None else self.h_x

    @property
    def h_o(self) -> torch.Tensor | None:
        if self.h_o_sum is None or self.input_sq_total <= 0.0:
            return None
        return self.h_o_sum / self.input_sq_total


def restrict_rows(stats: LayerStatistics, rows: torch.Tensor) -> LayerStatistics:
    """The statistics of the layer made of output rows ``rows`` of W: G and H_O restricted to them (H_X
    and H_I, which describe the inputs, are shared by every row)."""
    h_o_sum = stats.h_o_sum
    if h_o_sum is not None:
        h_o_sum = h_o_sum[rows][:, rows] if h_o_sum.dim() == 2 else h_o_sum[rows]
    gradient = None if stats.gradient is None else stats.gradient[rows]
    return dataclasses.replace(stats, gradient=gradient, h_o_sum=h_o_sum)


def new_statistics(n: int, m: int, *, gradients: bool, full_output_hessian: bool) -> LayerStatistics:
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32)  # noqa: E731
    stats = LayerStatistics(tokens=0, h_x=zeros(n, n), h_x_by_modality={})
    if gradients:
        stats.gradient = zeros(m, n)
        stats.h_i_sum = zeros(n, n)
        stats.h_o_sum = zeros(m, m) if full_output_hessian else zeros(m)
    return stats


def accumulate(
    stats: LayerStatistics,
    x: torch.Tensor,
    g: torch.Tensor | None = None,
    token_modality: dict[str, torch.Tensor] | None = None,
    token_importance: bool = True,
    x_reference: torch.Tensor | None = None,
) -> None:
    """Add tokens ``x`` [T, n] (and their output gradients ``g`` [T, m]) to ``stats``.

    ``token_modality`` maps a modality to a boolean mask [T] of its tokens (for H_X per modality).
    ``x_reference`` [T, n]: the same tokens' inputs in the reference model, for the cross moment.
    """
    x = x.detach().to(torch.float32)
    if x_reference is not None:
        x_reference = x_reference.detach().to(torch.float32)
        if x_reference.shape != x.shape:
            raise ValueError(f"reference inputs have shape {tuple(x_reference.shape)}, inputs {tuple(x.shape)}")
        if stats.cross_sum is None:
            stats.cross_sum = torch.zeros_like(stats.h_x)
    stats.tokens += x.shape[0]
    stats.h_x += x.T @ x
    for modality, mask in (token_modality or {}).items():
        xm = x[mask]
        if modality not in stats.h_x_by_modality:
            stats.h_x_by_modality[modality] = torch.zeros_like(stats.h_x)
        stats.h_x_by_modality[modality] += xm.T @ xm
    if g is None or stats.gradient is None:
        if x_reference is not None:
            stats.cross_sum += x_reference.T @ x
        return
    g = g.detach().to(torch.float32)
    g_sq = (g * g).sum(dim=1)
    x_sq = (x * x).sum(dim=1)
    stats.gradient += g.T @ x
    importance = g_sq if token_importance else torch.ones_like(g_sq)
    if x_reference is not None:
        stats.cross_sum += (x_reference * importance[:, None]).T @ x
    stats.h_i_sum += (x * importance[:, None]).T @ x
    if stats.h_o_sum.dim() == 2:
        stats.h_o_sum += (g * x_sq[:, None]).T @ g
    else:
        stats.h_o_sum += (g * g * x_sq[:, None]).sum(dim=0)
    stats.importance_total += float(importance.sum())
    stats.input_sq_total += float(x_sq.sum())
    stats.fisher_trace += float((g_sq * x_sq).sum())


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative second-order proxy loss tr(D H D^T) / tr(W H W^T), D = Q - W (float64)."""
    w = weight.to(torch.float64)
    h = hessian.to(torch.float64)
    delta = quantized.to(torch.float64) - w
    denominator = float(((w @ h) * w).sum())
    if denominator <= 0.0:
        return float("nan")
    return float(((delta @ h) * delta).sum()) / denominator


def kronecker_scale(stats: LayerStatistics) -> float:
    """s with F ~ s * (H_O kron H_I), F = sum_t (g_t g_t^T) kron (x_t x_t^T) the empirical Fisher.

    H_I and H_O are normalised averages, so their product lacks the Fisher's scale; matching traces,
    s = tr F / (tr H_O * tr H_I), which with importance-weighted H_I is
    sum|x|^2 * sum|g|^2 / sum_t |g_t|^2 |x_t|^2 (about the number of tokens when the norms are uncorrelated).
    """
    h_i, h_o = stats.h_i, stats.h_o
    if h_i is None or h_o is None or stats.fisher_trace <= 0.0:
        return 1.0
    h_o_trace = h_o.diagonal().sum() if h_o.dim() == 2 else h_o.sum()  # H_O may be kept as its diagonal
    factors_trace = float(torch.trace(h_i)) * float(h_o_trace)
    return stats.fisher_trace / factors_trace if factors_trace > 0.0 else 1.0


def gradient_signal_ratio(stats: LayerStatistics) -> float:
    """|G|_F^2 / tr(F) with G = sum_t g_t x_t^T and tr(F) = sum_t |g_t|^2 |x_t|^2.

    If the per-token terms g_t x_t^T were independent with mean zero (the gradient is noise), the
    expected |G|^2 equals tr(F), so the ratio is about 1; tokens that agree on a direction push it
    towards T. Tokens of one sequence are correlated, so read values of a few as noise too.
    """
    if stats.gradient is None or stats.fisher_trace <= 0.0:
        return float("nan")
    g = stats.gradient.to(torch.float64)
    return float((g * g).sum()) / stats.fisher_trace


def gradient_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """<A, B> / (|A|_F |B|_F): whether two calibration sets' gradients point the same way."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    norms = float(a64.norm() * b64.norm())
    return float((a64 * b64).sum()) / norms if norms > 0.0 else float("nan")


def first_order_transfer(step: torch.Tensor, gradient: torch.Tensor, tokens: int,
                         heldout_gradient: torch.Tensor, heldout_tokens: int) -> float:
    """<G_h / T_h, step> / <G / T, step>: of the first-order loss decrease per token that moving the
    weights along -step promises on the calibration set (G from T tokens), the share that another set
    (G_h from T_h tokens) sees. 1: the gradient generalises; about 0: it is the calibration set's noise;
    below 0: the move raises the other set's loss."""
    s64 = step.to(torch.float64)
    own = float((gradient.to(torch.float64) * s64).sum()) / tokens
    other = float((heldout_gradient.to(torch.float64) * s64).sum()) / heldout_tokens
    return other / own if own != 0.0 else float("nan")
