"""The CUDA build of the mgvq custom ops: it builds wherever nvcc is, carries the CPU kernels too, and
on a GPU its mgvq.VQGemm kernels equal the numpy reference (those tests skip without a CUDA device)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from mgvq_compile import runtime
from mgvq_compile.errors import MgvqError
from mgvq_compile.vqgemm import vqgemm_reference
from test_vq_gemm_op import CASES, custom_model, nonzero_normal, rel_err
from test_vqgemm import random_weight

CUDA = "CUDAExecutionProvider"


@pytest.fixture(scope="session")
def cuda_library(build_script) -> str:
    """Builds libmgvq_ops_cuda.so once per session (a no-op when up to date); skips without nvcc."""
    path = build_script.build_cuda()
    if path is None:
        pytest.skip("nvcc not found: the CUDA library cannot be built here")
    return str(path)


def _cuda_device_count() -> int:
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


HAVE_GPU = CUDA in ort.get_available_providers() and _cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")


# ------------------------------------------------------------------------------------------------
# Everywhere nvcc is: the build, its exports, its CPU kernels, the runtime's choice of library


def test_cuda_library_builds_and_exports_register_custom_ops(cuda_library):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    symbols = subprocess.run(["nm", "-D", "--defined-only", cuda_library], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "RegisterCustomOps" in symbols and "MgvqCudaKernelPath" in symbols
    # The CUDA runtime is linked in statically and hidden: nothing of it is exported, nor needed.
    assert not any(name.startswith("cuda") for name in symbols)
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", cuda_library], capture_output=True, text=True).stdout
        assert "libcudart" not in needed and "libcuda." not in needed


def test_cuda_library_runs_its_cpu_kernels_in_a_cpu_session(cuda_library, monkeypatch):
    """ORT takes one "mgvq" domain per session, so the CUDA build must serve CPU nodes too."""
    monkeypatch.setenv(runtime.CUDA_LIBRARY_ENV, cuda_library)
    rng = np.random.default_rng(21)
    weight = random_weight(rng, 33, 48, 4, [0, 16, 48], [2, 1], perm=True, scale_group=8)
    bias = nonzero_normal(rng, (33,)).astype(np.float32)
    x = nonzero_normal(rng, (3, 5, 48)).astype(np.float32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(runtime.library_path("cuda"))
    session = ort.InferenceSession(custom_model(weight, (3, 5), TensorProto.FLOAT, bias), options,
                                   providers=["CPUExecutionProvider"])
    assert rel_err(session.run(None, {"x": x})[0], vqgemm_reference(x, weight, bias)) < 1e-5


def test_create_session_registers_the_cuda_build_for_the_cuda_provider(monkeypatch):
    chosen = []
    monkeypatch.setattr(runtime, "library_path", lambda device="cpu": chosen.append(device) or "/nonexistent.so")
    for providers in ([CUDA, "CPUExecutionProvider"], [(CUDA, {"device_id": "0"})], ["CPUExecutionProvider"], None):
        with pytest.raises(Exception):  # the stand-in path does not load
            runtime.create_session(b"", providers=providers)
    assert chosen == ["cuda", "cuda", "cpu", "cpu"]


def test_missing_cuda_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "_candidates", lambda device: [tmp_path / "missing.so"])
    with pytest.raises(MgvqError, match="libmgvq_ops_cuda.so") as info:
        runtime.library_path("cuda")
    assert "custom_ops/build.py --cuda" in str(info.value) and runtime.CUDA_LIBRARY_ENV in str(info.value)


def test_cuda_library_env_does_not_redirect_the_cpu_library(monkeypatch, tmp_path):
    cuda_copy = tmp_path / "cuda.so"
    cuda_copy.write_bytes(b"")
    monkeypatch.setenv(runtime.CUDA_LIBRARY_ENV, str(cuda_copy))
    assert runtime.library_path("cuda") == str(cuda_copy)
    assert cuda_copy not in runtime._candidates("cpu")


# ------------------------------------------------------------------------------------------------
# On a GPU: the kernels against the reference


def cuda_session(model: bytes, library: str, path: str, monkeypatch) -> ort.InferenceSession:
    """A session whose every node must run on the CUDA provider (no silent CPU fallback)."""
    monkeypatch.setenv("MGVQ_VQGEMM_CUDA_PATH", path)  # read when the kernel is created
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(model, options, providers=[CUDA])


def run_on_device(session: ort.InferenceSession, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Runs with X copied to the GPU and Y bound to a NaN-poisoned device buffer."""
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.full(out_shape, np.nan, x.dtype), "cuda", 0))
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def kernel_path(library: str, weight, rows: int) -> str:
    fn = ctypes.CDLL(library).MgvqCudaKernelPath
    i64, p64 = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [i64, i64, i64, p64, p64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_char_p
    bounds = (ctypes.c_int64 * len(weight.group_bounds))(*weight.group_bounds)
    bits = (ctypes.c_int64 * len(weight.groups))(*[g.bits for g in weight.groups])
    return fn(weight.in_features, weight.out_features, weight.vector_dim, bounds, bits, len(weight.groups),
              weight.scale_group_size, rows, 0).decode()


# Beyond the CPU op's cases: every (d, bits) of the fast kernel, rows that end mid-chunk, M up to 300.
GPU_CASES = CASES + [
    (48, 4096, 4, [0, 4096], [2], True, 128, False, (1,)),
    (65, 1000, 2, [0, 200, 520, 1000], [1, 2, 4], True, 40, True, (2, 150)),
    (29, 776, 8, [0, 264, 776], [1, 2], True, 8, True, (16,)),
    (100, 1536, 4, [0, 512, 1024, 1536], [3, 4, 1], True, 64, True, (1,)),
    (77, 96, 2, [0, 96], [3], False, 0, False, (300,)),
]


@needs_gpu
@pytest.mark.parametrize("m,n,d,bounds,bits,perm,scale_group,with_bias,batch", GPU_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("path", ["auto", "generic"])
def test_cuda_op_equals_reference(cuda_library, monkeypatch, m, n, d, bounds, bits, perm, scale_group, with_bias,
                                  batch, dtype, path):
    rng = np.random.default_rng(m * 1000 + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=perm, scale_group=scale_group)
    bias = (nonzero_normal(rng, (m,)) * 0.1).astype(dtype) if with_bias else None
    x = nonzero_normal(rng, (*batch, n)).astype(dtype)
    onnx_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    session = cuda_session(custom_model(weight, batch, onnx_type, bias), cuda_library, path, monkeypatch)
    y = run_on_device(session, x, (*batch, m))
    assert y.dtype == dtype and y.shape == (*batch, m) and np.isfinite(y).all()
    ref = vqgemm_reference(x.astype(np.float32), weight, bias)
    assert rel_err(y, ref) < (1e-5 if dtype == np.float32 else 2e-3)


@needs_gpu
def test_fast_kernel_is_chosen_for_compiled_layouts(cuda_library):
    rng = np.random.default_rng(0)
    for d, bits in [(4, [2]), (4, [3]), (4, [4]), (2, [2]), (8, [1]), (8, [2])]:
        weight = random_weight(rng, 64, 4096, d, [0, 4096], bits, perm=True, scale_group=128)
        assert kernel_path(cuda_library, weight, 1) == "fast"
        assert kernel_path(cuda_library, weight, 16) == "fast"
    cut = random_weight(rng, 9, 20, 4, [0, 20], [3], perm=False, scale_group=5)  # scale blocks cut vectors
    assert kernel_path(cuda_library, cut, 1) == "generic"


@needs_gpu
def test_cuda_op_is_deterministic_and_matches_the_cpu_kernel(cuda_library, ops_library, monkeypatch):
    if ops_library is None:
        pytest.skip("the CPU library could not be built here")
    rng = np.random.default_rng(5)
    weight = random_weight(rng, 300, 512, 4, [0, 256, 512], [2, 3], perm=True, scale_group=64)
    model = custom_model(weight, (4,), TensorProto.FLOAT, None)
    x = nonzero_normal(rng, (4, 512)).astype(np.float32)
    session = cuda_session(model, cuda_library, "auto", monkeypatch)
    first = run_on_device(session, x, (4, 300))
    np.testing.assert_array_equal(first, run_on_device(session, x, (4, 300)))
    monkeypatch.setenv(runtime.LIBRARY_ENV, ops_library)
    (cpu,) = runtime.create_session(model).run(None, {"x": x})
    assert rel_err(first, cpu.astype(np.float64)) < 1e-5


@needs_gpu
def test_create_session_with_the_cuda_provider(cuda_library, monkeypatch):
    monkeypatch.setenv(runtime.CUDA_LIBRARY_ENV, cuda_library)
    rng = np.random.default_rng(9)
    weight = random_weight(rng, 40, 64, 4, [0, 64], [2], perm=True, scale_group=16)
    x = nonzero_normal(rng, (2, 64)).astype(np.float16)
    session = runtime.create_session(custom_model(weight, (2,), TensorProto.FLOAT16, None),
                                     providers=[CUDA, "CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    assert rel_err(y, vqgemm_reference(x.astype(np.float32), weight)) < 2e-3


@needs_gpu
def test_bad_inputs_are_reported_on_cuda(cuda_library, monkeypatch):
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    weight = random_weight(rng, 8, 16, 4, [0, 16], [2], perm=False)
    model = onnx.load_from_string(custom_model(weight, (2,), TensorProto.FLOAT, None))
    codes = model.graph.initializer[1]
    assert codes.name == "codes"
    codes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(codes)[:-1], "codes"))
    session = cuda_session(model.SerializeToString(), cuda_library, "auto", monkeypatch)
    with pytest.raises(Exception, match="codes has the wrong shape"):
        session.run(None, {"x": np.ones((2, 16), np.float32)})
