"""Is the calibration gradient a signal the compile can use? The statistics behind mgvq's short lam.

    python benchmarks/gradient.py [--models smollm2 whisper] [--seeds 0 1 2] [--work DIR]

Module 2 of the method rounds toward the Newton-shifted target W - lam (H_O + dI)^-1 G (H_I + dI)^-1.
That can only lower the loss of text the compile never saw if G, measured on the calibration set,
points where the gradient of other text points. Per quantizable layer this reads mgvq's calibration
statistics for each seed's calibration set (the accuracy benchmark's, from the same cache) and for a
held-out set from the evaluation novel, and reports:

- signal ratio |G|^2 / tr(F): about 1 when G is the sum of zero-mean per-token noise;
- the cosine between the gradients of two calibration sets, and of a calibration set and the held-out set;
- transfer: the share of the first-order loss decrease per token that the calibration set's Newton
  direction (at several dampings, and G itself) promises on its own tokens which the other set sees
  (1: generalises; 0: noise).

Writes ``benchmarks/results/gradient.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import accuracy
from mgvq_compile.algorithms.gptq import newton_step
from mgvq_compile.algorithms.statistics import first_order_transfer, gradient_cosine, gradient_signal_ratio
from mgvq_compile.api import collect_statistics
from mgvq_compile.output import write_text_atomic

HELDOUT = "held-out"
GRADIENT = "gradient (no curvature)"


def layer_part(key: str) -> str:
    return next((part for part in ("encoder", "decoder") if part in key), "all")


def direction_name(damp_rel: float) -> str:
    return f"Newton, damping {damp_rel:g}"


def read_gradients(setup: accuracy.ModelSetup, seed: int, damps: Sequence[float]) -> dict[str, dict]:
    """Per layer: G, its token count, its signal ratio and the move directions: mgvq's damped Newton
    step (H_O + dI)^-1 G (H_I + dI)^-1 per relative damping in ``damps``, and G itself (infinite damping)."""
    stats = collect_statistics(setup.fp_path, calib=setup.calib_dir, method="mgvq", seed=seed, progress=False)
    out = {}
    for key, layer in stats.items():
        steps = {
            direction_name(damp): newton_step(layer.gradient, layer.input_hessian, layer.h_o, damp_rel=damp).float()
            for damp in damps
        }
        steps[GRADIENT] = layer.gradient
        out[key] = {"gradient": layer.gradient, "tokens": layer.tokens,
                    "signal_ratio": gradient_signal_ratio(layer), "steps": steps}
    return out


def layer_rows(sets: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per layer: the statistics over calibration seeds and against the held-out set."""
    seeds = [name for name in sets if name != HELDOUT]
    pairs = list(itertools.permutations(seeds, 2))
    rows = []
    for key in sets[seeds[0]]:
        of = {name: sets[name][key] for name in sets}
        transfer = lambda a, b, direction: first_order_transfer(  # noqa: E731
            of[a]["steps"][direction], of[a]["gradient"], of[a]["tokens"], of[b]["gradient"], of[b]["tokens"])
        directions = list(of[seeds[0]]["steps"])
        rows.append({
            "layer": key,
            "part": layer_part(key),
            "signal_ratio": float(np.mean([of[s]["signal_ratio"] for s in seeds])),
            "signal_ratio_heldout": of[HELDOUT]["signal_ratio"],
            "cosine_between_seeds": float(np.mean([gradient_cosine(of[a]["gradient"], of[b]["gradient"])
                                                   for a, b in itertools.combinations(seeds, 2)])),
            "cosine_heldout": float(np.mean([gradient_cosine(of[s]["gradient"], of[HELDOUT]["gradient"]) for s in seeds])),
            "transfer_between_seeds": {d: float(np.mean([transfer(a, b, d) for a, b in pairs])) for d in directions},
            "transfer_heldout": {d: float(np.mean([transfer(s, HELDOUT, d) for s in seeds])) for d in directions},
        })
    return rows


