"""CPU kernel benchmark: mgvq.VQGemm against fp32 MatMul and ORT's MatMulNBits, and a SmolLM2-135M step.

    python benchmarks/kernels.py [--threads 2] [--quick] [--work-dir benchmarks/work] [--out-dir benchmarks/results]

1. Ops, one process: for each linear shape (out x in: 4096x4096, 4096x11008, 11008x4096 and
   SmolLM2-135M's 576x576, 192x576, 1536x576, 576x1536) and batch 1 and 16: a float32 ``MatMul``,
   ``com.microsoft.MatMulNBits`` at 4 and 2 bits (block 128; accuracy_level 0 = float compute, 4 = int8
   activations) and ``mgvq.VQGemm`` at 2 and 3 bits with d = 2 (mgvq's default at 3 bits, and at 2 before config v14: 16 and 64 codewords,
   the register-codebook kernel) and at 2 bits with d = 4 (mgvq's default at 2 bits: 256 codewords, the
   gather kernel up to 8 activation rows); one group, a column permutation. The issue's check: VQGemm 2-bit d = 2 over
   MatMulNBits 2-bit at 4096x4096, batch 1 (goal <= 0.3x), against both accuracy levels.
   Median time of many runs, "warm" (back to back) and "cold" (the caches evicted before each run by
   reading a buffer far larger than L3 on the same threads); effective GB/s = weight bytes / time, and
   the cold rate as a fraction of the DRAM read bandwidth measured in the same run (ORT ReduceSum over
   512 MiB, before and after the ops; the higher is used).
2. End to end: SmolLM2-135M exported with seq_len=1 (a one-token forward: the same linear layers as a
   decode step, attention over that one token, no KV cache), fp32 against kmeans-vq 2-bit d = 2 (mgvq.VQGemm)
   and the same 2-bit model in the portable form: step latency, tokens/s, file size, and the resident
   memory growth of a fresh process that creates the session and runs it once; the check that the
   memory saved matches the bytes saved. Exports and compiled models are cached in --work-dir.
3. The linear layers of a real mgvq compile (the layouts of a report.json: each layer's shape, vector
   dimension, channel groups and their bits, which mix 1 to 4 bits), batch 1: VQGemm at those layouts
   (random codes), against the same shapes as fp32 MatMul and as uniform 2-bit d = 2 VQGemm. Their sum
   is the linear-layer time of a decode step. The report is --layouts, else the accuracy benchmark's or
   the demo's SmolLM2 mgvq 2-bit seed-0 compile; without one the section is skipped (``make demo`` makes
   one).

Writes ``kernels.json`` and ``kernels.md`` to --out-dir and prints the tables. ``--quick`` (a smoke
run): two shapes, a few runs, SmolLM2 cut to 2 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mgvq_compile.errors import MgvqError
from mgvq_compile.output import write_text_atomic
from mgvq_compile.runtime import create_session
from opbench import (
    SHAPES,
    CacheFlusher,
    copy_bandwidth_gbs,
    dense_model,
    initializer_nbytes,
    nbits_model,
    read_bandwidth_gbs,
    vq_layout_model,
    session_rss_growth,
    time_runs,
    vq_model,
)

__all__ = ["main", "OPS", "SHAPES", "FULL", "QUICK", "add_ratios", "speed_check", "kernel_isa", "memory_check",
           "markdown_report"]

HERE = Path(__file__).resolve().parent
MB = 1e6



@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    build: Callable[[np.random.Generator, int, int, int], bytes]  # (rng, in, out, rows) -> model


OPS = (
    OpSpec("fp32 MatMul", dense_model),
    OpSpec("MatMulNBits 4-bit acc0", lambda rng, n, m, rows: nbits_model(rng, n, m, rows, 4, 128, 0)),
    OpSpec("MatMulNBits 4-bit acc4", lambda rng, n, m, rows: nbits_model(rng, n, m, rows, 4, 128, 4)),
    OpSpec("MatMulNBits 2-bit acc0", lambda rng, n, m, rows: nbits_model(rng, n, m, rows, 2, 128, 0)),
    OpSpec("MatMulNBits 2-bit acc4", lambda rng, n, m, rows: nbits_model(rng, n, m, rows, 2, 128, 4)),
    OpSpec("VQGemm 2-bit d2", lambda rng, n, m, rows: vq_model(rng, n, m, rows, 2, 2)),
    OpSpec("VQGemm 3-bit d2", lambda rng, n, m, rows: vq_model(rng, n, m, rows, 3, 2)),
    OpSpec("VQGemm 2-bit d4", lambda rng, n, m, rows: vq_model(rng, n, m, rows, 2, 4)),
)
BASELINE_OP = OPS[0].name
SPEED_CHECK = {"shape": (4096, 4096), "batch": 1, "op": "VQGemm 2-bit d2", "goal": 0.3,
               "against": ("MatMulNBits 2-bit acc0", "MatMulNBits 2-bit acc4")}


@dataclasses.dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int, str], ...]
    batches: tuple[int, ...]
    warm: dict  # time_runs arguments
    cold: dict
    decode: dict
    bandwidth_bytes: int
    smollm2_layers: int | None  # None: all 30


FULL = Settings(
    shapes=SHAPES, batches=(1, 16),
    warm=dict(min_runs=10, max_runs=2000, budget_s=0.5), cold=dict(min_runs=10, max_runs=60, budget_s=0.3),
    decode=dict(min_runs=20, max_runs=1000, budget_s=5.0), bandwidth_bytes=512 << 20, smollm2_layers=None,
)
QUICK = Settings(
    shapes=(SHAPES[0], SHAPES[6]), batches=(1, 16),
    warm=dict(min_runs=3, max_runs=20, budget_s=0.05), cold=dict(min_runs=3, max_runs=5, budget_s=0.05),
    decode=dict(min_runs=3, max_runs=20, budget_s=0.5), bandwidth_bytes=256 << 20, smollm2_layers=2,
)


# ---------------------------------------------------------------------------------------------
# Ops


def measure_op(spec: OpSpec, out: int, inp: int, rows: int, threads: int, settings: Settings,
               flush: Callable[[], None]) -> dict:
    rng = np.random.default_rng(out * 7919 + inp * 31 + rows)
    model = spec.build(rng, inp, out, rows)
    weight_bytes = initializer_nbytes(model)
    session = create_session(model, threads=threads)
    feed = {"x": rng.standard_normal((rows, inp), dtype=np.float32)}
    warm = time_runs(lambda: session.run(None, feed), **settings.warm)
    cold = time_runs(lambda: session.run(None, feed), before_each=flush, **settings.cold)
    return {
        "out": out, "in": inp, "batch": rows, "op": spec.name, "weight_bytes": weight_bytes,
        "warm_ms": warm.median_s * 1e3, "warm_min_ms": warm.min_s * 1e3, "warm_runs": warm.runs,
        "cold_ms": cold.median_s * 1e3, "cold_min_ms": cold.min_s * 1e3, "cold_runs": cold.runs,
        "warm_gbs": weight_bytes / warm.median_s / 1e9, "cold_gbs": weight_bytes / cold.median_s / 1e9,
    }


def run_ops(settings: Settings, threads: int, log: Callable[[str], None]) -> list[dict]:
    flush = CacheFlusher(threads=threads)
    rows = []
    for out, inp, _what in settings.shapes:
        for batch in settings.batches:
            for spec in OPS:
                row = measure_op(spec, out, inp, batch, threads, settings, flush)
                log(f"{out}x{inp} batch {batch} {spec.name}: warm {row['warm_ms']:.3f} ms, cold {row['cold_ms']:.3f} ms")
                rows.append(row)
    return rows


def speed_check(rows: list[dict]) -> list[dict]:
    """The issue's goal: our 2-bit op's warm time over MatMulNBits 2-bit's at 4096x4096, batch 1."""
    (out, inp), batch = SPEED_CHECK["shape"], SPEED_CHECK["batch"]
    times = {r["op"]: r["warm_ms"] for r in rows if (r["out"], r["in"], r["batch"]) == (out, inp, batch)}
    ours = times.get(SPEED_CHECK["op"])
    checks = []
    for other in SPEED_CHECK["against"]:
        if ours is None or other not in times:
            continue
        ratio = ours / times[other]
        checks.append({"shape": f"{out}x{inp}", "batch": batch, "op": SPEED_CHECK["op"], "against": other,
                       "op_ms": ours, "against_ms": times[other], "ratio": ratio, "goal": SPEED_CHECK["goal"],
                       "meets_goal": bool(ratio <= SPEED_CHECK["goal"])})
    return checks


