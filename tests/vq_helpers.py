"""Reading a compiled output back (the dequantized weight of every quantized layer, the bytes stored for
them) and comparing outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mgvq_compile.output import dequantized_weights  # noqa: F401 (re-exported for the tests)


def stored_vq_bytes(model_path: Path) -> int:
    """Bytes of every quantized layer's codes, codebooks, permutation and scales in the written files."""
    proto = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        if ".vq." in t.name and t.name.rsplit(".", 1)[-1] in ("codebooks", "codes", "perm", "scales"):
            external = {e.key: e.value for e in t.external_data}
            total += int(external["length"]) if external else len(t.raw_data)
    return total


def rel_err(a, b) -> float:
    """|a - b| / |b| (Frobenius), computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
