"""Global Response Normalization (ConvNeXt-V2) keeping its input at ``bits`` bits.

``y = x + w * (x * n) + b`` with ``n = G / (mean_c G + eps)`` and ``G = ||x||_2`` over the
spatial dimensions, per sample and channel. Natively autograd keeps ``x`` (for the norm and
for the product) in full precision, and ``x * n`` too where ``w`` trains. Backward needs
``x`` only through sums over the spatial dimensions and the term ``x / G * dL/dG``: here
``x`` is kept per row of its last dimension at ``bits`` bits (the ``normal`` codebook, as
LayerNorm keeps its normalised input), with ``G`` exact (one value per sample and channel),
so the direct term ``g * (1 + w * n)`` is exact.
"""

from __future__ import annotations

import math

import torch

from ._once import once_differentiable
from .functional import _needs_grad
from .rowquant import dequantize_rows, quantize_rows, row_codebook

__all__ = ["global_response_norm"]

_KIND = "normal"


class _GlobalResponseNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spatial: tuple[int, ...], channel: int, eps: float, bits: int):
        g_norm = x.norm(p=2, dim=spatial, keepdim=True)
        mean = g_norm.mean(dim=channel, keepdim=True) + eps
        out = x + torch.addcmul(bias, weight, x * (g_norm / mean))
        ctx.save_for_backward(*quantize_rows(x, row_codebook(_KIND, bits), keep_nan=True), g_norm, weight)
        ctx.meta = (x.shape, x.dtype, spatial, channel, eps, bits, weight.shape, bias.shape, bias.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        packed, scale, g_norm, weight = ctx.saved_tensors
        shape, dtype, spatial, channel, eps, bits, w_shape, b_shape, b_dtype = ctx.meta
        f32 = torch.promote_types(g.dtype, torch.float32)
        x = dequantize_rows(packed, scale, row_codebook(_KIND, bits), shape, f32)
        gf, w, gn = g.to(f32), weight.to(f32), g_norm.to(f32)
        mean = gn.mean(dim=channel, keepdim=True) + eps
        n = gn / mean
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            a = (gf * w * x).sum(spatial, keepdim=True)  # dL/dn, per sample and channel
            c = shape[channel]
            d_norm = a / mean - (a * gn).sum(channel, keepdim=True) / (c * mean * mean)
            per_x = torch.where(gn > 0, d_norm / gn.clamp_min(torch.finfo(f32).tiny), 0.0)
            gx = (gf * (1 + w * n) + x * per_x).to(dtype)
        if ctx.needs_input_grad[1]:
            gw = (gf * x * n).sum_to_size(w_shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = gf.sum_to_size(b_shape).to(b_dtype)
        return gx, gw, gb, None, None, None, None


def global_response_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, spatial: tuple[int, ...], channel: int,
    eps: float = 1e-6, bits: int = 4,
) -> torch.Tensor:
    """``x + bias + weight * x * n`` (``weight``, ``bias`` broadcastable to ``x``), keeping ``x``
    at ``bits`` bits per row of its last dimension; runs natively where nothing needs a
    gradient."""
    spatial = tuple(sorted(d % x.dim() for d in spatial))
    channel = channel % x.dim()
    if not _needs_grad(x, weight, bias) or x.numel() == 0 or not math.prod(x.shape[d] for d in spatial):
        g_norm = x.norm(p=2, dim=spatial, keepdim=True)
        return x + torch.addcmul(bias, weight, x * (g_norm / (g_norm.mean(dim=channel, keepdim=True) + eps)))
    return _GlobalResponseNorm.apply(x, weight, bias, spatial, channel, float(eps), int(bits))
