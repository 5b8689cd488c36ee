"""Shared pieces of the CPU benchmarks: one-op ONNX models, timing, memory bandwidth, session memory.

Imported by ``benchmarks/kernels.py`` and ``benchmarks/vq_gemm_cpu_timing.py`` (run as scripts, so this
folder is on ``sys.path``). ``python benchmarks/opbench.py rss MODEL [--threads N]`` is the probe that
:func:`session_rss_growth` runs in a fresh process: it prints the resident-memory growth of creating an
ORT session for MODEL and running it once, as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mgvq_compile.algorithms.packing import code_width
from mgvq_compile.errors import MgvqError
from mgvq_compile.runtime import create_session
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, CUSTOM_OP, VQGroup, VQWeight

__all__ = [
    "Timing",
    "single_op_model",
    "vq_model",
    "vq_layout_model",
    "nbits_model",
    "dense_model",
    "initializer_nbytes",
    "median_ms",
    "time_runs",
    "CacheFlusher",
    "read_bandwidth_gbs",
    "copy_bandwidth_gbs",
    "zero_feed",
    "current_rss_bytes",
    "peak_rss_bytes",
    "session_rss_growth",
]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


# ---------------------------------------------------------------------------------------------
# One-op models: y[rows, m] = op(x[rows, n], weight)


# (out, in, what it is): the large shapes and SmolLM2-135M's linear layers
SHAPES = (
    (4096, 4096, "7B attention"),
    (4096, 11008, "7B MLP down"),
    (11008, 4096, "7B MLP gate/up"),
    (576, 576, "SmolLM2 q/o proj"),
    (192, 576, "SmolLM2 k/v proj"),
    (1536, 576, "SmolLM2 gate/up proj"),
    (576, 1536, "SmolLM2 down proj"),
)


def single_op_model(nodes, inits, n: int, m: int, rows: int, extra_opsets=()) -> bytes:
    """A serialized model ``x[rows, n] -> y[rows, m]`` made of ``nodes`` and initializers ``inits``."""
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, m])], inits,
    )
    opsets = [helper.make_opsetid("", 18), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def vq_model(rng: np.random.Generator, n: int, m: int, rows: int, bits: int, d: int) -> bytes:
    """``mgvq.VQGemm`` with one group of random codes and codebook and a column permutation."""
    return vq_layout_model(rng, n, m, rows, d, [0, n], [bits])


def vq_layout_model(rng: np.random.Generator, n: int, m: int, rows: int, d: int, bounds: list[int],
                    bits: list[float]) -> bytes:
    """``mgvq.VQGemm`` with the given channel groups (bounds, bits per weight), random codes and
    codebooks, and a column permutation."""
    groups = []
    for (start, stop), b in zip(zip(bounds, bounds[1:]), bits):
        k = 1 << code_width(b, d)
        groups.append(VQGroup(start, stop, b, rng.standard_normal((k, d)).astype(np.float16),
                              rng.integers(0, k, (m, (stop - start) // d))))
    weight = VQWeight(m, n, d, tuple(groups), rng.permutation(n).astype(np.int32))
    arrays = weight.stored_arrays()
    node = helper.make_node(CUSTOM_OP, ["x", "perm", "codebooks", "codes"], ["y"], domain=CUSTOM_DOMAIN,
                            **weight.node_attributes())
    inits = [numpy_helper.from_array(a, r) for r, a in arrays.items()]
    return single_op_model([node], inits, n, m, rows, [CUSTOM_DOMAIN])


def nbits_model(rng: np.random.Generator, n: int, m: int, rows: int, bits: int, block: int,
                accuracy_level: int = 0) -> bytes:
    """ORT's ``com.microsoft.MatMulNBits`` (no zero points: the default 2^(bits-1)); a last partial block
    of K is padded, as the op specifies. ``accuracy_level`` 4 lets ORT quantize activations to int8."""
    blocks = -(-n // block)
    packed = rng.integers(0, 256, (m, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(m * blocks) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft",
                            K=n, N=m, bits=bits, block_size=block, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales")]
    return single_op_model([node], inits, n, m, rows, ["com.microsoft"])


def dense_model(rng: np.random.Generator, n: int, m: int, rows: int) -> bytes:
    """A float32 ``MatMul`` with a random [n, m] weight."""
    w = rng.standard_normal((n, m), dtype=np.float32)
    return single_op_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], n, m, rows)


def initializer_nbytes(model: bytes) -> int:
    """Bytes of all initializers of a serialized model (what the op reads as its weight)."""
    proto = onnx.load_from_string(model)
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed run."""

    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)


