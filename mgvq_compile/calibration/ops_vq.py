"""The executor's converter for the compiler's own ``mgvq.VQGemm`` node (the reference decode, in torch)."""

from __future__ import annotations

import torch

from mgvq_compile.calibration.ops import attr, register_op
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, CUSTOM_OP, decode_from_stored

__all__: list[str] = []

_ATTRIBUTES = ("in_features", "out_features", "vector_dim", "group_bounds", "group_bits", "group_code_bits",
               "scale_group_size")


@register_op(CUSTOM_OP, domain=CUSTOM_DOMAIN)
def _vq_gemm(node, x, opset):
    """Y = X W^T (+ bias), W decoded from the stored arrays (not differentiable w.r.t. the codes)."""
    inputs = list(x) + [None] * (6 - len(x))
    data, perm, codebooks, codes, scales, bias = inputs[:6]
    attributes = {name: attr(node, name, 0) for name in _ATTRIBUTES}
    weight = decode_from_stored(
        attributes, codebooks.cpu().numpy(), codes.cpu().numpy(),
        None if perm is None else perm.cpu().numpy(), None if scales is None else scales.cpu().numpy(),
    )
    w = torch.from_numpy(weight).to(device=data.device, dtype=data.dtype)
    y = data @ w.T
    return [y if bias is None else y + bias.to(y.dtype)]
