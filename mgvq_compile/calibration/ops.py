"""Converters from ONNX ops to torch, one per op type, registered per opset.

A converter takes ``(node, inputs, opset)`` (missing optional inputs are None) and returns the list of
outputs. Shape arithmetic stays in int64 tensors; float math keeps the graph's dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import onnx_ir as ir
import torch
import torch.nn.functional as F

__all__ = ["register_op", "find_converter", "torch_dtype", "Converter"]

Converter = Callable[[ir.Node, list, int], list]
_REGISTRY: dict[tuple[str, str], list[tuple[int, Converter]]] = {}

_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool, ir.DataType.UINT16: torch.uint16, ir.DataType.UINT32: torch.uint32,
    ir.DataType.UINT64: torch.uint64,
}


def torch_dtype(dtype: int | ir.DataType) -> torch.dtype:
    return _DTYPES[ir.DataType(dtype)]


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def register_op(op_type: str, domain: str = "", since_version: int = 1):
    """Register a converter for ``domain::op_type`` from opset ``since_version`` on."""

    def decorate(fn: Converter) -> Converter:
        entries = _REGISTRY.setdefault((_domain(domain), op_type), [])
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


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value
    if isinstance(value, bytes):
        return value.decode()
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    register_op(op_type)(lambda node, x, opset: [fn(x[0])])


def _binary(op_type: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    register_op(op_type)(lambda node, x, opset: [fn(x[0], x[1])])


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Sin": torch.sin, "Cos": torch.cos, "Floor": torch.floor, "Ceil": torch.ceil, "Not": torch.logical_not,
    "Sign": torch.sign, "IsNaN": torch.isnan, "Identity": lambda x: x, "Softplus": F.softplus,
    "Round": torch.round, "Atan": torch.atan, "Softsign": F.softsign,
}.items():
    _unary(_name, _fn)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": lambda a, b: torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b),
    "MatMul": torch.matmul, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
}.items():
    _binary(_name, _fn)


@register_op("Mod")
def _mod(node, x, opset):
    if _attr(node, "fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


@register_op("Max")
def _max(node, x, opset):
    out = x[0]
    for t in x[1:]:
        out = torch.maximum(out, t)
    return [out]


@register_op("Min")
def _min(node, x, opset):
    out = x[0]
    for t in x[1:]:
        out = torch.minimum(out, t)
    return [out]


@register_op("Sum")
def _sum(node, x, opset):
    out = x[0]
    for t in x[1:]:
        out = out + t
    return [out]


@register_op("Where")
def _where(node, x, opset):
    return [torch.where(x[0], x[1], x[2])]


@register_op("Constant")
def _constant(node, x, opset):
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        value = _attr(node, name)
        if value is None:
            continue
        if isinstance(value, ir.TensorProtocol):
            return [torch.from_numpy(value.numpy().copy())]
        if name.startswith("value_float"):
            return [torch.tensor(value, dtype=torch.float32)]
        return [torch.tensor(value, dtype=torch.int64)]
    raise NotImplementedError("Constant without a supported value attribute")


@register_op("ConstantOfShape")
def _constant_of_shape(node, x, opset):
    value = _attr(node, "value")
    fill = torch.from_numpy(value.numpy().copy()).reshape(()) if value is not None else torch.tensor(0.0)
    return [torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype)]


@register_op("Cast")
def _cast(node, x, opset):
    return [x[0].to(torch_dtype(_attr(node, "to")))]


@register_op("CastLike")
def _cast_like(node, x, opset):
    return [x[0].to(x[1].dtype)]


@register_op("Shape")
def _shape(node, x, opset):
    shape = torch.tensor(list(x[0].shape), dtype=torch.int64)
    start, end = _attr(node, "start", 0), _attr(node, "end")
    return [shape[start:end]]


@register_op("Size")
def _size(node, x, opset):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@register_op("Reshape", since_version=5)
def _reshape(node, x, opset):
    shape = _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


@register_op("Flatten")
def _flatten(node, x, opset):
    axis = _attr(node, "axis", 1)
    axis = axis + x[0].dim() if axis < 0 else axis
    lead = math.prod(x[0].shape[:axis])
    return [x[0].reshape(lead, -1)]


@register_op("Transpose")
def _transpose(node, x, opset):
    perm = _attr(node, "perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _axes_from(node, x, opset, since_input: int):
    if opset >= since_input:
        return _ints(x[1]) if len(x) > 1 else None
    return _attr(node, "axes")


@register_op("Unsqueeze")
def _unsqueeze(node, x, opset):
    axes = _axes_from(node, x, opset, 13)
    out = x[0]
    rank = out.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        out = out.unsqueeze(axis)
    return [out]


@register_op("Squeeze")
def _squeeze(node, x, opset):
    axes = _axes_from(node, x, opset, 13)
    if axes is None:
        return [x[0].squeeze()]
    out = x[0]
    for axis in sorted((a + out.dim() if a < 0 else a for a in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


@register_op("Concat")
def _concat(node, x, opset):
    tensors = [t for t in x if t is not None and not (t.dim() == 1 and t.numel() == 0 and len(x) > 1 and t.dtype == torch.int64 and False)]
    return [torch.cat(tensors, dim=_attr(node, "axis"))]


@register_op("Split", since_version=1)
def _split(node, x, opset):
    axis = _attr(node, "axis", 0)
    splits = _ints(x[1]) if opset >= 13 and len(x) > 1 and x[1] is not None else _attr(node, "split")
    if splits is None:
        count = _attr(node, "num_outputs") or len(node.outputs)
        size = x[0].shape[axis]
        chunk = -(-size // count)
        splits = [min(chunk, size - i * chunk) for i in range(count)]
    return list(torch.split(x[0], splits, dim=axis))


@register_op("Slice", since_version=10)
def _slice(node, x, opset):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + data.dim() if axis < 0 else axis
        size = data.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, max(start, end), step)
        else:
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            positions = torch.arange(start, end, step)
            index[axis] = positions
            flips.append(axis)
    if flips:
        out = data
        for axis, idx in enumerate(index):
            if isinstance(idx, torch.Tensor):
                out = out.index_select(axis, idx.to(out.device))
            elif idx != slice(None):
                out = out[(slice(None),) * axis + (idx,)]
        return [out]
    return [data[tuple(index)]]


@register_op("Gather")
def _gather(node, x, opset):
    axis = _attr(node, "axis", 0)
    data, indices = x[0], x[1].to(torch.int64)
    axis = axis + data.dim() if axis < 0 else axis
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    out = data.index_select(axis, indices.reshape(-1))
    return [out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])]


@register_op("GatherElements")
def _gather_elements(node, x, opset):
    axis = _attr(node, "axis", 0)
    index = x[1].to(torch.int64)
    index = torch.where(index < 0, index + x[0].shape[axis], index)
    return [torch.gather(x[0], axis, index)]


@register_op("GatherND")
def _gather_nd(node, x, opset):
    data, indices = x[0], x[1].to(torch.int64)
    batch = _attr(node, "batch_dims", 0)
    if batch:
        raise NotImplementedError("GatherND with batch_dims")
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    out = data[tuple(flat[:, i] for i in range(k))]
    return [out.reshape(indices.shape[:-1] + data.shape[k:])]


@register_op("ScatterND")
def _scatter_nd(node, x, opset):
    data, indices, updates = x[0].clone(), x[1].to(torch.int64), x[2]
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    reduction = _attr(node, "reduction", "none")
    target = tuple(flat[:, i] for i in range(k))
    values = updates.reshape((flat.shape[0],) + data.shape[k:])
    if reduction == "add":
        data = data.index_put(target, values, accumulate=True)
    else:
        data = data.index_put(target, values)
    return [data]


@register_op("ScatterElements")
def _scatter_elements(node, x, opset):
    axis = _attr(node, "axis", 0)
    reduction = _attr(node, "reduction", "none")
    index = x[1].to(torch.int64)
    index = torch.where(index < 0, index + x[0].shape[axis], index)
    if reduction == "add":
        return [x[0].scatter_add(axis, index, x[2])]
    return [x[0].scatter(axis, index, x[2])]


@register_op("Expand")
def _expand(node, x, opset):
    shape = _ints(x[1])
    data = x[0]
    rank = max(len(shape), data.dim())
    shape = [1] * (rank - len(shape)) + shape
    data = data.reshape([1] * (rank - data.dim()) + list(data.shape))
    target = [d if s == 1 else s for s, d in zip(shape, data.shape)]
    return [data.expand(target)]


@register_op("Tile")
def _tile(node, x, opset):
    return [x[0].repeat(*_ints(x[1]))]


@register_op("Range")
def _range(node, x, opset):
    start, limit, delta = (t.item() for t in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype)]


@register_op("Trilu")
def _trilu(node, x, opset):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if _attr(node, "upper", 1) else torch.tril(x[0], k)]


@register_op("CumSum")
def _cumsum(node, x, opset):
    axis = int(x[1].item())
    data = x[0]
    if _attr(node, "reverse", 0):
        data = data.flip(axis)
    out = torch.cumsum(data, axis)
    if _attr(node, "exclusive", 0):
        out = out - data
    if _attr(node, "reverse", 0):
        out = out.flip(axis)
    return [out.to(x[0].dtype)]


@register_op("NonZero")
def _nonzero(node, x, opset):
    return [torch.nonzero(x[0]).T.contiguous()]


@register_op("ArgMax")
def _argmax(node, x, opset):
    axis, keep = _attr(node, "axis", 0), _attr(node, "keepdims", 1)
    return [torch.argmax(x[0], dim=axis, keepdim=bool(keep))]


@register_op("ArgMin")
def _argmin(node, x, opset):
    axis, keep = _attr(node, "axis", 0), _attr(node, "keepdims", 1)
    return [torch.argmin(x[0], dim=axis, keepdim=bool(keep))]


def _reduce(fn_name: str, axes_input_since: int):
    def convert(node, x, opset):
        axes = _ints(x[1]) if opset >= axes_input_since and len(x) > 1 and x[1] is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        data = x[0]
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0) and opset >= axes_input_since:
                return [data]
            axes = list(range(data.dim()))
        if fn_name == "sum":
            return [data.sum(dim=axes, keepdim=keep)]
        if fn_name == "mean":
            return [data.mean(dim=axes, keepdim=keep)]
        if fn_name == "max":
            return [data.amax(dim=axes, keepdim=keep)]
        if fn_name == "min":
            return [data.amin(dim=axes, keepdim=keep)]
        if fn_name == "prod":
            out = data
            for axis in sorted(axes, reverse=True):
                out = out.prod(dim=axis, keepdim=keep)
            return [out]
        if fn_name == "l2":
            return [torch.sqrt((data * data).sum(dim=axes, keepdim=keep))]
        if fn_name == "sumsquare":
            return [(data * data).sum(dim=axes, keepdim=keep)]
        raise NotImplementedError(fn_name)

    return convert


for _op, _fn, _since in [
    ("ReduceSum", "sum", 13), ("ReduceMean", "mean", 18), ("ReduceMax", "max", 18), ("ReduceMin", "min", 18),
    ("ReduceProd", "prod", 18), ("ReduceL2", "l2", 18), ("ReduceSumSquare", "sumsquare", 18),
]:
    register_op(_op)(_reduce(_fn, _since))


@register_op("Softmax", since_version=13)
def _softmax(node, x, opset):
    return [torch.softmax(x[0], dim=_attr(node, "axis", -1))]


@register_op("LogSoftmax", since_version=13)
def _log_softmax(node, x, opset):
    return [torch.log_softmax(x[0], dim=_attr(node, "axis", -1))]


def _softmax_2d(log: bool):
    def convert(node, x, opset):
        axis = _attr(node, "axis", 1)
        data = x[0]
        flat = data.reshape(math.prod(data.shape[:axis]), -1)
        out = torch.log_softmax(flat, dim=1) if log else torch.softmax(flat, dim=1)
        return [out.reshape(data.shape)]

    return convert


register_op("Softmax", since_version=1)(_softmax_2d(False))
register_op("LogSoftmax", since_version=1)(_softmax_2d(True))
register_op("Softmax", since_version=13)(_softmax)
register_op("LogSoftmax", since_version=13)(_log_softmax)


@register_op("Gemm")
def _gemm(node, x, opset):
    a, b = x[0], x[1]
    if _attr(node, "transA", 0):
        a = a.T
    if _attr(node, "transB", 0):
        b = b.T
    out = _attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        out = out + _attr(node, "beta", 1.0) * x[2]
    return [out]


@register_op("LayerNormalization", since_version=17)
def _layer_norm(node, x, opset):
    axis = _attr(node, "axis", -1)
    data = x[0]
    axis = axis + data.dim() if axis < 0 else axis
    shape = data.shape[axis:]
    eps = _attr(node, "epsilon", 1e-5)
    return [F.layer_norm(data, shape, x[1].reshape(shape) if x[1] is not None else None,
                         x[2].reshape(shape) if len(x) > 2 and x[2] is not None else None, eps)]


@register_op("RMSNormalization", since_version=23)
def _rms_norm(node, x, opset):
    axis = _attr(node, "axis", -1)
    data = x[0]
    axis = axis + data.dim() if axis < 0 else axis
    dims = list(range(axis, data.dim()))
    eps = _attr(node, "epsilon", 1e-5)
    out = data * torch.rsqrt((data * data).mean(dim=dims, keepdim=True) + eps)
    return [out * x[1]]


@register_op("GroupNormalization", since_version=18)
def _group_norm(node, x, opset):
    groups = _attr(node, "num_groups")
    eps = _attr(node, "epsilon", 1e-5)
    data = x[0]
    n, c = data.shape[:2]
    normed = F.group_norm(data, groups, None, None, eps)
    if x[1].numel() == c:
        shape = (1, c) + (1,) * (data.dim() - 2)
        return [normed * x[1].reshape(shape) + x[2].reshape(shape)]
    grouped = normed.reshape(n, groups, -1)
    return [(grouped * x[1].reshape(1, groups, 1) + x[2].reshape(1, groups, 1)).reshape(data.shape)]


@register_op("InstanceNormalization")
def _instance_norm(node, x, opset):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=_attr(node, "epsilon", 1e-5))]


@register_op("Gelu", since_version=20)
def _gelu(node, x, opset):
    return [F.gelu(x[0], approximate=_attr(node, "approximate", "none"))]


@register_op("LeakyRelu")
def _leaky_relu(node, x, opset):
    return [F.leaky_relu(x[0], _attr(node, "alpha", 0.01))]


@register_op("Elu")
def _elu(node, x, opset):
    return [F.elu(x[0], _attr(node, "alpha", 1.0))]


@register_op("HardSigmoid")
def _hard_sigmoid(node, x, opset):
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    return [torch.clamp(alpha * x[0] + beta, 0, 1)]


@register_op("Clip", since_version=11)
def _clip(node, x, opset):
    low = x[1] if len(x) > 1 and x[1] is not None else None
    high = x[2] if len(x) > 2 and x[2] is not None else None
    out = x[0]
    if low is not None:
        out = torch.maximum(out, low.to(out.dtype))
    if high is not None:
        out = torch.minimum(out, high.to(out.dtype))
    return [out]


@register_op("Dropout")
def _dropout(node, x, opset):
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)][: len(node.outputs)]


def _conv_padding(node, spatial: int, x: torch.Tensor, kernel: Sequence[int], strides, dilations):
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    pads = _attr(node, "pads") or [0] * (2 * spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return pads


@register_op("Conv")
def _conv(node, x, opset):
    data, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    spatial = weight.dim() - 2
    strides = _attr(node, "strides") or [1] * spatial
    dilations = _attr(node, "dilations") or [1] * spatial
    group = _attr(node, "group", 1)
    pads = _conv_padding(node, spatial, data, weight.shape[2:], strides, dilations)
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        padding = begin
    else:
        torch_pads = []
        for b, e in zip(reversed(begin), reversed(end)):
            torch_pads += [b, e]
        data = F.pad(data, torch_pads)
        padding = [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [fn(data, weight, bias, stride=strides, padding=padding, dilation=dilations, groups=group)]


def _pool(kind: str):
    def convert(node, x, opset):
        data = x[0]
        spatial = data.dim() - 2
        kernel = _attr(node, "kernel_shape")
        strides = _attr(node, "strides") or [1] * spatial
        pads = _conv_padding(node, spatial, data, kernel, strides, [1] * spatial)
        begin, end = pads[:spatial], pads[spatial:]
        if begin != end:
            raise NotImplementedError("asymmetric pooling pads")
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return [fn(data, kernel, strides, begin, ceil_mode=bool(_attr(node, "ceil_mode", 0)))]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return [fn(data, kernel, strides, begin, ceil_mode=bool(_attr(node, "ceil_mode", 0)),
                   count_include_pad=bool(_attr(node, "count_include_pad", 0)))]

    return convert


register_op("MaxPool")(_pool("max"))
register_op("AveragePool")(_pool("avg"))


@register_op("GlobalAveragePool")
def _global_avg(node, x, opset):
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@register_op("Pad", since_version=11)
def _pad(node, x, opset):
    data = x[0]
    pads = _ints(x[1])
    value = x[2].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(data.dim()))
    count = len(axes)
    full_begin, full_end = [0] * data.dim(), [0] * data.dim()
    for i, axis in enumerate(axes):
        axis = axis + data.dim() if axis < 0 else axis
        full_begin[axis], full_end[axis] = pads[i], pads[i + count]
    torch_pads = []
    for b, e in zip(reversed(full_begin), reversed(full_end)):
        torch_pads += [b, e]
    mode = _attr(node, "mode", "constant")
    if mode == "constant":
        return [F.pad(data, torch_pads, value=value)]
    return [F.pad(data, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])]


@register_op("Einsum")
def _einsum(node, x, opset):
    return [torch.einsum(_attr(node, "equation"), *x)]


@register_op("TopK", since_version=10)
def _topk(node, x, opset):
    k = int(x[1].reshape(-1)[0])
    axis = _attr(node, "axis", -1)
    values, indices = torch.topk(x[0], k, dim=axis, largest=bool(_attr(node, "largest", 1)), sorted=True)
    return [values, indices]


@register_op("OneHot")
def _one_hot(node, x, opset):
    depth = int(x[1].reshape(-1)[0])
    off, on = x[2][0], x[2][1]
    indices = x[0].to(torch.int64)
    indices = torch.where(indices < 0, indices + depth, indices)
    hot = F.one_hot(indices, depth).to(x[2].dtype)
    out = hot * (on - off) + off
    axis = _attr(node, "axis", -1)
    if axis != -1:
        out = out.movedim(-1, axis)
    return [out]


@register_op("Resize", since_version=11)
def _resize(node, x, opset):
    data = x[0]
    scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
    sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None else None
    mode = _attr(node, "mode", "nearest")
    spatial_sizes = sizes[2:] if sizes else [int(math.floor(s * f)) for s, f in zip(data.shape[2:], scales.tolist()[2:])]
    torch_mode = {"nearest": "nearest", "linear": "bilinear" if data.dim() == 4 else "linear", "cubic": "bicubic"}[mode]
    align = _attr(node, "coordinate_transformation_mode", "half_pixel") == "align_corners"
    kwargs = {} if torch_mode == "nearest" else {"align_corners": align}
    return [F.interpolate(data, size=spatial_sizes, mode=torch_mode, **kwargs)]


@register_op("Attention", since_version=23)
def _attention(node, x, opset):
    q, k, v = x[0], x[1], x[2]
    mask = x[3] if len(x) > 3 else None
    if q.dim() != 4:
        raise NotImplementedError("Attention with 3-D inputs")
    scale = _attr(node, "scale")
    is_causal = bool(_attr(node, "is_causal", 0))
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)]
