"""Softmax and scaled-dot-product attention that keep low-bit state for backward.

The forward of ``softmax`` is exact (``torch.softmax``); attention computes the
native math in float32 (float64 for float64 inputs), equal to the native op to
float rounding. Only what backward reads is compressed, always through
``ctx.save_for_backward`` so saved-tensor hooks (offloading, byte counting) see
every byte:

``softmax(x, dim, bits)``
    The probabilities y, stored per row (along ``dim``) with scale = row max on
    the ``probs`` codebook (levels ``(i/(k-1))**2``, dense near 0 where most
    probabilities lie). Backward: ``dx = y_hat * (g - sum(g * y_hat))``.

``scaled_dot_product_attention(q, k, v, ..., bits, mode, qkv_bits)``
    Drop-in for ``torch.nn.functional.scaled_dot_product_attention``. Modes:

    * ``"probs"``: Q, K, V stored at ``qkv_bits`` (per-row absmax, default 8) and
      the attention probabilities P at ``bits`` on the ``probs`` codebook.
    * ``"recompute"``: Q, K, V stored at ``bits`` only; backward recomputes P from
      the stored Q, K (and the mask, kept by reference) and uses
      ``rowsum(P * dP)`` in the softmax backward, so the output is not needed. Calls
      whose logits are too large for that (Visformer's, in the thousands) keep P instead.

    Dropout on P costs no bytes: a seed drawn from the default CPU generator
    (``torch.manual_seed`` makes runs reproducible) seeds a private
    ``torch.Generator`` that draws the mask; the seed is saved as one int64 and the
    mask redrawn in backward. The batch is processed in slices and each slice's
    query rows in chunks (``CHUNK_ELEMS`` logits at a time), so the float32 logits
    never exceed that much more than one batch item's, and backward rebuilds Q, K, V
    one slice at a time.

Why the functional default is ``"probs"`` at 4 bits: measured on ViT-B-like inputs (B=8, 12 heads,
N=197, d=64, logit std 2-4, ``benchmarks/results/attention_modes.md``) it is the
only mode reaching gradient cosine >= 0.99 at 4 bits (dq, dk, dv >= 0.9976, with
725 KB per ViT-B block per sample vs 2.43 MB for native fp32 SDPA), while
``"recompute"`` at 4 bits saves 255 KB but reaches only 0.926-0.965 because 4-bit
Q/K perturb the logits by about a nat (such calls now keep P instead, see
``RECOMPUTE_MAX_LOGIT_ERROR``: 4-bit recompute holds only for logits a few times smaller).
Note that ``mode="recompute", bits=8`` beats the default on bytes and gradients (482 KB,
cosine >= 0.9997) at about the same CPU time (1.47x / 1.66x native fp32 SDPA on the ViT / text
cases timed at every width, against 1.44x / 1.65x), which is why ``compress_activations`` uses
it unless told otherwise.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._once import once_differentiable
from .kernels import dropout_mask
from .packing import check_bits
from .rowquant import (
    ROW_BITS,
    dequantize_rows,
    quantize_rows,
    renorm_rows,
    row_codebook,
    softmax_backward_rows,
)

SDPA_MODES = ("probs", "recompute")
DEFAULT_MODE = "probs"
# Logits (float32) materialised at a time in attention: the batch is cut in slices, and a
# slice's query rows in chunks, of about this many. Backward holds about five such blocks (P, dP,
# dS and temporaries). On ViT-B/16 at batch 64 (CPU, exact peak, before batch slicing), 2**22 gave
# a step peak 68 MiB below 2**24 at no loss of speed; 2**20 was then 1.9x slower (5-row chunks),
# but with batch slicing it costs nothing (ViT-B/16, batch 32, CPU: 7.9 vs 8.1 s a step, same
# peak) and takes 40 MiB off a 4-layer SmolLM2-135M step's peak (batch 8 x 256, with the gated
# MLP's 2**20 chunks), where the attention logits set the forward's peak.
CHUNK_ELEMS = 1 << 20
# "recompute" rebuilds P in backward from the stored Q and K, so their rounding error enters the
# logits. When the estimated error (:func:`_recompute_logit_error`) passes this many nats, the
# call stores P itself instead ("probs" mode: P at the same bits, Q/K/V at ``qkv_bits``).
# Measured per attention call (random-init timm models, pretrained MiniLM; 8 bits): estimates
# up to 0.37 kept the op's gradient cosine >= 0.999, 0.995 gave 0.944, 3.1 gave 0.76 and
# Visformer's logits in the thousands (estimates 17-124) gave 0.35 to 0.001; P at 8 bits gave
# >= 0.989 on all of them.
# Pretrained MiniLM's largest estimate is 0.22, ViT/DeiT/Swin at random init 0.002-0.008.
RECOMPUTE_MAX_LOGIT_ERROR = 0.5
# Q/K/V rows (head dim, per-row absmax): uniform levels. With absmax scaling of
# 32-128 Gaussian-like values they are as accurate as normal-quantile levels
# (4 bits: relative MSE 0.0083 vs 0.0077) and encode by rounding, not bucketize.
_QKV_KIND = "uniform"

__all__ = ["DEFAULT_MODE", "SDPA_MODES", "scaled_dot_product_attention", "softmax"]


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in SDPA_MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {list(SDPA_MODES)}")
    return mode


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, ValueError, TypeError):
        return None
    return None


# --------------------------------------------------------------------------- softmax


def _softmax_bwd(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y * (g - sum(g * y))`` over the last dim (fused ATen kernel when available)."""
    fused = getattr(torch, "_softmax_backward_data", None)
    if fused is not None:
        return fused(g, y, -1, y.dtype)
    gy = g * y
    return gy.addcmul_(y, gy.sum(-1, keepdim=True), value=-1.0)


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, bits: int, sink: list | None = None) -> torch.Tensor:
        y = torch.softmax(x, dim)
        rows = y.movedim(dim, -1)
        packed, scale = quantize_rows(rows, row_codebook("probs", bits), keep_nan=True)
        ctx.save_for_backward(packed, scale)
        ctx.meta = (dim, bits, rows.shape, x.dtype)
        if sink is not None:  # the caller reads the probabilities back elsewhere (probs.py)
            sink.append((packed, scale))
        return y

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, grad: torch.Tensor):
        packed, scale = ctx.saved_tensors
        dim, bits, shape, dtype = ctx.meta
        cdt = torch.promote_types(dtype, torch.float32)
        cb = row_codebook("probs", bits)
        g = grad.movedim(dim, -1)
        if cdt == torch.float32:  # decode + renormalise + backward: one fused kernel
            dx = softmax_backward_rows(packed, scale, cb, g)
        else:
            y = renorm_rows(dequantize_rows(packed, scale, cb, shape, cdt))
            dx = _softmax_bwd(g.to(cdt), y)
        return dx.movedim(-1, dim).to(dtype), None, None, None


