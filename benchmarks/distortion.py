"""How a layer's compensated error falls with its bit width: the measurement behind assign-bits' D(b).

    python benchmarks/distortion.py [--models whisper smollm2] [--bits 1 2 3 4] [--seed 0] [--work DIR]

Compiles each real model with ``mgvq-no-alloc`` (every layer at the same width, one codebook per layer)
at each width and reads, per quantized layer, the proxy loss tr(E H_I E^T) after compensation and
before it (the fitted codebooks' own rounding). For consecutive widths it prints the per-layer ratios
loss(b) / loss(b + 1): their geometric mean, median and 10-90 % range. The high-rate law says 4 at every
step. Compiles are shared with benchmarks/accuracy.py's work folder (same runs, same cache).
Writes ``benchmarks/results/distortion-MODEL.json`` and ``.md`` per model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

import accuracy
from mgvq_compile.output import write_text_atomic

METRICS = {"proxy_loss": "after compensation", "proxy_loss_before_compensation": "fitted codebooks, no compensation"}


def layer_losses(report: dict, metric: str) -> dict[str, float]:
    return {layer["name"]: float(layer[metric]) for layer in report["layers"] if layer["quantized"]}


def step_ratios(losses_by_bits: dict[int, dict[str, float]]) -> list[dict]:
    """Per consecutive width pair: statistics over layers of loss(b) / loss(b + 1)."""
    widths = sorted(losses_by_bits)
    rows = []
    for low, high in zip(widths, widths[1:]):
        names = sorted(set(losses_by_bits[low]) & set(losses_by_bits[high]))
        ratios = np.array([losses_by_bits[low][n] / losses_by_bits[high][n] for n in names])
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        rows.append({"from_bits": low, "to_bits": high, "layers": int(ratios.size),
                     "geometric_mean": float(np.exp(np.log(ratios).mean())),
                     "median": float(np.median(ratios)),
                     "q10": float(np.quantile(ratios, 0.1)), "q90": float(np.quantile(ratios, 0.9))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(accuracy.MODELS), default=["whisper", "smollm2"])
    parser.add_argument("--bits", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=accuracy.ROOT / "benchmarks" / "work" / "accuracy")
    args = parser.parse_args(argv)
    settings = accuracy.Settings()
    command = "python benchmarks/distortion.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    for model in args.models:
        results = []
        setup = accuracy.MODELS[model](args.work, args.seed, settings)
        reports = {}
        for bits in sorted(args.bits):
            out = args.work / "models" / f"{model}-mgvq-no-alloc-{bits}bit-seed{args.seed}-distortion"
            if not (out / "report.json").exists():
                accuracy._compile(setup, out, "mgvq-no-alloc", bits, args.seed, [])
            reports[bits] = json.loads((out / "report.json").read_text())
        for metric in METRICS:
            for row in step_ratios({b: layer_losses(r, metric) for b, r in reports.items()}):
                results.append({"model": model, "metric": metric, **row})
        print(write_results(model, command, args.seed, results))
    return 0


def write_results(model: str, command: str, seed: int, results: list[dict]) -> str:
    lines = [f"## Compensated error per width step ({command})", "",
             "Ratio loss(b) / loss(b+1) over quantized layers, mgvq-no-alloc (uniform widths, d = 2), "
             f"seed {seed}. The high-rate law 2^(-2b) says 4.", "",
             "| model | loss | step | layers | geometric mean | median | 10-90 % |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {METRICS[r['metric']]} | {r['from_bits']}->{r['to_bits']} | {r['layers']} | "
                     f"{r['geometric_mean']:.2f} | {r['median']:.2f} | {r['q10']:.2f}-{r['q90']:.2f} |")
    table = "\n".join(lines) + "\n"
    accuracy.RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(accuracy.RESULTS / f"distortion-{model}.json", json.dumps({"command": command, "rows": results}, indent=1))
    write_text_atomic(accuracy.RESULTS / f"distortion-{model}.md", table)
    return table


if __name__ == "__main__":
    sys.exit(main())
