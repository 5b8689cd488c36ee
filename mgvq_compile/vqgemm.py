"""The VQ-GEMM contract: a quantized linear weight, its reference decode, and its ONNX forms.

A quantized weight W (m x n, y = x W^T) is stored as:
- ``perm`` (int32 [n], optional): permuted column j is original column perm[j];
- groups of contiguous permuted columns [start, stop), each with its own bit width b per weight (a
  multiple of 1/d, so that a vector's code is b*d whole bits) and a codebook of 2^(b*d) codewords of d
  values (float16); every row of a group is cut into vectors of d consecutive permuted columns, each
  replaced by a code (an index into the group's codebook);
- the codes of each group packed row-major at exactly b*d bits per vector
  (:mod:`mgvq_compile.algorithms.packing`), groups concatenated, each starting on a byte;
- ``scales`` (float16 [m, n / scale_group_size], optional): multiply permuted column blocks of
  ``scale_group_size`` columns of each row.

Decode: W_perm[:, g] = codebook_g[codes_g] ; W_perm *= scales ; W[:, perm] = W_perm.
The node's ``group_bits`` attribute holds b per group when every b is whole; otherwise
``group_code_bits`` holds b*d per group instead.
The custom node ``mgvq.VQGemm`` computes Y = X W^T (+ bias) from exactly these arrays; the
decomposed form rebuilds W^T with standard ONNX ops, which stock ORT runs (and folds at load).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from mgvq_compile.algorithms.packing import code_width, pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "CUSTOM_DOMAIN",
    "CUSTOM_OP",
    "VQGroup",
    "VQWeight",
    "vqgemm_reference",
    "decode_from_stored",
    "emit_decomposed_weight",
    "emit_custom_node",
]

CUSTOM_DOMAIN = "mgvq"
CUSTOM_OP = "VQGemm"


@dataclasses.dataclass(frozen=True)
class VQGroup:
    """One channel group: permuted columns [start, stop), b bits per weight, its codebook and codes."""

    start: int
    stop: int
    bits: int | float  # per weight: bits * d is whole
    codebook: np.ndarray  # float16 [2^(bits*d), d]
    codes: np.ndarray  # int64 [m, (stop - start) / d]

    @property
    def width(self) -> int:
        return self.stop - self.start

    def code_bits(self, d: int) -> int:
        """b*d, the bits of one vector's code."""
        return code_width(self.bits, d)