def softmax(x: torch.Tensor, dim: int = -1, bits: int = 4, *, sink: list | None = None) -> torch.Tensor:
    """``torch.softmax(x, dim)`` whose backward reads the probabilities at ``bits``.

    Saved for backward: ``packed_nbytes(n, bits)`` bytes of codes (``ceil(n*bits/8)``;
    up to 2 more for 3 bits) plus one float32 scale per row (row max). Falls back to ``torch.softmax`` (nothing saved) when
    no gradient is needed or ``x`` is empty. ``sink``: a list that receives the saved
    ``(packed, scale)`` when they were made.
    """
    check_bits(bits, ROW_BITS, "bits")
    if not (torch.is_grad_enabled() and x.requires_grad) or x.numel() == 0 or x.dim() == 0:
        return torch.softmax(x, dim)
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"Dimension out of range (expected to be in range of [{-x.dim()}, {x.dim() - 1}], "
                         f"but got {dim})")
    return _Softmax.apply(x, dim % x.dim(), bits, sink)


# ------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class _Cfg:
    dropout_p: float
    is_causal: bool
    scale: float
    groups: int  # GQA: query heads per key/value head (1 without GQA)
    bits: int
    mode: str
    qkv_bits: int


def _dead_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Query rows whose mask excludes every key (native SDPA outputs 0 there)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        dead = mask.logical_not().all(-1, keepdim=True)
    else:
        dead = (mask == float("-inf")).all(-1, keepdim=True)
    if torch.compiler.is_compiling():  # bool(tensor) would break the graph; zeroing none is a no-op
        return dead
    return dead if bool(dead.any()) else None


