"""Running compiled models in ONNX Runtime with the mgvq custom-op library (``mgvq.VQGemm``).

Two builds exist: ``libmgvq_ops.so`` (CPU kernels) and ``libmgvq_ops_cuda.so`` (CUDA kernels plus the
same CPU kernels, in one "mgvq" domain: ORT rejects two custom domains of one name in a session, so a
session with the CUDA provider registers the CUDA build alone).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from mgvq_compile.errors import MgvqError

__all__ = ["LIBRARY_ENV", "CUDA_LIBRARY_ENV", "BUILD_COMMAND", "CUDA_BUILD_COMMAND", "library_path", "create_session"]

logger = logging.getLogger(__name__)

LIBRARY_ENV = "MGVQ_OPS_LIBRARY"
CUDA_LIBRARY_ENV = "MGVQ_OPS_CUDA_LIBRARY"
BUILD_COMMAND = "python custom_ops/build.py"
CUDA_BUILD_COMMAND = "python custom_ops/build.py --cuda"
_LIBRARY_NAMES = {"cpu": "libmgvq_ops.so", "cuda": "libmgvq_ops_cuda.so"}
_LIBRARY_ENVS = {"cpu": LIBRARY_ENV, "cuda": CUDA_LIBRARY_ENV}
_BUILD_HINTS = {
    "cpu": f"`{BUILD_COMMAND}` (needs g++ and apt-get)",
    "cuda": f"`{CUDA_BUILD_COMMAND}` (needs nvcc, g++ and apt-get)",
}
CUDA_PROVIDER = "CUDAExecutionProvider"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _candidates(device: str) -> list[Path]:
    name = _LIBRARY_NAMES[device]
    found = []
    if os.environ.get(_LIBRARY_ENVS[device]):
        found.append(Path(os.environ[_LIBRARY_ENVS[device]]))
    found.append(_PACKAGE_DIR / "lib" / name)  # where an installed package would carry it
    found.append(_PACKAGE_DIR.parent / "build" / name)  # a source checkout after custom_ops/build.py
    return found


def library_path(device: str = "cpu") -> str:
    """Path of the built custom-op library for ``device`` ("cpu" or "cuda"; ``$MGVQ_OPS_LIBRARY``,
    respectively ``$MGVQ_OPS_CUDA_LIBRARY``, wins when set)."""
    if device not in _LIBRARY_NAMES:
        raise MgvqError(f"no mgvq custom-op library for device {device!r}", f"use one of {sorted(_LIBRARY_NAMES)}")
    candidates = _candidates(device)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise MgvqError(
        f"the mgvq custom-op library ({_LIBRARY_NAMES[device]}) is not built; looked in "
        + ", ".join(str(p) for p in candidates),
        f"build it from the source checkout with {_BUILD_HINTS[device]}, "
        f"or set {_LIBRARY_ENVS[device]} to a built copy",
    )


def create_session(
    path: str | Path | bytes,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ORT session for a model (path or serialized bytes) with the mgvq custom ops registered.

    With "CUDAExecutionProvider" among ``providers`` (names or (name, options) pairs) the CUDA build of
    the library is registered, which carries the CPU kernels too.
    """
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers or ()]
    options = ort.SessionOptions()
    options.register_custom_ops_library(library_path("cuda" if CUDA_PROVIDER in names else "cpu"))
    if threads:
        options.intra_op_num_threads = threads
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))
