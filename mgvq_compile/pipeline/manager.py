"""The pass manager: validates a pipeline, runs it with progress and timings, stores artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mgvq_compile.cache import PARTIAL_SUFFIX
from mgvq_compile.errors import MgvqError, PassError, RecipeError
from mgvq_compile.pipeline.base import Pass, registered_passes
from mgvq_compile.pipeline.context import CompileContext

__all__ = ["PassManager", "save_atomic_torch"]

logger = logging.getLogger(__name__)


def save_atomic_torch(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _registered_providers(artifact: str) -> str:
    names = [name for name, cls in registered_passes().items() if artifact in cls.provides]
    return f"{', '.join(names)} (not in the recipe)" if names else "no pass in the recipe"


class PassManager:
    """Runs passes in order. ``work_dir`` (optional) keeps each artifact-producing pass's results.

    Each pass's step key chains the model fingerprint with the configs of every pass up to it, so a
    re-run with the same model and recipe loads everything, and a re-run with a changed late pass
    reloads the early ones (calibration statistics) and recomputes only from the change on.
    """

    def __init__(self, passes: list[Pass], *, work_dir: Path | None = None, progress: bool = True):
        self.passes = passes
        self.work_dir = work_dir
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.resumed: list[str] = []

    def validate(self, available: set[str]) -> None:
        """Check every pass's requirements against what earlier passes provide, before running any."""
        have = set(available)
        for index, p in enumerate(self.passes):
            missing = [a for a in p.requires if a not in have]
            if missing:
                providers = {
                    a: [q.name for q in self.passes[index + 1 :] if a in q.provides] for a in missing
                }
                hint = "; ".join(
                    f"{a!r} is provided by {', '.join(v) + ' (placed later)' if v else _registered_providers(a)}"
                    for a, v in providers.items()
                )
                raise RecipeError(
                    f"pass {p.name!r} (step {index + 1}) requires {', '.join(map(repr, missing))}, "
                    "which no earlier pass provides",
                    hint + "; add or reorder passes in the recipe",
                )
            have.update(p.provides)

    def run(self, ctx: CompileContext, root_key: str) -> None:
        self.validate(set(ctx.artifacts))
        chain = root_key
        done: list[str] = []
        bar = tqdm(self.passes, desc="passes", disable=not self.progress, unit="pass")
        for index, p in enumerate(bar):
            bar.set_postfix_str(p.name)
            chain = hashlib.sha256(
                (chain + json.dumps(p.describe(), sort_keys=True)).encode()
            ).hexdigest()
            step_dir = self._step_dir(index, p, chain)
            start = time.perf_counter()
            if step_dir is not None and (step_dir / "artifacts.pt").exists():
                ctx.artifacts.update(torch.load(step_dir / "artifacts.pt", weights_only=False))
                os.utime(step_dir / "artifacts.pt")  # last used now: cache pruning removes the least recently used
                self.resumed.append(p.name)
                logger.info("pass %s: resumed from %s", p.name, step_dir)
            else:
                result = self._run_one(p, ctx, step_dir, done)
                ctx.artifacts.update(result.artifacts)
                if step_dir is not None:
                    self._store(step_dir, result.artifacts)
            self.timings[p.name] = time.perf_counter() - start
            logger.info("pass %s: %.2f s", p.name, self.timings[p.name])
            done.append(p.name)

    def _step_dir(self, index: int, p: Pass, chain: str) -> Path | None:
        if self.work_dir is None or p.rewrites_graph:
            return None
        return self.work_dir / f"{index:02d}-{p.name}-{chain[:16]}"

    def _run_one(self, p: Pass, ctx: CompileContext, step_dir: Path | None, done: list[str]):
        partial = None
        if step_dir is not None:
            partial = step_dir.with_name(step_dir.name + PARTIAL_SUFFIX)
            partial.mkdir(parents=True, exist_ok=True)
        ctx.checkpoint_dir = partial
        try:
            return p.run(ctx)
        except MgvqError as exc:
            if not isinstance(exc, PassError):
                exc.message = f"pass {p.name!r} failed (after: {', '.join(done) or 'none'}): {exc.message}"
                exc.args = (exc.message,)
            raise
        except Exception as exc:
            raise PassError(
                f"pass {p.name!r} failed (after: {', '.join(done) or 'none'}): {type(exc).__name__}: {exc}",
                "run with -v for the traceback; report it if the input is valid",
            ) from exc
        finally:
            ctx.checkpoint_dir = None

    @staticmethod
    def _store(step_dir: Path, artifacts: dict[str, Any]) -> None:
        partial = step_dir.with_name(step_dir.name + PARTIAL_SUFFIX)
        partial.mkdir(parents=True, exist_ok=True)
        save_atomic_torch(artifacts, partial / "artifacts.pt")
        for leftover in partial.glob("layer-*"):
            leftover.unlink()
        if step_dir.exists():
            shutil.rmtree(step_dir)
        os.replace(partial, step_dir)