def _probs(s: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    p = torch.softmax(s, -1)
    return p if dead is None else p.masked_fill_(dead, 0.0)


def _chunk_bounds(n_rows: int, per_row: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // max(per_row, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _rows(t: torch.Tensor | None, i0: int, i1: int) -> torch.Tensor | None:
    # Slice the query-row dim of a mask unless it broadcasts along it.
    if t is None or t.dim() < 2 or t.size(-2) == 1:
        return t
    return t[..., i0:i1, :]


def _attn_probs(qc, kT, mask, cfg: _Cfg, i0: int, n_keys: int) -> torch.Tensor:
    """Attention probabilities of query rows ``qc`` (already multiplied by the scale)."""
    s = torch.matmul(qc, kT)
    if mask is not None:
        if mask.dtype == torch.bool:
            s.masked_fill_(mask.logical_not(), float("-inf"))
        else:
            s.add_(mask)
    if cfg.is_causal:
        drop = torch.ones(qc.size(-2), n_keys, dtype=torch.bool, device=qc.device)
        s.masked_fill_(drop.triu_(i0 + 1), float("-inf"))
    return _probs(s, _dead_rows(mask))


def _draw_seed() -> int:
    """Seed for the dropout mask, drawn from the default (CPU) generator."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def _keep_scale(gen: torch.Generator | torch.Tensor, like: torch.Tensor, p: float, offset: int = 0) -> torch.Tensor:
    """Dropout multiplier: 0 where dropped, 1/(1-p) where kept (drawn from ``gen``; a seed
    tensor under torch.compile: the counter-based hash mask of ``kernels.dropout_mask``, of
    the elements from ``offset`` on, since no Generator object can live in a traced graph)."""
    if isinstance(gen, torch.Tensor):
        keep = dropout_mask(like.shape, gen, p, like.device, offset)
        return keep.to(like.dtype).mul_(1.0 / (1.0 - p))
    keep = torch.rand(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    return keep.lt_(1.0 - p).mul_(1.0 / (1.0 - p))


def _dropout_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def _reduce_kv(g: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    if groups > 1:
        g = g.sum_to_size(*g.shape[:-3], shape[-3] * groups, *g.shape[-2:])
        g = g.unflatten(-3, (shape[-3], groups)).sum(-3)
    return g.sum_to_size(shape)


def _batch_slices(q, k, v, mask, batch: torch.Size, L: int, S: int) -> list[slice] | None:
    """Slices of the leading batch dim so that one slice's logits stay near ``CHUNK_ELEMS``, or
    None to run the whole batch at once (a single slice suffices, or an input broadcasts along
    that dim). Backward then rebuilds Q, K, V and P one slice at a time, not whole."""
    if not batch or any(t.dim() != len(batch) + 2 or t.size(0) != batch[0] for t in (q, k, v)):
        return None
    if mask is not None and mask.dim() == len(batch) + 2 and mask.size(0) not in (1, batch[0]):
        return None
    per_item = math.prod(batch[1:]) * L * S
    step = max(1, CHUNK_ELEMS // max(per_item, 1))
    if step >= batch[0]:
        return None
    return [slice(b, min(b + step, batch[0])) for b in range(0, batch[0], step)]


def _bslice(t: torch.Tensor | None, sl: slice | None, n_batch: int) -> torch.Tensor | None:
    """``t`` restricted to batch slice ``sl`` (unchanged where it broadcasts along that dim)."""
    if t is None or sl is None or t.dim() < n_batch + 2 or t.size(0) == 1:
        return t
    return t[sl]


class _SDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, cfg: _Cfg):
        dev = q.device
        cdt = torch.promote_types(q.dtype, torch.float32)
        qkv_bits = cfg.qkv_bits if cfg.mode == "probs" else cfg.bits
        cb_x = row_codebook(_QKV_KIND, qkv_bits)
        cb_p = row_codebook("probs", cfg.bits)
        with _no_autocast(dev.type):
            L, S = q.size(-2), k.size(-2)
            batch = torch.broadcast_shapes(
                q.shape[:-2], _expand_kv(k[..., :0, :], cfg.groups).shape[:-2],
                _expand_kv(v[..., :0, :], cfg.groups).shape[:-2],
            )
            nb = len(batch)
            slices = _batch_slices(q, k, v, mask, batch, L, S) or [None]
            seed_t, gen, drawn = None, None, 0
            hashed = torch.compiler.is_compiling()  # no .item(), no Generator in the graph
            if cfg.dropout_p > 0 and hashed:
                seed_t = gen = torch.randint(0, 2**62, (1,), dtype=torch.int64)
            elif cfg.dropout_p > 0:
                seed = _draw_seed()
                seed_t = torch.tensor([seed], dtype=torch.int64)
                gen = _dropout_generator(seed, dev)
            out = None
            qkv_state, p_state, p_batches = [], [], []
            for sl in slices:
                qs_, ks_, vs_ = (_bslice(t, sl, nb) for t in (q, k, v))
                for t in (qs_, ks_, vs_):
                    qkv_state.extend(quantize_rows(t, cb_x, keep_nan=True))
                qc = qs_.to(cdt) * cfg.scale
                kT = _expand_kv(ks_.to(cdt), cfg.groups).transpose(-1, -2)
                vc = _expand_kv(vs_.to(cdt), cfg.groups)
                m = _bslice(mask, sl, nb)
                sl_batch = torch.broadcast_shapes(qc.shape[:-2], kT.shape[:-2], vc.shape[:-2])
                for i0, i1 in _chunk_bounds(L, math.prod(sl_batch) * S):
                    p = _attn_probs(qc[..., i0:i1, :], kT, _rows(m, i0, i1), cfg, i0, S)
                    p_batches.append(p.shape[:-2])  # batch of P (v may broadcast beyond it)
                    if cfg.mode == "probs":
                        p_state.extend(quantize_rows(p, cb_p, keep_nan=True))
                    if gen is not None:
                        p.mul_(_keep_scale(gen, p, cfg.dropout_p, drawn))
                        drawn += p.numel()
                    o = torch.matmul(p, vc)
                    del p
                    if out is None:
                        out = o.new_empty(*batch, L, o.size(-1))
                    out[(*_batch_index(sl), Ellipsis, slice(i0, i1), slice(None))] = o
                    del o
                del qc, kT, vc
        saved_mask = mask if cfg.mode == "recompute" else None
        ctx.save_for_backward(seed_t, saved_mask, *qkv_state, *p_state)
        ctx.cfg = cfg
        ctx.hashed = hashed
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.mask_dtype = None if mask is None else mask.dtype
        ctx.meta = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, batch, p_batches, slices)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, grad_out):
        cfg: _Cfg = ctx.cfg
        q_shape, k_shape, v_shape, q_dt, k_dt, v_dt, batch, p_batches, slices = ctx.meta
        seed_t, mask, *state = ctx.saved_tensors
        qkv_state, p_state = state[: 6 * len(slices)], state[6 * len(slices):]
        dev = grad_out.device
        cdt = torch.promote_types(q_dt, torch.float32)
        cb_x = row_codebook(_QKV_KIND, cfg.qkv_bits if cfg.mode == "probs" else cfg.bits)
        cb_p = row_codebook("probs", cfg.bits)
        need_q, need_k, need_v, need_mask = ctx.needs_input_grad[:4]
        nb = len(batch)
        dmask = torch.zeros(ctx.mask_shape, dtype=cdt, device=dev) if need_mask else None
        with _no_autocast(dev.type):
            g = grad_out.to(cdt)
            L, S = q_shape[-2], k_shape[-2]
            gen, drawn = None, 0
            if seed_t is not None:
                gen = seed_t if ctx.hashed else _dropout_generator(int(seed_t.item()), dev)
            # gradients in the broadcast (and GQA-expanded) batch shape, reduced at the end
            dq_shape = torch.Size((*batch, L, q_shape[-1]))
            dk_shape = torch.Size((*batch, S, k_shape[-1]))
            dv_shape = torch.Size((*batch, S, v_shape[-1]))
            dq = dk = dv = None
            n = 0
            for j, sl in enumerate(slices):
                where = _batch_index(sl)
                qp, qsc, kp, ksc, vp, vsc = qkv_state[6 * j: 6 * j + 6]
                qh = dequantize_rows(qp, qsc, cb_x, _sliced_shape(q_shape, sl), cdt)
                kh = _expand_kv(dequantize_rows(kp, ksc, cb_x, _sliced_shape(k_shape, sl), cdt), cfg.groups)
                vh = _expand_kv(dequantize_rows(vp, vsc, cb_x, _sliced_shape(v_shape, sl), cdt), cfg.groups)
                kT = kh.transpose(-1, -2)
                m = _bslice(mask, sl, nb)
                g_s = g[where]
                sl_batch = torch.broadcast_shapes(qh.shape[:-2], kT.shape[:-2], vh.shape[:-2])
                for i0, i1 in _chunk_bounds(L, math.prod(sl_batch) * S):
                    q_c = qh[..., i0:i1, :]
                    if cfg.mode == "probs":
                        rows_shape = (*p_batches[n], i1 - i0, S)
                        p = dequantize_rows(p_state[2 * n], p_state[2 * n + 1], cb_p, rows_shape, cdt, renorm=True)
                    else:
                        p = _attn_probs(q_c * cfg.scale, kT, _rows(m, i0, i1), cfg, i0, S)
                    n += 1
                    whole_rows = sl is None and (i0, i1) == (0, L)  # this part is all of dq
                    g_c = g_s[..., i0:i1, :]
                    keep = None if gen is None else _keep_scale(gen, p, cfg.dropout_p, drawn)
                    drawn += p.numel()
                    if need_v:
                        pd = p if keep is None else p * keep
                        dv = _accumulate(dv, dv_shape, where, torch.matmul(pd.transpose(-1, -2), g_c), sl is None)
                        del pd
                    if need_q or need_k or need_mask:
                        dp = torch.matmul(g_c, vh.transpose(-1, -2))
                        if dp.shape != p.shape:  # v broadcast P over more batch dims
                            dp = dp.sum_to_size(p.shape)
                        if keep is not None:
                            dp.mul_(keep)
                        ds = _softmax_bwd(dp, p)  # P * (dP - rowsum(P dP)); scale applied below
                        if need_mask:  # an additive mask enters the logits unscaled
                            _add_mask_grad(dmask, ds, sl, i0, i1)
                        if need_q:
                            rows = (*where, Ellipsis, slice(i0, i1), slice(None))
                            dq = _accumulate(dq, dq_shape, rows, torch.matmul(ds, kh), whole_rows)
                        if need_k:
                            dk = _accumulate(dk, dk_shape, where, torch.matmul(ds.transpose(-1, -2), q_c), sl is None)
                        del dp, ds
                    del p, keep
                del qh, kh, vh, kT
            if need_q:
                dq = dq.mul_(cfg.scale).sum_to_size(q_shape).to(q_dt)
            if need_k:
                dk = _reduce_kv(dk.mul_(cfg.scale), k_shape, cfg.groups).to(k_dt)
            if need_v:
                dv = _reduce_kv(dv, v_shape, cfg.groups).to(v_dt)
            if need_mask:
                dmask = dmask.to(ctx.mask_dtype)
        return dq, dk, dv, dmask, None


def _add_mask_grad(dmask: torch.Tensor, ds: torch.Tensor, sl: slice | None, i0: int, i1: int) -> None:
    """``dmask += ds`` for query rows ``i0:i1`` of batch slice ``sl``, summed over the dims along
    which the mask broadcasts (a relative-position bias shared by the batch, a padding mask
    shared by the heads)."""
    full = (1,) * (ds.dim() - dmask.dim()) + tuple(dmask.shape)
    index = [slice(None)] * len(full)
    if sl is not None and full[0] != 1:
        index[0] = sl
    if full[-2] != 1:
        index[-2] = slice(i0, i1)
    region = dmask.view(full)[tuple(index)]
    region.add_(ds.sum_to_size(region.shape))


def _recompute_logit_error(q: torch.Tensor, k: torch.Tensor, scale: float, groups: int, bits: int) -> torch.Tensor:
    """Estimated worst standard deviation (nats) over heads of the error that ``bits``-bit Q and
    K put in the recomputed logits: per element, rounding to a step of 2 absmax / (2**bits - 1)
    has std step / sqrt(12), so ``q_hat . k_hat - q . k`` has about
    ``step_q / sqrt(12) * |k| + step_k / sqrt(12) * |q|``, here with each head's largest step and
    norm. Heads holding a NaN or an infinity count 0 (their rows are NaN in either mode). O(rows x
    head dim), against the O(rows^2 x head dim) of the attention itself.

    It over-estimates when one channel dominates both Q and K (stored exactly at the row max, it
    adds no error but dominates the norms): such calls keep P needlessly, at a cost in bytes
    that the warning names."""
    per_unit = abs(scale) * 2.0 / ((2**bits - 1) * math.sqrt(12.0))

    def head_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        absmax = t.abs().amax(-1).amax(-1).float()  # (vector_norm with ord=inf is 10x slower on CPU)
        norm = torch.linalg.vector_norm(t, dim=-1, dtype=torch.promote_types(t.dtype, torch.float32)).amax(-1).float()
        return absmax[..., None, None], norm[..., None, None]  # (..., heads, 1, 1) for _expand_kv

    q_max, q_norm = head_stats(q)
    k_max, k_norm = (_expand_kv(t, groups) for t in head_stats(k))
    per_head = q_max * k_norm + k_max * q_norm
    return torch.where(per_head.isfinite(), per_head, 0.0).amax() * per_unit


def _checks_recompute(q: torch.Tensor) -> bool:
    """Whether this call can read the estimate back: not while tracing (a compiled graph keeps
    the mode it was given), on meta or fake tensors, or in CUDA-graph capture."""
    if not math.isfinite(RECOMPUTE_MAX_LOGIT_ERROR) or torch.compiler.is_compiling() or q.is_meta:
        return False
    if isinstance(q, torch._subclasses.FakeTensor):
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


_warned_recompute = False


def _warn_recompute_fallback(error: float, bits: int, qkv_bits: int) -> None:
    global _warned_recompute
    if _warned_recompute:
        return
    _warned_recompute = True
    warnings.warn(
        f"attention logits too large to recompute from {bits}-bit Q and K (estimated logit error "
        f"{error:.2g} nats, limit {RECOMPUTE_MAX_LOGIT_ERROR}): such calls keep their probabilities "
        f"at {bits} bits instead, and Q, K, V at {qkv_bits} ({bits / 8:g} byte per query-key pair and "
        "head more). To keep attention exact, leave it native: S2AConfig(op_bits={'attention': 0}) or "
        "compress_activations(..., ops={...} without 'attention'); to recompute anyway, set "
        "s2a.activations.attention.RECOMPUTE_MAX_LOGIT_ERROR = float('inf'). Reported once per process.",
        RuntimeWarning,
        stacklevel=3,
    )


def _batch_index(sl: slice | None) -> tuple[slice, ...]:
    """Index prefix selecting batch slice ``sl``; empty for the whole batch, which may have no
    batch dim at all (unbatched 2-D Q, K, V)."""
    return () if sl is None else (sl,)


def _sliced_shape(shape: torch.Size, sl: slice | None) -> torch.Size:
    """Shape of one batch slice of Q, K or V (:func:`_batch_slices` slices only when all three
    carry the whole batch dim, so none of them broadcasts along it)."""
    return shape if sl is None else torch.Size((sl.stop - sl.start, *shape[1:]))


def _accumulate(
    total: torch.Tensor | None, shape: torch.Size, where, part: torch.Tensor, whole: bool
) -> torch.Tensor:
    """``total[where] += part`` (``part`` summed over the dims it has beyond that region, or
    broadcast over those it lacks); returns ``total``. On first use ``total`` is zeros of
    ``shape``, unless ``part`` already is all of it (``whole``, one slice and one chunk): then
    it is ``part`` itself, so an unsliced call holds no second full-size gradient."""
    if total is None:
        if whole and part.shape == shape:
            return part
        total = part.new_zeros(shape)
    view = total[where]
    if part.shape != view.shape and part.numel() > view.numel():
        part = part.sum_to_size(view.shape)
    view.add_(part)
    return total


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    bits: int = 4,
    mode: str = DEFAULT_MODE,
    qkv_bits: int = 8,
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` with low-bit saved state.

    Same semantics as the native op (bool mask = keep, float mask additive,
    broadcastable masks, ``is_causal`` top-left aligned, ``scale`` default
    ``1/sqrt(E)``, GQA). Saved for backward, per call:

    * ``mode="probs"``: ``packed_nbytes(n, qkv_bits)`` bytes (``ceil(n*bits/8)``, up
      to 2 more for 3 bits) + 4 bytes per row of head dim for each of Q, K, V, plus
      ``packed_nbytes(n_P, bits)`` + 4 bytes per row of P.
    * ``mode="recompute"``: the same for Q, K, V at ``bits``, plus the mask tensor
      (by reference, it is an input). A call whose logits are too large for ``bits``-bit Q
      and K (estimated recomputation error over ``RECOMPUTE_MAX_LOGIT_ERROR`` nats) is
      stored as ``mode="probs"`` (P at ``bits``, Q, K, V at ``qkv_bits``), with a warning
      once per process; not checked under ``torch.compile``.

    plus 8 bytes (one int64 seed) when ``dropout_p > 0``. A float mask that requires grad
    (a trainable relative-position bias) gets its gradient and costs nothing more. Falls
    back to the native op (its own saved state) when no input needs a gradient or grad mode
    is off (with ``dropout_p == 0``: with dropout the same mask as with grad is drawn), or a
    tensor is empty.
    """
    check_bits(bits, ROW_BITS, "bits")
    check_bits(qkv_bits, ROW_BITS, "qkv_bits")
    _check_mode(mode)
    q, k, v = query, key, value

    def native():
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    )
    # A float mask may need a gradient (Swin's relative-position bias trains in full
    # fine-tuning): it gets dL/dlogits, summed over the dims it broadcasts along.
    mask_ok = attn_mask is None or (
        (attn_mask.dtype == torch.bool or attn_mask.is_floating_point())
        and not is_causal
        and (not attn_mask.requires_grad or attn_mask.dim() <= max(q.dim(), k.dim(), v.dim()))
    )
    # Without grad, dropout still draws s2a's mask (one seed of the default generator), not
    # native SDPA's: a reentrant checkpoint runs this forward without grad, then recomputes
    # it with grad, and both must drop the same probabilities.
    if (
        (not needs_grad and dropout_p == 0.0)
        or not mask_ok
        or q.numel() == 0
        or k.numel() == 0
        or v.numel() == 0
        or q.dim() < 2
        or k.dim() < 2
        or v.dim() < 2
        or not (0.0 <= dropout_p < 1.0)
        or not (q.is_floating_point() and q.dtype == k.dtype == v.dtype)
    ):
        return native()  # also raises the native errors for invalid arguments

    groups = 1
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and q.size(-3) != k.size(-3):
        hq, hk = q.size(-3), k.size(-3)
        if hk == 0 or hq % hk != 0 or v.size(-3) != hk:
            return native()
        groups = hq // hk

    dt = _autocast_dtype(q.device.type)
    if dt is not None and q.dtype != dt:  # native SDPA runs in the autocast dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool and dt is not None:
        mask = mask.to(dt)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    if mode == "recompute" and _checks_recompute(q):
        # one host sync per call, as a padding mask's dead-row check has
        error = float(_recompute_logit_error(q.detach(), k.detach(), sc, groups, bits))
        if error > RECOMPUTE_MAX_LOGIT_ERROR:
            _warn_recompute_fallback(error, bits, qkv_bits)
            mode = "probs"
    cfg = _Cfg(float(dropout_p), bool(is_causal), float(sc), groups, bits, mode, qkv_bits)
    return _SDPA.apply(q, k, v, mask, cfg)