COLUMNS = ("signal_ratio", "signal_ratio_heldout", "cosine_between_seeds", "cosine_heldout")
TRANSFERS = ("transfer_between_seeds", "transfer_heldout")


def spread(values: list[float]) -> dict:
    array = np.array(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    return {"median": float(np.median(array)), "q10": float(np.quantile(array, 0.1)),
            "q90": float(np.quantile(array, 0.9))}


def summarize(model: str, rows: list[dict]) -> list[dict]:
    out = []
    for part in sorted({r["part"] for r in rows}):
        chosen = [r for r in rows if r["part"] == part]
        summary = {"model": model, "part": part, "layers": len(chosen)}
        summary.update({column: spread([r[column] for r in chosen]) for column in COLUMNS})
        for column in TRANSFERS:
            summary[column] = {d: spread([r[column][d] for r in chosen]) for d in chosen[0][column]}
        summary["layers_with_heldout_descent"] = {
            d: int(sum(r["transfer_heldout"][d] > 0 for r in chosen)) for d in chosen[0]["transfer_heldout"]}
        out.append(summary)
    return out


def _cell(value: dict) -> str:
    return f"{value['median']:.2f} ({value['q10']:.2f} to {value['q90']:.2f})"


def markdown(command: str, summaries: list[dict]) -> str:
    lines = [f"## Is the calibration gradient signal or noise? ({command})", "",
             "Per quantizable layer, mgvq's statistics (H_I = H_X / T, full H_O): median over layers and "
             "10-90 % range. Signal ratio |G|^2 / tr(F): about 1 for noise. Cosine: between the gradients "
             "of two calibration sets (seeds), and of a calibration set and a held-out set from the evaluation "
             "novel.", "",
             "| model | part | layers | signal ratio (calib) | signal ratio (held-out) | cosine, seeds | cosine, held-out |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['model']} | {s['part']} | {s['layers']} | " + " | ".join(_cell(s[c]) for c in COLUMNS) + " |")
    lines += ["", "Transfer: of the first-order loss decrease per token that a calibration set's move direction "
              "promises on its own tokens, the share another set sees (1 = generalises, 0 = noise). mgvq's "
              "compensate uses the Newton direction at damping 0.01 (its `newton_damp_rel`). Descent: layers whose "
              "held-out transfer is above 0.", "",
              "| model | part | direction | transfer, seeds | transfer, held-out | descent |", "|---|---|---|---|---|---|"]
    for s in summaries:
        for direction, between in s["transfer_between_seeds"].items():
            lines.append(f"| {s['model']} | {s['part']} | {direction} | {_cell(between)} | "
                         f"{_cell(s['transfer_heldout'][direction])} | "
                         f"{s['layers_with_heldout_descent'][direction]}/{s['layers']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(accuracy.MODELS), default=["smollm2", "whisper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--damp-rel", nargs="+", type=float, default=[0.01, 0.1, 1.0],
                        help="relative dampings of the Newton step to compare (compensate's is 0.01)")
    parser.add_argument("--work", type=Path, default=accuracy.ROOT / "benchmarks" / "work" / "accuracy")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two calibration sets to compare")
    settings = accuracy.Settings()
    command = "python benchmarks/gradient.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    summaries, layers = [], {}
    for model in args.models:
        sets = {}
        for seed in args.seeds:
            sets[f"seed {seed}"] = read_gradients(accuracy.MODELS[model](args.work, seed, settings), seed, args.damp_rel)
        heldout = accuracy.MODELS[model](args.work, args.seeds[0], settings, calib_novel=accuracy.EVALUATION_NOVEL)
        sets[HELDOUT] = read_gradients(heldout, args.seeds[0], damps=())  # only its G is compared
        layers[model] = layer_rows(sets)
        summaries += summarize(model, layers[model])
        del sets
    table = markdown(command, summaries)
    write_text_atomic(accuracy.RESULTS / "gradient.json",
                      json.dumps({"command": command, "summaries": summaries, "layers": layers}, indent=1))
    write_text_atomic(accuracy.RESULTS / "gradient.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
