"""Neural-network ONNX ops in torch: activations, softmax, GEMM, normalizations, convolutions, pooling,
padding, resizing, and the opset-23 Attention / RotaryEmbedding ops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mgvq_compile.calibration.ops import attr, ints, norm_axis, register_op

__all__: list[str] = []


def _opt(x: list, i: int) -> torch.Tensor | None:
    return x[i] if len(x) > i else None


# --- activations -------------------------------------------------------------------------------------


@register_op("Gelu", since_version=20)
def _gelu(node, x, opset):
    return [F.gelu(x[0], approximate=attr(node, "approximate", "none"))]


@register_op("LeakyRelu")
def _leaky_relu(node, x, opset):
    return [F.leaky_relu(x[0], attr(node, "alpha", 0.01))]


@register_op("Elu")
def _elu(node, x, opset):
    return [F.elu(x[0], attr(node, "alpha", 1.0))]


@register_op("Celu")
def _celu(node, x, opset):
    return [F.celu(x[0], attr(node, "alpha", 1.0))]


@register_op("Selu")
def _selu(node, x, opset):
    alpha, gamma = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x[0] > 0, x[0], alpha * (torch.exp(x[0]) - 1))]


@register_op("ThresholdedRelu")
def _thresholded_relu(node, x, opset):
    return [torch.where(x[0] > attr(node, "alpha", 1.0), x[0], torch.zeros_like(x[0]))]


@register_op("HardSigmoid")
def _hard_sigmoid(node, x, opset):
    return [torch.clamp(attr(node, "alpha", 0.2) * x[0] + attr(node, "beta", 0.5), 0, 1)]


@register_op("Shrink")
def _shrink(node, x, opset):
    bias, lambd = attr(node, "bias", 0.0), attr(node, "lambd", 0.5)
    data = x[0]
    return [torch.where(data < -lambd, data + bias, torch.where(data > lambd, data - bias, torch.zeros_like(data)))]


@register_op("Dropout")
def _dropout(node, x, opset):
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)][: len(node.outputs)]


# --- softmax ------------------------------------------------------------------------------------------


def _softmax_2d(log: bool):
    """Opset < 13: coerce to 2-D at ``axis`` (default 1), normalise the second dimension."""

    def convert(node, x, opset):
        data = x[0]
        axis = norm_axis(attr(node, "axis", 1), data.dim())
        flat = data.reshape(math.prod(data.shape[:axis]), -1)
        out = torch.log_softmax(flat, dim=1) if log else torch.softmax(flat, dim=1)
        return [out.reshape(data.shape)]

    return convert


register_op("Softmax", since_version=1)(_softmax_2d(False))
register_op("LogSoftmax", since_version=1)(_softmax_2d(True))


@register_op("Softmax", since_version=13)
def _softmax(node, x, opset):
    return [torch.softmax(x[0], dim=attr(node, "axis", -1))]


@register_op("LogSoftmax", since_version=13)
def _log_softmax(node, x, opset):
    return [torch.log_softmax(x[0], dim=attr(node, "axis", -1))]


@register_op("Hardmax", since_version=13)
def _hardmax(node, x, opset):
    axis = attr(node, "axis", -1)
    return [F.one_hot(torch.argmax(x[0], dim=axis), x[0].shape[axis]).movedim(-1, axis).to(x[0].dtype)]


# --- GEMM and normalizations -------------------------------------------------------------------------


@register_op("Gemm")
def _gemm(node, x, opset):
    a = x[0].T if attr(node, "transA", 0) else x[0]
    b = x[1].T if attr(node, "transB", 0) else x[1]
    out = a @ b
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    if alpha != 1.0:
        out = alpha * out
    c = _opt(x, 2)
    if c is not None:
        out = out + (c if beta == 1.0 else beta * c)
    return [out]


def _stash(data: torch.Tensor, node) -> torch.Tensor:
    """Normalizations compute in float32 for half inputs when ``stash_type`` is 1 (the default)."""
    if data.dtype in (torch.float16, torch.bfloat16) and attr(node, "stash_type", 1) == 1:
        return data.float()
    return data


@register_op("LayerNormalization", since_version=17)
def _layer_norm(node, x, opset):
    data = x[0]
    axis = norm_axis(attr(node, "axis", -1), data.dim())
    dims = list(range(axis, data.dim()))
    eps = attr(node, "epsilon", 1e-5)
    work = _stash(data, node)
    mean = work.mean(dim=dims, keepdim=True)
    centered = work - mean
    inv_std = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + eps)
    out = (centered * inv_std).to(data.dtype) * x[1]
    bias = _opt(x, 2)
    if bias is not None:
        out = out + bias
    return [out, mean, inv_std][: len(node.outputs)]


@register_op("RMSNormalization", since_version=23)
def _rms_norm(node, x, opset):
    data = x[0]
    axis = norm_axis(attr(node, "axis", -1), data.dim())
    work = _stash(data, node)
    inv = torch.rsqrt((work * work).mean(dim=list(range(axis, data.dim())), keepdim=True) + attr(node, "epsilon", 1e-5))
    return [(work * inv).to(data.dtype) * x[1]]


@register_op("GroupNormalization", since_version=18)
def _group_norm(node, x, opset):
    groups, eps = attr(node, "num_groups"), attr(node, "epsilon", 1e-5)
    data = x[0]
    n, c = data.shape[:2]
    normed = F.group_norm(_stash(data, node), groups, None, None, eps).to(data.dtype)
    if x[1].numel() == c:  # opset 21: per-channel scale and bias
        shape = (1, c) + (1,) * (data.dim() - 2)
        return [normed * x[1].reshape(shape) + x[2].reshape(shape)]
    grouped = normed.reshape(n, groups, -1)  # opset 18: per-group scale and bias
    return [(grouped * x[1].reshape(1, groups, 1) + x[2].reshape(1, groups, 1)).reshape(data.shape)]


@register_op("InstanceNormalization")
def _instance_norm(node, x, opset):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=attr(node, "epsilon", 1e-5))]


@register_op("BatchNormalization")
def _batch_norm(node, x, opset):
    if attr(node, "training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1")
    data, scale, bias, mean, var = x[:5]
    shape = (1, -1) + (1,) * (data.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + attr(node, "epsilon", 1e-5))
    return [(data - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)]


@register_op("LpNormalization")
def _lp_norm(node, x, opset):
    return [F.normalize(x[0], p=attr(node, "p", 2), dim=attr(node, "axis", -1), eps=0.0)]


@register_op("MeanVarianceNormalization")
def _mvn(node, x, opset):
    axes = attr(node, "axes", [0, 2, 3])
    mean = x[0].mean(dim=axes, keepdim=True)
    var = ((x[0] - mean) ** 2).mean(dim=axes, keepdim=True)
    return [(x[0] - mean) / torch.sqrt(var + 1e-9)]


@register_op("LRN")
def _lrn(node, x, opset):
    return [F.local_response_norm(x[0], attr(node, "size"), attr(node, "alpha", 1e-4), attr(node, "beta", 0.75),
                                  attr(node, "bias", 1.0))]


# --- convolution and pooling ------------------------------------------------------------------------


def _pads(node, spatial: int, data: torch.Tensor, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends), resolving ``auto_pad``."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            size = data.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        return pads
    return attr(node, "pads") or [0] * (2 * spatial)


def _torch_pad(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX begins/ends (first axis first) as F.pad's list (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


@register_op("Conv")
def _conv(node, x, opset):
    data, weight, bias = x[0], x[1], _opt(x, 2)
    spatial = weight.dim() - 2
    strides = attr(node, "strides") or [1] * spatial
    dilations = attr(node, "dilations") or [1] * spatial
    pads = _pads(node, spatial, data, weight.shape[2:], strides, dilations)
    begin, end = pads[:spatial], pads[spatial:]
    padding = begin
    if begin != end:
        data = F.pad(data, _torch_pad(begin, end))
        padding = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [conv(data, weight, bias, stride=strides, padding=padding, dilation=dilations, groups=attr(node, "group", 1))]


@register_op("ConvTranspose")
def _conv_transpose(node, x, opset):
    data, weight, bias = x[0], x[1], _opt(x, 2)
    spatial = weight.dim() - 2
    strides = attr(node, "strides") or [1] * spatial
    dilations = attr(node, "dilations") or [1] * spatial
    kernel = attr(node, "kernel_shape") or list(weight.shape[2:])
    out_pad = attr(node, "output_padding") or [0] * spatial
    output_shape = attr(node, "output_shape")
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = output_shape[-spatial:] if output_shape is not None else [d * s for d, s in zip(data.shape[2:], strides)]
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            total = strides[i] * (data.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - target[i]
            small, large = total // 2, total - total // 2
            pads[i], pads[i + spatial] = (large, small) if auto_pad == "SAME_LOWER" else (small, large)
    else:
        pads = [0] * (2 * spatial) if auto_pad == "VALID" else (attr(node, "pads") or [0] * (2 * spatial))
    begin, end = pads[:spatial], pads[spatial:]
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    out = conv(data, weight, bias, stride=strides, padding=0, output_padding=out_pad, groups=attr(node, "group", 1),
               dilation=dilations)
    for i in range(spatial):  # crop the pads (they may differ at both ends, which torch's padding cannot say)
        out = out.narrow(2 + i, begin[i], out.shape[2 + i] - begin[i] - end[i])
    return [out]


def _pool(kind: str):
    def convert(node, x, opset):
        data = x[0]
        spatial = data.dim() - 2
        kernel = attr(node, "kernel_shape")
        strides = attr(node, "strides") or [1] * spatial
        dilations = attr(node, "dilations") or [1] * spatial
        pads = _pads(node, spatial, data, kernel, strides, dilations)
        begin, end = pads[:spatial], pads[spatial:]
        ceil = bool(attr(node, "ceil_mode", 0))
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise NotImplementedError("MaxPool's Indices output")
        if kind == "max":
            if begin != end:
                data = F.pad(data, _torch_pad(begin, end), value=-math.inf)
                begin = [0] * spatial
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return [fn(data, kernel, strides, begin, dilation=dilations, ceil_mode=ceil)]
        include_pad = bool(attr(node, "count_include_pad", 0))
        if begin != end or any(2 * b > k for b, k in zip(begin, kernel)):
            if not include_pad:
                raise NotImplementedError("AveragePool with asymmetric pads and count_include_pad=0")
            data = F.pad(data, _torch_pad(begin, end))
            begin = [0] * spatial
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return [fn(data, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include_pad)]

    return convert


register_op("MaxPool")(_pool("max"))
register_op("AveragePool")(_pool("avg"))


@register_op("GlobalAveragePool")
def _global_avg(node, x, opset):
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@register_op("GlobalMaxPool")
def _global_max(node, x, opset):
    return [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)]


def _pad_impl(node, data: torch.Tensor, pads: list[int], value, axes: list[int] | None) -> torch.Tensor:
    axes = [norm_axis(a, data.dim()) for a in axes] if axes else list(range(data.dim()))
    begin, end = [0] * data.dim(), [0] * data.dim()
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    mode = attr(node, "mode", "constant")
    torch_pads = _torch_pad(begin, end)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]  # F.pad's non-constant modes only pad trailing dims
    if mode == "constant":
        return F.pad(data, torch_pads, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(data, torch_pads, mode=torch_mode)


@register_op("Pad", since_version=2)
def _pad_attrs(node, x, opset):
    return [_pad_impl(node, x[0], attr(node, "pads"), attr(node, "value", 0.0), None)]


@register_op("Pad", since_version=11)
def _pad(node, x, opset):
    value = _opt(x, 2)
    fill = value.reshape(-1)[0].item() if value is not None and value.numel() else 0
    return [_pad_impl(node, x[0], ints(x[1]), fill, ints(_opt(x, 3)))]


@register_op("Resize", since_version=10)
def _resize(node, x, opset):
    data = x[0]
    if opset < 11:
        scales, sizes = _opt(x, 1), None
    else:
        scales, sizes = _opt(x, 2), _opt(x, 3)
    spatial = data.dim() - 2
    if sizes is not None and sizes.numel():
        out_size = ints(sizes)[-spatial:]
        scale_list = None
    else:
        scale_list = [float(s) for s in scales.tolist()]
        if any(s != 1.0 for s in scale_list[:2]):
            raise NotImplementedError("Resize of the batch or channel axis")
        out_size = [int(math.floor(d * s)) for d, s in zip(data.shape[2:], scale_list[2:])]
        scale_list = scale_list[2:]
    mode = attr(node, "mode", "nearest")
    transform = attr(node, "coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric")
    if mode == "nearest":
        nearest = attr(node, "nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and nearest == "floor":
            return [F.interpolate(data, size=out_size, mode="nearest")]
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            return [F.interpolate(data, size=out_size, mode="nearest-exact")]
        if transform == "asymmetric" and all(float(s).is_integer() for s in (scale_list or [])) and scale_list:
            return [F.interpolate(data, size=out_size, mode="nearest")]
        raise NotImplementedError(f"Resize nearest with {transform}/{nearest}")
    torch_mode = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear",
                  ("cubic", 2): "bicubic"}.get((mode, spatial))
    if torch_mode is None or transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise NotImplementedError(f"Resize {mode} with {transform} on {spatial} spatial axes")
    if mode == "cubic" and attr(node, "cubic_coeff_a", -0.75) != -0.75:
        raise NotImplementedError("Resize cubic with cubic_coeff_a != -0.75")
    if scale_list is not None and transform != "align_corners":
        # ONNX maps coordinates with the given scales, not out/in; so does torch when told the scales.
        return [F.interpolate(data, scale_factor=scale_list, mode=torch_mode, align_corners=False,
                              recompute_scale_factor=False)]
    return [F.interpolate(data, size=out_size, mode=torch_mode, align_corners=transform == "align_corners")]


# --- attention (opset 23) -------------------------------------------------------------------------


def _heads(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """(B, S, heads*H) -> (B, heads, S, H); 4-D inputs are already (B, heads, S, H)."""
    if t.dim() == 4:
        return t
    b, s, _ = t.shape
    return t.reshape(b, s, heads, -1).transpose(1, 2)


@register_op("Attention", since_version=23)
def _attention(node, x, opset):
    q_in = x[0]
    q = _heads(q_in, attr(node, "q_num_heads"))
    k = _heads(x[1], attr(node, "kv_num_heads"))
    v = _heads(x[2], attr(node, "kv_num_heads"))
    mask, past_k, past_v = _opt(x, 3), _opt(x, 4), _opt(x, 5)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = attr(node, "scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    bias = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if mask is not None:
        mask = mask[..., : k.shape[-2]] if mask.shape[-1] > k.shape[-2] else mask
        bias = torch.where(mask, 0.0, -math.inf).to(scores.dtype) if mask.dtype == torch.bool else mask.to(scores.dtype)
    if attr(node, "is_causal", 0):
        sq, sk = q.shape[-2], k.shape[-2]
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        bias = bias + torch.where(causal, 0.0, -math.inf).to(scores.dtype)
    scores = scores + bias
    qk_out = scores
    softcap = attr(node, "softcap", 0.0)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.float() if attr(node, "softmax_precision") else scores, dim=-1).to(v.dtype)
    out = probs @ v
    if q_in.dim() == 3:
        out = out.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)
    return [out, present_k, present_v, qk_out][: len(node.outputs)]


@register_op("RotaryEmbedding", since_version=23)
def _rotary_embedding(node, x, opset):
    data, cos, sin, positions = x[0], x[1], x[2], _opt(x, 3)
    four_d = data.dim() == 4
    t = data.transpose(1, 2) if four_d else data.reshape(data.shape[0], data.shape[1], attr(node, "num_heads"), -1)
    head = t.shape[-1]
    rot = attr(node, "rotary_embedding_dim", 0) or head
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos, sin = cos[..., : rot // 2].unsqueeze(2), sin[..., : rot // 2].unsqueeze(2)
    x_rot, x_pass = t[..., :rot], t[..., rot:]
    if attr(node, "interleaved", 0):
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([cos * x1 - sin * x2, sin * x1 + cos * x2], dim=-1).reshape(x_rot.shape)
    else:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        rotated = torch.cat([cos * x1 - sin * x2, sin * x1 + cos * x2], dim=-1)
    out = torch.cat([rotated, x_pass], dim=-1)
    return [out.transpose(1, 2) if four_d else out.reshape(data.shape)]