def add_ratios(rows: list[dict], bandwidth_gbs: float) -> list[dict]:
    """Each row with ``cold_bw_fraction`` (cold GB/s over the DRAM read bandwidth) and
    ``speedup_vs_fp32`` (warm time of the fp32 MatMul of its shape and batch over its own)."""
    baseline = {(r["out"], r["in"], r["batch"]): r["warm_ms"] for r in rows if r["op"] == BASELINE_OP}
    result = []
    for row in rows:
        fp32_ms = baseline.get((row["out"], row["in"], row["batch"]))
        result.append({**row, "cold_bw_fraction": row["cold_gbs"] / bandwidth_gbs,
                       "speedup_vs_fp32": None if fp32_ms is None else fp32_ms / row["warm_ms"]})
    return result


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M, one token


def _files_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.glob(model.name + "*"))


def export_fp32(path: Path, layers: int | None) -> None:
    """SmolLM2 with seq_len=1, its weights in ``model.onnx.data`` like the compiler's outputs: ORT loads
    both the same way, so their session memory differs only by the quantized layers."""
    import onnx_ir as ir

    from mgvq_compile.models.smollm2 import export_causal_lm_onnx, first_layers, load_smollm2

    model, _tokenizer = load_smollm2()
    inline = path.with_name("inline.onnx")
    export_causal_lm_onnx(model if layers is None else first_layers(model, layers), inline, seq_len=1)
    ir.save(ir.load(inline), path, external_data=f"{path.name}.data", size_threshold_bytes=1024)
    inline.unlink()


