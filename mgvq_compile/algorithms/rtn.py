"""Scalar round-to-nearest with one symmetric scale per row and group of columns.

A b-bit weight takes one of the levels c_q = q - (2^b - 1)/2, q = 0 .. 2^b - 1, times the scale
s = absmax / ((2^b - 1)/2) of its (row, column group); so the codebook is the same for every layer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["uniform_levels", "rtn_quantize"]


def uniform_levels(bits: int) -> np.ndarray:
    """The 2^b symmetric levels, as a float16 codebook of 1-dimensional codewords."""
    half = ((1 << bits) - 1) / 2.0
    return (np.arange(1 << bits, dtype=np.float64) - half).astype(np.float16).reshape(-1, 1)


def rtn_quantize(weight: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [m, n] (int64) and float16 scales [m, n / group_size] of ``weight`` [m, n]."""
    m, n = weight.shape
    half = ((1 << bits) - 1) / 2.0
    blocks = weight.astype(np.float64).reshape(m, n // group_size, group_size)
    absmax = np.abs(blocks).max(axis=2)
    scales = np.where(absmax > 0, absmax / half, 1.0).astype(np.float16)
    # Codes are chosen against the stored (float16) scales so that decode reproduces them exactly.
    scaled = blocks / scales.astype(np.float64)[:, :, None]
    codes = np.clip(np.rint(scaled + half), 0, (1 << bits) - 1).astype(np.int64)
    return codes.reshape(m, n), scales
