"""The artifact cache of resumable compiles (``--work-dir``, default ``~/.cache/mgvq-compile``): what it
holds, and pruning it. Nothing else removes its entries, and calibration statistics of a real model take
gigabytes, so a build machine that compiles many models or recipes needs this.

Layout (see pipeline.manager): ``<work dir>/<run key>/<NN>-<pass>-<step key>/artifacts.pt`` per finished
pass, and ``<...>.partial/`` for a pass that was interrupted (its per-layer checkpoints, which a re-run
resumes from). An entry is one such step directory; it is "used" when written or resumed from (the
manager touches ``artifacts.pt`` on resume), and pruning removes the least recently used first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

__all__ = ["CacheEntry", "PARTIAL_SUFFIX", "default_work_dir", "cache_entries", "prune_cache", "parse_size", "parse_age", "human_size"]

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# Entries used this recently are never pruned: a compile running beside the pruning may be writing or
# reading them.
IN_USE_S = 600.0


def default_work_dir() -> Path:
    """Where artifacts of long passes are kept between runs (``MGVQ_CACHE_DIR`` overrides)."""
    base = os.environ.get("MGVQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mgvq-compile"
    )
    return Path(base)


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    path: Path
    nbytes: int
    last_used: float  # seconds since the epoch: the newest file time in the entry
    partial: bool  # an interrupted pass's checkpoints, not a finished pass

    @property
    def run(self) -> str:
        return self.path.parent.name


def _size_and_time(directory: Path) -> tuple[int, float]:
    nbytes, newest = 0, directory.stat().st_mtime
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walk (a compile finishing beside us)
                continue
            nbytes += stat.st_size
            newest = max(newest, stat.st_mtime)
    return nbytes, newest


def cache_entries(work_dir: str | os.PathLike) -> list[CacheEntry]:
    """Every step directory under ``work_dir``, least recently used first ([] when it does not exist)."""
    root = Path(work_dir)
    if not root.is_dir():
        return []
    entries = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        for step in sorted(p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")):
            nbytes, last_used = _size_and_time(step)
            entries.append(CacheEntry(step, nbytes, last_used, step.name.endswith(PARTIAL_SUFFIX)))
    return sorted(entries, key=lambda e: (e.last_used, str(e.path)))


def prune_cache(work_dir: str | os.PathLike, *, max_bytes: int | None = None, older_than_s: float | None = None,
                now: float | None = None, dry_run: bool = False) -> list[CacheEntry]:
    """Remove entries, least recently used first: every one unused for ``older_than_s`` seconds, then more
    until the cache holds at most ``max_bytes``. Entries used in the last :data:`IN_USE_S` seconds stay.
    Returns the entries removed (with ``dry_run``, those that would be). A run directory left empty goes too."""
    if max_bytes is None and older_than_s is None:
        raise ValueError("give max_bytes, older_than_s or both")
    now = time.time() if now is None else now
    entries = cache_entries(work_dir)
    total = sum(e.nbytes for e in entries)
    removed = []
    for entry in entries:
        if now - entry.last_used < IN_USE_S:
            continue
        stale = older_than_s is not None and now - entry.last_used > older_than_s
        over = max_bytes is not None and total > max_bytes
        if not (stale or over):
            continue
        removed.append(entry)
        total -= entry.nbytes
        if not dry_run:
            _remove(entry.path)
    if not dry_run:
        for run in {e.path.parent for e in removed}:
            if run.is_dir() and not any(run.iterdir()):
                run.rmdir()
    if max_bytes is not None and total > max_bytes:
        logger.warning("the cache still holds %s (over %s): the rest was used in the last %d minutes",
                       human_size(total), human_size(max_bytes), IN_USE_S // 60)
    return removed


def _remove(step: Path) -> None:
    """Rename first, so that an interrupted removal never leaves a step that looks finished."""
    doomed = step.with_name(f".removing-{step.name}-{os.getpid()}")
    os.replace(step, doomed)
    shutil.rmtree(doomed)


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``"20G"``, ``"500M"``, ``"1.5T"``, ``"0"`` -> bytes (binary units; a trailing B or iB is allowed)."""
    spec = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (spec[:-1], spec[-1]) if spec and spec[-1] in _SIZE_UNITS else (spec, "")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit K, M, G or T") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value * _SIZE_UNITS[unit])


def parse_age(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"2w"``, ``"90m"`` -> seconds."""
    spec = text.strip().lower()
    try:
        value = float(spec[:-1]) if spec and spec[-1] in _AGE_UNITS else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"age {text!r} is not a number with a unit s, m, h, d or w (e.g. 30d)")
    return value * _AGE_UNITS[spec[-1]]


def human_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
