"""Mixture-of-experts feed-forward with frozen experts, keeping only its input for backward.

transformers' MoE decoders (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE...) route each token
to ``k`` of ``E`` gated experts and sum ``w_k * down_e(act(gate_e(x)) * up_e(x))``. Natively
every routed copy keeps, for backward, its gathered input, the packed gate/up output, both
factors of the product and the down projection's input: about ``k * (2 * model + 5 *
intermediate)`` values per token, in full precision. With the expert weights frozen (bias,
prompt or LoRA tuning elsewhere) backward needs only ``x``, the routing and the expert
weights: each expert's hidden layers are recomputed from its tokens, one matmul per expert
besides the two of the native backward (the routing weights' gradient, ``<g, down(m)> =
<g @ W_down, m>``, reuses the product the input's gradient needs). ``x`` is kept as the
gated MLP keeps it
(:mod:`.gated_mlp`): a bf16 / fp16 ``x`` as it is, a float32 one in ``store_dtype``.

Gradients flow to ``x``, to the routing weights (so on to the router) and to expert biases
that train. Forward and backward run in chunks of rows sorted by expert: on the CPU with
float32 / bf16 / fp16 weights each chunk is one ``torch._grouped_mm`` per product, elsewhere
(other devices, float64, weights to be cast) a loop over experts. Under autocast the
experts compute in autocast's dtype, as ``F.linear`` does and transformers' eager experts do
(its default ``grouped_mm`` path is not autocast-enabled: it computes in the weights' dtype).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._once import once_differentiable
from .codebooks import SMOOTH_FUNCTIONS
from .mlp import _compute_dtype, _row_chunks, input_copy

__all__ = ["CHUNK_ELEMS", "frozen_moe_experts", "frozen_moe_experts_applies"]

# Hidden-layer elements (2 x intermediate per row) per chunk of one expert's rows.
CHUNK_ELEMS = 1 << 20


def _check_ids(flat: torch.Tensor) -> None:
    if bool((flat < 0).any()):  # transformers' own loop fails on them too
        raise ValueError(f"frozen_moe_experts: negative expert ids in top_k_index (min {int(flat.min())})")


class _Rows:
    """Routed rows that run together: one expert's (a loop over experts), or rows sorted by
    expert and run by ``torch._grouped_mm`` (``offs``: where each expert's rows end). Its
    methods are the four products forward and backward need, biases added per row."""

    def __init__(self, p, ids, first_w, first_b, down_w, down_b, offs=None):
        self.p, self.ids, self.offs = p, ids, offs
        self._first_w, self._down_w = first_w, down_w  # (in, out) per expert, or one expert's
        self.first_b = None if first_b is None else (first_b[ids] if offs is not None else first_b)
        self.down_b = None if down_b is None else (down_b[ids] if offs is not None else down_b)

    def _mm(self, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(rows, w, offs=self.offs) if self.offs is not None else torch.mm(rows, w)

    def first(self, rows: torch.Tensor) -> torch.Tensor:
        y = self._mm(rows, self._first_w)
        return y if self.first_b is None else y + self.first_b

    def down(self, m: torch.Tensor) -> torch.Tensor:
        y = self._mm(m, self._down_w)
        return y if self.down_b is None else y + self.down_b

    def through_down(self, g: torch.Tensor) -> torch.Tensor:  # g @ W_down: dL/dm
        return self._mm(g, self._down_w.transpose(-2, -1))

    def through_first(self, dh: torch.Tensor) -> torch.Tensor:  # dh @ W_first: dL/dx
        return self._mm(dh, self._first_w.transpose(-2, -1))


def _grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the rows run through ``torch._grouped_mm`` (CPU, weights already in the compute
    dtype: a cast would copy every expert) rather than a loop over experts."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and gate_up.dtype == down.dtype == dtype)


def _routed_rows(top_k_index, gate_up, gate_up_bias, down, down_bias, transposed: bool,
                 dtype: torch.dtype, grouped: bool):
    """The routed rows in chunks of about ``CHUNK_ELEMS`` first-projection elements: positions
    in the flattened ``(tokens, k)`` routing, expert by expert. Ids of ``num_experts`` and more
    (transformers' expert-parallel sentinels) route nowhere, as in transformers' own loop."""
    flat = top_k_index.reshape(-1)
    _check_ids(flat)
    num_experts = gate_up.shape[0]
    width = gate_up.shape[2] if transposed else gate_up.shape[1]
    key = torch.where(flat < num_experts, flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    bgu = None if gate_up_bias is None else gate_up_bias.to(dtype)
    bd = None if down_bias is None else down_bias.to(dtype)
    if grouped:  # weights (E, in, out), the layout _grouped_mm multiplies by
        first_w = gate_up if transposed else gate_up.transpose(1, 2)
        down_w = down if transposed else down.transpose(1, 2)
        ends = torch.cumsum(counts, 0)
        ids = key[order]
        for r0, r1 in _row_chunks(int(ends[-1]) if num_experts else 0, width, CHUNK_ELEMS):
            offs = (ends.clamp(r0, r1) - r0).to(torch.int32)
            yield _Rows(order[r0:r1], ids[r0:r1], first_w, bgu, down_w, bd, offs)
        return
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            first_w = (gate_up[e] if transposed else gate_up[e].t()).to(dtype)
            down_w = (down[e] if transposed else down[e].t()).to(dtype)
            pos = order[start:start + n]
            for r0, r1 in _row_chunks(n, width, CHUNK_ELEMS):
                ids = torch.full((r1 - r0,), e, device=flat.device)
                yield _Rows(pos[r0:r1], ids, first_w, None if bgu is None else bgu[e], down_w,
                            None if bd is None else bd[e])
        start += n


def _gate_function(gate: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(gate):
        return gate
    act = SMOOTH_FUNCTIONS[gate]

    def act_gate_times_up(h: torch.Tensor) -> torch.Tensor:
        g, up = h.chunk(2, dim=-1)
        return act(g) * up

    return act_gate_times_up


class _MoEExpertsFrozenWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gate_up, gate_up_bias, down, down_bias,
                gate_fn: Callable, transposed: bool, store_dtype: torch.dtype | None):
        dtype = _compute_dtype(x, gate_up)
        x2 = input_copy(x, dtype)
        k = top_k_index.shape[-1]
        weights = top_k_weights.reshape(-1)
        out_dim = down.shape[2] if transposed else down.shape[1]
        # the weighted sum in the routing weights' precision (float32 for a bf16 model), as
        # transformers' grouped path sums it, then x's dtype
        out = x2.new_zeros(x.shape[0], out_dim, dtype=torch.promote_types(dtype, top_k_weights.dtype))
        grouped = _grouped(x2, gate_up, down, dtype)
        for rows in _routed_rows(top_k_index, gate_up, gate_up_bias, down, down_bias, transposed, dtype, grouped):
            t = rows.p // k
            with torch._C.DisableTorchFunction():  # the gate as the model computes it, natively
                m = gate_fn(rows.first(x2[t]))
            out.index_add_(0, t, rows.down(m) * weights[rows.p, None])
        kept = x2 if x2.element_size() < x.element_size() else x
        if kept.dtype == torch.float32 and store_dtype is not None:
            kept = input_copy(kept, store_dtype)
        ctx.save_for_backward(kept, top_k_index, top_k_weights, gate_up, gate_up_bias, down, down_bias)
        ctx.gate_fn, ctx.transposed, ctx.dtype, ctx.x_dtype, ctx.grouped = gate_fn, transposed, dtype, x.dtype, grouped
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable  # recomputed first derivatives only: refuse double backward
    def backward(ctx, g):
        kept, top_k_index, top_k_weights, gate_up, gate_up_bias, down, down_bias = ctx.saved_tensors
        dtype, transposed = ctx.dtype, ctx.transposed
        need_x, need_w, need_bgu, need_bd = (ctx.needs_input_grad[i] for i in (0, 2, 4, 6))
        k = top_k_index.shape[-1]
        weights = top_k_weights.reshape(-1)
        g2 = g.to(dtype)
        f32 = torch.float64 if dtype == torch.float64 else torch.float32
        gx = torch.zeros(kept.shape, dtype=f32, device=g.device) if need_x else None
        gw = torch.zeros(weights.shape, dtype=f32, device=g.device) if need_w else None
        gbgu = torch.zeros(gate_up_bias.shape, dtype=f32, device=g.device) if need_bgu else None
        gbd = torch.zeros(down_bias.shape, dtype=f32, device=g.device) if need_bd else None
        for rows in _routed_rows(top_k_index, gate_up, gate_up_bias, down, down_bias, transposed, dtype,
                                 ctx.grouped):
            p, t = rows.p, rows.p // k
            # the gate's derivative from PyTorch's own backward, as natively; no torch function
            # mode (s2a's included) may reroute it here
            with torch.enable_grad(), torch._C.DisableTorchFunction():
                h = rows.first(kept[t].to(dtype)).requires_grad_()
                m = ctx.gate_fn(h)
            gt = g2[t]
            w = weights[p, None]
            gm = rows.through_down(gt)  # dL/dm before the routing weight
            if need_w:  # dL/dw_k = <g, down(m)> = <g @ W_down, m> (+ <g, b_down>)
                gw[p] = (gm.to(f32) * m.detach().to(f32)).sum(-1)
                if rows.down_b is not None:
                    gw[p] += (gt.to(f32) * rows.down_b.to(f32)).sum(-1)
            if need_bd:
                gbd.index_add_(0, rows.ids, (gt * w).to(f32))
            (dh,) = torch.autograd.grad(m, h, (gm * w).to(dtype))
            del m, h, gm
            if need_bgu:
                gbgu.index_add_(0, rows.ids, dh.to(f32))
            if need_x:
                gx.index_add_(0, t, rows.through_first(dh).to(f32))
        return (
            gx.to(ctx.x_dtype) if need_x else None,
            None,
            gw.reshape(top_k_weights.shape).to(top_k_weights.dtype) if need_w else None,
            None,
            gbgu.to(gate_up_bias.dtype) if need_bgu else None,
            None,
            gbd.to(down_bias.dtype) if need_bd else None,
            None, None, None,
        )


def frozen_moe_experts_applies(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up: torch.Tensor, down: torch.Tensor, gate: str | Callable = "silu", transposed: bool = False,
) -> bool:
    """Whether :func:`frozen_moe_experts` can stand in for the experts' own forward here."""
    if not (torch.is_grad_enabled() and not gate_up.requires_grad and not down.requires_grad
            and (callable(gate) or gate in SMOOTH_FUNCTIONS) and x.dim() == 2 and x.is_floating_point()
            # plain float weights: quantized ones (FP8 with their scales) compute otherwise
            and all(w.is_floating_point() and w.element_size() >= 2 for w in (gate_up, down))
            and gate_up.dim() == down.dim() == 3 and gate_up.shape[0] == down.shape[0]
            and top_k_index.dim() == 2 and not top_k_index.is_floating_point()
            and not top_k_index.is_complex() and top_k_weights.shape == top_k_index.shape
            and top_k_index.shape[0] == x.shape[0]):
        return False
    (hidden, width), (inter, out) = (
        (gate_up.shape[1:], down.shape[1:]) if transposed else (gate_up.shape[:0:-1], down.shape[:0:-1]))
    # a callable gate may map the first projection's width to any (checked when it runs)
    return hidden == x.shape[-1] and out == hidden and (callable(gate) or width == 2 * inter)


def frozen_moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    gate: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    transposed: bool = False,
    store_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """``sum_k top_k_weights[:, k] * expert_{top_k_index[:, k]}(x)`` with frozen experts
    ``expert_e(x) = F.linear(gate(F.linear(x, gate_up[e], gate_up_bias[e])), down[e],
    down_bias[e])``, keeping only ``x`` (tokens x model width) and the routing for backward.

    ``gate``: an activation name (``act(g) * up`` with ``g, up`` the two halves of the first
    projection, transformers' default), or a function of the first projection's output
    (a model's own ``_apply_gate``: clamps, interleaved halves...) that must be deterministic
    and row-wise: it is run again in backward. ``gate_up``: ``(E, W, H)`` and ``down``:
    ``(E, H, I)``, or with ``transposed`` ``(E, H, W)`` and ``(E, I, H)`` (transformers'
    ``is_transposed``). ``store_dtype``: the dtype a float32 ``x`` is kept in; None keeps it
    exact.
    """
    if gate_up.requires_grad or down.requires_grad:
        raise ValueError("frozen_moe_experts: the expert weights must be frozen (requires_grad=False); "
                         "run the experts' own forward when they train")
    if store_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"frozen_moe_experts: store_dtype={store_dtype!r}; choose torch.bfloat16, "
                         "torch.float16 or None (exact)")
    if not callable(gate) and gate not in SMOOTH_FUNCTIONS:
        raise ValueError(f"frozen_moe_experts: unknown activation {gate!r}; "
                         f"supported: {sorted(SMOOTH_FUNCTIONS)}, or a function of the first projection")
    if not frozen_moe_experts_applies(x, top_k_index, top_k_weights, gate_up, down, gate, transposed):
        raise ValueError(
            f"frozen_moe_experts: shapes do not fit: x {tuple(x.shape)} (tokens, H), top_k_index "
            f"{tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} (tokens, k), "
            f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)} (transposed={transposed})"
        )
    return _MoEExpertsFrozenWeights.apply(
        x, top_k_index, top_k_weights, gate_up, gate_up_bias, down, down_bias, _gate_function(gate),
        transposed, store_dtype)
