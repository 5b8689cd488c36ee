"""The CPU kernel against an earlier build of itself, side by side: a real mgvq compile's linear layers.

    python benchmarks/kernel_builds.py --baseline REV [--layouts report.json] [--runs 3] [--threads 2]
                                       [--quick] [--tag NAME] [--out-dir benchmarks/results]

REV is a git commit whose ``custom_ops/vq_gemm_cpu.cc`` (and ``vq_gemm_op.h``) are compiled into a
temporary library, or the path of a built library. The current build is the one the runtime finds
(``custom_ops/build.py`` builds it). Each run times, in a fresh process per build and alternating between
the builds, what ``benchmarks/kernels.py``'s layouts section times: VQGemm at every quantized layer's
layout of the report (random codes, batch 1, warm medians, one op per layer in turn), and the same
shapes as fp32 MatMul in the same process. These machines are shared and noisy, so the runs alternate
and the table gives every run. The report is --layouts, else the accuracy benchmark's or the demo's
SmolLM2 mgvq 2-bit seed-0 compile.

Writes ``kernel_builds.json`` and ``kernel_builds.md`` (``kernel_builds-NAME.*`` with --tag) to --out-dir and
prints the table. ``--quick`` (a smoke run) times each layout a few times only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mgvq_compile import runtime
from mgvq_compile.errors import MgvqError
from mgvq_compile.output import write_text_atomic

__all__ = ["main", "build_baseline", "summarise", "markdown_report"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL_SOURCES = ("custom_ops/vq_gemm_cpu.cc", "custom_ops/vq_gemm_op.h")


def _build_script():
    spec = importlib.util.spec_from_file_location("mgvq_custom_ops_build", ROOT / "custom_ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_baseline(baseline: str, work: Path) -> tuple[str, str]:
    """(library path, label) of the baseline: a built library as given, or a commit's kernel sources built
    into ``work``."""
    if Path(baseline).is_file():
        return str(Path(baseline).resolve()), Path(baseline).name
    for name in KERNEL_SOURCES:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{baseline}:{name}"], capture_output=True)
        if shown.returncode != 0:
            raise MgvqError(f"--baseline {baseline!r} is neither a library file nor a commit with {name}",
                            "pass a git commit of this repository (e.g. HEAD~1) or the path of a built libmgvq_ops.so")
        (work / Path(name).name).write_bytes(shown.stdout)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", baseline], capture_output=True,
                            text=True, check=True).stdout.strip()
    library = work / "libmgvq_ops.so"
    _build_script().build(library, sources=[work / "vq_gemm_cpu.cc"])
    return str(library), f"commit {commit}"


def _current_label() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *KERNEL_SOURCES],
                           capture_output=True, text=True).stdout.strip()
    if head.returncode != 0:
        return "current build"
    return f"current build (HEAD {head.stdout.strip()}{', kernel sources edited' if dirty else ''})"


def _measure_in_fresh_process(library: str, report: Path, threads: int, quick: bool) -> dict:
    env = {**os.environ, runtime.LIBRARY_ENV: library}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--layouts", str(report),
           "--threads", str(threads), *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise MgvqError(f"timing with {library} failed: {done.stderr.strip()[-2000:]}",
                        "check that the library loads (python custom_ops/build.py rebuilds the current one)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """Per build: its runs' layer sums, their median, and the median of each run's ratio to fp32."""
    rows = []
    for label, results in runs.items():
        vq = [r["vqgemm_ms"] for r in results]
        rows.append({"build": label, "vqgemm_ms": vq, "wide_code_vqgemm_ms": [r["wide_code_vqgemm_ms"] for r in results],
                     "fp32_ms": [r["fp32_ms"] for r in results], "median_vqgemm_ms": statistics.median(vq),
                     "median_over_fp32": statistics.median(r["vqgemm_ms"] / r["fp32_ms"] for r in results)})
    return rows


def markdown_report(record: dict) -> str:
    def ms(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    first = record["builds"][0]
    lines = [
        "# CPU kernel builds side by side", "",
        f"`{record['command']}` on {record['machine']}, ORT {record['ort']}, {record['threads']} intra-op threads, "
        f"{record['date']}; 1-minute load average {record['load_average_1min']['start']:.1f} at the start, "
        f"{record['load_average_1min']['end']:.1f} at the end.", "",
        f"Layouts from `{record['report']}` ({record['layers']} quantized layers, {record['wide_code_layers']} of them "
        "with a group of codes wider than 6 bits). Each run: a fresh process per build, alternating, VQGemm at "
        "every layer's layout (random codes, batch 1, warm medians, one op per layer in turn) and the same shapes "
        "as fp32 MatMul in the same process; the sums are a decode step's linear layers.", "",
        "| build | VQGemm ms per run | median | layers with codes > 6 bits, ms per run | fp32 MatMul ms per run | "
        "median VQGemm / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["builds"]:
        lines.append(f"| {row['build']} | {ms(row['vqgemm_ms'])} | {row['median_vqgemm_ms']:.2f} | "
                     f"{ms(row['wide_code_vqgemm_ms'])} | {ms(row['fp32_ms'])} | {row['median_over_fp32']:.2f}x |")
    for row in record["builds"][1:]:
        lines += ["", f"Speed-up of {row['build']} over {first['build']} (medians): "
                      f"{first['median_vqgemm_ms'] / row['median_vqgemm_ms']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git commit (its kernel sources are built) or a built library")
    parser.add_argument("--layouts", type=Path, help="report.json of an mgvq compile (default: as kernels.py)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per build (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--work-dir", type=Path, default=HERE / "work", help="where kernels.py caches its models")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="a few timings per layout (a smoke run)")
    parser.add_argument("--tag", help="suffix of the result files (kernel_builds-TAG.json / .md)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one timing, in this process
    args = parser.parse_args(argv)
    import kernels  # benchmarks/ is on sys.path when this runs as a script

    if args.measure:
        print(json.dumps(kernels.measure_layouts(args.layouts, args.threads, kernels.QUICK if args.quick else kernels.FULL)))
        return 0
    try:
        if args.baseline is None:
            raise MgvqError("no --baseline to compare with", "pass a git commit (e.g. --baseline HEAD~1) or a built library")
        report = args.layouts or kernels.find_layouts_report(args.work_dir)
        if report is None or not Path(report).is_file():
            raise MgvqError("no report.json of a SmolLM2 mgvq 2-bit compile to take layouts from",
                            "run make demo, or pass --layouts PATH/report.json")
        started, load_before = time.time(), os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="mgvq-kernel-baseline-") as tmp:
            baseline_library, baseline_label = build_baseline(args.baseline, Path(tmp))
            builds = {baseline_label: baseline_library, _current_label(): runtime.library_path("cpu")}
            runs: dict[str, list[dict]] = {label: [] for label in builds}
            for run in range(args.runs):
                for label, library in builds.items():
                    runs[label].append(_measure_in_fresh_process(library, Path(report), args.threads, args.quick))
                    print(f"run {run + 1}/{args.runs}, {label}: {runs[label][-1]['vqgemm_ms']:.2f} ms", file=sys.stderr)
    except MgvqError as error:
        print(f"kernel_builds: error: {error}", file=sys.stderr)
        return 2
    last = list(runs.values())[-1][-1]
    record = {
        "command": " ".join(["python benchmarks/kernel_builds.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "seconds": round(time.time() - started, 1),
        "machine": kernels._machine(), "ort": kernels.ort.__version__, "threads": args.threads, "quick": args.quick,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "report": str(report), "layers": last["layers"], "wide_code_layers": last["wide_code_layers"],
        "builds": summarise(runs), "runs": runs,
    }
    text = markdown_report(record)
    stem = f"kernel_builds-{args.tag}" if args.tag else "kernel_builds"
    write_text_atomic(args.out_dir / f"{stem}.json", json.dumps(record, indent=1) + "\n")
    write_text_atomic(args.out_dir / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
