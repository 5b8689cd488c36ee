"""How compiles spent their bits: per output directory, the share of quantized weights at each width and
the geometric mean over layers of the proxy loss tr(E H E^T) / tr(W H W^T), from its report.json.

    python benchmarks/allocation_shares.py benchmarks/work/accuracy/models/whisper-mgvq-2bit-seed0-*
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

__all__ = ["allocation_shares", "main"]


def allocation_shares(report: dict) -> dict:
    """{"widths": {width: share of the quantized weights}, "proxy_geomean": ..., bits per weight}."""
    weights: Counter = Counter()
    losses = []
    for layer in report["layers"]:
        if not layer["quantized"]:
            continue
        rows, bounds = layer["shape"][0], layer["group_bounds"]
        for (start, stop), bits in zip(zip(bounds, bounds[1:]), layer["bits"]):
            weights[bits] += rows * (stop - start)
        if layer.get("proxy_loss") is not None and layer["proxy_loss"] > 0:
            losses.append(math.log(layer["proxy_loss"]))
    total = sum(weights.values())
    return {
        "widths": {bits: count / total for bits, count in sorted(weights.items())},
        "proxy_geomean": math.exp(sum(losses) / len(losses)) if losses else None,
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "index_bits_per_weight": report["summary"]["index_bits_per_weight"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="mgvq-compile output directories")
    args = parser.parse_args(argv)
    print("| output | stored bits/weight | index bits/weight | share of weights per width | proxy loss (geometric mean) |")
    print("|---|---|---|---|---|")
    for out in args.outputs:
        report_path = out / "report.json"
        if not report_path.is_file():
            print(f"{out}: no report.json", file=sys.stderr)
            continue
        shares = allocation_shares(json.loads(report_path.read_text()))
        widths = ", ".join(f"{bits:g}: {share:.3f}" for bits, share in shares["widths"].items())
        proxy = "" if shares["proxy_geomean"] is None else f"{shares['proxy_geomean']:.4f}"
        print(f"| {out.name} | {shares['bits_per_weight']:.3f} | {shares['index_bits_per_weight']:.3f} | {widths} | {proxy} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
