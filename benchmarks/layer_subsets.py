"""Which layers' quantization costs a compiled Whisper tiny.en its accuracy: the float model with the
decoded (dequantized) weights of only a subset of its layers, evaluated like benchmarks/accuracy.py.

    python benchmarks/layer_subsets.py OUTDIR [OUTDIR ...] [--subset LABEL=REGEX ...] [--tag NAME]

OUTDIR is an mgvq-compile output of the benchmark's Whisper graph (benchmarks/work/accuracy/models/...).
Each subset puts the decoded weights of the layers whose names match REGEX (re.search) into the
benchmark's float graph and measures it as the benchmark does (mgvq_compile.evaluate.whisper_eval_ort:
teacher-forced NLL and greedy WER on its evaluation sentences, 64 since 2026-11-24; the
committed tables read 16). Errors of two layers need not add up: comparing a pair's row with each member's alone shows
how much they interact. Writes ``benchmarks/results/layer-subsets{-TAG}.json`` and ``.md``, and prints
the table.
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


def evaluate_subsets(out_dir: Path, subsets: list[tuple[str, str]]) -> list[dict]:
    import onnx_ir as ir

    from mgvq_compile.calibration.data import novel_sentences, read_novel
    from mgvq_compile.evaluate import whisper_eval_ort
    from mgvq_compile.graph import find_linear_layers, load_onnx, with_weights
    from mgvq_compile.models.whisper_ct2 import load_whisper_tiny_en
    from mgvq_compile.output import dequantized_weights

    settings = accuracy.Settings()
    float_path = accuracy.whisper_float_path(accuracy.DEFAULT_WORK, settings)
    if not float_path.exists():
        raise SystemExit(f"{float_path} is missing: run python benchmarks/accuracy.py --models whisper first")
    _model, tokenizer = load_whisper_tiny_en()
    references = novel_sentences(read_novel(accuracy.EVALUATION_NOVEL), settings.whisper_eval_sentences, seed=1234)
    float_graph = load_onnx(float_path)
    layers = find_linear_layers(float_graph)
    decoded = dequantized_weights(out_dir)
    rows = []
    for label, pattern in subsets:
        regex = re.compile(pattern)
        names = [name for name in decoded if regex.search(name)]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(with_weights(float_graph, {name: decoded[name] for name in names}, layers), str(path),
                    external_data="model.onnx.data")
            result = whisper_eval_ort(path, tokenizer, references, decoder_len=settings.whisper_decoder_len)
        rows.append({"model": str(out_dir), "subset": label, "pattern": pattern, "layers": len(names),
                     "nll": result["nll"], "wer": result["wer"]})
        print(f"{out_dir.name}  {label:24s} {len(names):3d} layers  NLL {result['nll']:.3f}  WER {result['wer']:.3f}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="mgvq-compile output directories of the Whisper graph")
    parser.add_argument("--subset", action="append", metavar="LABEL=REGEX",
                        help="a subset of layers by weight name (repeatable; default: a standard set)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args(argv)
    subsets = []
    for item in args.subset or DEFAULT_SUBSETS:
        label, sep, pattern = item.partition("=")
        if not sep:
            parser.error(f"--subset {item!r} is not LABEL=REGEX")
        subsets.append((label, pattern))
    for out in args.outputs:
        if not (out / "report.json").exists():
            parser.error(f"{out} is not an mgvq-compile output (no report.json)")
    rows = [row for out in args.outputs for row in evaluate_subsets(out, subsets)]
    command = "python benchmarks/layer_subsets.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [f"## Whisper tiny.en with the decoded weights of some layers ({command})", "",
             f"Machine: {platform.machine()}, Python {platform.python_version()}. Float model: the rest.", "",
             "| compiled model | subset | layers | NLL | WER |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['model']).name} | {r['subset']} | {r['layers']} | {r['nll']:.3f} | {r['wer']:.3f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    suffix = f"-{args.tag}" if args.tag else ""
    accuracy.RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(accuracy.RESULTS / f"layer-subsets{suffix}.json", json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    write_text_atomic(accuracy.RESULTS / f"layer-subsets{suffix}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
