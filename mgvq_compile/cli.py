"""The ``mgvq-compile`` command line: builds a recipe and calls the same ``compile()`` as Python users."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import yaml

from mgvq_compile import __version__
from mgvq_compile.errors import MgvqError, RecipeError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from mgvq_compile.api import DEFAULT_METHOD
    from mgvq_compile.recipes import METHODS

    parser = argparse.ArgumentParser(
        prog="mgvq-compile",
        description="Quantize an ONNX model to ~2 bits per weight with vector quantization.",
        epilog="'mgvq-compile cache' shows the artifact cache of resumable compiles and prunes it (see its --help).",
    )
    parser.add_argument("model", metavar="MODEL", help="an .onnx file (external data next to it is read)")
    parser.add_argument("-o", "--output", metavar="OUTDIR", help="output directory (must not exist, see --overwrite)")
    parser.add_argument("--bits", type=float, default=2.0, help="bits per weight (default 2)")
    parser.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(METHODS)} (default {DEFAULT_METHOD})")
    parser.add_argument("--calib", metavar="PATH", help="calibration directory of .npz feeds")
    parser.add_argument("--labels", choices=("data", "model"), default="data",
                        help="labels for gradient statistics: from the .npz files (default) or the model's own argmax")
    parser.add_argument("--logits", default="logits", metavar="NAME", help="graph output for the calibration loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", metavar="FILE", help="a YAML/JSON recipe that replaces the method's built-in one")
    parser.add_argument("--save-recipe", metavar="FILE", help="write the resolved recipe to FILE (alone: without -o, only that)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--portable", action="store_true",
                      help="write standard ONNX ops that stock ORT runs, instead of mgvq.VQGemm nodes "
                           "(those need mgvq_compile.runtime.create_session, or the library registered)")
    form.add_argument("--form", choices=("custom", "decomposed"), help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--set", action="append", default=[], metavar="PASS.OPTION=VALUE", dest="options",
                        help="override a pass option of the recipe, e.g. --set compensate.lam=0.1 (repeatable)")
    parser.add_argument("--plots", action="store_true", help="also write bits-per-layer and error-per-layer PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="where resumable artifacts are kept (default ~/.cache/mgvq-compile; "
                             "'mgvq-compile cache --help' shows and prunes it)")
    parser.add_argument("--no-resume", action="store_true", help="recompute everything, store nothing")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _summary(report: dict) -> str:
    s = report["summary"]
    bpw = s["bits_per_weight"]
    return (
        f"quantized {s['quantized_layers']}/{s['layers']} layers, {s['quantized_weights']:,} weights at "
        f"{bpw:.3f} bits/weight ({s['index_bits_per_weight']:.3f} in indices); files: "
        + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in s["files"].items())
    )


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["compensate.lam=0.1", ...]`` -> ``{"compensate.lam": 0.1}`` (values read as YAML scalars/lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {pair!r} is not PASS.OPTION=VALUE", "write it like --set compensate.lam=0.1")
        options[key.strip()] = yaml.safe_load(value)
    return options


def build_cache_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgvq-compile cache",
        description="Show the artifact cache of resumable compiles, or prune it (least recently used first). "
                    "Pruning only costs time: a later compile recomputes what it needs.",
    )
    parser.add_argument("--work-dir", metavar="DIR", help="the cache (default: $MGVQ_CACHE_DIR or ~/.cache/mgvq-compile)")
    parser.add_argument("--prune", action="store_true", help="remove entries (needs --max-size and/or --older-than)")
    parser.add_argument("--max-size", metavar="SIZE", help="keep at most SIZE, e.g. 20G or 500M")
    parser.add_argument("--older-than", metavar="AGE", help="remove entries unused for AGE, e.g. 30d, 12h, 2w")
    parser.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, remove nothing")
    return parser


def cache_main(argv: list[str]) -> int:
    from mgvq_compile.cache import cache_entries, default_work_dir, human_size, parse_age, parse_size, prune_cache

    parser = build_cache_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    work_dir = args.work_dir or default_work_dir()
    try:
        max_bytes = parse_size(args.max_size) if args.max_size else None
        older_than = parse_age(args.older_than) if args.older_than else None
    except ValueError as exc:
        parser.error(str(exc))
    if (max_bytes is not None or older_than is not None) and not args.prune:
        parser.error("--max-size and --older-than choose what --prune removes: add --prune")
    if args.prune:
        if max_bytes is None and older_than is None:
            parser.error("--prune needs --max-size SIZE and/or --older-than AGE")
        removed = prune_cache(work_dir, max_bytes=max_bytes, older_than_s=older_than, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for entry in removed:
            print(f"{verb} {entry.path} ({human_size(entry.nbytes)})")
        print(f"{verb} {len(removed)} entries, {human_size(sum(e.nbytes for e in removed))}")
    entries = cache_entries(work_dir)
    runs: dict[str, list] = {}
    for entry in entries:
        runs.setdefault(entry.run, []).append(entry)
    print(f"{work_dir}: {human_size(sum(e.nbytes for e in entries))} in {len(entries)} entries of {len(runs)} runs")
    for run, items in sorted(runs.items(), key=lambda kv: -max(e.last_used for e in kv[1])):
        partial = sum(e.partial for e in items)
        last = max(e.last_used for e in items)
        print(f"  {run}  {human_size(sum(e.nbytes for e in items)):>10}  {len(items):3d} entries"
              f"{f' ({partial} interrupted)' if partial else ''}  last used {_ago(last)}")
    return 0


def _ago(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
    args = build_parser().parse_args(argv)
    portable = args.portable or args.form == "decomposed"
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from mgvq_compile.api import compile as compile_model
    from mgvq_compile.output import write_text_atomic
    from mgvq_compile.recipes import builtin_recipe, load_recipe

    try:
        if args.output is None and not args.save_recipe:
            raise MgvqError("no output directory given", "pass -o OUTDIR (or --save-recipe FILE to only write the recipe)")
        options = _parse_options(args.options)
        recipe = load_recipe(args.recipe) if args.recipe else None
        if args.save_recipe and recipe is None:
            recipe = builtin_recipe(args.method, bits=args.bits, calibrated=args.calib is not None, portable=portable)
        if recipe is not None and options:
            recipe, options = recipe.with_options(options), {}
        if args.save_recipe:
            write_text_atomic(args.save_recipe, recipe.to_yaml())
            print(f"recipe written to {args.save_recipe}")
            if args.output is None:
                return 0
        result = compile_model(
            args.model, method=args.method, bits=args.bits, calib=args.calib, output=args.output,
            seed=args.seed, recipe=recipe, labels=args.labels, logits_name=args.logits, portable=portable,
            overwrite=args.overwrite, work_dir=args.work_dir, resume=not args.no_resume,
            progress=False if args.quiet else None, options=options, plots=args.plots,
        )
    except MgvqError as exc:
        if args.verbose:
            logging.exception("compile failed")
        print(f"mgvq-compile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mgvq-compile: interrupted; stored artifacts let the next run resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {result.output}: {_summary(result.report)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
