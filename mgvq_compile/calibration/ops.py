"""Converters from ONNX ops to torch: a registry keyed by (domain, op type) and opset.

A converter is ``fn(node, inputs, opset) -> outputs``: ``inputs`` are torch tensors (None for a missing
optional input), attributes are read from ``node.attributes``, and it returns one entry per node output
(None for an output it does not compute). Converters keep each value in its ONNX dtype; shape arithmetic
stays in int64 tensors, which never need gradients. The element-wise and tensor-manipulation ops live
here, the neural-network ops in :mod:`.ops_nn`, the ``com.microsoft`` ops in :mod:`.ops_contrib`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

__all__ = [
    "Converter",
    "register_op",
    "find_converter",
    "registered_ops",
    "torch_dtype",
    "tensor_to_torch",
    "attr",
    "ints",
    "norm_axis",
]

Converter = Callable[[ir.Node, list, int], list]
_REGISTRY: dict[tuple[str, str], list[tuple[int, Converter]]] = {}

_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool, ir.DataType.UINT16: torch.uint16, ir.DataType.UINT32: torch.uint32,
    ir.DataType.UINT64: torch.uint64,
}


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def register_op(op_type: str, domain: str = "", since_version: int = 1) -> Callable[[Converter], Converter]:
    """Decorator: register a converter for ``domain::op_type`` from opset ``since_version`` on.

    For a model importing opset N of the domain, the converter with the greatest ``since_version <= N``
    is used; registering the same (op, since_version) again replaces the earlier converter.
    """

    def decorate(fn: Converter) -> Converter:
        entries = _REGISTRY.setdefault((_domain(domain), op_type), [])
        entries[:] = [e for e in entries if e[0] != since_version]
        entries.append((since_version, fn))
        entries.sort(key=lambda e: e[0])
        return fn

    return decorate


def find_converter(domain: str, op_type: str, opset: int) -> Converter | None:
    """The converter with the greatest ``since_version <= opset``, or None."""
    best = None
    for since, fn in _REGISTRY.get((_domain(domain), op_type), ()):
        if since <= opset:
            best = fn
    return best


def registered_ops() -> list[tuple[str, str, int]]:
    """Every registered ``(domain, op_type, since_version)``, sorted."""
    return sorted((d, op, since) for (d, op), entries in _REGISTRY.items() for since, _ in entries)


def torch_dtype(dtype: int | ir.DataType) -> torch.dtype:
    """The torch dtype of an ONNX data type (NotImplementedError for strings, float8, 4-bit types)."""
    try:
        return _DTYPES[ir.DataType(dtype)]
    except KeyError:
        raise NotImplementedError(f"ONNX data type {ir.DataType(dtype).name} has no torch equivalent here") from None


def tensor_to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """A constant (initializer or attribute tensor) as a new CPU torch tensor of its ONNX dtype."""
    dtype = torch_dtype(tensor.dtype)
    array = np.asarray(tensor.numpy())
    if dtype == torch.bfloat16:  # numpy holds ml_dtypes.bfloat16, which torch cannot read directly
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of ``node`` as a Python value (lists for repeated fields, str for strings)."""
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    value = attribute.value
    if isinstance(value, (ir.TensorProtocol, ir.Graph)):
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def ints(t: torch.Tensor | None) -> list[int] | None:
    """An int64 shape / axes tensor as a list of ints (None stays None)."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _opt(x: list, i: int) -> torch.Tensor | None:
    """Input ``i`` when given (missing trailing inputs and empty names are None)."""
    return x[i] if len(x) > i else None


# --- element-wise ---------------------------------------------------------------------------------------


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor], since: int = 1) -> None:
    register_op(op_type, since_version=since)(lambda node, x, opset: [fn(x[0])])


def _binary(op_type: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    register_op(op_type)(lambda node, x, opset: [fn(x[0], x[1])])


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
    "Atanh": torch.atanh, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Not": torch.logical_not, "Sign": torch.sign, "IsNaN": torch.isnan, "Identity": lambda t: t,
    "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish,
    "BitwiseNot": torch.bitwise_not,
}.items():
    _unary(_name, _fn)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)  # ONNX: the result has the base's type


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow, "MatMul": torch.matmul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor, "PRelu": lambda a, s: torch.where(a >= 0, a, a * s),
}.items():
    _binary(_name, _fn)


@register_op("Mod")
def _mod(node, x, opset):
    if attr(node, "fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


@register_op("BitShift")
def _bit_shift(node, x, opset):
    if attr(node, "direction") == "LEFT":
        return [torch.bitwise_left_shift(x[0], x[1])]
    return [torch.bitwise_right_shift(x[0], x[1])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Converter:
    def convert(node, x, opset):
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return [out]

    return convert


register_op("Max")(_variadic(torch.maximum))
register_op("Min")(_variadic(torch.minimum))
register_op("Sum")(_variadic(torch.add))


@register_op("Mean")
def _mean(node, x, opset):
    return [_variadic(torch.add)(node, x, opset)[0] / len(x)]


@register_op("IsInf", since_version=10)
def _is_inf(node, x, opset):
    data = x[0]
    pos, neg = attr(node, "detect_positive", 1), attr(node, "detect_negative", 1)
    out = torch.zeros_like(data, dtype=torch.bool)
    if pos:
        out = out | torch.isposinf(data)
    if neg:
        out = out | torch.isneginf(data)
    return [out]


@register_op("Where")
def _where(node, x, opset):
    return [torch.where(x[0], x[1], x[2])]


@register_op("Clip", since_version=1)
def _clip_attrs(node, x, opset):
    return [torch.clamp(x[0], attr(node, "min", -math.inf), attr(node, "max", math.inf))]


@register_op("Clip", since_version=11)
def _clip(node, x, opset):
    out, low, high = x[0], _opt(x, 1), _opt(x, 2)
    if low is not None:
        out = torch.maximum(out, low.to(out.dtype))
    if high is not None:
        out = torch.minimum(out, high.to(out.dtype))
    return [out]


# --- constants, types, shapes ------------------------------------------------------------------------


@register_op("Constant")
def _constant(node, x, opset):
    value = attr(node, "value")
    if value is not None:
        return [tensor_to_torch(value)]
    for name, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                        ("value_int", torch.int64), ("value_ints", torch.int64)):
        value = attr(node, name)
        if value is not None:
            return [torch.tensor(value, dtype=dtype)]
    raise NotImplementedError("Constant without a numeric value attribute (string / sparse constants)")


@register_op("ConstantOfShape")
def _constant_of_shape(node, x, opset):
    value = attr(node, "value")
    fill = tensor_to_torch(value).reshape(()) if value is not None else torch.tensor(0.0)
    return [torch.full(ints(x[0]), fill.item(), dtype=fill.dtype, device=x[0].device)]


@register_op("Cast")
def _cast(node, x, opset):
    return [x[0].to(torch_dtype(attr(node, "to")))]


@register_op("CastLike")
def _cast_like(node, x, opset):
    return [x[0].to(x[1].dtype)]


@register_op("Shape")
def _shape(node, x, opset):
    shape = torch.tensor(list(x[0].shape), dtype=torch.int64, device=x[0].device)
    return [shape[attr(node, "start", 0):attr(node, "end")]]


@register_op("Size")
def _size(node, x, opset):
    return [torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)]


@register_op("Reshape", since_version=5)
def _reshape(node, x, opset):
    shape = ints(x[1])
    if not attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@register_op("Flatten")
def _flatten(node, x, opset):
    axis = norm_axis(attr(node, "axis", 1), x[0].dim())
    return [x[0].reshape(math.prod(x[0].shape[:axis]), math.prod(x[0].shape[axis:]))]


@register_op("Transpose")
def _transpose(node, x, opset):
    perm = attr(node, "perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _axes(node, x, opset: int, input_since: int) -> list[int] | None:
    """``axes`` from the second input (opset >= input_since) or from the attribute (older opsets)."""
    if opset >= input_since:
        return ints(_opt(x, 1))
    return attr(node, "axes")


@register_op("Unsqueeze")
def _unsqueeze(node, x, opset):
    out = x[0]
    axes = _axes(node, x, opset, 13)
    rank = out.dim() + len(axes)
    for axis in sorted(norm_axis(a, rank) for a in axes):
        out = out.unsqueeze(axis)
    return [out]


@register_op("Squeeze")
def _squeeze(node, x, opset):
    axes = _axes(node, x, opset, 13)
    out = x[0]
    if axes is None:
        return [out.squeeze()]
    for axis in sorted((norm_axis(a, out.dim()) for a in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


@register_op("Concat")
def _concat(node, x, opset):
    return [torch.cat([t for t in x if t is not None], dim=attr(node, "axis"))]


@register_op("Split")
def _split(node, x, opset):
    data = x[0]
    axis = norm_axis(attr(node, "axis", 0), data.dim())
    splits = ints(_opt(x, 1)) if opset >= 13 else attr(node, "split")
    if not splits:
        count = attr(node, "num_outputs") or len(node.outputs)
        size = data.shape[axis]
        chunk = -(-size // count)
        splits = [max(0, min(chunk, size - i * chunk)) for i in range(count)]
    return list(torch.split(data, splits, dim=axis))


def _slice_axis(data: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    size = data.shape[axis]
    if step > 0:
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        return data.narrow(axis, start, max(0, end - start))[(slice(None),) * axis + (slice(None, None, step),)]
    start = max(-1, min(size - 1, start + size if start < 0 else start))
    end = max(-1, min(size - 1, end + size if end < 0 else end))
    positions = torch.arange(start, end, step, device=data.device)
    return data.index_select(axis, positions)


@register_op("Slice", since_version=1)
def _slice_attrs(node, x, opset):
    starts, ends = attr(node, "starts"), attr(node, "ends")
    axes = attr(node, "axes") or list(range(len(starts)))
    out = x[0]
    for start, end, axis in zip(starts, ends, axes):
        out = _slice_axis(out, norm_axis(axis, out.dim()), start, end, 1)
    return [out]


@register_op("Slice", since_version=10)
def _slice(node, x, opset):
    out = x[0]
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(_opt(x, 3)) or list(range(len(starts)))
    steps = ints(_opt(x, 4)) or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        out = _slice_axis(out, norm_axis(axis, out.dim()), start, end, step)
    return [out]


def _index(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of any integer dtype (uint8 codebook indices too) as int64, negatives wrapped."""
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