def prepare_smollm2(work_dir: Path, layers: int | None, log: Callable[[str], None]) -> dict[str, Path]:
    """fp32, 2-bit (mgvq.VQGemm) and 2-bit portable one-token SmolLM2 models, built once into ``work_dir``."""
    import mgvq_compile

    tag = "smollm2-135m" if layers is None else f"smollm2-135m-{layers}layers"
    fp32 = work_dir / f"{tag}-seq1-fp32" / "model.onnx"
    if not fp32.with_name("model.onnx.data").exists():
        log(f"exporting {fp32}")
        export_fp32(fp32, layers)
    models = {"fp32": fp32}
    for label, portable in (("kmeans-vq 2-bit d2, mgvq.VQGemm", False), ("kmeans-vq 2-bit d2, portable", True)):
        out = work_dir / f"{tag}-seq1-kmeans-vq-2bit-d2{'-portable' if portable else ''}"
        if not (out / "model.onnx").exists():
            log(f"compiling {out}")
            mgvq_compile.compile(str(fp32), method="kmeans-vq", bits=2, output=out, portable=portable,
                                 options={"quantize-kmeans-vq.vector_dim": 2}, work_dir=work_dir / "cache",
                                 overwrite=True, progress=False)
        models[label] = out / "model.onnx"
    return models


def measure_decode(label: str, model: Path, threads: int, settings: Settings) -> dict:
    session = create_session(model, threads=threads)
    feed = {"input_ids": np.array([[1000]], np.int64)}
    timing = time_runs(lambda: session.run(["logits"], feed), **settings.decode)
    del session
    rss = session_rss_growth(model, threads)
    return {"model": label, "path": str(model), "file_bytes": _files_bytes(model), "step_ms": timing.median_s * 1e3,
            "step_min_ms": timing.min_s * 1e3, "runs": timing.runs, "tokens_per_s": 1.0 / timing.median_s, **rss}


# Codes up to this width run on the CPU kernel's register kernels (kRegisterMaxCodeBits in
# custom_ops/vq_gemm_cpu.cc); wider ones (d = 2 and 4) take its gather kernels at batch 1.
REGISTER_MAX_CODE_BITS = 6


