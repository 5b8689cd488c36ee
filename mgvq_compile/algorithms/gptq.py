"""Hessian-aware rounding with error feedback: scalar GPTQ, BlockLDLQ and the Newton-shifted target.

Method page, section 4. All three share one feedback loop (``_feedback_round``), so that BlockLDLQ
with d = 1 on a scalar grid gives scalar GPTQ's result bit for bit.

The loop factors the *inverse* Hessian, H^-1 = L D L^T (block d, :func:`block_ldl`), and walks the
column blocks in order: block k's target is its W~ block plus the feedback of the already-quantized
blocks' errors E_j = (target_j - Q_j) through L (W_k -= sum_{j<k} E_j L_kj^T), applied lazily in
batches of ``block_size`` columns. This is GPTQ's formulation (for d = 1, L^T is GPTQ's upper Cholesky
factor of H^-1 with unit diagonal); in exact arithmetic it is QuIP#'s LDLQ on H. Each block's residual
costs target-to-codeword distance in the metric D_k^-1 (:func:`ldlq_block_metrics`), and the proxy
loss is exactly the sum of these costs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from mgvq_compile.algorithms.hessian import damp, dead_inputs
from mgvq_compile.algorithms.ldl import block_ldl
from mgvq_compile.algorithms.rtn import uniform_levels

__all__ = [
    "GPTQResult",
    "gptq_quantize",
    "block_ldlq",
    "block_ldlq_two_sided",
    "ldlq_block_metrics",
    "block_metrics_of",
    "newton_shifted_target",
    "newton_step",
    "output_matching_target",
    "trust_region_target",
    "hessian_norm",
    "feedback_factor",
]

logger = logging.getLogger(__name__)

# (column index of the block, working weights [m, n]) -> quantized block [m, d]
_BlockQuantizer = Callable[[int, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """GPTQ's output. With a scalar grid, ``codes`` and ``scales`` are in the VQ-GEMM layout.

    Columns of ``codes`` / ``scales`` are the *permuted* columns when ``perm`` is set (act-order):
    Q[:, perm] = levels[codes] * scales (each scale repeated over ``group_size`` columns).
    """

    q: torch.Tensor  # [m, n] float64, original column order
    codes: torch.Tensor | None = None  # int64 [m, n]
    scales: torch.Tensor | None = None  # float16 [m, n / group_size]
    perm: torch.Tensor | None = None  # int64 [n]: permuted column j is original column perm[j]
    bits: int | None = None
    group_size: int | None = None


def feedback_factor(h: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) with H^-1 = U^T D U, U unit block-upper (block ``d``); ``h`` must be SPD (damped)."""
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h.to(torch.float64)))
    lower, d_blocks = block_ldl(0.5 * (h_inv + h_inv.T), d)
    return lower.T.contiguous(), d_blocks


def ldlq_block_metrics(h: torch.Tensor, d: int, *, damp_rel: float = 0.01) -> torch.Tensor:
    """Metric [n/d, d, d] of each column block's residual (the inverse D blocks of H^-1's block LDL)."""
    h_damped, _ = damp(h, damp_rel)
    _, d_blocks = feedback_factor(h_damped, d)
    return block_metrics_of(d_blocks, d)


def block_metrics_of(d_blocks: torch.Tensor, d: int) -> torch.Tensor:
    """:func:`ldlq_block_metrics` from the D of an already computed :func:`feedback_factor`."""
    n = d_blocks.shape[0]
    blocks = torch.stack([d_blocks[i : i + d, i : i + d] for i in range(0, n, d)])
    return torch.linalg.inv(blocks)


