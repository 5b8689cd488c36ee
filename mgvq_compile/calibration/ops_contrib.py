"""ONNX Runtime's contrib ops (``com.microsoft``, and the two it registers in the default domain) that
ORT-optimized transformer graphs commonly contain."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mgvq_compile.calibration.ops import attr, norm_axis, register_op

__all__: list[str] = []

_MS = "com.microsoft"


def _opt(x: list, i: int) -> torch.Tensor | None:
    return x[i] if len(x) > i else None


def _add_bias(data: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return data if bias is None else data + bias


@register_op("Gelu", _MS)
def _gelu(node, x, opset):
    return [F.gelu(x[0])]


@register_op("BiasGelu", _MS)
def _bias_gelu(node, x, opset):
    return [F.gelu(x[0] + x[1])]


@register_op("FastGelu", _MS)
def _fast_gelu(node, x, opset):
    return [F.gelu(_add_bias(x[0], _opt(x, 1)), approximate="tanh")]


@register_op("QuickGelu", _MS)
def _quick_gelu(node, x, opset):
    return [x[0] * torch.sigmoid(attr(node, "alpha", 1.702) * x[0])]


def _normalize(data: torch.Tensor, axis: int, eps: float, simplified: bool):
    """(normalized, mean or None, inv_std) over the axes from ``axis`` on, computed in float32."""
    dims = list(range(norm_axis(axis, data.dim()), data.dim()))
    work = data.float() if data.dtype in (torch.float16, torch.bfloat16) else data
    mean = None if simplified else work.mean(dim=dims, keepdim=True)
    centered = work if mean is None else work - mean
    inv_std = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + eps)
    return (centered * inv_std).to(data.dtype), mean, inv_std


def _layer_norm(simplified: bool):
    def convert(node, x, opset):
        out, mean, inv_std = _normalize(x[0], attr(node, "axis", -1), attr(node, "epsilon", 1e-5), simplified)
        out = _add_bias(out * x[1], None if simplified else _opt(x, 2))
        return ([out, inv_std] if simplified else [out, mean, inv_std])[: len(node.outputs)]

    return convert


register_op("LayerNormalization", since_version=1)(_layer_norm(False))  # ORT's pre-opset-17 contrib op
register_op("SimplifiedLayerNormalization", since_version=1)(_layer_norm(True))


def _skip_layer_norm(simplified: bool):
    def convert(node, x, opset):
        data, skip, gamma = x[0], x[1], x[2]
        beta = None if simplified else _opt(x, 3)
        bias = _opt(x, 3 if simplified else 4)
        summed = _add_bias(data + skip, bias)
        out, mean, inv_std = _normalize(summed, -1, attr(node, "epsilon", 1e-5), simplified)
        out = _add_bias(out * gamma, beta)
        return [out, mean, inv_std, summed][: len(node.outputs)]

    return convert


register_op("SkipLayerNormalization", _MS)(_skip_layer_norm(False))
register_op("SkipSimplifiedLayerNormalization", _MS)(_skip_layer_norm(True))


@register_op("FusedMatMul", _MS)
def _fused_matmul(node, x, opset):
    a = x[0].transpose(-1, -2) if attr(node, "transA", 0) else x[0]
    b = x[1].transpose(-1, -2) if attr(node, "transB", 0) else x[1]
    alpha = attr(node, "alpha", 1.0)
    out = a @ b
    return [out if alpha == 1.0 else alpha * out]


@register_op("Attention", _MS)
def _ms_attention(node, x, opset):
    """ORT's packed-QKV self-attention (no past state, no relative bias)."""
    data, weight, bias, mask = x[0], x[1], _opt(x, 2), _opt(x, 3)
    if _opt(x, 4) is not None or _opt(x, 5) is not None:
        raise NotImplementedError("com.microsoft::Attention with past state or attention bias")
    heads = attr(node, "num_heads")
    qkv = _add_bias(data @ weight, bias)
    hidden = qkv.shape[-1] // 3
    b, s = data.shape[:2]
    q, k, v = (t.reshape(b, s, heads, -1).transpose(1, 2) for t in qkv.split(hidden, dim=-1))
    scale = attr(node, "scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dim() != 2:
            raise NotImplementedError("com.microsoft::Attention with a mask that is not (batch, seq)")
        scores = scores + torch.where(mask.bool(), 0.0, -10000.0).to(scores.dtype)[:, None, None, :]
    if attr(node, "unidirectional", 0):
        causal = torch.ones(s, s, dtype=torch.bool, device=data.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    out = torch.softmax(scores, dim=-1) @ v
    return [out.transpose(1, 2).reshape(b, s, -1)]
