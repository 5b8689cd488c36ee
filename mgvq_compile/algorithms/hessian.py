"""Damping and inverse factors of a layer Hessian (method page, sections 1 and 7).

Damping adds ``rel * mean(diag H) * I`` and raises it tenfold until a Cholesky factorisation
succeeds. Dead inputs (zero diagonal: the input was never non-zero in calibration) get a unit diagonal,
as in GPTQ, so that they neither break the factorisation nor attract compensation.
All solves run in float64.
"""

from __future__ import annotations

import logging

import torch

from mgvq_compile.errors import CalibrationError

__all__ = ["dead_inputs", "damp", "cholesky_inverse_upper"]

logger = logging.getLogger(__name__)


def dead_inputs(h: torch.Tensor) -> torch.Tensor:
    """Boolean mask [n] of the inputs whose diagonal entry of ``h`` is zero."""
    return torch.diagonal(h) == 0


def damp(h: torch.Tensor, rel: float = 0.01, *, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Damped float64 copy of ``h`` that admits a Cholesky factorisation, and the damping added.

    Dead inputs get diagonal 1 first; then ``rel * mean(diag)`` is added to the diagonal and raised
    x10 per failed factorisation, at most ``max_tries`` times.
    """
    h = h.detach().to(torch.float64).clone()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise CalibrationError(
            "the layer Hessian has non-finite entries",
            "check the calibration inputs for inf/nan activations",
        )
    h = 0.5 * (h + h.T)
    dead = dead_inputs(h)
    if bool(dead.any()):
        logger.info("%d of %d inputs are dead (zero diagonal); setting their diagonal to 1",
                    int(dead.sum()), h.shape[0])
        idx = torch.nonzero(dead).flatten()
        h[idx, idx] = 1.0
    mean_diag = abs(float(torch.diagonal(h).mean()))
    damping = rel * mean_diag
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    for attempt in range(max_tries):
        damped = h + damping * eye
        _, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            if attempt:
                logger.info("damping raised to %.3g (x%d of the base)", damping, 10**attempt)
            return damped, damping
        damping = (damping if damping > 0 else mean_diag * 1e-6) * 10.0
    raise CalibrationError(
        f"the layer Hessian is not positive definite even with damping {damping / 10:.3g}",
        "use more calibration samples or a larger damping (rel)",
    )


def cholesky_inverse_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), as GPTQ uses it; ``h`` must be SPD."""
    h = h.to(torch.float64)
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)
