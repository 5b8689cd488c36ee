"""Packing of integer codes at an exact bit width (method page, section 5).

Codes are written LSB-first into a little-endian bit stream: code i occupies bits
[i*k, (i+1)*k) of the stream, bit j of the stream is bit (j % 8) of byte j // 8. The stream is
padded with zero bits to a whole byte, so n codes of k bits take ceil(n*k/8) bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["code_width", "packed_nbytes", "pack_codes", "unpack_codes"]


def code_width(bits_per_weight: float, d: int) -> int:
    """The bits of one code of ``d`` weights at ``bits_per_weight`` each (b*d); raises unless it is whole
    and positive."""
    code = bits_per_weight * d
    if abs(code - round(code)) > 1e-9 or round(code) < 1:
        raise ValueError(f"{bits_per_weight} bits per weight at d={d} is not a whole number of code bits")
    return int(round(code))


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer ``codes`` (any shape, flattened row-major) at ``bits`` bits each."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    flat = np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes do not fit in {bits} bits (range {flat.min()}..{flat.max()})")
    bit_matrix = (flat[:, None] >> np.arange(bits, dtype=np.int64)) & 1
    stream = bit_matrix.astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int64."""
    if packed.size != packed_nbytes(count, bits):
        raise ValueError(f"{packed.size} bytes cannot hold exactly {count} codes of {bits} bits")
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: count * bits]
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return stream.reshape(count, bits).astype(np.int64) @ weights
