"""Reading a compiled output back (the dequantized weight of every quantized layer, the bytes stored for
them) and comparing outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mgvq_compile.vqgemm import decode_from_stored


def dequantized_weights(out: Path, graph_file: str = "model.onnx") -> dict[str, np.ndarray]:
    """Layer name (the original initializer) -> W [m, n] decoded from the arrays stored in the output."""
    report = json.loads((out / "report.json").read_text())
    compiled = onnx.load(str(out / graph_file))
    arrays = {t.name: numpy_helper.to_array(t) for t in compiled.graph.initializer}
    weights = {}
    for layer in report["layers"]:
        if not layer["quantized"]:
            continue
        prefix = layer["name"] + ".vq."
        attributes = {
            "out_features": layer["shape"][0], "in_features": layer["shape"][1], "vector_dim": layer["vector_dim"],
            "group_bounds": layer["group_bounds"], "group_bits": layer["bits"],
            "scale_group_size": layer["scale_group_size"] or 0,
        }
        weights[layer["name"]] = decode_from_stored(
            attributes, arrays[prefix + "codebooks"], arrays[prefix + "codes"],
            arrays.get(prefix + "perm"), arrays.get(prefix + "scales"),
        )
    return weights


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