def find_layouts_report(work_dir: Path) -> Path | None:
    """The report.json of a SmolLM2 mgvq 2-bit compile: the accuracy benchmark's, else the demo's."""
    candidates = [work_dir / "accuracy" / "models" / "smollm2-mgvq-2bit-seed0" / "report.json",
                  HERE.parent / "demo_out" / "smollm2-mgvq-2bit-seed0" / "report.json"]
    return next((path for path in candidates if path.is_file()), None)


def read_layouts(report: Path) -> list[dict]:
    """Each quantized layer's shape (out, in), vector dimension and channel groups, from a report.json."""
    layers = json.loads(report.read_text())["layers"]
    return [{"out": layer["shape"][0], "in": layer["shape"][1], "d": layer["vector_dim"],
             "bounds": layer["group_bounds"], "bits": layer["bits"]} for layer in layers if layer["quantized"]]


def measure_layouts(report: Path, threads: int, settings: Settings, limit: int | None = None) -> dict:
    """Batch-1 warm medians of every layout's VQGemm (equal layouts timed once) and of the same shapes as
    fp32 MatMul and uniform 2-bit d = 2 VQGemm; sums over the layers."""
    layouts = read_layouts(report)[:limit]
    cache: dict[tuple, float] = {}

    def timed(key: tuple, build: Callable[[np.random.Generator], bytes], n: int) -> float:
        if key not in cache:
            rng = np.random.default_rng(len(cache))
            session = create_session(build(rng), threads=threads)
            feed = {"x": rng.standard_normal((1, n), dtype=np.float32)}
            cache[key] = time_runs(lambda: session.run(None, feed), **settings.warm).median_s * 1e3
        return cache[key]

    rows = []
    for lay in layouts:
        m, n, d = lay["out"], lay["in"], lay["d"]
        rows.append({
            **lay, "wide_codes": max(lay["bits"]) * d > REGISTER_MAX_CODE_BITS,
            "vqgemm_ms": timed(("vq", m, n, d, tuple(lay["bounds"]), tuple(lay["bits"])),
                               lambda rng: vq_layout_model(rng, n, m, 1, d, lay["bounds"], lay["bits"]), n),
            "uniform_ms": timed(("uniform", m, n), lambda rng: vq_model(rng, n, m, 1, 2, 2), n),
            "fp32_ms": timed(("fp32", m, n), lambda rng: dense_model(rng, n, m, 1), n),
        })
    total = {key: sum(r[key] for r in rows) for key in ("vqgemm_ms", "uniform_ms", "fp32_ms")}
    wide = [r for r in rows if r["wide_codes"]]
    return {"report": str(report), "layers": len(rows), **total,
            "wide_code_layers": len(wide), "wide_code_vqgemm_ms": sum(r["vqgemm_ms"] for r in wide),
            "weights_by_bits": _weights_by_bits(layouts)}


def _weights_by_bits(layouts: list[dict]) -> dict[str, float]:
    counts: dict[float, int] = {}
    for lay in layouts:
        for (start, stop), b in zip(zip(lay["bounds"], lay["bounds"][1:]), lay["bits"]):
            counts[b] = counts.get(b, 0) + (stop - start) * lay["out"]
    total = sum(counts.values())
    return {str(b): counts[b] / total for b in sorted(counts)}


def memory_check(fp32: dict, quantized: dict, tolerance: float = 0.15) -> dict:
    """Does the session memory saved match the file bytes saved (within ``tolerance``)?"""
    saved = fp32["file_bytes"] - quantized["file_bytes"]
    drop = fp32["growth_bytes"] - quantized["growth_bytes"]
    ratio = drop / saved if saved else float("nan")
    return {"model": quantized["model"], "file_bytes_saved": saved, "rss_drop_bytes": drop,
            "drop_over_saved": ratio, "matches": bool(abs(ratio - 1.0) <= tolerance), "tolerance": tolerance}


# ---------------------------------------------------------------------------------------------
# Report


def kernel_isa() -> str:
    """The instruction-set level the CPU library picks on this machine (avx512, avx2 or portable)."""
    import ctypes

    from mgvq_compile.runtime import library_path

    isa = ctypes.CDLL(library_path("cpu")).MgvqVQGemmIsa
    isa.restype = ctypes.c_char_p
    return isa().decode()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def _shape_label(out: int, inp: int) -> str:
    what = next((w for o, i, w in SHAPES if (o, i) == (out, inp)), "")
    return f"{out}x{inp}" + (f" ({what})" if what else "")


