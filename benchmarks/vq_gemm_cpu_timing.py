"""Timing check of the mgvq.VQGemm CPU kernel against ORT's MatMulNBits and a float32 MatMul.

``python benchmarks/vq_gemm_cpu_timing.py [--n 4096] [--threads 2] [--rows 1]`` (build the library
first: ``python custom_ops/build.py``). Prints the median time of each over many runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mgvq_compile import runtime  # noqa: E402
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, CUSTOM_OP, VQGroup, VQWeight  # noqa: E402

__all__ = ["main"]


def _model(nodes, inits, n: int, m: int, rows: int, extra_opsets=()) -> bytes:
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, m])], inits,
    )
    opsets = [helper.make_opsetid("", 18), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def vq_model(rng, n: int, m: int, rows: int, bits: int, d: int) -> bytes:
    k = 1 << (bits * d)
    group = VQGroup(0, n, bits, rng.standard_normal((k, d)).astype(np.float16), rng.integers(0, k, (m, n // d)))
    weight = VQWeight(m, n, d, (group,), rng.permutation(n).astype(np.int32))
    arrays = weight.stored_arrays()
    node = helper.make_node(CUSTOM_OP, ["x", "perm", "codebooks", "codes"], ["y"], domain=CUSTOM_DOMAIN,
                            **weight.node_attributes())
    return _model([node], [numpy_helper.from_array(a, r) for r, a in arrays.items()], n, m, rows, [CUSTOM_DOMAIN])


def nbits_model(rng, n: int, m: int, rows: int, bits: int, block: int) -> bytes:
    blocks = n // block
    packed = rng.integers(0, 256, (m, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random((m, blocks)) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft",
                            K=n, N=m, bits=bits, block_size=block)
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales")]
    return _model([node], inits, n, m, rows, ["com.microsoft"])


def dense_model(rng, n: int, m: int, rows: int) -> bytes:
    w = rng.standard_normal((n, m)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], n, m, rows)


def median_ms(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    for _ in range(10):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "vq_gemm_cpu_timing.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.n)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    results = {}
    for path in ("auto", "lut", "decode"):
        os.environ["MGVQ_VQGEMM_PATH"] = path
        session = runtime.create_session(vq_model(rng, args.n, args.m, args.rows, args.bits, args.d), threads=args.threads)
        results[f"vqgemm_{path}"] = median_ms(session, x, args.runs)
    os.environ.pop("MGVQ_VQGEMM_PATH")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