@register_op("Gather")
def _gather(node, x, opset):
    data = x[0]
    axis = norm_axis(attr(node, "axis", 0), data.dim())
    indices = _index(x[1], data.shape[axis])
    out = data.index_select(axis, indices.reshape(-1))
    return [out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])]


@register_op("GatherElements")
def _gather_elements(node, x, opset):
    axis = norm_axis(attr(node, "axis", 0), x[0].dim())
    return [torch.gather(x[0], axis, _index(x[1], x[0].shape[axis]))]


@register_op("GatherND")
def _gather_nd(node, x, opset):
    data, indices = x[0], x[1].to(torch.int64)
    batch = attr(node, "batch_dims", 0)
    k = indices.shape[-1]
    batch_shape = data.shape[:batch]
    nb = math.prod(batch_shape)
    flat_data = data.reshape((nb,) + data.shape[batch:])
    flat_idx = indices.reshape(nb, -1, k)
    batch_idx = torch.arange(nb, device=data.device).reshape(nb, 1).expand(nb, flat_idx.shape[1])
    out = flat_data[(batch_idx,) + tuple(flat_idx[..., i] for i in range(k))]
    return [out.reshape(indices.shape[:-1] + data.shape[batch + k:])]


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@register_op("ScatterND")
def _scatter_nd(node, x, opset):
    data, indices, updates = x[0], x[1].to(torch.int64), x[2]
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    values = updates.reshape((flat.shape[0],) + data.shape[k:])
    reduction = attr(node, "reduction", "none")
    if reduction in ("none", "add"):
        return [data.index_put(tuple(flat[:, i] for i in range(k)), values, accumulate=reduction == "add")]
    strides = torch.tensor([math.prod(data.shape[i + 1:k]) for i in range(k)], device=data.device)
    sizes = torch.tensor(data.shape[:k], device=data.device)
    linear = (torch.where(flat < 0, flat + sizes, flat) * strides).sum(-1)
    rows = data.reshape((-1,) + data.shape[k:])
    return [rows.index_reduce(0, linear, values, _REDUCE[reduction].replace("sum", "add"), include_self=True)
            .reshape(data.shape)]


