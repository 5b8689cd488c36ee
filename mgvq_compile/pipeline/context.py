"""The state a compile carries from pass to pass."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from mgvq_compile.graph import LinearLayer

__all__ = ["CompileOptions", "CompileContext"]


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    seed: int = 0
    labels: str = "data"  # "data": labels from the calibration files; "model": the model's own argmax
    logits_name: str = "logits"
    device: str = "cpu"
    progress: bool = True


@dataclasses.dataclass
class CompileContext:
    """Graphs (a model may be several graphs, handled as one), their layers, data and artifacts."""

    models: dict[str, ir.Model]
    layers: list[LinearLayer]
    modalities: dict[str, str]
    options: CompileOptions
    calibration: list[dict[str, np.ndarray]] | None = None
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_dir: Path | None = None  # set by the pass manager for the pass that is running

    def layer_seed(self, layer: LinearLayer) -> int:
        """A per-layer seed that depends on the run's seed and the layer name, not on visiting order."""
        return (self.options.seed * 1_000_003 + zlib.crc32(layer.key.encode())) % (2**31)

    def progress(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
        return tqdm(items, desc=desc, total=total, disable=not self.options.progress, leave=False, unit="layer")

    def checkpoint_path(self, layer: LinearLayer, suffix: str = ".pt") -> Path | None:
        """Where a long pass may store one layer's result, so that a killed run resumes per layer."""
        if self.checkpoint_dir is None:
            return None
        safe = hashlib.sha1(layer.key.encode()).hexdigest()[:16]
        return self.checkpoint_dir / f"layer-{safe}{suffix}"