def time_runs(run: Callable[[], object], *, min_runs: int = 10, max_runs: int = 1000, budget_s: float = 1.0,
              warmup: int = 3, before_each: Callable[[], None] | None = None) -> Timing:
    """Time ``run`` after ``warmup`` calls: at least ``min_runs`` runs, then more until ``budget_s`` of
    timed runs or ``max_runs``. ``before_each`` (untimed) runs before every timed run."""
    for _ in range(warmup):
        run()
    seconds: list[float] = []
    while len(seconds) < max_runs and (len(seconds) < min_runs or sum(seconds) < budget_s):
        if before_each is not None:
            before_each()
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds))


def median_ms(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    """Median milliseconds of ``session.run`` on input ``x`` over exactly ``runs`` runs (10 warm-up)."""
    timing = time_runs(lambda: session.run(None, {"x": x}), min_runs=runs, max_runs=runs, warmup=10)
    return timing.median_s * 1e3


# ---------------------------------------------------------------------------------------------
# Caches and memory bandwidth


def _reduce_sum_model(count: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model.SerializeToString()


class CacheFlusher:
    """Evicts the caches of the cores ORT runs on: an ORT ReduceSum over a buffer several times the L3
    size, on ``threads`` threads (a numpy write from this thread alone would leave the other cores' L2)."""

    def __init__(self, nbytes: int = 128 << 20, threads: int = 2):
        self.feed = {"x": np.ones(nbytes // 4, np.float32)}
        self.session = create_session(_reduce_sum_model(nbytes // 4), threads=threads)

    def __call__(self) -> None:
        self.session.run(None, self.feed)


def read_bandwidth_gbs(nbytes: int = 512 << 20, threads: int = 2, runs: int = 9) -> float:
    """DRAM read rate (GB/s): ORT ``ReduceSum`` over a float32 buffer far larger than the caches, with
    ``threads`` intra-op threads (the op benchmarks' setting); median of ``runs``."""
    x = np.ones(nbytes // 4, np.float32)
    session = create_session(_reduce_sum_model(x.size), threads=threads)
    timing = time_runs(lambda: session.run(None, {"x": x}), min_runs=runs, max_runs=runs, warmup=1)
    return x.nbytes / timing.median_s / 1e9


def copy_bandwidth_gbs(nbytes: int = 512 << 20, runs: int = 9) -> float:
    """numpy copy rate (GB/s, bytes read + bytes written), one thread; median of ``runs``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    timing = time_runs(lambda: np.copyto(dst, src), min_runs=runs, max_runs=runs, warmup=1)
    return 2 * src.nbytes / timing.median_s / 1e9


# ---------------------------------------------------------------------------------------------
# Session memory


def zero_feed(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Zeros for every input of ``session`` (symbolic dimensions taken as 1)."""
    feed = {}
    for value in session.get_inputs():
        if value.type not in _ORT_TYPES:
            raise MgvqError(f"input {value.name!r} has type {value.type}, which zero_feed cannot make",
                            f"feed one of {sorted(_ORT_TYPES)}")
        shape = [dim if isinstance(dim, int) else 1 for dim in value.shape]
        feed[value.name] = np.zeros(shape, _ORT_TYPES[value.type])
    return feed


def _proc_status_bytes(field: str) -> int:
    status = Path("/proc/self/status")
    if not status.exists():
        raise MgvqError("resident memory is read from /proc/self/status, which this system lacks",
                        "run the memory measurement on Linux")
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise MgvqError(f"/proc/self/status has no {field} line", "run the memory measurement on Linux")


def current_rss_bytes() -> int:
    """Resident memory of this process now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss, not inherited across fork)."""
    return _proc_status_bytes("VmHWM")


def _rss_probe(model: str, threads: int) -> dict[str, int]:
    baseline = current_rss_bytes()
    session = create_session(model, threads=threads)
    after_load = current_rss_bytes()
    session.run(None, zero_feed(session))
    after_run = current_rss_bytes()
    return {"baseline_bytes": baseline, "load_growth_bytes": after_load - baseline,
            "growth_bytes": after_run - baseline, "peak_growth_bytes": peak_rss_bytes() - baseline}


def session_rss_growth(model: str | Path, threads: int = 2, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Resident-memory growth of a fresh process that creates a session for ``model`` and runs it once
    (after importing numpy, onnxruntime and mgvq_compile): ``growth_bytes`` after the run,
    ``load_growth_bytes`` after session creation, ``peak_growth_bytes`` from the peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "rss", str(model), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise MgvqError(f"the memory probe for {model} failed:\n{proc.stderr.strip()}",
                        f"run it alone to see why: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memory probe: RSS growth of one ORT session (JSON on stdout)")
    sub = parser.add_subparsers(dest="command", required=True)
    rss = sub.add_parser("rss")
    rss.add_argument("model")
    rss.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(_rss_probe(args.model, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
