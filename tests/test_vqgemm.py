"""The three forms of a VQ weight agree: numpy reference, decode from stored arrays, decomposed ONNX in ORT."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from mgvq_compile.vqgemm import VQGroup, VQWeight, decode_from_stored, emit_decomposed_weight, vqgemm_reference


def random_weight(rng, m, n, d, bounds, bits, *, perm=True, scale_group=0):
    groups = []
    for (start, stop), b in zip(zip(bounds, bounds[1:]), bits):
        k = 1 << round(b * d)
        codebook = rng.standard_normal((k, d)).astype(np.float16)
        codes = rng.integers(0, k, size=(m, (stop - start) // d))
        groups.append(VQGroup(start, stop, b, codebook, codes))
    scales = None
    if scale_group:
        scales = (rng.random((m, n // scale_group)) + 0.5).astype(np.float16)
    return VQWeight(m, n, d, tuple(groups), rng.permutation(n).astype(np.int32) if perm else None, scales, scale_group)


CASES = [
    (5, 16, 4, [0, 8, 16], [2, 1], True, 0),
    (3, 24, 2, [0, 4, 10, 24], [1, 3, 2], True, 8),
    (7, 12, 1, [0, 12], [4], False, 4),
    (4, 32, 8, [0, 16, 32], [1, 2], True, 0),
    (9, 20, 4, [0, 20], [3], False, 0),
    (6, 40, 4, [0, 16, 28, 40], [1.75, 2, 2.25], True, 4),  # fractional bits: 7-, 8- and 9-bit codes
    (5, 18, 2, [0, 6, 18], [1.5, 2.5], False, 0),
]


@pytest.mark.parametrize("m,n,d,bounds,bits,perm,scale_group", CASES)
def test_decode_and_decomposed_onnx_agree(m, n, d, bounds, bits, perm, scale_group):
    rng = np.random.default_rng(m * n)
    weight = random_weight(rng, m, n, d, bounds, bits, perm=perm, scale_group=scale_group)
    dense = weight.dequantize()
    arrays = weight.stored_arrays()
    np.testing.assert_array_equal(
        decode_from_stored(weight.node_attributes(), arrays["codebooks"], arrays["codes"], arrays.get("perm"), arrays.get("scales")),
        dense,
    )
    assert arrays["codes"].nbytes == sum((g.codes.size * round(g.bits * d) + 7) // 8 for g in weight.groups)
    # Whole widths keep the group_bits attribute; any fraction writes every group's code width instead.
    whole = all(float(b).is_integer() for b in bits)
    assert ("group_bits" in weight.node_attributes()) == whole != ("group_code_bits" in weight.node_attributes())

    # A graph Y = MatMul(X, W^T) where W^T is rebuilt by the decomposed ops.
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, n]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    placeholder = ir.Value(name="w_placeholder")
    matmul = ir.node("MatMul", [x, placeholder], name="mm")
    matmul.outputs[0].name = "y"
    matmul.outputs[0].dtype = ir.DataType.FLOAT
    graph.append(matmul)
    graph.outputs.append(matmul.outputs[0])
    dense_t, _stored = emit_decomposed_weight(graph, matmul, "w", weight, 18, transpose=True)
    matmul.replace_input_with(1, dense_t)
    model = ir.Model(graph, ir_version=10)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    xs = rng.standard_normal((2, 3, n)).astype(np.float32)
    (y,) = session.run(None, {"x": xs})
    ref = vqgemm_reference(xs, weight)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


def test_invalid_layouts_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="whole number of code bits"):
        VQWeight(2, 8, 4, (VQGroup(0, 8, 1.1, np.zeros((16, 4), np.float16), np.zeros((2, 2), np.int64)),))
    with pytest.raises(ValueError, match="multiple of d"):
        random_weight(rng, 2, 12, 4, [0, 6, 12], [1, 1])
    with pytest.raises(ValueError, match="tile"):
        VQWeight(2, 8, 4, (VQGroup(0, 4, 1, np.zeros((16, 4), np.float16), np.zeros((2, 1), np.int64)),))