def _op_table(rows: list[dict]) -> list[str]:
    lines = ["| shape (out x in) | batch | op | weight MB | warm ms | warm best ms | cold ms | warm GB/s | cold GB/s | cold % of DRAM BW | speed-up vs fp32 (warm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        lines.append(
            f"| {_shape_label(r['out'], r['in'])} | {r['batch']} | {r['op']} | {r['weight_bytes'] / MB:.2f} | "
            f"{r['warm_ms']:.3f} | {r['warm_min_ms']:.3f} | {r['cold_ms']:.3f} | {r['warm_gbs']:.1f} | {r['cold_gbs']:.1f} | "
            f"{100 * r['cold_bw_fraction']:.0f}% | {speedup} |"
        )
    return lines


def _decode_table(rows: list[dict], checks: list[dict]) -> list[str]:
    lines = ["| model (one-token forward, batch 1) | files MB | step ms | best step ms | tokens/s | session RSS growth MB | peak RSS growth MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['file_bytes'] / MB:.1f} | {r['step_ms']:.2f} | {r['step_min_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['growth_bytes'] / MB:.1f} | {r['peak_growth_bytes'] / MB:.1f} |")
    lines.append("")
    for c in checks:
        verdict = "matches" if c["matches"] else "does not match"
        lines.append(f"- {c['model']}: session memory {-c['rss_drop_bytes'] / MB:+.1f} MB against fp32 for "
                     f"{c['file_bytes_saved'] / MB:.1f} MB fewer file bytes: saved / file bytes saved = "
                     f"{c['drop_over_saved']:.2f}, {verdict} within ±{c['tolerance']:.0%}")
    lines.append("- The portable form is not meant to pass: ORT constant-folds its standard-op decode into dense "
                 "float32 weights when the session is created.")
    return lines


def _speed_table(checks: list[dict]) -> list[str]:
    lines = ["| shape | batch | op | against | op ms | against ms | ratio | goal | meets goal |", "|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['shape']} | {c['batch']} | {c['op']} | {c['against']} | {c['op_ms']:.3f} | "
                     f"{c['against_ms']:.3f} | {c['ratio']:.3f}x | <= {c['goal']}x | {'yes' if c['meets_goal'] else 'no'} |")
    return lines


def _layouts_section(layouts: dict | None) -> list[str]:
    lines = ["## Linear layers at a real mgvq compile's layouts, batch 1", ""]
    if layouts is None or "skipped" in (layouts or {}):
        reason = (layouts or {}).get("skipped", "not run")
        return [*lines, f"Skipped: {reason}.", ""]
    shares = ", ".join(f"{b} bits {100 * f:.0f}%" for b, f in layouts["weights_by_bits"].items())
    lines += [
        f"Layouts from `{layouts['report']}` ({layouts['layers']} quantized layers; weights at {shares}). "
        "VQGemm at those layouts with random codes, warm medians, one op per layer in turn; the sums are a "
        "decode step's linear layers (the fp32 LM head not included).", "",
        "| layers | VQGemm at the report's layouts ms | uniform 2-bit d2 VQGemm ms | fp32 MatMul ms | "
        "layers with a group of codes > 6 bits | their VQGemm ms |",
        "|---|---|---|---|---|---|",
        f"| {layouts['layers']} | {layouts['vqgemm_ms']:.2f} | {layouts['uniform_ms']:.2f} | {layouts['fp32_ms']:.2f} | "
        f"{layouts['wide_code_layers']} | {layouts['wide_code_vqgemm_ms']:.2f} |", "",
    ]
    return lines


def _load_note(record: dict) -> str:
    load = record["load_average_1min"]
    note = f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
    if max(load.values()) > record["threads"] + 1:
        note += " (other jobs shared the machine: times are noisy)"
    return note


