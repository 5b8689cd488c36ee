"""Reading a compiled output back (the dequantized weight of every quantized layer, the bytes stored for
them) and comparing outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mgvq_compile.output import dequantized_weights  # noqa: F401 (re-exported for the tests)
from mgvq_compile.output import stored_initializer_bytes


def stored_vq_bytes(model_path: Path) -> int:
    """Bytes of every quantized layer's codes, codebooks, permutation and scales in the written files."""
    return sum(size for name, size in stored_initializer_bytes(model_path).items()
               if ".vq." in name and name.rsplit(".", 1)[-1] in ("codebooks", "codes", "perm", "scales"))


def rel_err(a, b) -> float:
    """|a - b| / |b| (Frobenius), computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
