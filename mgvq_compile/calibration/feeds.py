"""Calibration directories: one ``.npz`` feed per file (graph input name -> array), read in sorted order.

A feed may also hold ``labels`` (int64, -100 = ignore; the label at position t is the target of the
logits at position t) and ``token_modality`` (1 where a language-model token carries image/audio features).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from mgvq_compile.errors import CalibrationError

__all__ = ["LABELS_KEY", "TOKEN_MODALITY_KEY", "load_calibration_dir", "write_feed"]

LABELS_KEY = "labels"
TOKEN_MODALITY_KEY = "token_modality"


def write_feed(path: str | os.PathLike, feed: dict[str, np.ndarray]) -> Path:
    """Write one feed atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in feed.items()})
    os.replace(tmp, path)
    return path


def load_calibration_dir(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Every ``*.npz`` feed of ``path`` in sorted file order, checked for readability and equal keys."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration directory not found: {path}", "pass --calib DIR, a directory of .npz feeds")
    if not path.is_dir():
        raise CalibrationError(f"--calib must be a directory of .npz files, got the file {path}",
                               "put the feed(s) in a directory and pass that")
    files = sorted(path.glob("*.npz"))
    if not files:
        raise CalibrationError(
            f"calibration directory {path} holds no .npz files",
            "write one .npz per feed (graph input name -> array), e.g. with mgvq_compile.calibration.data",
        )
    feeds = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as data:
                feeds.append({key: data[key] for key in data.files})
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"calibration file {file} cannot be read: {exc}", "re-create the file") from exc
    first = set(feeds[0])
    for file, feed in zip(files, feeds):
        if set(feed) != first:
            raise CalibrationError(
                f"calibration file {file.name} has arrays {sorted(feed)} but {files[0].name} has {sorted(first)}",
                "every feed must hold the same graph inputs",
            )
        if LABELS_KEY in feed and feed[LABELS_KEY].dtype.kind not in "iu":
            raise CalibrationError(f"'labels' in {file.name} must be integers (int64, -100 = ignore)")
    return feeds
