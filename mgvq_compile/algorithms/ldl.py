"""Block LDL decomposition (QuIP#'s BlockLDLQ building block, method page section 4).

H = L D L^T with L unit block-lower-triangular (identity blocks on the diagonal) and D block-diagonal,
blocks of size ``block``. Computed from the Cholesky factor C (H = C C^T): with B the block diagonal of
C, L = C B^-1 and D = B B^T.
"""

from __future__ import annotations

import torch

__all__ = ["block_ldl"]


def block_ldl(h: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) with L @ D @ L.T == h (float64); ``h`` must be SPD and its size divisible by ``block``."""
    h = h.to(torch.float64)
    n = h.shape[0]
    if h.dim() != 2 or h.shape[1] != n:
        raise ValueError(f"expected a square matrix, got shape {tuple(h.shape)}")
    if block < 1 or n % block:
        raise ValueError(f"size {n} is not divisible by block {block}")
    c = torch.linalg.cholesky(h)
    nb = n // block
    # Diagonal blocks of C, [nb, block, block], and the block diagonal matrix they form.
    diag_blocks = c.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    b = torch.block_diag(*diag_blocks)
    lower = torch.linalg.solve_triangular(b, c, upper=False, left=False)
    # Clean the rounding noise off the structure the decomposition guarantees.
    mask = torch.kron(torch.tril(torch.ones(nb, nb, dtype=torch.bool), diagonal=-1),
                      torch.ones(block, block, dtype=torch.bool))
    lower = torch.where(mask, lower, torch.zeros((), dtype=torch.float64)) + torch.eye(n, dtype=torch.float64)
    d = torch.block_diag(*(diag_blocks @ diag_blocks.transpose(1, 2)))
    return lower, d