def markdown_report(record: dict) -> str:
    bw = record["bandwidth"]
    lines = [
        "# CPU kernel benchmark", "",
        f"`{record['command']}` on {record['machine']}, ORT {record['ort']}, {record['threads']} intra-op threads, "
        f"{record['date']}{' (quick run)' if record['quick'] else ''}; {_load_note(record)}.", "",
        f"DRAM read bandwidth (ORT ReduceSum over {bw['buffer_bytes'] >> 20} MiB, {record['threads']} threads): "
        f"{bw['read_gbs_before']:.1f} GB/s before the ops, {bw['read_gbs_after']:.1f} GB/s after; "
        f"{bw['reference_gbs']:.1f} GB/s is the reference. numpy copy (read + write, 1 thread): {bw['copy_gbs']:.1f} GB/s.",
        "", "## Ops", "",
        "Weight MB = the op's initializers (codes, codebook and permutation for VQGemm; packed blocks and scales "
        "for MatMulNBits). Times are medians (\"best\": the fastest run, less sensitive to other jobs). "
        "Warm: back-to-back runs (small weights stay in cache, so GB/s can pass DRAM's); "
        "cold: caches evicted before each run. MatMulNBits acc0 computes in float, acc4 quantizes activations "
        "to int8 (an approximation; VQGemm always computes in float32 and matches the reference to 1e-5). "
        f"VQGemm: one group, column permutation, no scales; kernel level {record.get('isa', '?')}.", "",
        *_op_table(record["ops"]), "",
        "### The issue's speed check", "",
        *_speed_table(record.get("speed_check", [])), "",
        "## SmolLM2-135M, one token", "",
        "Exported with seq_len=1: a one-token forward whose linear layers are those of a decode step (attention "
        "over the one token, no KV cache). The embedding / tied LM head (49152 x 576) stays float32 in every "
        "model. All three keep their weights in model.onnx.data, so ORT loads them alike. RSS growth: a fresh "
        "process, after its imports, creating the session and running it once.", "",
        *_decode_table(record["decode"], record["memory_checks"]), "",
        *_layouts_section(record.get("layouts")),
    ]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="two shapes, a few runs, SmolLM2 cut to 2 layers")
    parser.add_argument("--work-dir", type=Path, default=HERE / "work", help="cached exports and compiled models")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="where kernels.json and kernels.md go")
    parser.add_argument("--layouts", type=Path, help="report.json of an mgvq compile whose layer layouts to time "
                        "(default: the accuracy benchmark's or the demo's SmolLM2 mgvq 2-bit compile)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    started, load_before = time.time(), os.getloadavg()[0]
    try:
        read_before = read_bandwidth_gbs(settings.bandwidth_bytes, args.threads)
        ops = run_ops(settings, args.threads, _log)
        # Right after the ops: timed after the SmolLM2 sessions, the same small ops ran ~1.5x slower.
        layouts_report = args.layouts or find_layouts_report(args.work_dir)
        if layouts_report is None:
            layouts = {"skipped": "no report.json of a SmolLM2 mgvq 2-bit compile (run make demo, or pass --layouts)"}
        else:
            layouts = measure_layouts(layouts_report, args.threads, settings, limit=12 if args.quick else None)
        read_after = read_bandwidth_gbs(settings.bandwidth_bytes, args.threads)
        reference = max(read_before, read_after)
        models = prepare_smollm2(args.work_dir, settings.smollm2_layers, _log)
        decode = [measure_decode(label, path, args.threads, settings) for label, path in models.items()]
    except MgvqError as error:
        print(f"kernels: error: {error}", file=sys.stderr)
        return 2
    record = {
        "command": " ".join(["python benchmarks/kernels.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "seconds": round(time.time() - started, 1),
        "machine": _machine(), "ort": ort.__version__, "threads": args.threads, "quick": args.quick,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "bandwidth": {"buffer_bytes": settings.bandwidth_bytes, "read_gbs_before": read_before,
                      "read_gbs_after": read_after, "reference_gbs": reference,
                      "copy_gbs": copy_bandwidth_gbs(settings.bandwidth_bytes)},
        "isa": kernel_isa(),
        "ops": add_ratios(ops, reference),
        "speed_check": speed_check(ops),
        "decode": decode,
        "memory_checks": [memory_check(decode[0], row) for row in decode[1:]],
        "layouts": layouts,
    }
    report = markdown_report(record)
    write_text_atomic(args.out_dir / "kernels.json", json.dumps(record, indent=1) + "\n")
    write_text_atomic(args.out_dir / "kernels.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
