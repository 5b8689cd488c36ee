"""Reading a compiled output back: the dequantized weight of every quantized layer."""

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
