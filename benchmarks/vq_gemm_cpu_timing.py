"""Timing check of the mgvq.VQGemm CPU kernel against ORT's MatMulNBits and a float32 MatMul.

``python benchmarks/vq_gemm_cpu_timing.py [--n 4096] [--threads 2] [--rows 1]`` (the library is built
by ``pip install -e .``, or ``python custom_ops/build.py``). Prints the median time of each over many
runs; ``vqgemm_no_tile`` is the kernel with its tile kernel (2- and 4-bit codes, up to 4 activation rows)
turned off. MatMulNBits runs at accuracy_level 0 here (float compute); benchmarks/kernels.py also times
accuracy_level 4 (int8 activations), ORT's fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mgvq_compile import runtime
from mgvq_compile.output import write_text_atomic
from opbench import dense_model, median_ms, nbits_model, vq_model

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--d", type=int, default=2)  # the mgvq layout
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "vq_gemm_cpu_timing.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.n)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    results = {}
    vq = vq_model(rng, args.n, args.m, args.rows, args.bits, args.d)
    # The kernel reads these when the session is created: a forced path, and 0 = no tile kernel.
    for name, path, tile_rows in (("auto", "auto", ""), ("no_tile", "auto", "0"), ("lut", "lut", ""),
                                  ("decode", "decode", "")):
        os.environ["MGVQ_VQGEMM_PATH"], os.environ["MGVQ_VQGEMM_TILE_ROWS"] = path, tile_rows
        results[f"vqgemm_{name}"] = median_ms(runtime.create_session(vq, threads=args.threads), x, args.runs)
    os.environ.pop("MGVQ_VQGEMM_PATH")
    os.environ.pop("MGVQ_VQGEMM_TILE_ROWS")
    for block in (32, 128):
        session = ort.InferenceSession(nbits_model(rng, args.n, args.m, args.rows, 2, block), options)
        results[f"matmulnbits2_b{block}"] = median_ms(session, x, args.runs)
    session = ort.InferenceSession(nbits_model(rng, args.n, args.m, args.rows, 4, 32), options)
    results["matmulnbits4_b32"] = median_ms(session, x, args.runs)
    results["matmul_fp32"] = median_ms(ort.InferenceSession(dense_model(rng, args.n, args.m, args.rows), options), x, args.runs)
    best_nbits = min(results["matmulnbits2_b32"], results["matmulnbits2_b128"])
    record = {
        "command": "python benchmarks/vq_gemm_cpu_timing.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "ort": ort.__version__, "median_ms": results,
        "vqgemm_over_best_matmulnbits2": results["vqgemm_auto"] / best_nbits,
    }
    print("| op | median ms |\n|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.3f} |")
    print(f"vqgemm(auto) / best MatMulNBits(2 bits) = {record['vqgemm_over_best_matmulnbits2']:.3f}")
    out = Path(args.out)
    write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
