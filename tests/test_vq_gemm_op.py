"""The C++ CPU kernel of mgvq.VQGemm in ORT equals the numpy reference and the decomposed ONNX form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mgvq_compile import runtime
from mgvq_compile.errors import MgvqError
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, CUSTOM_OP, VQWeight, emit_decomposed_weight, vqgemm_reference
from test_vqgemm import random_weight
from vq_helpers import rel_err


@pytest.fixture()
def library(ops_library) -> str:
    """The library conftest built for the session; these kernel tests skip where it could not be built."""
    if ops_library is None:
        pytest.skip("mgvq custom-op library could not be built; run python custom_ops/build.py")
    return ops_library


@pytest.fixture()
def session_for(library, monkeypatch):
    def make(model: bytes | Path, *, path: str = "auto", isa: str = "auto", threads: int = 2,
             piece: int = 0, tile_rows: str = "") -> ort.InferenceSession:
        monkeypatch.setenv(runtime.LIBRARY_ENV, library)
        # Read when the kernel is created: forced path, instruction set, table slice size, most
        # activation rows for the 16-output-row tile kernel ("" = its default, "0" = never).
        monkeypatch.setenv("MGVQ_VQGEMM_PATH", path)
        monkeypatch.setenv("MGVQ_VQGEMM_ISA", isa)
        monkeypatch.setenv("MGVQ_VQGEMM_PIECE", str(piece))
        monkeypatch.setenv("MGVQ_VQGEMM_TILE_ROWS", tile_rows)
        return runtime.create_session(model, threads=threads)

    return make


def custom_model(weight: VQWeight, batch_shape: tuple[int, ...], dtype: int, bias: np.ndarray | None) -> bytes:
    arrays = weight.stored_arrays()
    inits = [numpy_helper.from_array(array, role) for role, array in arrays.items()]
    names = ["x", "perm" if "perm" in arrays else "", "codebooks", "codes", "scales" if "scales" in arrays else ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    while not names[-1]:
        names.pop()
    node = helper.make_node(CUSTOM_OP, names, ["y"], domain=CUSTOM_DOMAIN, name="vq", **weight.node_attributes())
    n, m = weight.in_features, weight.out_features
    graph = helper.make_graph(
        [node], "vq", [helper.make_tensor_value_info("x", dtype, [*batch_shape, n])],
        [helper.make_tensor_value_info("y", dtype, [*batch_shape, m])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    model.ir_version = 10
    return model.SerializeToString()


def decomposed_model(weight: VQWeight, batch_shape: tuple[int, ...], bias: np.ndarray | None) -> bytes:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([*batch_shape, weight.in_features]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    matmul = ir.node("MatMul", [x, ir.Value(name="placeholder")], name="mm")
    graph.append(matmul)
    out = matmul.outputs[0]
    if bias is not None:
        b = ir.Value(name="bias", const_value=ir.tensor(bias, name="bias"))
        graph.register_initializer(b)
        add = ir.node("Add", [out, b], name="add")
        graph.append(add)
        out = add.outputs[0]
    out.name, out.dtype = "y", ir.DataType.FLOAT
    graph.outputs.append(out)
    dense_t, _ = emit_decomposed_weight(graph, matmul, "w", weight, 18, transpose=True)
    matmul.replace_input_with(1, dense_t)
    return ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()



def nonzero_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 1e-3, 0.5, x)


# m, n, d, group bounds, group bits, perm, scale_group_size, bias, batch shape
CASES = [
    (64, 64, 4, [0, 64], [2], True, 0, False, (1,)),
    (33, 48, 4, [0, 16, 48], [2, 1], True, 8, True, (3, 5)),
    (17, 24, 2, [0, 4, 10, 24], [1, 3, 4], True, 6, True, (7,)),
    (40, 32, 8, [0, 16, 32], [1, 2], False, 0, True, (2, 1, 3)),
    (9, 20, 4, [0, 20], [3], False, 5, False, (300,)),  # scale blocks cut vectors in two
    (50, 40, 4, [0, 8, 40], [4, 2], True, 20, False, (2, 150)),
    (31, 30, 2, [0, 30], [2], True, 0, True, (1,)),
    (70, 96, 4, [0, 32, 64, 96], [1, 2, 3], True, 32, True, (4, 11)),
    (5, 16, 8, [0, 16], [2], True, 16, False, (13,)),
    # layouts the register-codebook path takes (codes of at most 6 bits, d in {1, 2, 4})
    (64, 128, 2, [0, 128], [2], True, 0, False, (1,)),
    (29, 70, 2, [0, 6, 40, 70], [1, 2, 3], True, 0, True, (3,)),  # 3-bit codes at odd bit offsets
    (19, 62, 1, [0, 30, 62], [6, 4], True, 0, False, (2, 3)),
    (21, 36, 4, [0, 36], [1], False, 12, True, (9,)),
    (33, 66, 2, [0, 2, 66], [2, 3], True, 6, True, (40,)),  # more rows than one call takes
    # fractional bits per weight (group_code_bits): 7- and 9-bit codes at d = 4, 6-bit ones on the
    # register path, 3- and 5-bit codes at d = 2
    (37, 64, 4, [0, 32, 64], [1.75, 2.25], True, 0, True, (3,)),
    (20, 48, 4, [0, 16, 48], [1.5, 2], True, 8, False, (5,)),
    (25, 60, 2, [0, 20, 60], [1.5, 2.5], True, 0, True, (2, 40)),
]


@pytest.mark.parametrize("m,n,d,bounds,bits,perm,scale_group,with_bias,batch", CASES)
@pytest.mark.parametrize("path", ["auto", "register", "gather", "lut", "decode"])
def test_custom_op_equals_reference_and_decomposed(session_for, m, n, d, bounds, bits, perm, scale_group,
                                                   with_bias, batch, path):
    rng = np.random.default_rng(m * 1000 + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=perm, scale_group=scale_group)
    bias = nonzero_normal(rng, (m,)).astype(np.float32) if with_bias else None
    x = nonzero_normal(rng, (*batch, n)).astype(np.float32)
    (y,) = session_for(custom_model(weight, batch, TensorProto.FLOAT, bias), path=path).run(None, {"x": x})
    assert y.shape == (*batch, m) and y.dtype == np.float32
    ref = vqgemm_reference(x, weight, bias)
    assert rel_err(y, ref) < 1e-5
    (y_dec,) = ort.InferenceSession(decomposed_model(weight, batch, bias)).run(None, {"x": x})
    assert rel_err(y, y_dec) < 1e-5


@pytest.mark.parametrize("path", ["gather", "lut", "decode"])
def test_portable_path_equals_vectorised_path(session_for, path):
    rng = np.random.default_rng(7)
    weight = random_weight(rng, 37, 72, 4, [0, 40, 72], [2, 3], perm=True, scale_group=8)
    model = custom_model(weight, (3, 4), TensorProto.FLOAT, None)
    x = nonzero_normal(rng, (3, 4, 72)).astype(np.float32)
    (fast,) = session_for(model, path=path).run(None, {"x": x})
    (portable,) = session_for(model, path=path, isa="portable").run(None, {"x": x})
    assert rel_err(portable, vqgemm_reference(x, weight)) < 1e-5
    assert rel_err(fast, portable) < 1e-6


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("m,n,d,bounds,bits,scale_group,batch", [
    (64, 128, 2, [0, 128], [2], 0, (1,)),
    (29, 70, 2, [0, 6, 40, 70], [1, 2, 3], 10, (5,)),
    (19, 62, 1, [0, 30, 62], [6, 5], 0, (3, 2)),
    (21, 36, 4, [0, 36], [1], 12, (4,)),
    (23, 64, 1, [0, 32, 64], [8, 3], 0, (3,)),  # 8-bit codes at d = 1: tables of 256 per position
])
def test_register_path_on_every_instruction_set(session_for, isa, m, n, d, bounds, bits, scale_group, batch):
    # A level the CPU lacks falls back to the next one down, so this passes (and checks) on any x86-64.
    rng = np.random.default_rng(m + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=True, scale_group=scale_group)
    bias = nonzero_normal(rng, (m,)).astype(np.float32)
    x = nonzero_normal(rng, (*batch, n)).astype(np.float32)
    session = session_for(custom_model(weight, batch, TensorProto.FLOAT, bias), path="register", isa=isa)
    assert rel_err(session.run(None, {"x": x})[0], vqgemm_reference(x, weight, bias)) < 1e-5


# Layouts for the gather kernels (codebooks too large for registers, few activation rows): d = 4 codes of
# 5 to 16 bits in rows that start on a byte (the fixed-width kernels) and rows that do not (odd vector
# counts, scale blocks of 3 vectors), more rows than one call takes, and d = 2 and 8 (portable loops).
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("m,n,d,bounds,bits,scale_group,batch", [
    (24, 256, 4, [0, 256], [1.75], 0, (1,)),
    (19, 200, 4, [0, 72, 200], [2.25, 2.75], 0, (3,)),  # 18 vectors of 9 bits: every other row off a byte
    (21, 96, 4, [0, 32, 96], [1.25, 3], 32, (9,)),
    (17, 96, 4, [0, 48, 96], [1.75, 2.5], 12, (2,)),
    (9, 64, 4, [0, 32, 64], [3.5, 4], 0, (5,)),       # 14- and 16-bit codes
    (40, 64, 4, [0, 16, 64], [1, 2], 16, (4,)),       # 4- and 8-bit codes
    (23, 64, 2, [0, 64], [3.5], 0, (2,)),
    (26, 96, 2, [0, 32, 96], [3.5, 5], 0, (3,)),       # 7- and 10-bit codes at d = 2, rows from a byte
    (11, 36, 2, [0, 36], [2.5], 6, (6,)),              # 18 vectors of 5 bits, scale blocks of 3 vectors
    (9, 64, 8, [0, 64], [1.25], 8, (3,)),
])
def test_gather_path_on_every_instruction_set(session_for, isa, m, n, d, bounds, bits, scale_group, batch):
    rng = np.random.default_rng(m * 3 + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=True, scale_group=scale_group)
    bias = nonzero_normal(rng, (m,)).astype(np.float32)
    x = nonzero_normal(rng, (*batch, n)).astype(np.float32)
    session = session_for(custom_model(weight, batch, TensorProto.FLOAT, bias), path="gather", isa=isa)
    assert rel_err(session.run(None, {"x": x})[0], vqgemm_reference(x, weight, bias)) < 1e-5


# Layers that mix codebooks of at most 64 codewords with larger ones (mgvq's 3-bit layout: d = 2, four
# groups of 4- to 8-bit codes): the register kernels take the small ones, the gather kernels the wide
# ones, next to the 8-bit groups' tables; up to 8 activation rows (4 with 8-bit codes).
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("m,n,d,bounds,bits,scale_group,batch", [
    (40, 192, 2, [0, 48, 96, 144, 192], [2, 2.5, 3, 3.5], 0, (1,)),
    (33, 200, 2, [0, 40, 104, 200], [3.5, 2.5, 6], 8, (5,)),
    (35, 160, 2, [0, 32, 96, 160], [3, 3.5, 4], 0, (3,)),   # 8-bit codes too
    (24, 128, 4, [0, 64, 128], [1.5, 2.25], 16, (2,)),
])
def test_register_path_with_wide_groups(session_for, isa, m, n, d, bounds, bits, scale_group, batch):
    rng = np.random.default_rng(m * 5 + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=True, scale_group=scale_group)
    bias = nonzero_normal(rng, (m,)).astype(np.float32)
    x = nonzero_normal(rng, (*batch, n)).astype(np.float32)
    model = custom_model(weight, batch, TensorProto.FLOAT, bias)
    ref = vqgemm_reference(x, weight, bias)
    assert rel_err(session_for(model, path="register", isa=isa).run(None, {"x": x})[0], ref) < 1e-5
    assert rel_err(session_for(model, isa=isa).run(None, {"x": x})[0], ref) < 1e-5


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 40])
def test_wide_d4_codes_on_the_default_path(session_for, batch):
    # mgvq's 2-bit default: d = 4, fractional widths, so 6- to 12-bit codes, mixed in one layer here: the
    # gather path up to 8 activation rows, the LUT or decode path beyond.
    rng = np.random.default_rng(batch + 100)
    weight = random_weight(rng, 48, 192, 4, [0, 64, 128, 192], [1.5, 2.25, 3], perm=True)
    bias = nonzero_normal(rng, (48,)).astype(np.float32)
    x = nonzero_normal(rng, (batch, 192)).astype(np.float32)
    (y,) = session_for(custom_model(weight, (batch,), TensorProto.FLOAT, bias)).run(None, {"x": x})
    assert rel_err(y, vqgemm_reference(x, weight, bias)) < 1e-5


# Layouts for the AVX-512 tile kernel (2- and 4-bit codes, rows of whole bytes, 16 output rows per
# call): full steps and tails, scale blocks, a last partial tile, 1 to 4 activation rows, and a group
# whose rows do not start on a byte (other kernels).
@pytest.mark.parametrize("m,n,d,bounds,bits,scale_group,batch", [
    (48, 600, 2, [0, 8, 264, 600], [1, 2, 1], 0, (1,)),
    (35, 480, 2, [0, 160, 480], [2, 1], 40, (3,)),
    (32, 300, 1, [0, 100, 300], [4, 2], 0, (2, 2)),
    (16, 520, 4, [0, 520], [1], 0, (1,)),
    (32, 70, 2, [0, 6, 70], [1, 2], 0, (2,)),
    (48, 256, 2, [0, 64, 128, 192, 256], [1, 2, 3, 4], 32, (3,)),  # all four widths, 8-bit codes too
])
def test_tile_kernel_equals_reference_and_the_other_kernels(session_for, m, n, d, bounds, bits, scale_group,
                                                            batch):
    rng = np.random.default_rng(m * 7 + n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=True, scale_group=scale_group)
    bias = nonzero_normal(rng, (m,)).astype(np.float32)
    x = nonzero_normal(rng, (*batch, n)).astype(np.float32)
    model = custom_model(weight, batch, TensorProto.FLOAT, bias)
    (tiled,) = session_for(model, path="register").run(None, {"x": x})
    (untiled,) = session_for(model, path="register", tile_rows="0").run(None, {"x": x})
    ref = vqgemm_reference(x, weight, bias)
    assert rel_err(tiled, ref) < 1e-5
    assert rel_err(untiled, ref) < 1e-5
    assert rel_err(tiled, untiled) < 1e-5


@pytest.mark.parametrize("isa", ["auto", "portable"])
@pytest.mark.parametrize("piece", [3, 16])
def test_lut_table_slices(session_for, isa, piece):
    rng = np.random.default_rng(piece)
    weight = random_weight(rng, 45, 200, 4, [0, 72, 200], [2, 1], perm=True, scale_group=40)
    bias = nonzero_normal(rng, (45,)).astype(np.float32)
    x = nonzero_normal(rng, (2, 9, 200)).astype(np.float32)
    session = session_for(custom_model(weight, (2, 9), TensorProto.FLOAT, bias), path="lut", isa=isa, piece=piece)
    assert rel_err(session.run(None, {"x": x})[0], vqgemm_reference(x, weight, bias)) < 1e-5


@pytest.mark.parametrize("path,d", [("lut", 4), ("decode", 4), ("register", 2), ("gather", 4)])
def test_float16_activations(session_for, path, d):
    rng = np.random.default_rng(3)
    weight = random_weight(rng, 24, 32, d, [0, 16, 32], [2, 1], perm=True, scale_group=8)
    bias = (nonzero_normal(rng, (24,)) * 0.1).astype(np.float16)
    x = nonzero_normal(rng, (5, 32)).astype(np.float16)
    (y,) = session_for(custom_model(weight, (5,), TensorProto.FLOAT16, bias), path=path).run(None, {"x": x})
    assert y.dtype == np.float16 and y.shape == (5, 24)
    assert rel_err(y, vqgemm_reference(x.astype(np.float32), weight, bias)) < 2e-3


def test_outputs_are_written_over_a_poisoned_buffer(session_for):
    rng = np.random.default_rng(11)
    weight = random_weight(rng, 20, 16, 4, [0, 16], [2], perm=True)
    x = nonzero_normal(rng, (3, 16)).astype(np.float32)
    session = session_for(custom_model(weight, (3,), TensorProto.FLOAT, None))
    poisoned = ort.OrtValue.ortvalue_from_numpy(np.full((3, 20), np.nan, np.float32))
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_ortvalue_output("y", poisoned)
    session.run_with_iobinding(binding)
    y = binding.get_outputs()[0].numpy()
    assert np.isfinite(y).all()
    assert rel_err(y, vqgemm_reference(x, weight)) < 1e-5


@pytest.mark.parametrize("path,d,bits", [("lut", 4, 2), ("register", 2, 2), ("gather", 4, 2.5), ("decode", 4, 2.5)])
def test_deterministic_across_runs_and_threads(session_for, path, d, bits):
    rng = np.random.default_rng(5)
    weight = random_weight(rng, 300, 64, d, [0, 64], [bits], perm=True, scale_group=16)
    model = custom_model(weight, (4,), TensorProto.FLOAT, None)
    x = nonzero_normal(rng, (4, 64)).astype(np.float32)
    first = session_for(model, path=path, threads=2).run(None, {"x": x})[0]
    np.testing.assert_array_equal(first, session_for(model, path=path, threads=2).run(None, {"x": x})[0])
    np.testing.assert_array_equal(first, session_for(model, path=path, threads=1).run(None, {"x": x})[0])


def test_bad_inputs_are_reported(session_for):
    rng = np.random.default_rng(1)
    weight = random_weight(rng, 8, 16, 4, [0, 16], [2], perm=False)
    model = onnx.load_from_string(custom_model(weight, (2,), TensorProto.FLOAT, None))
    codes = model.graph.initializer[1]
    assert codes.name == "codes"
    codes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(codes)[:-1], "codes"))
    session = session_for(model.SerializeToString())
    with pytest.raises(Exception, match="codes has the wrong shape"):
        session.run(None, {"x": np.ones((2, 16), np.float32)})


def test_compiled_custom_form_runs_in_ort(session_for, tmp_path):
    import mgvq_compile
    from onnx_builders import save_mlp

    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32)
    common = dict(method="kmeans-vq", bits=2, resume=False, progress=False)
    mgvq_compile.compile(str(mlp), output=tmp_path / "dec", portable=True, **common)
    mgvq_compile.compile(str(mlp), output=tmp_path / "cus", **common)  # custom op: the default
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    (y_dec,) = ort.InferenceSession(str(tmp_path / "dec" / "model.onnx")).run(None, {"x": x})
    (y_cus,) = session_for(tmp_path / "cus" / "model.onnx").run(None, {"x": x})
    assert rel_err(y_cus, y_dec) < 1e-5


def test_library_path_errors(monkeypatch, tmp_path):
    with pytest.raises(MgvqError, match="no mgvq custom-op library for device"):
        runtime.library_path("tpu")
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "missing.so"))
    monkeypatch.setattr(runtime, "_candidates", lambda device: [tmp_path / "missing.so"])
    with pytest.raises(MgvqError, match="not built") as info:
        runtime.library_path("cpu")
    assert "custom_ops/build.py" in str(info.value)


@pytest.mark.parametrize("path", ["register", "gather", "lut", "decode"])
def test_scale_group_size_without_scales_scales_nothing(session_for, path):
    rng = np.random.default_rng(2)
    weight = random_weight(rng, 32, 64, 2, [0, 64], [2], perm=True)
    model = onnx.load_from_string(custom_model(weight, (3,), TensorProto.FLOAT, None))
    node = model.graph.node[0]
    attribute = next(a for a in node.attribute if a.name == "scale_group_size")
    attribute.i = 16  # the optional scales input stays absent
    x = nonzero_normal(rng, (3, 64)).astype(np.float32)
    (y,) = session_for(model.SerializeToString(), path=path).run(None, {"x": x})
    assert rel_err(y, vqgemm_reference(x, weight)) < 1e-5


@pytest.mark.parametrize("batch", [1, 4, 5, 9])
def test_mixed_widths_with_8_bit_codes_on_the_default_path(session_for, batch):
    # mgvq's allocation mixes 1- to 4-bit groups at d = 2: the 8-bit codes of the 4-bit groups join the
    # register path up to 8 activation rows (the gather kernels), and the LUT or decode path beyond.
    rng = np.random.default_rng(batch)
    weight = random_weight(rng, 40, 192, 2, [0, 48, 96, 144, 192], [4, 1, 2, 3], perm=True)
    bias = nonzero_normal(rng, (40,)).astype(np.float32)
    x = nonzero_normal(rng, (batch, 192)).astype(np.float32)
    (y,) = session_for(custom_model(weight, (batch,), TensorProto.FLOAT, bias)).run(None, {"x": x})
    assert rel_err(y, vqgemm_reference(x, weight, bias)) < 1e-5
