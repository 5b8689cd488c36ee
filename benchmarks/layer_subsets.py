"""Which layers' quantization costs a compiled model its accuracy: the float model with the decoded
(dequantized) weights of only a subset of its layers, evaluated like benchmarks/accuracy.py.

    python benchmarks/layer_subsets.py OUTDIR [OUTDIR ...] [--model smollm2] [--base BASEDIR]
        [--subset LABEL=REGEX ...] [--tag NAME]

OUTDIR is an mgvq-compile output of the benchmark's Whisper (default) or SmolLM2 graph
(benchmarks/work/accuracy/models/...). Each subset puts the decoded weights of the layers whose names
match REGEX (re.search) into the benchmark's float graph and measures it as the benchmark does
(Whisper: teacher-forced NLL and greedy WER on its evaluation sentences, 64 since 2026-11-24, the
committed tables before that read 16; SmolLM2: perplexity). With ``--base BASEDIR`` the other layers
hold BASEDIR's decoded weights instead of the float ones: swapping one compile's layers into another
shows which layers' widths make the difference between two allocations. Errors of two layers need not
add up: comparing a pair's row with each member's alone shows how much they interact. Writes
``benchmarks/results/layer-subsets{-TAG}.json`` and ``.md``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the benchmark's settings, evaluation novel and results folder)
from mgvq_compile.output import write_text_atomic  # noqa: E402

DEFAULT_SUBSETS = (
    "none=^$", "all=.", "encoder=^model\\.encoder\\.", "decoder=^model\\.decoder\\.",
    "cross-attention=encoder_attn", "cross q=encoder_attn\\.q_proj", "cross k=encoder_attn\\.k_proj",
    "cross q+k=encoder_attn\\.(q|k)_proj", "every q+k=(q|k)_proj",
    "all but cross q+k=^(?!.*encoder_attn\\.(q|k)_proj)", "all but every q+k=^(?!.*(q|k)_proj)",
)


SMOLLM2_SUBSETS = (
    "none=^$", "all=.", "attention=self_attn", "mlp=mlp", "q=q_proj", "k=k_proj", "v=v_proj", "o=o_proj",
    "gate+up=(gate|up)_proj", "down=down_proj",
)
METRICS = {"whisper": ("nll", "wer"), "smollm2": ("perplexity",)}


def _evaluator(model: str, settings: "accuracy.Settings"):
    """(float graph path, graph path -> {metric: value}) of the benchmark's ``model``."""
    if model == "smollm2":
        from mgvq_compile.models.smollm2 import load_smollm2

        return (accuracy.smollm2_float_path(accuracy.DEFAULT_WORK, settings),
                accuracy.smollm2_evaluator(load_smollm2()[1], settings))
    from mgvq_compile.models.whisper_ct2 import load_whisper_tiny_en

    return (accuracy.whisper_float_path(accuracy.DEFAULT_WORK, settings),
            accuracy.whisper_evaluator(load_whisper_tiny_en()[1], settings))


def evaluate_subsets(out_dir: Path, subsets: list[tuple[str, str]], model: str = "whisper",
                     base_dir: Path | None = None) -> list[dict]:
    import onnx_ir as ir

    from mgvq_compile.graph import find_linear_layers, load_onnx, with_weights
    from mgvq_compile.output import dequantized_weights

    float_path, evaluate = _evaluator(model, accuracy.Settings())
    if not float_path.exists():
        raise SystemExit(f"{float_path} is missing: run python benchmarks/accuracy.py --models {model} first")
    float_graph = load_onnx(float_path)
    layers = find_linear_layers(float_graph)
    decoded = dequantized_weights(out_dir)
    base = dequantized_weights(base_dir) if base_dir is not None else {}
    rows = []
    for label, pattern in subsets:
        regex = re.compile(pattern)
        names = [name for name in decoded if regex.search(name)]
        weights = {**base, **{name: decoded[name] for name in names}}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(with_weights(float_graph, weights, layers), str(path), external_data="model.onnx.data")
            measured = evaluate(path)
        result = {metric: measured[metric] for metric in METRICS[model]}
        rows.append({"model": str(out_dir), "base": str(base_dir) if base_dir else None, "subset": label,
                     "pattern": pattern, "layers": len(names), **result})
        shown = "  ".join(f"{metric} {value:.3f}" for metric, value in result.items())
        print(f"{out_dir.name}  {label:24s} {len(names):3d} layers  {shown}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="mgvq-compile output directories of the model's graph")
    parser.add_argument("--model", choices=tuple(METRICS), default="whisper", help="the benchmark model compiled")
    parser.add_argument("--base", type=Path, help="an output whose decoded weights the other layers hold (default: float)")
    parser.add_argument("--subset", action="append", metavar="LABEL=REGEX",
                        help="a subset of layers by weight name (repeatable; default: a standard set per model)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args(argv)
    subsets = []
    for item in args.subset or (SMOLLM2_SUBSETS if args.model == "smollm2" else DEFAULT_SUBSETS):
        label, sep, pattern = item.partition("=")
        if not sep:
            parser.error(f"--subset {item!r} is not LABEL=REGEX")
        subsets.append((label, pattern))
    for out in [*args.outputs, *([args.base] if args.base else [])]:
        if not (out / "report.json").exists():
            parser.error(f"{out} is not an mgvq-compile output (no report.json)")
    rows = [row for out in args.outputs for row in evaluate_subsets(out, subsets, args.model, args.base)]
    command = "python benchmarks/layer_subsets.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    metrics = METRICS[args.model]
    title = {"whisper": "Whisper tiny.en", "smollm2": "SmolLM2-135M"}[args.model]
    rest = f"the decoded weights of {args.base.name}" if args.base else "float"
    lines = [f"## {title} with the decoded weights of some layers ({command})", "",
             f"Machine: {platform.machine()}, Python {platform.python_version()}. The other layers: {rest}.", "",
             "| compiled model | subset | layers | " + " | ".join(m.upper() if m != "perplexity" else "perplexity" for m in metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    lines += [f"| {Path(r['model']).name} | {r['subset']} | {r['layers']} | " + " | ".join(f"{r[m]:.3f}" for m in metrics) + " |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    suffix = f"-{args.tag}" if args.tag else ""
    accuracy.RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(accuracy.RESULTS / f"layer-subsets{suffix}.json", json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    write_text_atomic(accuracy.RESULTS / f"layer-subsets{suffix}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
