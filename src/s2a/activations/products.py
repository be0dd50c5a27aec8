"""Batched products of two activations, ``A @ B``: eager attention's ``Q K^T`` (and ``P V``).

Where attention cannot run as SDPA (MPNet's relative bias, DeBERTa's disentangled terms,
Bloom's ALiBi ``baddbmm``, Gemma 2's soft-capping, timm models with ``fused_attn`` off), it
computes ``scores = Q @ K^T`` itself, and a native matmul keeps both operands in full
precision: each is the other's gradient factor (``dA = dY B^T``, ``dB = A^T dY``). Here each
operand is kept as SDPA keeps Q, K and V (:mod:`.attention`): rows along the contracted
dimension (one head's channels of one token) at 8 bits per element with a per-row scale,
a quarter of float32's bytes. (The probabilities of ``P V`` keep their softmax's codes, see
:mod:`.probs`, and V joins them here.)

Only products of two batched tensors with the same batch dimensions (``(..., M, K) @ (...,
K, N)``, at least 3-D, no broadcasting, neither a parameter) are taken, and the function mode
of :mod:`.apply` routes them only inside modules named like attention: a batched product
elsewhere may be of weights (MoE experts' gathered weights, a weight broadcast over a batch of
one), whose trainable side must see the other exactly. A non-negative left operand
(probabilities that reach the product untagged) is kept on the ``probs`` codebook.
"""

from __future__ import annotations

import torch
from torch import nn

from ._once import once_differentiable
from .attention import _QKV_KIND as _KIND  # the codebook of SDPA's Q/K/V rows
from .rowquant import dequantize_rows, quantize_rows, row_codebook

__all__ = ["activation_matmul", "activation_matmul_applies"]



def _is_weight(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def activation_matmul_applies(a, b) -> bool:
    """Whether ``a @ b`` is a product this module keeps compressed: two floating-point tensors
    of the same dtype and device, at least 3-D with the same batch dimensions, neither a
    parameter (batched expert weights) or a view of one, at least one needing a gradient."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and not _is_weight(a) and not _is_weight(b)
            and a.dim() >= 3 and a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2]
            and a.shape[-1] == b.shape[-2] and a.shape[-1] > 0
            and a.is_floating_point() and a.dtype == b.dtype and a.device == b.device
            and (a.requires_grad or b.requires_grad))


def keep_rows(t: torch.Tensor, bits: int, kind: str = _KIND) -> tuple[torch.Tensor, torch.Tensor]:
    """``t``'s rows along its last dimension (for a product, the contracted one: A, B^T) at
    ``bits`` bits, as SDPA keeps q, k, v: (packed codes, scales)."""
    return quantize_rows(t, row_codebook(kind, bits), keep_nan=True)


def rebuild_rows(packed, scale, shape, dtype, bits, kind: str = _KIND) -> torch.Tensor:
    return dequantize_rows(packed, scale, row_codebook(kind, bits), shape, dtype)


def _kind_of_left(a: torch.Tensor) -> str:
    """Probabilities that reach a product untagged (mixed across heads, as CaiT's talking
    heads do, or with the softmax kind left out) are mostly tiny: the ``probs`` codebook's
    levels crowd near 0 where a signed uniform one would round them to 0 (dV over 4096 keys:
    cosine 0.98)."""
    return "probs" if bool((a.detach().amin() >= 0).item()) else _KIND


class _ActivationMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias, beta: float, alpha: float, bits: int):
        if bias is None:
            out = torch.matmul(a, b) if alpha == 1 else torch.matmul(a, b).mul_(alpha)
        else:
            out = torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
        need_a, need_b = ctx.needs_input_grad[:2]
        # A for B's gradient, B (as B^T: rows along the contracted dimension) for A's
        a_kind = _kind_of_left(a) if need_b and a.numel() else _KIND
        kept_a = keep_rows(a, bits, a_kind) if need_b else ()
        kept_b = keep_rows(b.transpose(-1, -2), bits) if need_a else ()
        ctx.save_for_backward(*kept_a, *kept_b)
        ctx.meta = (a.shape, a.dtype, b.shape, b.dtype, beta, alpha, bits, bool(kept_a), a_kind,
                    None if bias is None else (bias.shape, bias.dtype))
        return out

    @staticmethod
    @once_differentiable  # the kept operands are rounded: refuse double backward
    def backward(ctx, g):
        a_shape, a_dtype, b_shape, b_dtype, beta, alpha, bits, has_a, a_kind, bias_meta = ctx.meta
        saved = list(ctx.saved_tensors)
        cdt = torch.promote_types(g.dtype, torch.float32) if g.device.type == "cpu" else g.dtype
        ga = gb = gbias = None
        if has_a:
            pa, sa = saved[:2]
            del saved[:2]
            if ctx.needs_input_grad[1]:
                a = rebuild_rows(pa, sa, a_shape, cdt, bits, a_kind)
                gb = torch.matmul(a.transpose(-1, -2), g.to(cdt)).mul_(alpha).to(b_dtype)
        if ctx.needs_input_grad[0]:
            pb, sb = saved[:2]
            bt = rebuild_rows(pb, sb, (*b_shape[:-2], b_shape[-1], b_shape[-2]), cdt, bits)
            ga = torch.matmul(g.to(cdt), bt).mul_(alpha).to(a_dtype)
        if bias_meta is not None and ctx.needs_input_grad[2]:
            shape, dtype = bias_meta
            gbias = (g * beta).sum_to_size(shape).to(dtype)
        return ga, gb, gbias, None, None, None


def activation_matmul(a: torch.Tensor, b: torch.Tensor, bits: int = 8, *, bias: torch.Tensor | None = None,
                      beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``a @ b`` (``torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)`` with ``bias``) keeping
    each operand that the other's gradient needs at ``bits`` bits per element, per row along
    the contracted dimension. The forward is exact."""
    if not activation_matmul_applies(a, b):
        raise ValueError(
            "activation_matmul: expected two floating-point tensors of one dtype and device, at "
            f"least 3-D with equal batch dimensions, got {tuple(a.shape)} @ {tuple(b.shape)}")
    return _ActivationMatmul.apply(a, b, bias, float(beta), float(alpha), int(bits))