@register_op("ScatterElements")
def _scatter_elements(node, x, opset):
    axis = norm_axis(attr(node, "axis", 0), x[0].dim())
    index = _index(x[1], x[0].shape[axis])
    reduction = attr(node, "reduction", "none")
    if reduction == "none":
        return [x[0].scatter(axis, index, x[2])]
    return [x[0].scatter_reduce(axis, index, x[2], _REDUCE[reduction], include_self=True)]


@register_op("Expand")
def _expand(node, x, opset):
    shape, data = ints(x[1]), x[0]
    rank = max(len(shape), data.dim())
    shape = [1] * (rank - len(shape)) + shape
    data = data.reshape([1] * (rank - data.dim()) + list(data.shape))
    return [data.expand([d if s == 1 else s for s, d in zip(shape, data.shape)])]


@register_op("Tile")
def _tile(node, x, opset):
    return [x[0].repeat(*ints(x[1]))]


@register_op("Range")
def _range(node, x, opset):
    start, limit, delta = (t.item() for t in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)]


@register_op("Trilu")
def _trilu(node, x, opset):
    k = int(x[1].item()) if _opt(x, 1) is not None else 0
    return [torch.triu(x[0], k) if attr(node, "upper", 1) else torch.tril(x[0], k)]


@register_op("CumSum")
def _cumsum(node, x, opset):
    axis = int(x[1].item())
    data = x[0].flip(axis) if attr(node, "reverse", 0) else x[0]
    out = torch.cumsum(data, axis).to(data.dtype)
    if attr(node, "exclusive", 0):
        out = out - data
    return [out.flip(axis) if attr(node, "reverse", 0) else out]


