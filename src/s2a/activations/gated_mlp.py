"""A gated transformer MLP, ``down(act(gate(x)) * up(x))``, for when its weights are frozen.

LLaMA, Mistral, Qwen, Gemma, Phi-3 and 130-odd other transformers models (and timm's
``SwiGLU``) feed a product of two hidden layers to the down projection. Natively autograd keeps
both factors of that product, ``act(gate(x))`` and ``up(x)``, each 2.7-8x the model width, in
full precision, plus what the activation keeps: under bias or prompt tuning, with the
projections frozen, that is most of what a decoder layer saves for backward.

With the three weights frozen the block's backward needs nothing but ``x``: ``gate(x)`` and
``up(x)`` are recomputed from it (two of the five matmuls of a backward that full fine-tuning
runs as six). So ``x`` is all that is saved, the model width per token instead of 2 x 2.7-8x
it. A bf16 / fp16 ``x`` is kept as it is, and the gradients are the native ones; a float32
``x`` is kept in bfloat16 (``store_dtype``), half the bytes for a relative rounding error of
at most 2**-9 per element, far below the 4- and 8-bit codes of every other operator (gradient
cosine to native > 0.99999 in the tests); ``store_dtype=None`` keeps it exact. Forward (exact
in any case) and backward run in chunks of rows, so the hidden layers never exist whole.
Trainable biases get their gradients.

If any of the three weights requires grad (full fine-tuning, LoRA merged into a weight...)
the block runs unfused, each operator compressed on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._once import once_differentiable
from .codebooks import SMOOTH_FUNCTIONS
from .mlp import _compute_dtype, _row_chunks, input_copy

__all__ = ["CHUNK_ELEMS", "frozen_gated_mlp", "frozen_gated_mlp_applies"]

# Hidden-layer elements per chunk of rows. Backward holds about six hidden-width blocks at once
# (dh, gate, act(gate), up, their products): with 2**23 (the whole 2048 x 1536 layer of
# SmolLM2-135M at batch 8 x 256) that was 72 MiB of the step's peak; 2**20 is as fast on CPU.
CHUNK_ELEMS = 1 << 20


class _GatedMLPFrozenWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd, act_name: str, store_dtype: torch.dtype | None):
        dtype = _compute_dtype(x, wg)
        x2 = input_copy(x, dtype).reshape(-1, x.shape[-1])
        wgc, wuc, wdc = wg.to(dtype), wu.to(dtype), wd.to(dtype)
        bgc, buc, bdc = (None if b is None else b.to(dtype) for b in (bg, bu, bd))
        act = SMOOTH_FUNCTIONS[act_name]
        rows, hidden = x2.shape[0], wg.shape[0]
        # Allocated in its final shape and written through a 2-D view: returned as a view, the
        # output could not be modified in place by the caller (a view made inside a Function).
        out = x2.new_empty(*x.shape[:-1], wd.shape[0])
        out2 = out.view(rows, wd.shape[0])
        for r0, r1 in _row_chunks(rows, hidden, CHUNK_ELEMS):
            h = act(F.linear(x2[r0:r1], wgc, bgc)).mul_(F.linear(x2[r0:r1], wuc, buc))
            if bdc is None:
                torch.mm(h, wdc.t(), out=out2[r0:r1])
            else:
                torch.addmm(bdc, h, wdc.t(), out=out2[r0:r1])
        # Recomputing from the compute-dtype copy gives the same hidden layers as from x: keep
        # whichever is smaller (under bf16 autocast, x2 is half of an fp32 x).
        kept = x2 if x2.element_size() < x.element_size() else x
        if kept.dtype == torch.float32 and store_dtype is not None:
            kept = input_copy(kept, store_dtype)
        ctx.save_for_backward(kept, wg, bg, wu, bu, wd)
        ctx.act_name, ctx.dtype = act_name, dtype
        ctx.x_meta = (x.shape, x.dtype)
        ctx.b_dtypes = tuple(None if b is None else b.dtype for b in (bg, bu, bd))
        return out

    @staticmethod
    @once_differentiable  # recomputed first derivatives only: refuse double backward
    def backward(ctx, g):
        kept, wg, bg, wu, bu, wd = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dtype = ctx.dtype
        act = SMOOTH_FUNCTIONS[ctx.act_name]
        need_x, need_bg, need_bu, need_bd = (ctx.needs_input_grad[i] for i in (0, 2, 4, 6))
        x2 = kept.reshape(-1, kept.shape[-1])
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        wgc, wuc, wdc = wg.to(dtype), wu.to(dtype), wd.to(dtype)
        bgc, buc = (None if b is None else b.to(dtype) for b in (bg, bu))
        rows, hidden = x2.shape[0], wg.shape[0]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gx = g2.new_empty(rows, wg.shape[1]) if need_x else None
        gbg = g2.new_zeros(hidden, dtype=acc) if need_bg else None
        gbu = g2.new_zeros(hidden, dtype=acc) if need_bu else None
        for r0, r1 in _row_chunks(rows, hidden, CHUNK_ELEMS):
            dh = torch.mm(g2[r0:r1], wdc)
            # The activation's derivative from PyTorch's own backward, as natively; no torch
            # function mode (s2a's included) may reroute the activation here.
            xc = x2[r0:r1].to(dtype)
            with torch.enable_grad(), torch._C.DisableTorchFunction():
                gate = F.linear(xc, wgc, bgc).detach().requires_grad_()
                a = act(gate)
                up = F.linear(xc, wuc, buc)
                (dgate,) = torch.autograd.grad(a, gate, dh * up)
            dup = dh.mul_(a.detach())
            del a, gate, up, xc
            if need_bg:
                gbg += dgate.sum(0, dtype=acc)
            if need_bu:
                gbu += dup.sum(0, dtype=acc)
            if need_x:
                # two products rounded apart, then summed: as autograd sums x's two gradients
                torch.mm(dgate, wgc, out=gx[r0:r1]).add_(torch.mm(dup, wuc))
        gx = gx.reshape(x_shape).to(x_dtype) if need_x else None
        bg_dtype, bu_dtype, bd_dtype = ctx.b_dtypes
        gbg = gbg.to(bg_dtype) if need_bg else None
        gbu = gbu.to(bu_dtype) if need_bu else None
        gbd = g2.sum(0, dtype=acc).to(bd_dtype) if need_bd else None
        return gx, None, gbg, None, gbu, None, gbd, None, None


def frozen_gated_mlp_applies(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
    activation: str,
) -> bool:
    """Whether :func:`frozen_gated_mlp` can stand in for the unfused block here."""
    return (
        torch.is_grad_enabled()
        and not (gate_weight.requires_grad or up_weight.requires_grad or down_weight.requires_grad)
        and activation in SMOOTH_FUNCTIONS
        and x.dim() >= 2
        and x.is_floating_point()
        and gate_weight.dim() == up_weight.dim() == down_weight.dim() == 2
        and gate_weight.shape == up_weight.shape
        and x.shape[-1] == gate_weight.shape[1]
        and down_weight.shape[1] == gate_weight.shape[0]
    )


def frozen_gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    activation: str = "silu",
    store_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """``F.linear(act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu), Wd, bd)`` with frozen
    ``Wg``, ``Wu``, ``Wd``, keeping only ``x`` for backward and recomputing the hidden layers.

    ``store_dtype``: the dtype a float32 ``x`` is kept in (bf16 / fp16 / fp64 inputs are kept
    as they are); None keeps it exact, and the gradients are then the native ones.

    Callers check :func:`frozen_gated_mlp_applies` first; a weight that requires grad is
    refused here.
    """
    if gate_weight.requires_grad or up_weight.requires_grad or down_weight.requires_grad:
        raise ValueError("frozen_gated_mlp: the three weights must be frozen (requires_grad=False); "
                         "run the block unfused when a weight trains")
    if activation not in SMOOTH_FUNCTIONS:
        raise ValueError(f"frozen_gated_mlp: unknown activation {activation!r}; "
                         f"supported: {sorted(SMOOTH_FUNCTIONS)}")
    if (gate_weight.shape != up_weight.shape or x.shape[-1] != gate_weight.shape[1]
            or down_weight.shape[1] != gate_weight.shape[0]):
        raise ValueError(
            f"frozen_gated_mlp: shapes do not chain: x (..., {x.shape[-1]}), gate weight "
            f"{tuple(gate_weight.shape)}, up weight {tuple(up_weight.shape)}, down weight "
            f"{tuple(down_weight.shape)}"
        )
    if store_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"frozen_gated_mlp: store_dtype={store_dtype!r}; choose torch.bfloat16, "
                         "torch.float16 or None (exact)")
    return _GatedMLPFrozenWeights.apply(
        x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_bias, activation, store_dtype)
