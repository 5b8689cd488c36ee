"""CUDA kernel benchmark: mgvq.VQGemm against fp16 MatMul and ORT's MatMulNBits on the CUDA provider.

    python benchmarks/kernels_cuda.py [--quick] [--budget 1.0] [--out-dir benchmarks/results]

Needs onnxruntime-gpu, a CUDA device and the CUDA build of the custom ops
(``python custom_ops/build.py --cuda``). For each linear shape (out x in: 4096x4096, 4096x11008,
11008x4096 and SmolLM2-135M's 576x576, 1536x576, 576x1536) and batch 1 and 16, with float16
activations and every node forced onto the CUDA provider (no CPU fallback): a float16 ``MatMul``,
``com.microsoft.MatMulNBits`` at 4 and 2 bits (block 128; "unsupported" where the CUDA provider has no
kernel for it) and ``mgvq.VQGemm`` at 2 and 3 bits with d = 2 (mgvq's default at 3 bits) and d = 4 (its default at 2; one group, with a
column permutation).
Inputs and outputs stay on the device (io_binding). Two timings, medians of many runs:
- call: one node per session, the wall time of one ``run_with_iobinding`` (ORT's per-run overhead and
  the stream synchronisation included);
- stacked: L nodes of the same shape with distinct weights (together more than twice the L2 cache)
  fed by the same X, run time / L: the cost of the op inside a model, its weights coming from HBM.
Effective GB/s = weight bytes read / stacked time, also as a fraction of the device bandwidth measured
in the same run (a device-to-device copy, through torch when it has CUDA, else an ORT Add on 256 MiB)
and of the theoretical peak (memory clock x bus width). Our op's batch-1 output is checked against the
numpy reference. Writes ``kernels_cuda.json`` and ``kernels_cuda.md`` to --out-dir, prints the table.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mgvq_compile import runtime  # noqa: E402
from mgvq_compile.errors import MgvqError  # noqa: E402
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, CUSTOM_OP, VQGroup, VQWeight, vqgemm_reference  # noqa: E402
from mgvq_compile.output import write_text_atomic  # noqa: E402
from opbench import SHAPES, time_runs  # noqa: E402

__all__ = ["main", "SHAPES", "OPS", "device_info", "build_model", "markdown_table"]

CUDA = "CUDAExecutionProvider"
NEEDS = "needs onnxruntime-gpu and a CUDA device"

BATCHES = (1, 16)
MAX_STACK = 1024


# ------------------------------------------------------------------------------------------------
# The device, through the driver API (no CUDA toolkit needed)

def _driver() -> ctypes.CDLL | None:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return driver if driver.cuInit(0) == 0 else None


def device_info(device: int = 0) -> dict | None:
    """Name, SM count, L2 size and theoretical memory bandwidth of ``device``; None without one."""
    driver = _driver()
    count = ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        return None
    handle = ctypes.c_int(0)
    driver.cuDeviceGet(ctypes.byref(handle), device)

    def attribute(code: int) -> int:
        value = ctypes.c_int(0)
        driver.cuDeviceGetAttribute(ctypes.byref(value), code, handle)
        return value.value

    name = ctypes.create_string_buffer(256)
    driver.cuDeviceGetName(name, 256, handle)
    version = ctypes.c_int(0)
    driver.cuDriverGetVersion(ctypes.byref(version))
    # CU_DEVICE_ATTRIBUTE_*: MULTIPROCESSOR_COUNT 16, MEMORY_CLOCK_RATE 36 (kHz), GLOBAL_MEMORY_BUS_WIDTH
    # 37 (bits), L2_CACHE_SIZE 38 (bytes). Double data rate: two transfers per clock.
    clock_khz, bus_bits = attribute(36), attribute(37)
    return {
        "name": name.value.decode(), "driver": f"{version.value // 1000}.{version.value % 1000 // 10}",
        "sms": attribute(16), "l2_bytes": attribute(38),
        "peak_gbs": 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9,
    }


def require_gpu() -> dict:
    if CUDA not in ort.get_available_providers():
        raise SystemExit(f"{NEEDS}: this onnxruntime ({ort.__version__}) has no {CUDA}; "
                         "install onnxruntime-gpu on a machine with an NVIDIA GPU")
    info = device_info()
    if info is None:
        raise SystemExit(f"{NEEDS}: no CUDA device is visible (libcuda.so.1 missing or no GPU)")
    return info


# ------------------------------------------------------------------------------------------------
# Models: `copies` nodes of one op on the same X [rows, n] -> y0..y{copies-1} [rows, m], float16

@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    # (rng, n, m, index) -> (node, initializers, the VQWeight for the reference or None)
    node: Callable[[np.random.Generator, int, int, int], tuple]
    domain: str | None = None


def dense_node(rng, n: int, m: int, k: int):
    w = (rng.standard_normal((n, m)) * 0.02).astype(np.float16)
    return helper.make_node("MatMul", ["x", f"w{k}"], [f"y{k}"]), [numpy_helper.from_array(w, f"w{k}")], None


def nbits_node(bits: int, block: int = 128):
    def make(rng, n: int, m: int, k: int):
        blocks = -(-n // block)  # K need not be a multiple of the block
        packed = rng.integers(0, 256, (m, blocks, block * bits // 8), dtype=np.uint8)
        scales = (rng.random((m, blocks)) * 0.01).astype(np.float16)
        node = helper.make_node("MatMulNBits", ["x", f"b{k}", f"s{k}"], [f"y{k}"], domain="com.microsoft",
                                K=n, N=m, bits=bits, block_size=block)
        return node, [numpy_helper.from_array(packed, f"b{k}"), numpy_helper.from_array(scales, f"s{k}")], None
    return make


def vq_node(bits: int, d: int = 4):
    def make(rng, n: int, m: int, k: int):
        size = 1 << (bits * d)
        group = VQGroup(0, n, bits, (rng.standard_normal((size, d)) * 0.02).astype(np.float16),
                        rng.integers(0, size, (m, n // d)))
        weight = VQWeight(m, n, d, (group,), rng.permutation(n).astype(np.int32))
        arrays = weight.stored_arrays()
        names = {role: f"{role}{k}" for role in arrays}
        node = helper.make_node(CUSTOM_OP, ["x", names["perm"], names["codebooks"], names["codes"]], [f"y{k}"],
                                domain=CUSTOM_DOMAIN, **weight.node_attributes())
        return node, [numpy_helper.from_array(a, names[r]) for r, a in arrays.items()], weight
    return make


OPS = (
    OpSpec("fp16 MatMul", dense_node),
    OpSpec("MatMulNBits 4-bit", nbits_node(4), "com.microsoft"),
    OpSpec("MatMulNBits 2-bit", nbits_node(2), "com.microsoft"),
    OpSpec("mgvq.VQGemm 2-bit d2", vq_node(2, 2), CUSTOM_DOMAIN),
    OpSpec("mgvq.VQGemm 3-bit d2", vq_node(3, 2), CUSTOM_DOMAIN),
    OpSpec("mgvq.VQGemm 2-bit d4", vq_node(2), CUSTOM_DOMAIN),
    OpSpec("mgvq.VQGemm 3-bit d4", vq_node(3), CUSTOM_DOMAIN),
)


def build_model(spec: OpSpec, rng: np.random.Generator, n: int, m: int, rows: int, copies: int):
    """The model bytes, the weight bytes of one node, and the first node's VQWeight (or None)."""
    nodes, inits, first = [], [], None
    for k in range(copies):
        node, arrays, weight = spec.node(rng, n, m, k)
        nodes.append(node)
        inits.extend(arrays)
        first = first if first is not None else weight
    per_node = sum(numpy_helper.to_array(t).nbytes for t in inits) // copies
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [rows, n])],
        [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT16, [rows, m]) for k in range(copies)], inits,
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(spec.domain, 1)] if spec.domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString(), per_node, first