@register_op("NonZero")
def _nonzero(node, x, opset):
    return [torch.nonzero(x[0]).T.contiguous()]


@register_op("Compress")
def _compress(node, x, opset):
    keep = torch.nonzero(x[1].to(torch.bool)).reshape(-1)
    axis = attr(node, "axis")
    if axis is None:
        return [x[0].reshape(-1).index_select(0, keep[keep < x[0].numel()])]
    axis = norm_axis(axis, x[0].dim())
    return [x[0].index_select(axis, keep[keep < x[0].shape[axis]])]


@register_op("EyeLike")
def _eye_like(node, x, opset):
    dtype = torch_dtype(attr(node, "dtype")) if attr(node, "dtype") is not None else x[0].dtype
    rows, cols = x[0].shape
    i = torch.arange(rows, device=x[0].device).reshape(-1, 1)
    j = torch.arange(cols, device=x[0].device).reshape(1, -1)
    return [(j - i == attr(node, "k", 0)).to(dtype)]


def _arg_reduce(reduce: Callable[..., torch.Tensor]) -> Converter:
    """ArgMax / ArgMin, with ONNX's select_last_index (ties resolved to the last position)."""

    def convert(node, x, opset):
        data, axis, keep = x[0], attr(node, "axis", 0), bool(attr(node, "keepdims", 1))
        if attr(node, "select_last_index", 0):
            axis = norm_axis(axis, data.dim())
            idx = reduce(data.flip(axis), dim=axis, keepdim=keep)
            return [data.shape[axis] - 1 - idx]
        return [reduce(data, dim=axis, keepdim=keep)]

    return convert


register_op("ArgMax")(_arg_reduce(torch.argmax))
register_op("ArgMin")(_arg_reduce(torch.argmin))


_REDUCTIONS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceSum": lambda t, a, k: t.sum(dim=a, keepdim=k),
    "ReduceMean": lambda t, a, k: t.mean(dim=a, keepdim=k),
    "ReduceMax": lambda t, a, k: t.amax(dim=a, keepdim=k),
    "ReduceMin": lambda t, a, k: t.amin(dim=a, keepdim=k),
    "ReduceProd": lambda t, a, k: _prod(t, a, k),
    "ReduceL1": lambda t, a, k: t.abs().sum(dim=a, keepdim=k),
    "ReduceL2": lambda t, a, k: torch.sqrt((t * t).sum(dim=a, keepdim=k)),
    "ReduceSumSquare": lambda t, a, k: (t * t).sum(dim=a, keepdim=k),
    "ReduceLogSum": lambda t, a, k: torch.log(t.sum(dim=a, keepdim=k)),
    "ReduceLogSumExp": lambda t, a, k: torch.logsumexp(t, dim=a, keepdim=k),
}


