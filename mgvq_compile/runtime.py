"""Running compiled models in ONNX Runtime with the mgvq custom-op library (``mgvq.VQGemm``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from mgvq_compile.errors import MgvqError

__all__ = ["LIBRARY_ENV", "BUILD_COMMAND", "library_path", "create_session"]

logger = logging.getLogger(__name__)

LIBRARY_ENV = "MGVQ_OPS_LIBRARY"
BUILD_COMMAND = "python custom_ops/build.py"
_LIBRARY_NAMES = {"cpu": "libmgvq_ops.so"}
_PACKAGE_DIR = Path(__file__).resolve().parent


def _candidates(device: str) -> list[Path]:
    name = _LIBRARY_NAMES[device]
    found = []
    if os.environ.get(LIBRARY_ENV):
        found.append(Path(os.environ[LIBRARY_ENV]))
    found.append(_PACKAGE_DIR / "lib" / name)  # where an installed package would carry it
    found.append(_PACKAGE_DIR.parent / "build" / name)  # a source checkout after custom_ops/build.py
    return found


def library_path(device: str = "cpu") -> str:
    """Path of the built custom-op library for ``device`` (``$MGVQ_OPS_LIBRARY`` wins when set)."""
    if device not in _LIBRARY_NAMES:
        raise MgvqError(f"no mgvq custom-op library for device {device!r}", f"use one of {sorted(_LIBRARY_NAMES)}")
    candidates = _candidates(device)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise MgvqError(
        f"the mgvq custom-op library ({_LIBRARY_NAMES[device]}) is not built; looked in "
        + ", ".join(str(p) for p in candidates),
        f"build it from the source checkout with `{BUILD_COMMAND}` (needs g++ and apt-get), "
        f"or set {LIBRARY_ENV} to a built copy",
    )


def create_session(
    path: str | Path | bytes,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ORT session for a model (path or serialized bytes) with the mgvq custom ops registered."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(library_path("cpu"))
    if threads:
        options.intra_op_num_threads = threads
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))
