"""The CPU kernel reads only its own buffers: every path and instruction set under AddressSanitizer.

The gather kernels and the code unpacking read the bit-packed codes 8 bytes at a time, so near the end of
the codes buffer they must fall back to byte-wise reads. ORT allocates each initializer with malloc when
its arena is off, so a read past the codes (or the codebooks, activations or scales) is reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# m, n, d, group bounds, bits, scale_group, rows: wide codes at d = 2 and 4 (rows on and off a byte, the
# last row ending on the buffer's last byte), mixed register and gather groups, 8-bit codes, tiny layers.
LAYOUTS = [
    (24, 256, 4, [0, 256], [1.75], 0, 1), (19, 200, 4, [0, 72, 200], [2.25, 2.75], 0, 3),
    (21, 96, 4, [0, 32, 96], [1.25, 3], 32, 9), (17, 96, 4, [0, 48, 96], [1.75, 2.5], 12, 2),
    (9, 64, 4, [0, 32, 64], [3.5, 4], 0, 5), (1, 8, 4, [0, 8], [2.25], 0, 1), (3, 12, 4, [0, 12], [1.75], 0, 2),
    (2, 36, 4, [0, 36], [2.5], 0, 1), (23, 64, 2, [0, 64], [3.5], 0, 2),
    (40, 192, 2, [0, 48, 96, 144, 192], [2, 2.5, 3, 3.5], 0, 1), (33, 200, 2, [0, 40, 104, 200], [3.5, 2.5, 6], 8, 5),
    (35, 160, 2, [0, 32, 96, 160], [3, 3.5, 4], 0, 3), (24, 128, 4, [0, 64, 128], [1.5, 2.25], 16, 2),
    (3, 16, 2, [0, 16], [3.5], 0, 1), (1, 16, 2, [0, 8, 16], [2.5, 3.5], 0, 2), (23, 64, 1, [0, 32, 64], [8, 3], 0, 3),
]

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto
    from mgvq_compile.vqgemm import vqgemm_reference
    from test_vq_gemm_op import custom_model, nonzero_normal
    from test_vqgemm import random_weight
    from vq_helpers import rel_err

    worst = 0.0
    for isa in ["avx512", "avx2", "portable"]:
        for path in ["auto", "register", "gather", "lut", "decode"]:
            os.environ["MGVQ_VQGEMM_ISA"], os.environ["MGVQ_VQGEMM_PATH"] = isa, path
            for m, n, d, bounds, bits, scale_group, rows in {layouts!r}:
                rng = np.random.default_rng(m + n)
                weight = random_weight(rng, m, n, d, bounds, bits, perm=True, scale_group=scale_group)
                x = nonzero_normal(rng, (rows, n)).astype(np.float32)
                options = ort.SessionOptions()
                options.enable_cpu_mem_arena = False
                options.register_custom_ops_library({library!r})
                session = ort.InferenceSession(custom_model(weight, (rows,), TensorProto.FLOAT, None), options,
                                               providers=["CPUExecutionProvider"])
                worst = max(worst, rel_err(session.run(None, {{"x": x}})[0], vqgemm_reference(x, weight)))
    print("worst relative error", worst)
    assert worst < 1e-5
""")


def _runtime_library(name: str) -> str | None:
    found = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def test_every_path_reads_only_its_buffers_under_address_sanitizer(build_script, tmp_path):
    preload = [_runtime_library("libasan.so"), _runtime_library("libstdc++.so")] if shutil.which("g++") else [None]
    if None in preload:
        pytest.skip("needs g++ with AddressSanitizer's runtime (libasan)")
    headers = build_script.fetch_headers()
    library = tmp_path / "libmgvq_ops_asan.so"
    subprocess.run(["g++", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-std=c++17", "-shared",
                    "-fPIC", "-fvisibility=hidden", f"-I{headers}", *map(str, build_script.SOURCES), "-o", str(library)],
                   check=True)
    script = SCRIPT.format(tests=str(TESTS), layouts=LAYOUTS, library=str(library))
    # libstdc++ too: python does not link it, and ASan's interceptor of the C++ throw (the kernel reads an
    # optional attribute by catching ORT's exception) must find the real one at start.
    env = {**os.environ, "LD_PRELOAD": " ".join(preload), "ASAN_OPTIONS": "detect_leaks=0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[:3000]
    assert "AddressSanitizer" not in done.stderr and "worst relative error" in done.stdout