def _prod(t: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for axis in sorted((norm_axis(a, t.dim()) for a in axes), reverse=True):
        t = t.prod(dim=axis, keepdim=keep)
    return t


def _reduce(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor], input_since: int) -> Converter:
    def convert(node, x, opset):
        data = x[0]
        axes = ints(_opt(x, 1)) if opset >= input_since else attr(node, "axes")
        if not axes:
            if opset >= input_since and attr(node, "noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.dim()))
        if data.dim() == 0:
            return [data]
        return [fn(data, axes, bool(attr(node, "keepdims", 1)))]

    return convert


for _op, _fn in _REDUCTIONS.items():
    register_op(_op)(_reduce(_fn, 10**9))  # axes as an attribute before the opset that made it an input
    register_op(_op, since_version=13 if _op == "ReduceSum" else 18)(_reduce(_fn, 13 if _op == "ReduceSum" else 18))


@register_op("TopK", since_version=10)
def _topk(node, x, opset):
    k = int(x[1].reshape(-1)[0])
    values, indices = torch.topk(x[0], k, dim=attr(node, "axis", -1), largest=bool(attr(node, "largest", 1)),
                                 sorted=True)
    return [values, indices]


@register_op("OneHot")
def _one_hot(node, x, opset):
    depth = int(x[1].reshape(-1)[0])
    off, on = x[2][0], x[2][1]
    hot = F.one_hot(_index(x[0], depth), depth).to(x[2].dtype)
    out = hot * (on - off) + off
    axis = attr(node, "axis", -1)
    return [out if axis == -1 else out.movedim(-1, norm_axis(axis, out.dim()))]


@register_op("Einsum")
def _einsum(node, x, opset):
    return [torch.einsum(attr(node, "equation"), *x)]


@register_op("DepthToSpace")
def _depth_to_space(node, x, opset):
    b = attr(node, "blocksize")
    n, c, h, w = x[0].shape
    if attr(node, "mode", "DCR") == "DCR":
        t = x[0].reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        t = x[0].reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [t.reshape(n, c // (b * b), h * b, w * b)]


@register_op("SpaceToDepth")
def _space_to_depth(node, x, opset):
    b = attr(node, "blocksize")
    n, c, h, w = x[0].shape
    t = x[0].reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [t.reshape(n, c * b * b, h // b, w // b)]


@register_op("DequantizeLinear", since_version=10)
def _dequantize_linear(node, x, opset):
    data, scale, zero = x[0], x[1], _opt(x, 2)
    scale, zero = _quant_broadcast(node, data, scale), _quant_broadcast(node, data, zero)
    out = data.to(torch.float32) if zero is None else data.to(torch.float32) - zero.to(torch.float32)
    return [(out * scale.to(torch.float32)).to(scale.dtype)]


@register_op("QuantizeLinear", since_version=10)
def _quantize_linear(node, x, opset):
    data, scale, zero = x[0], x[1], _opt(x, 2)
    scale, zero = _quant_broadcast(node, data, scale), _quant_broadcast(node, data, zero)
    dtype = zero.dtype if zero is not None else torch_dtype(attr(node, "output_dtype", 0) or ir.DataType.UINT8)
    info = torch.iinfo(dtype)
    q = torch.round(data.to(torch.float32) / scale.to(torch.float32))
    if zero is not None:
        q = q + zero.to(torch.float32)
    return [q.clamp(info.min, info.max).to(dtype)]


def _quant_broadcast(node: ir.Node, data: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """Per-tensor, per-axis or blocked scale / zero point, broadcast against ``data``."""
    if t is None or t.dim() == 0 or t.numel() == 1:
        return None if t is None else t.reshape(())
    axis = norm_axis(attr(node, "axis", 1), data.dim())
    block = attr(node, "block_size", 0)
    if block:
        return t.repeat_interleave(block, dim=axis).narrow(axis, 0, data.shape[axis])
    return t.reshape([-1 if i == axis else 1 for i in range(data.dim())])


# Registers the remaining converters (imported for their side effect).
from mgvq_compile.calibration import ops_contrib as _ops_contrib  # noqa: E402,F401
from mgvq_compile.calibration import ops_nn as _ops_nn  # noqa: E402,F401
from mgvq_compile.calibration import ops_vq as _ops_vq  # noqa: E402,F401
