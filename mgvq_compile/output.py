"""Writing a compile's outputs atomically: everything goes to a temporary directory that is renamed
into place at the end, so OUTDIR holds either a complete result or nothing new."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from mgvq_compile.algorithms.packing import code_width
from mgvq_compile.errors import InputError
from mgvq_compile.vqgemm import decode_from_stored

__all__ = ["check_output_dir", "write_output_dir", "stored_initializer_bytes", "graph_file_name", "dequantized_weights",
           "write_json_atomic", "write_text_atomic"]

logger = logging.getLogger(__name__)


def graph_file_name(graph_name: str) -> str:
    return f"{graph_name}.onnx"


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless ``overwrite``; refuse a file in its place."""
    if output.exists() and not output.is_dir():
        raise InputError(f"output path {output} exists and is not a directory", "choose another -o OUTDIR")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(
            f"output directory {output} already exists and is not empty",
            "choose another -o OUTDIR, or pass --overwrite to replace it",
        )
    parent = output.resolve().parent
    if not parent.exists():
        raise InputError(f"the parent directory of {output} does not exist", f"create {parent} first")


def write_output_dir(
    output: Path,
    models: Mapping[str, ir.Model],
    write_extras: Callable[[Path], None],
    *,
    overwrite: bool,
) -> None:
    """Save each graph as ``<name>.onnx`` + ``<name>.onnx.data``, call ``write_extras(tmp_dir)`` for the
    other files, then move the finished directory to ``output`` in one rename."""
    check_output_dir(output, overwrite)
    output = output.resolve()
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for graph_name, model in models.items():
            file_name = graph_file_name(graph_name)
            ir.save(model, tmp / file_name, external_data=f"{file_name}.data", size_threshold_bytes=1024)
        write_extras(tmp)
        trash = None
        if output.exists():
            trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, trash)
        os.replace(tmp, output)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stored_initializer_bytes(onnx_path: Path) -> dict[str, int]:
    """Bytes each initializer occupies in a written model (external data length, or inline raw data)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    sizes = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            sizes[tensor.name] = int(entries["length"])
        else:
            sizes[tensor.name] = len(tensor.raw_data) if tensor.raw_data else tensor.ByteSize()
    return sizes


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: a reader (or a run
    killed halfway) never leaves half a file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def dequantized_weights(out: str | os.PathLike, graph_file: str = "model.onnx") -> dict[str, np.ndarray]:
    """Layer name (the original initializer) -> W [m, n] decoded from the arrays stored in the output."""
    out = Path(out)
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
            "group_bounds": layer["group_bounds"],
            "group_code_bits": [code_width(b, layer["vector_dim"]) for b in layer["bits"]],
            "scale_group_size": layer["scale_group_size"] or 0,
        }
        weights[layer["name"]] = decode_from_stored(
            attributes, arrays[prefix + "codebooks"], arrays[prefix + "codes"],
            arrays.get(prefix + "perm"), arrays.get(prefix + "scales"),
        )
    return weights
