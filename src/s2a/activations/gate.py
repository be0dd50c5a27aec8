"""Channel gates ``x * gate`` of feature maps, with ``gate`` constant over each channel.

Squeeze-and-excitation (EfficientNet, MobileNetV3, GhostNet, RegNetY, SE-ResNet) scales each
channel of a feature map by a gate computed from that same map: ``x * gate`` with ``x`` of
shape (N, C, H, W) and ``gate`` (N, C, 1, 1). Natively autograd keeps all of ``x`` in full
precision, for the gate's gradient ``sum_hw(g * x)``; in EfficientNet-B0 under bias + prompt
tuning that is three quarters of everything saved for backward.

The gradient of ``x`` (``g * gate``) needs only the small gate, kept exactly. The gate's
gradient is a sum over each row of ``x`` (the H*W elements one gate value scales), so ``x``
is stored per row at ``bits`` bits on evenly spaced levels between the row's minimum and
maximum (a centre and a half-range per row: post-activation rows are skewed, a symmetric
range would leave half the levels unused). Rounding errors average out in the sum.
"""

from __future__ import annotations

import math

import torch

from ._once import once_differentiable
from .rowquant import dequantize_rows, quantize_rows, row_codebook

# A row of L elements keeps 4L bytes natively and L/2 + 8 here (4 bits): from 4 elements
# on that is at least a third less; shorter rows are left native.
MIN_ROW = 4


def gate_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(x, gate, 2)`` if ``a * b`` is a channel gate of a feature map: ``x`` of shape
    (N, C, H, W) or (N, C, D, H, W), ``gate`` (N, C, 1, 1[, 1]) (or without N when N = 1), and
    rows of at least :data:`MIN_ROW` elements; else None.

    Gates over token rows, (B, T, D) * (B, T, 1), are left native: they are mostly hand-written
    norms (``x * rsqrt(mean(x**2))``), whose rows hold a transformer's outlier channels, 20-100x
    the rest, on which a per-row range would spend every level (strict mode names them)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if a.dtype != b.dtype or not a.is_floating_point() or a.device != b.device:
        return None
    x, gate = (a, b) if a.dim() >= b.dim() and a.numel() >= b.numel() else (b, a)
    base = gate if gate._base is None else gate._base
    if base.is_leaf:  # a trainable per-channel scale (layer scale), not a gate computed from x
        return None
    nd = x.dim()
    if nd not in (4, 5) or gate.dim() > nd or gate.numel() == x.numel():
        return None
    shape = (1,) * (nd - gate.dim()) + tuple(gate.shape)
    k = 0
    while k < nd and shape[k] == x.shape[k]:
        k += 1
    if k != 2 or any(s != 1 for s in shape[k:]) or math.prod(x.shape[k:]) < MIN_ROW:
        return None
    return x, gate, k


class _GateMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, k: int, bits: int) -> torch.Tensor:
        y = x * gate
        rows = x.reshape(math.prod(x.shape[:k]), -1)
        if ctx.needs_input_grad[1]:
            lo, hi = rows.aminmax(dim=-1, keepdim=True)
            centre = lo.float() / 2 + hi.float() / 2  # (lo + hi) / 2 overflows past 1.7e38
            # keep_nan: a row holding NaN or inf decodes to NaN (natively NaN, or +-inf for
            # a row of one-signed infinities): never a finite, wrong gradient
            packed, scale = quantize_rows(rows.float() - centre, row_codebook("uniform", bits), keep_nan=True)
        else:
            packed = scale = centre = None
        ctx.save_for_backward(gate, packed, scale, centre)
        ctx.meta = (rows.shape, bits)
        return y

    @staticmethod
    @once_differentiable  # the stored rows are approximate: refuse double backward
    def backward(ctx, g: torch.Tensor):
        gate, packed, scale, centre = ctx.saved_tensors
        rows_shape, bits = ctx.meta
        gx = ggate = None
        if ctx.needs_input_grad[0]:
            gx = g * gate
        if ctx.needs_input_grad[1]:
            xr = dequantize_rows(packed, scale, row_codebook("uniform", bits), rows_shape) + centre
            ggate = (g.reshape(rows_shape).float() * xr).sum(-1).to(gate.dtype).view(gate.shape)
        return gx, ggate, None, None


def compressed_gate_mul(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``a * b`` with the feature map kept at ``bits`` bits for the gate's gradient, if
    :func:`gate_layout` recognises a channel gate and the gate needs a gradient; else None
    (natively such a product keeps the gate alone, or is no gate)."""
    layout = gate_layout(a, b)
    if layout is None or not (torch.is_grad_enabled() and layout[1].requires_grad):
        return None
    return _GateMul.apply(*layout, bits)


def gate_mul(a: torch.Tensor, b: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``a * b``, compressed where :func:`compressed_gate_mul` applies, else native."""
    out = compressed_gate_mul(a, b, bits)
    return a * b if out is None else out
