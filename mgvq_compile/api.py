"""The public entry point: ``compile(model, ...)``, which the CLI calls too."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mgvq_compile.cache import default_work_dir
from mgvq_compile.errors import CalibrationError, InputError, RecipeError
from mgvq_compile.graph import find_linear_layers, load_onnx, model_fingerprint, tag_modalities, weight_matrix
from mgvq_compile.output import check_output_dir, graph_file_name, stored_initializer_bytes, write_json_atomic, write_output_dir
from mgvq_compile.pipeline.context import CompileContext, CompileOptions
from mgvq_compile.pipeline.manager import PassManager
from mgvq_compile.recipes import Recipe, builtin_recipe
from mgvq_compile.plots import require_matplotlib, write_plots
from mgvq_compile.report import build_report

__all__ = ["DEFAULT_METHOD", "CompileResult", "collect_statistics", "compile", "default_work_dir"]

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "kmeans-vq"
_RESERVED_KEYS = ("labels", "token_modality")


@dataclasses.dataclass
class CompileResult:
    output: Path
    report: dict[str, Any]
    recipe: Recipe
    models: dict[str, ir.Model]


def _as_graphs(model: Any, example_inputs: Mapping[str, Any] | None) -> dict[str, ir.Model]:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix != ".onnx" and path.is_file():
            raise InputError(f"{path} is not an .onnx file", "export the model to ONNX, or pass a torch model from Python")
        return {"model": load_onnx(path)}
    if isinstance(model, ir.Model):
        return {"model": model}
    if isinstance(model, Mapping) and model and all(isinstance(m, ir.Model) for m in model.values()):
        return dict(model)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        if not example_inputs:
            raise InputError(
                "a torch model needs example_inputs (a dict of input name -> tensor) to be captured",
                "pass example_inputs={'input_ids': ...} (and pixel_values for a VLM)",
            )
        from mgvq_compile.capture import capture_torch_model

        return capture_torch_model(model, dict(example_inputs))
    raise InputError(
        f"cannot compile an object of type {type(model).__name__}",
        "pass an .onnx path, an onnx_ir.Model, a dict of onnx_ir.Models, or a torch.nn.Module with example_inputs",
    )


def _load_calibration(calib: Any) -> list[dict[str, np.ndarray]] | None:
    if calib is None:
        return None
    if isinstance(calib, (str, os.PathLike)):
        from mgvq_compile.calibration.feeds import load_calibration_dir

        return load_calibration_dir(calib)
    feeds = [dict(feed) for feed in calib]
    if not feeds:
        raise CalibrationError("the calibration set is empty", "pass at least one feed")
    return feeds


def _check_feeds(graphs: Mapping[str, ir.Model], feeds: Sequence[Mapping[str, np.ndarray]], source: Any) -> None:
    expected = set()
    for model in graphs.values():
        expected |= {v.name for v in model.graph.inputs if not v.is_initializer()}
    for index, feed in enumerate(feeds):
        keys = set(feed) - set(_RESERVED_KEYS)
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        if missing or extra:
            raise CalibrationError(
                f"calibration feed {index} of {source} does not match the graph inputs"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; not graph inputs: {', '.join(extra)}" if extra else ""),
                f"each .npz must hold exactly the graph inputs ({', '.join(sorted(expected))}), "
                "plus optional 'labels' and 'token_modality'",
            )


def _calibration_fingerprint(feeds: Sequence[Mapping[str, np.ndarray]] | None) -> str:
    digest = hashlib.sha256()
    for feed in feeds or ():
        for key in sorted(feed):
            array = np.ascontiguousarray(feed[key])
            digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _load_inputs(model, example_inputs, calib, method, bits, recipe, labels, portable, options):
    """The graphs, calibration feeds and recipe of a compile, each checked."""
    from mgvq_compile.recipes import load_recipe

    if labels not in ("data", "model"):
        raise InputError(f"labels must be 'data' or 'model', got {labels!r}")
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    graphs = _as_graphs(model, example_inputs)
    feeds = _load_calibration(calib)
    if recipe is None:
        recipe = builtin_recipe(method, bits=bits, calibrated=feeds is not None, portable=portable)
    elif portable:
        recipe = recipe.with_options({"fuse-vq-gemm.form": "decomposed"})
    if options:
        recipe = recipe.with_options(options)
    if recipe.needs_calibration and feeds is None:
        raise CalibrationError(
            f"recipe {recipe.method!r} collects calibration statistics but no calibration data was given",
            "pass --calib DIR (a directory of .npz feeds)",
        )
    if feeds is not None:
        _check_feeds(graphs, feeds, calib if isinstance(calib, (str, os.PathLike)) else "the calibration set")
    return graphs, feeds, recipe


def _new_context(graphs, feeds, seed, labels, logits_name, device, progress, work_dir, resume):
    """The compile context, its cache key and its artifact directory (None without ``resume``)."""
    layers = [layer for name, g in graphs.items() for layer in find_linear_layers(g, name)]
    if not layers:
        raise InputError(
            "the model has no MatMul/Gemm with a 2-D float weight initializer to quantize",
            "export it with its weights as initializers (torch.onnx.export keeps them so); the LM head, "
            "embeddings, tied weights and MatMuls that produce a graph output are left in float by design",
        )
    modalities: dict[str, str] = {}
    for name, g in graphs.items():
        modalities.update(tag_modalities(g, [layer for layer in layers if layer.graph == name]))
    options = CompileOptions(
        seed=seed, labels=labels, logits_name=logits_name, device=device,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    ctx = CompileContext(graphs, layers, modalities, options, calibration=feeds)
    root_key = hashlib.sha256(
        f"{model_fingerprint(graphs)}|{_calibration_fingerprint(feeds)}|{seed}|{labels}|{logits_name}".encode()
    ).hexdigest()
    run_dir = (Path(work_dir) if work_dir else default_work_dir()) / root_key[:16] if resume else None
    return ctx, root_key, run_dir


def compile(
    model: Any,
    *,
    method: str = DEFAULT_METHOD,
    bits: float = 2.0,
    calib: Any = None,
    output: str | os.PathLike,
    seed: int = 0,
    recipe: Recipe | str | os.PathLike | None = None,
    example_inputs: Mapping[str, Any] | None = None,
    labels: str = "data",
    logits_name: str = "logits",
    portable: bool = False,
    overwrite: bool = False,
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str = "cpu",
    progress: bool | None = None,
    options: Mapping[str, Any] | None = None,
    plots: bool = False,
) -> CompileResult:
    """Quantize ``model`` and write ``output``/model.onnx (+ weights), recipe.yaml and report.json.

    ``model``: an .onnx path, an ``onnx_ir.Model``, a dict of named graphs, or a torch module with
    ``example_inputs``. ``calib``: a directory of .npz feeds, or a list of feeds. ``recipe``
    (a Recipe or a YAML/JSON file) replaces the built-in recipe of ``method``. ``options`` overrides
    pass options, keyed ``"pass-name.option"`` (e.g. ``{"compensate.lam": 0.1}``). ``plots`` also writes
    bits-per-layer and error-per-layer PNGs next to report.json. The output runs its quantized layers
    as ``mgvq.VQGemm`` nodes (open it with ``mgvq_compile.runtime.create_session``); ``portable=True``
    writes standard ONNX ops instead, which stock ORT runs (slower, and dense in memory once loaded).
    """
    output = Path(output)
    check_output_dir(output, overwrite)
    if plots:
        require_matplotlib()
    graphs, feeds, recipe = _load_inputs(model, example_inputs, calib, method, bits, recipe, labels, portable, options)
    ctx, root_key, run_dir = _new_context(graphs, feeds, seed, labels, logits_name, device, progress, work_dir, resume)
    layers = ctx.layers
    manager = PassManager(list(recipe.passes), work_dir=run_dir, progress=ctx.options.progress)
    logger.info("compiling %d layers with recipe %r (work dir %s)", len(layers), recipe.method, run_dir)
    # The original weights are needed for the report after the graph is rewritten.
    dense_weights = {layer.key: weight_matrix(graphs[layer.graph], layer) for layer in layers}
    manager.run(ctx, root_key)
    if "stored" not in ctx.artifacts:
        raise RecipeError("the recipe never rewrote the graph", "end the recipe with the fuse-vq-gemm pass")
    graph_of = {layer.key: layer.graph for layer in layers}
    report_box: dict[str, Any] = {}

    def write_extras(tmp: Path) -> None:
        sizes = {name: stored_initializer_bytes(tmp / graph_file_name(name)) for name in graphs}
        stored_bytes = {
            key: {role: sizes[graph_of[key]][value] for role, value in roles.items()}
            for key, roles in ctx.artifacts["stored"].items()
        }
        files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
        report = build_report(
            ctx, dense_weights, stored_bytes, method=recipe.method, seed=seed,
            timings=manager.timings, resumed=manager.resumed, files=files,
        )
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        write_json_atomic(tmp / "report.json", report)
        if plots:
            write_plots(report, tmp)
        report_box["report"] = report

    write_output_dir(output, graphs, write_extras, overwrite=overwrite)
    return CompileResult(output, report_box["report"], recipe, graphs)


def collect_statistics(
    model: Any,
    *,
    calib: Any,
    method: str = "mgvq",
    bits: float = 2.0,
    seed: int = 0,
    example_inputs: Mapping[str, Any] | None = None,
    labels: str = "data",
    logits_name: str = "logits",
    work_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str = "cpu",
    progress: bool | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The calibration statistics ``method``'s recipe collects (layer key -> ``LayerStatistics``).

    Runs the recipe only up to its statistics pass. With the same model, calibration data, seed and
    options as a compile, it shares that compile's cache entry, so it reloads instead of recomputing.
    """
    graphs, feeds, recipe = _load_inputs(model, example_inputs, calib, method, bits, recipe=None, labels=labels,
                                         portable=False, options=options)
    if not recipe.needs_calibration:
        raise RecipeError(f"method {method!r} collects no calibration statistics", "use a calibrated method, e.g. mgvq")
    end = next(index for index, p in enumerate(recipe.passes) if "stats" in p.provides)
    ctx, root_key, run_dir = _new_context(graphs, feeds, seed, labels, logits_name, device, progress, work_dir, resume)
    PassManager(list(recipe.passes[: end + 1]), work_dir=run_dir, progress=ctx.options.progress).run(ctx, root_key)
    return ctx.artifacts["stats"]