@dataclasses.dataclass(frozen=True)
class VQWeight:
    """A quantized m x n weight in the VQ-GEMM layout (see the module docstring)."""

    out_features: int
    in_features: int
    vector_dim: int
    groups: tuple[VQGroup, ...]
    perm: np.ndarray | None = None  # int32 [n]
    scales: np.ndarray | None = None  # float16 [m, n / scale_group_size]
    scale_group_size: int = 0

    def __post_init__(self) -> None:
        d = self.vector_dim
        bounds = [g.start for g in self.groups] + [self.groups[-1].stop]
        if bounds[0] != 0 or bounds[-1] != self.in_features or any(
            a >= b for a, b in zip(bounds, bounds[1:])
        ):
            raise ValueError(f"group bounds {bounds} do not tile 0..{self.in_features}")
        for g in self.groups:
            if g.width % d:
                raise ValueError(f"group width {g.width} is not a multiple of d={d}")
            k = 1 << g.code_bits(d)
            if g.codebook.shape != (k, d) or g.codebook.dtype != np.float16:
                raise ValueError(f"codebook of a {g.bits}-bit group must be float16 [{k}, {d}]")
            if g.codes.shape != (self.out_features, g.width // d):
                raise ValueError(f"codes shape {g.codes.shape} != {(self.out_features, g.width // d)}")
        if self.scales is not None:
            if self.scale_group_size <= 0 or self.in_features % self.scale_group_size:
                raise ValueError("scale_group_size must divide in_features")
            expected = (self.out_features, self.in_features // self.scale_group_size)
            if self.scales.shape != expected or self.scales.dtype != np.float16:
                raise ValueError(f"scales must be float16 {expected}")

    @property
    def group_bounds(self) -> list[int]:
        return [g.start for g in self.groups] + [self.in_features]

    def packed_codes(self) -> np.ndarray:
        """All groups' codes packed at b*d bits per vector, each group starting on a byte."""
        parts = [pack_codes(g.codes, g.code_bits(self.vector_dim)) for g in self.groups]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def codebooks(self) -> np.ndarray:
        return np.concatenate([g.codebook for g in self.groups], axis=0)

    def stored_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that are written to the model, by role."""
        arrays = {"codebooks": self.codebooks(), "codes": self.packed_codes()}
        if self.perm is not None:
            arrays["perm"] = self.perm
        if self.scales is not None:
            arrays["scales"] = self.scales
        return arrays

    def stored_nbytes(self) -> int:
        return sum(a.nbytes for a in self.stored_arrays().values())

    def index_nbytes(self) -> int:
        d = self.vector_dim
        return sum(packed_nbytes(g.codes.size, g.code_bits(d)) for g in self.groups)

    def dequantize(self) -> np.ndarray:
        """W (float32 [m, n], original column order) exactly as every VQ-GEMM implementation decodes it."""
        m = self.out_features
        permuted = np.empty((m, self.in_features), dtype=np.float32)
        for g in self.groups:
            permuted[:, g.start : g.stop] = g.codebook.astype(np.float32)[g.codes].reshape(m, g.width)
        if self.scales is not None:
            permuted *= np.repeat(self.scales.astype(np.float32), self.scale_group_size, axis=1)
        if self.perm is None:
            return permuted
        weight = np.empty_like(permuted)
        weight[:, self.perm] = permuted
        return weight

    def node_attributes(self) -> dict[str, object]:
        whole = all(float(g.bits).is_integer() for g in self.groups)
        widths = ({"group_bits": [int(g.bits) for g in self.groups]} if whole
                  else {"group_code_bits": [g.code_bits(self.vector_dim) for g in self.groups]})
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_dim": self.vector_dim,
            "group_bounds": self.group_bounds,
            **widths,
            "scale_group_size": self.scale_group_size,
        }


def decode_from_stored(
    attributes: dict[str, object],
    codebooks: np.ndarray,
    codes: np.ndarray,
    perm: np.ndarray | None,
    scales: np.ndarray | None,
) -> np.ndarray:
    """Rebuild W [m, n] from a VQGemm node's attributes and stored arrays (the reference decode)."""
    m = int(attributes["out_features"])
    n = int(attributes["in_features"])
    d = int(attributes["vector_dim"])
    bounds = [int(b) for b in attributes["group_bounds"]]
    if attributes.get("group_code_bits"):  # written instead of group_bits when a width is fractional
        code_widths = [int(c) for c in attributes["group_code_bits"]]
    else:
        code_widths = [int(b) * d for b in attributes["group_bits"]]
    groups = []
    codebook_offset = code_offset = 0
    for (start, stop), code in zip(zip(bounds, bounds[1:]), code_widths):
        count = m * (stop - start) // d
        nbytes = packed_nbytes(count, code)
        group_codes = unpack_codes(codes[code_offset : code_offset + nbytes], code, count)
        k = 1 << code
        bits = code // d if code % d == 0 else code / d
        groups.append(
            VQGroup(start, stop, bits, codebooks[codebook_offset : codebook_offset + k], group_codes.reshape(m, -1))
        )
        codebook_offset += k
        code_offset += nbytes
    if code_offset != codes.size or codebook_offset != codebooks.shape[0]:
        raise ValueError("stored arrays do not match the node's group layout")
    weight = VQWeight(m, n, d, tuple(groups), perm, scales, int(attributes.get("scale_group_size", 0)))
    return weight.dequantize()


def vqgemm_reference(
    x: np.ndarray, weight: VQWeight, bias: np.ndarray | None = None
) -> np.ndarray:
    """Y = X W^T (+ bias) for X of shape [..., n], computed in float32 (the numpy reference)."""
    y = np.asarray(x, dtype=np.float32) @ weight.dequantize().T
    return y if bias is None else y + bias.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ONNX emission


class _Builder:
    """Appends nodes before an anchor node and registers initializers, with deterministic names."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str, opset: int):
        self.graph = graph
        self.anchor = anchor
        self.prefix = prefix
        self.opset = opset
        self.count = 0

    def constant(self, role: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{self.prefix}.{role}", const_value=ir.tensor(array, name=f"{self.prefix}.{role}"))
        value.shape = ir.Shape(array.shape)
        value.dtype = value.const_value.dtype
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attributes: object) -> ir.Value:
        self.count += 1
        node = ir.node(
            op_type, list(inputs), attributes or None, name=f"{self.prefix}/{op_type}_{self.count}"
        )
        node.outputs[0].name = f"{self.prefix}/{op_type}_{self.count}_out"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]


def _unpack_decomposed(b: _Builder, packed: ir.Value, bits: int, count: int, tag: str) -> ir.Value:
    """Standard-op unpacking of ``count`` codes of ``bits`` bits from a byte stream -> int64 [count]."""
    byte_values = b.op("Cast", [packed], to=ir.DataType.INT32)
    bytes_col = b.op("Unsqueeze", [byte_values, b.constant(f"{tag}.axis1", np.array([1], np.int64))])
    place = b.constant(f"{tag}.bit_place", (1 << np.arange(8, dtype=np.int32)).astype(np.int32))
    shifted = b.op("Div", [bytes_col, place])
    bits_matrix = b.op("Mod", [shifted, b.constant(f"{tag}.two", np.array(2, np.int32))])
    stream = b.op("Reshape", [bits_matrix, b.constant(f"{tag}.flat", np.array([-1], np.int64))])
    used = b.op(
        "Slice",
        [stream, b.constant(f"{tag}.zero", np.array([0], np.int64)), b.constant(f"{tag}.used", np.array([count * bits], np.int64))],
    )
    per_code = b.op("Reshape", [used, b.constant(f"{tag}.code_shape", np.array([count, bits], np.int64))])
    weighted = b.op("Mul", [per_code, b.constant(f"{tag}.code_place", (1 << np.arange(bits, dtype=np.int64)).astype(np.int32))])
    axes = np.array([1], np.int64)
    if b.opset >= 13:
        summed = b.op("ReduceSum", [weighted, b.constant(f"{tag}.sum_axes", axes)], keepdims=0)
    else:
        summed = b.op("ReduceSum", [weighted], axes=[1], keepdims=0)
    return b.op("Cast", [summed], to=ir.DataType.INT64)


def emit_decomposed_weight(
    graph: ir.Graph, anchor: ir.Node, prefix: str, weight: VQWeight, opset: int, transpose: bool
) -> tuple[ir.Value, dict[str, ir.Value]]:
    """Insert standard ops before ``anchor`` that rebuild W (or W^T if ``transpose``) as float32.

    Returns the value of the rebuilt weight and the initializers that store the quantized weight.
    """
    b = _Builder(graph, anchor, prefix, opset)
    m, d = weight.out_features, weight.vector_dim
    stored = {role: b.constant(role, array) for role, array in weight.stored_arrays().items()}
    codebooks = b.op("Cast", [stored["codebooks"]], to=ir.DataType.FLOAT)
    columns = []
    codebook_offset = code_offset = 0
    for index, g in enumerate(weight.groups):
        tag = f"g{index}"
        count = g.codes.size
        nbytes = packed_nbytes(count, g.code_bits(d))
        group_bytes = b.op(
            "Slice",
            [
                stored["codes"],
                b.constant(f"{tag}.byte_start", np.array([code_offset], np.int64)),
                b.constant(f"{tag}.byte_stop", np.array([code_offset + nbytes], np.int64)),
            ],
        )
        codes = _unpack_decomposed(b, group_bytes, g.code_bits(d), count, tag)
        if codebook_offset:
            codes = b.op("Add", [codes, b.constant(f"{tag}.codebook_offset", np.array(codebook_offset, np.int64))])
        vectors = b.op("Gather", [codebooks, codes], axis=0)
        columns.append(b.op("Reshape", [vectors, b.constant(f"{tag}.shape", np.array([m, g.width], np.int64))]))
        codebook_offset += g.codebook.shape[0]
        code_offset += nbytes
    permuted = columns[0] if len(columns) == 1 else b.op("Concat", columns, axis=1)
    if weight.scales is not None:
        s = weight.scale_group_size
        blocks = b.op("Reshape", [permuted, b.constant("blocks", np.array([m, weight.in_features // s, s], np.int64))])
        scales = b.op("Cast", [stored["scales"]], to=ir.DataType.FLOAT)
        scale_col = b.op("Unsqueeze", [scales, b.constant("axis2", np.array([2], np.int64))])
        scaled = b.op("Mul", [blocks, scale_col])
        permuted = b.op("Reshape", [scaled, b.constant("dense_shape", np.array([m, weight.in_features], np.int64))])
    dense = permuted
    if weight.perm is not None:
        inverse = np.argsort(weight.perm).astype(np.int64)
        dense = b.op("Gather", [permuted, b.constant("inverse_perm", inverse)], axis=1)
    if transpose:
        dense = b.op("Transpose", [dense], perm=[1, 0])
    return dense, stored


def emit_custom_node(
    graph: ir.Graph,
    anchor: ir.Node,
    prefix: str,
    weight: VQWeight,
    x: ir.Value,
    bias: ir.Value | None,
    output: ir.Value,
) -> tuple[ir.Node, dict[str, ir.Value]]:
    """Insert a ``mgvq.VQGemm`` node computing ``output`` = x W^T (+ bias) before ``anchor``."""
    b = _Builder(graph, anchor, prefix, opset=0)
    stored = {role: b.constant(role, array) for role, array in weight.stored_arrays().items()}
    inputs = [x, stored.get("perm"), stored["codebooks"], stored["codes"], stored.get("scales"), bias]
    while inputs and inputs[-1] is None:
        inputs.pop()
    node = ir.Node(
        CUSTOM_DOMAIN,
        CUSTOM_OP,
        inputs,
        [ir.convenience.convert_attribute(k, v) for k, v in weight.node_attributes().items()],
        outputs=[output],
        name=f"{prefix}/{CUSTOM_OP}",
    )
    graph.insert_before(anchor, node)
    return node, stored