def _feedback_round(
    w: torch.Tensor, u: torch.Tensor, d: int, block_size: int, quantize_block: _BlockQuantizer
) -> torch.Tensor:
    """Quantize the columns of ``w`` block by block with error feedback through ``u`` (lazy batches)."""
    w = w.to(torch.float64).clone()
    m, n = w.shape
    q = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        err = torch.zeros(m, i2 - i1, dtype=torch.float64)
        for c in range(i1, i2, d):
            qb = quantize_block(c, w).to(torch.float64)
            q[:, c : c + d] = qb
            e = w[:, c : c + d] - qb
            err[:, c - i1 : c - i1 + d] = e
            w[:, c + d : i2] -= e @ u[c : c + d, c + d : i2]
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q


def _aligned_block_size(block_size: int, group_size: int, n: int) -> int:
    """A lazy-batch size such that every scale group is read when all its feedback has arrived."""
    if group_size >= n or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    if group_size < block_size:
        return group_size * (block_size // group_size)
    return math.gcd(group_size, block_size)


def _group_scales(block: torch.Tensor, bits: int) -> torch.Tensor:
    """Float16 symmetric scales [m] of a column group, as :func:`rtn.rtn_quantize` computes them."""
    half = ((1 << bits) - 1) / 2.0
    absmax = block.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / half, torch.ones_like(absmax))
    # Keep the float16 scale finite and non-zero (tiny groups would underflow to a zero scale).
    return scales.clamp(2.0**-24, 65504.0).to(torch.float16)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    quantize_column_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    block_size: int = 128,
    act_order: bool = False,
    damp_rel: float = 0.01,
) -> GPTQResult:
    """Scalar GPTQ of ``w`` [m, n] under the input Hessian ``h`` [n, n].

    Either ``bits`` (+ ``group_size``, default the full row): the symmetric RTN grid of
    :mod:`rtn`, with each (row, group) scale computed from the compensated weights when its group is
    reached; or ``quantize_column_fn(column [m], index) -> [m]`` (then only ``q`` is returned).
    Dead inputs are zeroed, as GPTQ does. ``act_order`` processes columns by decreasing diag(H).
    """
    if (bits is None) == (quantize_column_fn is None):
        raise ValueError("give exactly one of bits or quantize_column_fn")
    m, n = w.shape
    gs = n if group_size is None else group_size
    if bits is not None and (gs < 1 or n % gs):
        raise ValueError(f"group size {gs} does not divide {n} columns")
    h_damped, _ = damp(h, damp_rel)
    work = w.detach().to(torch.float64).clone()
    work[:, dead_inputs(h.to(torch.float64))] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h_damped), descending=True, stable=True)
        work = work[:, perm]
        h_damped = h_damped[perm][:, perm]
    u, _ = feedback_factor(h_damped, 1)

    codes = torch.zeros(m, n, dtype=torch.int64)
    scales = torch.zeros(m, n // gs, dtype=torch.float16)
    scale64 = torch.zeros(m, dtype=torch.float64)

    def quantize_scalar(c: int, state: torch.Tensor) -> torch.Tensor:
        nonlocal scale64
        assert bits is not None
        if c % gs == 0:
            s = _group_scales(state[:, c : c + gs], bits)
            scales[:, c // gs] = s
            scale64 = s.to(torch.float64)
        half = ((1 << bits) - 1) / 2.0
        code = torch.clamp(torch.round(state[:, c] / scale64 + half), 0, (1 << bits) - 1)
        codes[:, c] = code.to(torch.int64)
        return ((code - half) * scale64)[:, None]

    def quantize_custom(c: int, state: torch.Tensor) -> torch.Tensor:
        assert quantize_column_fn is not None
        return quantize_column_fn(state[:, c].clone(), c).to(torch.float64).reshape(m, 1)

    if bits is not None:
        block_size = _aligned_block_size(block_size, gs, n)
        q = _feedback_round(work, u, 1, block_size, quantize_scalar)
    else:
        q = _feedback_round(work, u, 1, block_size, quantize_custom)
    if perm is not None:
        q_orig = torch.empty_like(q)
        q_orig[:, perm] = q
        q = q_orig
    if bits is None:
        return GPTQResult(q=q, perm=perm)
    return GPTQResult(q=q, codes=codes, scales=scales, perm=perm, bits=bits, group_size=gs)


def block_ldlq(
    w_target: torch.Tensor,
    h: torch.Tensor,
    assign_fn: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    d: int,
    block_size: int = 128,
    damp_rel: float = 0.01,
    feedback: torch.Tensor | None = None,
) -> torch.Tensor:
    """BlockLDLQ rounding of ``w_target`` [m, n] toward ``assign_fn``'s grid under ``h`` [n, n].

    ``assign_fn(targets [m, d], block_index) -> quantized [m, d]`` (e.g. nearest codeword). Column
    blocks are walked in order; returns Q [m, n] float64. With d = 1 and GPTQ's grid this is GPTQ.
    ``feedback``: U of ``feedback_factor(damp(h, damp_rel)[0], d)``, for callers that round one layer
    several times (``h`` is then not factored again).
    """
    m, n = w_target.shape
    if n % d:
        raise ValueError(f"{n} columns are not divisible by d={d}")
    block_size = max(d, block_size - block_size % d)
    if feedback is None:
        feedback, _ = feedback_factor(damp(h, damp_rel)[0], d)

    def quantize_block(c: int, state: torch.Tensor) -> torch.Tensor:
        out = assign_fn(state[:, c : c + d].clone(), c // d)
        if tuple(out.shape) != (m, d):
            raise ValueError(f"assign_fn returned shape {tuple(out.shape)}, expected {(m, d)}")
        return out

    return _feedback_round(w_target.detach(), feedback, d, block_size, quantize_block)


def block_ldlq_two_sided(
    w_target: torch.Tensor,
    h_in: torch.Tensor,
    h_out: torch.Tensor,
    assign_fn: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    d: int,
    block_size: int = 128,
    damp_rel: float = 0.01,
) -> torch.Tensor:
    """BlockLDLQ under the Kronecker proxy tr(H_O E H_I E^T) (YAQA-style), ``h_out`` [m, m].

    Inside each column block the rows are rounded one at a time (``assign_fn(targets [1, d], k)``),
    feeding their error forward to the later rows through the LDL of H_O^-1; the block's total error
    W_k - Q_k = U_O^T E_k then feeds the later column blocks exactly as in :func:`block_ldlq`.
    With H_O = I this is :func:`block_ldlq` bit for bit. Python loop over m rows per block: a
    reference implementation, slow for wide layers.
    """
    m, n = w_target.shape
    if n % d:
        raise ValueError(f"{n} columns are not divisible by d={d}")
    if tuple(h_out.shape) != (m, m):
        raise ValueError(f"h_out has shape {tuple(h_out.shape)}, expected {(m, m)}")
    block_size = max(d, block_size - block_size % d)
    u_in, _ = feedback_factor(damp(h_in, damp_rel)[0], d)
    u_out, _ = feedback_factor(damp(h_out, damp_rel)[0], 1)

    def quantize_block(c: int, state: torch.Tensor) -> torch.Tensor:
        rows = state[:, c : c + d].clone()
        out = torch.empty_like(rows)
        for r in range(m):
            qr = assign_fn(rows[r : r + 1].clone(), c // d).to(torch.float64).reshape(1, d)
            out[r] = qr[0]
            rows[r + 1 :] -= u_out[r, r + 1 :, None] * (rows[r] - qr[0])
        return out

    return _feedback_round(w_target.detach(), u_in, d, block_size, quantize_block)


def _damped_solve_right(x: torch.Tensor, h: torch.Tensor, damp_rel: float) -> torch.Tensor:
    """x (H + dI)^-1 for symmetric H."""
    h_damped, _ = damp(h, damp_rel)
    chol = torch.linalg.cholesky(h_damped)
    return torch.cholesky_solve(x.T, chol).T


def newton_step(
    g: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor | None = None, *, damp_rel: float = 0.01
) -> torch.Tensor:
    """(H_O + dI)^-1 G (H_I + dI)^-1 (float64; H_O = I when None, a vector = diagonal)."""
    step = _damped_solve_right(g.detach().to(torch.float64), h_in, damp_rel)  # G (H_I + dI)^-1
    if h_out is not None:
        h_out = h_out.detach().to(torch.float64)
        if h_out.dim() == 1:
            diag = torch.where(h_out > 0, h_out, torch.ones_like(h_out))
            step = step / (diag + damp_rel * float(diag.mean()))[:, None]
        else:
            step = _damped_solve_right(step.T, h_out, damp_rel).T  # (H_O + dI)^-1 step
    return step


def hessian_norm(x: torch.Tensor, h: torch.Tensor) -> float:
    """sqrt(tr(X H X^T)) for X [m, n] and H [n, n]."""
    x64 = x.to(torch.float64)
    return math.sqrt(max(float(((x64 @ h.to(torch.float64)) * x64).sum()), 0.0))


def output_matching_target(w: torch.Tensor, cross: torch.Tensor, h_in: torch.Tensor, *, damp_rel: float = 0.01,
                           strength: float = 1.0) -> torch.Tensor:
    """W + a W (C - H)(H + dI)^-1 (float64). At strength a = 1: the weights that, fed the layer's actual
    inputs x_t, best reproduce the reference outputs W x^f_t, argmin_Q sum_t w_t |W x^f_t - Q x_t|^2 =
    W C H^-1, with C = sum_t w_t x^f_t x_t^T and H = sum_t w_t x_t x_t^T (GPTAQ's asymmetric calibration).
    Written as a damped correction of W, so that it is W exactly when the inputs agree (C = H) or a = 0;
    0 < a < 1 moves part of the way.
    """
    w64 = w.detach().to(torch.float64)
    h = damp(h_in, damp_rel)[0]
    mismatch = cross.to(torch.float64) - h_in.to(torch.float64)
    return w64 + strength * torch.linalg.solve(h, (w64 @ mismatch).T).T  # H is symmetric: X H^-1 = (H^-1 X^T)^T


def trust_region_target(w: torch.Tensor, step: torch.Tensor, h_in: torch.Tensor, *, radius: float) -> torch.Tensor:
    """W - c * step with c chosen so the shift's H_I-norm is ``radius`` times W's (float64).

    The raw Newton step from calibration statistics is unusable at its natural length: the damped
    inverse of a nearly low-rank H_O amplifies G by orders of magnitude (on SmolLM2-135M it moves W by
    tens of times its own norm). Only its direction is kept; ``radius`` bounds how far the rounding
    target moves, relative to the weights, in the metric the rounding minimises.
    """
    w64 = w.detach().to(torch.float64)
    step_norm = hessian_norm(step, h_in)
    if radius == 0.0 or step_norm == 0.0:
        return w64.clone()
    return w64 - (radius * hessian_norm(w64, h_in) / step_norm) * step.to(torch.float64)


def newton_shifted_target(
    w: torch.Tensor,
    g: torch.Tensor,
    h_in: torch.Tensor,
    h_out: torch.Tensor | None = None,
    *,
    lam: float = 0.05,
    damp_rel: float = 0.01,
) -> torch.Tensor:
    """W~ = W - lam (H_O + dI)^-1 G (H_I + dI)^-1 (float64; H_O = I when None, a vector = diagonal)."""
    w64 = w.detach().to(torch.float64)
    if lam == 0.0:
        return w64.clone()
    step = newton_step(g, h_in, h_out, damp_rel=damp_rel)
    target = w64 - lam * step
    first_order = float((g.to(torch.float64) * (target - w64)).sum())
    if first_order >= 0.0:
        logger.warning("Newton step does not descend: <G, W~ - W> = %.3g", first_order)
    return target