# ------------------------------------------------------------------------------------------------
# Sessions and timing

def cuda_session(model: bytes, library: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node on the GPU
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=[CUDA])


def bind(session: ort.InferenceSession, x: np.ndarray, outputs: dict[str, tuple[int, ...]]):
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for name, shape in outputs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(np.full(shape, np.nan, x.dtype), "cuda", 0))
    return binding


def median_s(run: Callable[[], object], budget_s: float) -> float:
    return time_runs(run, min_runs=20, max_runs=5000, budget_s=budget_s, warmup=5).median_s


def timed_run(session: ort.InferenceSession, binding) -> Callable[[], None]:
    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def copy_bandwidth_gbs(library: str, budget_s: float, nbytes: int = 256 << 20) -> dict:
    """Device-to-device bandwidth (bytes read + written per second): torch's copy when it has CUDA,
    and ORT's Add of a zero to a float16 tensor; the higher is the reference."""
    found = {}
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
            dst = torch.empty_like(src)

            def copy() -> None:
                dst.copy_(src)
                torch.cuda.synchronize()

            found["torch_copy"] = 2 * nbytes / median_s(copy, budget_s) / 1e9
    except ImportError:
        pass
    count = nbytes // 2
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["y"])], "copy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [count])],
        [numpy_helper.from_array(np.zeros((), np.float16), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = cuda_session(model.SerializeToString(), library)
    binding = bind(session, np.zeros(count, np.float16), {"y": (count,)})
    found["ort_add"] = 2 * nbytes / median_s(timed_run(session, binding), budget_s) / 1e9
    found["reference"] = max(found.values())
    return found


def stack_copies(weight_bytes: int, l2_bytes: int) -> int:
    return int(min(MAX_STACK, max(2, math.ceil(2.5 * max(l2_bytes, 1 << 20) / max(weight_bytes, 1)))))


def measure(spec: OpSpec, out: int, inp: int, rows: int, library: str, info: dict, budget_s: float) -> dict:
    row = {"op": spec.name, "out": out, "in": inp, "batch": rows}
    rng = np.random.default_rng(out * 7 + inp)
    x = (rng.standard_normal((rows, inp)) * 0.5).astype(np.float16)
    try:
        model, weight_bytes, weight = build_model(spec, rng, inp, out, rows, 1)
        session = cuda_session(model, library)
    except Exception as error:  # noqa: BLE001 - no CUDA kernel (or no such op) in this ORT build
        return {**row, "status": "unsupported", "error": str(error).splitlines()[0][:200]}
    binding = bind(session, x, {"y0": (rows, out)})
    row["weight_bytes"] = weight_bytes
    row["call_ms"] = median_s(timed_run(session, binding), budget_s) * 1e3
    if weight is not None and rows == 1:
        y = binding.get_outputs()[0].numpy().astype(np.float64)
        ref = vqgemm_reference(x.astype(np.float32), weight)
        row["rel_err"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    copies = stack_copies(weight_bytes, info["l2_bytes"])
    model, _, _ = build_model(spec, np.random.default_rng(1), inp, out, rows, copies)
    session = cuda_session(model, library)
    binding = bind(session, x, {f"y{k}": (rows, out) for k in range(copies)})
    per_op_s = median_s(timed_run(session, binding), budget_s) / copies
    row.update(status="ok", copies=copies, stacked_us=per_op_s * 1e6, gbs=weight_bytes / per_op_s / 1e9)
    return row


def add_fractions(rows: list[dict], measured_gbs: float, peak_gbs: float) -> None:
    for row in rows:
        if row.get("status") == "ok":
            row["frac_measured"] = row["gbs"] / measured_gbs
            row["frac_peak"] = row["gbs"] / peak_gbs if peak_gbs > 0 else None


# ------------------------------------------------------------------------------------------------
# Report

def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| shape (out x in) | batch | op | weight MB | call ms | stacked us | GB/s | of measured BW | of peak | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r['out']}x{r['in']}"
        if r.get("status") != "ok":
            lines.append(f"| {shape} | {r['batch']} | {r['op']} | | | | | | | unsupported: {r.get('error', '')} |")
            continue
        note = f"rel err {r['rel_err']:.1e}" if "rel_err" in r else ""
        peak = f"{r['frac_peak']:.0%}" if r.get("frac_peak") is not None else ""
        lines.append(
            f"| {shape} | {r['batch']} | {r['op']} | {r['weight_bytes'] / 1e6:.2f} | {r['call_ms']:.3f} | "
            f"{r['stacked_us']:.1f} | {r['gbs']:.0f} | {r['frac_measured']:.0%} | {peak} | "
            f"L={r['copies']}{'; ' + note if note else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, batch 1, short timings (a smoke run)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of runs per timing (default 1)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the .json and .md go")
    args = parser.parse_args(argv)
    try:
        info = require_gpu()
        library = runtime.library_path("cuda")
    except (SystemExit, MgvqError) as error:
        print(f"kernels_cuda: {error}", file=sys.stderr)
        return 2
    shapes = SHAPES[::3] if args.quick else SHAPES
    batches = BATCHES[:1] if args.quick else BATCHES
    budget = 0.2 if args.quick else args.budget
    bandwidth_before = copy_bandwidth_gbs(library, budget)
    rows = []
    for out, inp, _ in shapes:
        for batch in batches:
            for spec in OPS:
                rows.append(measure(spec, out, inp, batch, library, info, budget))
                r = rows[-1]
                print(f"{out}x{inp} batch {batch} {spec.name}: " +
                      (f"{r['stacked_us']:.1f} us stacked, {r['call_ms']:.3f} ms call" if r["status"] == "ok"
                       else "unsupported"), file=sys.stderr, flush=True)
    bandwidth_after = copy_bandwidth_gbs(library, budget)
    measured = max(bandwidth_before["reference"], bandwidth_after["reference"])
    add_fractions(rows, measured, info["peak_gbs"])
    record = {
        "command": "python benchmarks/kernels_cuda.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": info, "host": f"{platform.machine()}, {os.cpu_count()} cores", "ort": ort.__version__,
        "library": library, "bandwidth_gbs": {"before": bandwidth_before, "after": bandwidth_after, "used": measured},
        "rows": rows,
    }
    table = markdown_table(rows)
    header = (f"# CUDA kernels on {info['name']} (driver {info['driver']}, ORT {ort.__version__})\n\n"
              f"Measured device bandwidth {measured:.0f} GB/s (read + write), theoretical peak "
              f"{info['peak_gbs']:.0f} GB/s. Float16 activations; stacked = per-op time among L copies.\n\n")
    write_text_atomic(args.out_dir / "kernels_cuda.json", json.dumps(record, indent=1) + "\n")
    write_text_atomic(args.out_dir / "kernels_cuda.md", header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
