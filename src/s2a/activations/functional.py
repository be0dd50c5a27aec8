"""Autograd operators that keep low-bit state for backward.

Every operator's forward is the exact native computation; only what is saved
for backward changes. All saved tensors go through ``ctx.save_for_backward`` so
saved-tensor hooks, checkpointing and ``s2a.measure`` see them. Everything else
stashed on ``ctx`` is O(1) Python metadata.

If no input requires grad (inference, frozen prefix) the native op runs as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from . import rowquant as RQ
from ._once import once_differentiable
from .attention import _autocast_dtype, _no_autocast
from .codebooks import SMOOTH_FUNCTIONS, get_codebook
from .packing import check_bits, pack, unpack
from .rowquant import ROW_BITS, dequantize_rows, quantize_rows, row_codebook

POINTWISE_BITS = (1, 2, 3, 4, 8)
NORM_CODEBOOK = "normal"
EXACT_FUNCTIONS = ("relu", "relu6", "leaky_relu", "hardtanh", "hardsigmoid")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- pointwise nonlinearities ---------------------------------------------------------

# The exact forward of each smooth function is the one its codebook was fitted on.
_FORWARD = SMOOTH_FUNCTIONS


class _CodebookActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, bits: int) -> torch.Tensor:
        cb = get_codebook(name, bits)
        lut, _ = cb.tensors(x.device)
        y = _FORWARD[name](x)
        ctx.save_for_backward(kernels.encode_lut(x, lut, bits, cb.nan_code, cb.runs))
        ctx.name, ctx.bits = name, bits
        return y

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, g: torch.Tensor):
        (packed,) = ctx.saved_tensors
        _, levels = get_codebook(ctx.name, ctx.bits).tensors(g.device)
        return kernels.decode_lut(packed, g, levels, ctx.bits), None, None


class _MaskActivation(torch.autograd.Function):
    """ReLU-family: the derivative takes two values, so 1 bit is exact."""

    @staticmethod
    def forward(ctx, x, fn, lo: float, hi: float | None, inclusive: bool, low: float, high: float):
        y = fn(x)
        ctx.save_for_backward(kernels.encode_mask(x, lo, hi, inclusive))
        ctx.levels = (low, high)
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        return kernels.decode_mask(packed, g, *ctx.levels), None, None, None, None, None, None


def activation(x: torch.Tensor, name: str, bits: int = 4, **kwargs) -> torch.Tensor:
    """Pointwise nonlinearity ``name`` with compressed backward state.

    ReLU, ReLU6, LeakyReLU, Hardtanh and Hardsigmoid always store 1 exact bit; the smooth
    functions store ``bits``-bit codes of their derivative codebook.
    """
    check_bits(bits, POINTWISE_BITS, what=f"bits for {name}")
    if name in EXACT_FUNCTIONS:
        if name == "relu":
            args = (F.relu, 0.0, None, True, 0.0, 1.0)
        elif name == "leaky_relu":
            slope = float(kwargs.get("negative_slope", 0.01))
            args = (lambda t: F.leaky_relu(t, slope), 0.0, None, False, slope, 1.0)
        elif name == "hardsigmoid":  # relu6(x + 3) / 6: slope 1/6 strictly inside (-3, 3)
            args = (F.hardsigmoid, -3.0, 3.0, False, 0.0, 1.0 / 6.0)
        else:
            lo, hi = (0.0, 6.0) if name == "relu6" else (
                float(kwargs.get("min_val", -1.0)), float(kwargs.get("max_val", 1.0)))
            args = (lambda t: F.hardtanh(t, lo, hi), lo, hi, True, 0.0, 1.0)
        if not _needs_grad(x):
            return args[0](x)
        return _MaskActivation.apply(x, *args)
    if name not in _FORWARD:
        known = sorted([*_FORWARD, *EXACT_FUNCTIONS])
        raise ValueError(f"unknown activation {name!r}; supported: {known}")
    if not _needs_grad(x):
        return _FORWARD[name](x)
    return _CodebookActivation.apply(x, name, bits)


class _StarReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bias, bits: int):
        r = F.relu(x)
        out = scale * r**2 + bias
        need_x, need_scale = ctx.needs_input_grad[:2]
        # relu(x), non-negative, on the probabilities' codebook (levels crowd near 0): the
        # derivative is 2 * scale * relu(x), the scale's gradient sums relu(x)**2
        kept = quantize_rows(r, row_codebook("probs", bits), keep_nan=True) if need_x or need_scale else ()
        ctx.save_for_backward(*kept, scale)
        ctx.meta = (x.shape, x.dtype, bits, bias.shape, bias.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        shape, dtype, bits, b_shape, b_dtype = ctx.meta
        *kept, scale = ctx.saved_tensors
        gx = gs = gb = None
        if kept:
            cdt = torch.promote_types(g.dtype, torch.float32)
            r = dequantize_rows(*kept, row_codebook("probs", bits), shape, cdt)
            if ctx.needs_input_grad[0]:
                gx = (g.to(cdt) * (2 * scale.to(cdt)) * r).to(dtype)
            if ctx.needs_input_grad[1]:
                gs = (g.to(cdt) * r * r).sum_to_size(scale.shape).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum_to_size(b_shape).to(b_dtype)
        return gx, gs, gb, None


def star_relu(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """MetaFormer's StarReLU, ``scale * relu(x)**2 + bias``, keeping ``relu(x)`` at ``bits``
    bits per row of its last dimension (natively in full precision, and ``relu(x)**2`` too
    where the scale trains)."""
    check_bits(bits, ROW_BITS, what="bits for star_relu")
    if not _needs_grad(x, scale, bias) or x.numel() == 0:
        return scale * F.relu(x) ** 2 + bias
    return _StarReLU.apply(x, scale, bias, bits)


# --- normalisation ------------------------------------------------------------------


def _store_normalized(xhat: torch.Tensor, bits: int):
    """Normalised input (rows, channels) at ``bits`` bits, one scale per channel.

    Per channel, not per row: pretrained transformers have a few outlier channels
    (values 20-100x the rest, the same channels in every token); a per-row scale
    would spend all levels on them and round the other channels to zero. A token row
    holding NaN/inf is zeroed first, as the fast kernel does: it would otherwise put a
    NaN in every channel and spoil every scale (its own gradient is NaN through 1/σ).
    """
    finite = torch.nan_to_num(xhat, nan=0.0, posinf=0.0, neginf=0.0)
    return quantize_rows(finite.t().contiguous(), row_codebook(NORM_CODEBOOK, bits))


def _load_normalized(packed, scale, bits, shape) -> torch.Tensor:
    rows, channels = shape
    return dequantize_rows(packed, scale, row_codebook(NORM_CODEBOOK, bits), (channels, rows)).t()


def _reduce_to(t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    if like is None or not like.requires_grad:
        return None
    return t.reshape(-1, like.numel()).sum(0).view(like.shape).to(like.dtype)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm / RMSNorm over the trailing ``nd`` dims; stores x̂ at ``bits`` bits
    (one scale per channel) + 1/σ per row."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, nd: int, rms: bool, bits: int):
        shape = x.shape
        norm_shape = shape[len(shape) - nd:]
        d = math.prod(norm_shape)
        x2d = x.reshape(-1, d)
        if rms:
            rstd = torch.rsqrt(x2d.float().pow(2).mean(-1, keepdim=True) + eps)
            mean = rstd  # unused by the RMS kernels
            # y is computed in x's shape, not reshaped from 2-D: a view made inside the
            # Function could not be modified in place by the caller.
            y = x.float() * rstd.view(*shape[:len(shape) - nd], *(1,) * nd)
            y = y * weight.float() if weight is not None else y
            y = y.to(x.dtype)  # as F.rms_norm: the input's dtype, whatever the weight's
        else:
            # The native kernel gives the exact output and the per-row statistics.
            with _no_autocast(x.device.type):
                y, mean, rstd = torch.native_layer_norm(x, norm_shape, weight, bias, eps)
            mean, rstd = mean.float().reshape(-1, 1), rstd.float().reshape(-1, 1)
        fast = bits != 3 and d % (8 // bits) == 0
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # Only the bias trains: its gradient needs nothing.
            packed, scale = x.new_zeros(0, dtype=torch.uint8), x.new_zeros(0)
        elif fast:
            _, mids = row_codebook(NORM_CODEBOOK, bits).tensors(x.device)
            packed, scale = kernels.norm_encode(x2d, mean, rstd, mids, bits, rms)
        else:
            xhat = x2d.float() * rstd if rms else (x2d.float() - mean) * rstd
            packed, scale = _store_normalized(xhat, bits)
        ctx.save_for_backward(packed, scale, rstd, weight, bias)
        ctx.meta = ((x2d.shape[0], d), shape, bits, rms, x.dtype, fast)
        return y

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, g):
        packed, scale, rstd, weight, bias = ctx.saved_tensors
        flat_shape, shape, bits, rms, in_dtype, fast = ctx.meta
        g2d = g.reshape(flat_shape)
        gx = gw = gb = None
        if bias is not None and bias.requires_grad:
            gb = _reduce_to(g2d.float(), bias)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return gx, gw, gb, None, None, None, None
        w = weight.float().reshape(-1) if weight is not None else torch.ones((), device=g.device)
        if fast:
            levels, _ = row_codebook(NORM_CODEBOOK, bits).tensors(g.device)
            need_w = weight is not None and weight.requires_grad
            gx2d, gw_all = kernels.norm_backward(packed, scale, levels, rstd, g2d, w, bits, rms, need_w)
        else:
            xhat = _load_normalized(packed, scale, bits, flat_shape)
            gf = g2d.float()
            wg = gf * w
            proj = (wg * xhat).mean(-1, keepdim=True)
            centred = wg if rms else wg - wg.mean(-1, keepdim=True)
            gx2d = rstd * (centred - xhat * proj)
            gw_all = (gf * xhat).sum(0)
        if weight is not None and weight.requires_grad:
            # A row holding NaN/inf is stored as zeros (it would spoil every channel's scale);
            # natively its x̂ is NaN and makes every dL/dw NaN. A NaN row's 1/σ is NaN: added
            # as 0 * sum(1/σ), O(rows), that NaN comes back. (An RMSNorm row with an inf but
            # no NaN has 1/σ = 0 and stays finite here, where natively it is NaN.)
            gw = (gw_all + rstd.sum() * 0.0).view(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gx = gx2d.reshape(shape).to(in_dtype)
        return gx, gw, gb, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    """GroupNorm of (N, C, *): stores x̂ at ``bits`` bits, one scale per (sample, channel)
    row of its spatial positions (a channel's outliers spend only its own levels), and 1/σ
    per (sample, group)."""

    @staticmethod
    def forward(ctx, x, groups: int, weight, bias, eps: float, bits: int):
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        with _no_autocast(x.device.type):
            y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        mean, rstd = mean.float().reshape(n, groups, 1), rstd.float().reshape(n, groups, 1)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            xhat = (x.reshape(n, groups, -1).float() - mean) * rstd
            xhat = torch.nan_to_num(xhat, nan=0.0, posinf=0.0, neginf=0.0)
            packed, scale = quantize_rows(xhat.reshape(n * c, hw), row_codebook(NORM_CODEBOOK, bits))
        else:  # only the bias trains: its gradient needs nothing
            packed, scale = x.new_zeros(0, dtype=torch.uint8), x.new_zeros(0)
        ctx.save_for_backward(packed, scale, rstd, weight, bias)
        ctx.meta = (x.shape, x.dtype, groups, bits)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        packed, scale, rstd, weight, bias = ctx.saved_tensors
        shape, dtype, groups, bits = ctx.meta
        n, c = shape[:2]
        hw = math.prod(shape[2:])
        gf = g.float().reshape(n, c, hw)
        gx = gw = gb = None
        if bias is not None and ctx.needs_input_grad[3]:
            gb = gf.sum((0, 2)).to(bias.dtype)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            return gx, None, gw, gb, None, None
        xhat = dequantize_rows(packed, scale, row_codebook(NORM_CODEBOOK, bits), (n * c, hw)).view(n, c, hw)
        if weight is not None and ctx.needs_input_grad[2]:
            # a NaN group's 1/σ is NaN: added as 0 * sum(1/σ), the NaN comes back as natively
            gw = ((gf * xhat).sum((0, 2)) + rstd.sum() * 0.0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            wg = gf * weight.float().view(1, c, 1) if weight is not None else gf
            wg, xh = wg.reshape(n, groups, -1), xhat.reshape(n, groups, -1)
            gx = (rstd * (wg - wg.mean(-1, keepdim=True) - xh * (wg * xh).mean(-1, keepdim=True)))
            gx = gx.reshape(shape).to(dtype)
        return gx, None, gw, gb, None, None


def group_norm(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    eps: float = 1e-5, bits: int = 4,
) -> torch.Tensor:
    """``F.group_norm`` storing the normalised input at ``bits`` bits per element."""
    _check_row_bits(bits, "group_norm")
    # (rows of fewer than 16 positions would keep more in scales than they save)
    if (not _needs_grad(x, weight, bias) or x.numel() == 0 or x.dim() < 3 or x.shape[1] % num_groups
            or math.prod(x.shape[2:]) < 16):
        return F.group_norm(x, num_groups, weight, bias, eps)
    x, weight, bias = _as_autocast_norm("aten::group_norm", x, weight, bias)
    return _GroupNorm.apply(x, int(num_groups), weight, bias, float(eps), bits)


def _autocast_float32_norms() -> frozenset[tuple[str, str]]:
    """(op, device type) pairs autocast has a kernel for. For the norms that is the float32
    policy: CUDA (XPU, MPS...) autocast runs layer_norm, group_norm and rms_norm in float32,
    CPU autocast in the input's dtype. Asked of the dispatcher, as the lists change between
    PyTorch versions (rms_norm joined later; MPS has none); once, at import: a traced model
    (torch.compile) can read a constant table, not the dispatcher."""
    pairs = set()
    for device in ("cpu", "cuda", "xpu", "mps", "mtia", "maia", "hpu", "xla"):
        for op in ("aten::layer_norm", "aten::group_norm", "aten::rms_norm"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autocast" + device.upper()):
                    pairs.add((op, device))
            except (RuntimeError, AttributeError):  # no autocast dispatch key for this device
                break
    return frozenset(pairs)


_AUTOCAST_FLOAT32_NORMS = _autocast_float32_norms()


def _as_autocast_norm(op: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The norm's tensors as native autocast would pass them to ``op``: fp16 / bf16 ones cast
    to float32 where autocast runs it in float32 (the output is then float32 too, and the
    gradients flow back through the casts, as natively)."""
    x = tensors[0]
    if _autocast_dtype(x.device.type) is None or (op, x.device.type) not in _AUTOCAST_FLOAT32_NORMS:
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def _check_row_bits(bits: int, what: str) -> None:
    check_bits(bits, ROW_BITS, what=f"bits for {what}")


class _RMSNorm(_LayerNorm):
    """The RMS flavour, under its own name: memory reports file its bytes as ``rms_norm``."""


def _norm_dims(x: torch.Tensor, normalized_shape: Sequence[int] | int, op: str) -> int:
    """The number of trailing dims a norm normalises, after checking that they are
    ``normalized_shape`` (the kernels read the extent from ``x``, so a mismatch would
    normalise over the wrong one instead of failing as natively)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    nd = len(shape)
    if nd == 0 or nd > x.dim() or tuple(x.shape[x.dim() - nd:]) != shape:
        raise RuntimeError(
            f"{op}: given normalized_shape={list(shape)}, expected an input of shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size {list(x.shape)}")
    return nd


def layer_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, eps: float = 1e-5, bits: int = 4,
) -> torch.Tensor:
    """``F.layer_norm`` storing the normalised input at ``bits`` bits per element."""
    _check_row_bits(bits, "layer_norm")
    if not _needs_grad(x, weight, bias) or x.numel() == 0:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    nd = _norm_dims(x, normalized_shape, "layer_norm")
    x, weight, bias = _as_autocast_norm("aten::layer_norm", x, weight, bias)
    return _LayerNorm.apply(x, weight, bias, eps, nd, False, bits)


def rms_norm(
    x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
    eps: float | None = None, bits: int = 4,
) -> torch.Tensor:
    """``F.rms_norm`` storing the normalised input at ``bits`` bits per element (float64
    input runs natively: its kernels compute in float32)."""
    _check_row_bits(bits, "rms_norm")
    if not _needs_grad(x, weight) or x.numel() == 0 or x.dtype == torch.float64:
        return F.rms_norm(x, normalized_shape, weight, eps)
    if eps is None:
        # As ATen: the epsilon of the type it computes in (float32 for bf16 / fp16 input),
        # not of the input's (bf16's 7.8e-3 would swamp the mean square of small inputs).
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    nd = _norm_dims(x, normalized_shape, "rms_norm")
    x, weight = _as_autocast_norm("aten::rms_norm", x, weight)
    return _RMSNorm.apply(x, weight, None, eps, nd, True, bits)


# BatchNorm in train mode: the batch statistics, the output and the codes of x̂ come
# out of one compiled pass over x (plus the per-row reductions); the backward decodes the
# codes inside its two passes. x is viewed as (per, N/per, C, S) (S: the spatial size,
# 1 for (N, C) input): row (j, n, c) is the plane x[j*N/per + n, c], with one scale each.


def _bn_planes(n: int, bits: int) -> int:
    """``per``: how many samples share a byte of the saved codes. :func:`packing.pack`
    of the (N, C, S) codes puts the codes of samples n, n + N/per, ... (same channel and
    position) in one byte, so when ``N % per == 0`` the forward writes the packed bytes
    directly; else (``per`` = 1) it writes codes that are packed afterwards."""
    per = 8 // bits
    return per if bits in (2, 4) and n % per == 0 else 1


_BN_TABLES: dict[int, tuple[str, str, bool]] = {}


def _bn_tables(bits: int) -> tuple[str, str, bool]:
    """(midpoints, levels, symmetric) of the codebook as static strings of float32 values:
    the compiled bodies use them as constants, not table loads (inductor counts every
    load as a read and stores, rather than recomputes, an expression with many reads)."""
    if bits not in _BN_TABLES:
        levels, mids = row_codebook(NORM_CODEBOOK, bits).tensors(torch.device("cpu"))
        _BN_TABLES[bits] = (",".join(map(repr, mids.tolist())),
                            ",".join(map(repr, levels.tolist())),
                            bool(torch.equal(levels, -levels.flip(0))))
    return _BN_TABLES[bits]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _bn_forward_body(x, mean, rstd, eps, w, b, mids, *, bits: int, rule: str, per: int,
                     batch_stats: bool, quant: bool, has_w: bool, has_b: bool, stack: bool,
                     mids_str: str):
    """BatchNorm forward of ``x`` (per, N/per, C, S): (y, codes, per-row max |x̂|
    (per, N/per, C, 1), batch mean, biased batch variance, 1/σ). The batch statistics are
    float64, None unless ``batch_stats``.

    Codes: ``per`` > 1, packed bytes (N/per, C, S); else uint8 codes shaped like ``x``.
    With ``batch_stats`` the mean and variance come from float64 row sums of x and x²,
    taken in the same loop as the row max and min (E[x²] - mean² in float64 keeps ~9
    digits more than float32 needs; only a mean 10^4 times the spread would show). The
    compiled and eager paths add in different orders, but in float64: they round to the
    same float32 mean and 1/σ (barring a near-tie at a rounding boundary), hence the same
    codes. The row scale max |x̂| is computed from the row max and min of x:
    x ↦ (x - mean) * rstd is monotone in float arithmetic, so it is the same value.
    """
    xf = x.float()
    pmax, pmin = xf.amax(3), xf.amin(3)
    stats = (None, None)
    if batch_stats:
        xd = xf.double()
        mean_d = xd.mean(3).mean((0, 1))  # every row has S elements: the mean of row means
        var = ((xd * xd).mean(3).mean((0, 1)) - mean_d * mean_d).clamp_min(0.0)
        stats = (mean_d, var)
        mean = mean_d.float()
        rstd = torch.rsqrt(var + eps).float()
    # Shapes built with -1: reading the channel count would make dynamo specialise on it
    # and recompile for every layer width.
    bshape = (1, -1, 1)
    m3, r3 = mean.view(bshape), rstd.view(bshape)

    def affine(xhat):
        y = xhat
        if has_w:
            y = y * w.float().view(bshape)
        if has_b:
            y = y + b.float().view(bshape)
        return y.to(x.dtype)

    compiled = torch.compiler.is_compiling()
    fused = quant and per > 1 and compiled
    if not (fused and stack):
        y = affine((xf - m3) * r3)
    if not quant:
        return y, None, None, *stats, rstd
    scale = torch.maximum((pmax - mean) * rstd, (mean - pmin) * rstd).unsqueeze(-1)
    finite, safe = RQ._safe_scale(scale)
    if not fused:
        xhat = (xf - m3) * r3
        if not compiled:
            xhat = xhat.contiguous()  # channels_last input: bucketize wants it contiguous
        codes = RQ._encode_codes(xhat, finite, safe, mids, bits, rule, True)
        return y, kernels._combine(codes, bits) if per > 1 else codes, scale, *stats, rstd
    # One loop over the packed bytes: for each of the ``per`` samples sharing a byte, x̂,
    # its output (``stack``: y written from the same loop) and its code, counted in float
    # and summed into the byte in float (vectorises; uint8 masks and shifts do not).
    mv = _floats(mids_str)
    ys, out = [], None
    for j in range(per):
        xhat = (xf[j] - m3) * r3
        if stack:
            ys.append(affine(xhat))
        v = torch.where(finite[j], xhat, 0.0) / safe[j]
        count = torch.where(v <= mv[0], 0.0, 1.0)
        for k in range(1, (1 << bits) - 1):
            count = count + torch.where(v <= mv[k], 0.0, 1.0)
        out = count if j == 0 else out + count * float(1 << (bits * j))
    if stack:
        y = torch.stack(ys)
    return y, out.to(torch.uint8), scale, *stats, rstd


def _bn_backward_body(codes, scale, levels, g, rstd, w, *, bits: int, rule: str, per: int,
                      batch_stats: bool, need_x: bool, need_w: bool, need_b: bool, has_w: bool,
                      stack: bool, levels_str: str, symmetric: bool):
    """(grad x float32 (per, N/per, C, S), grad weight, grad bias) from the saved codes
    (``per`` > 1: packed (N/per, C, S), unpacked here; else (1, N, C, S)) and g viewed as
    (per, N/per, C, S): decode fused into the two passes of the BatchNorm backward."""
    lv = _floats(levels_str)

    def decode(c, sc):
        if rule != "table" or not torch.compiler.is_compiling():
            return RQ._decode_codes(c, sc, levels, bits, rule, True)
        cf = c.float()
        if not symmetric:  # a chain of selects over the levels
            out = torch.where(cf < 0.5, lv[0], lv[1])
            for k in range(2, len(lv)):
                out = torch.where(cf > k - 0.5, lv[k], out)
            return out * sc
        # Symmetric levels (lv[k-1-i] == -lv[i]): select among the k/2 magnitudes, then
        # the sign; half the selects of the chain (the decode is most of this loop's work).
        half = len(lv) // 2
        neg = cf < half - 0.5
        m = torch.where(neg, (half - 1) - cf, cf - half)
        out = torch.where(m < 0.5, lv[half], lv[half + 1])
        for k in range(2, half):
            out = torch.where(m > k - 0.5, lv[half + k], out)
        return torch.where(neg, -out, out) * sc

    # Blocks of (codes, g), each 4-D: one per sample block when gx is written from the
    # loop over the packed bytes (``stack``), else the whole tensor (g not contiguous,
    # channels_last: gx keeps its layout; or ``per`` == 1: codes already unpacked).
    bshape, dims = (1, 1, -1, 1), (0, 1, 3)
    mask = (1 << bits) - 1
    if per == 1:
        blocks = [(decode(codes, scale), g)]
    elif stack:
        blocks = [(decode(((codes >> (bits * j)) & mask if j else codes & mask).unsqueeze(0),
                          scale[j:j + 1]), g[j:j + 1]) for j in range(per)]
    else:
        shifts = torch.arange(per, device=codes.device, dtype=torch.uint8).mul_(bits)
        blocks = [(decode((codes.unsqueeze(0) >> shifts.view(per, 1, 1, 1)) & mask, scale), g)]
    blocks = [(xh, gb.float()) for xh, gb in blocks]
    need_sums = need_x and batch_stats
    sg = sum(gf.sum(dims) for _, gf in blocks) if need_b or need_sums else None
    sgx = sum((gf * xh).sum(dims) for xh, gf in blocks) if need_w or need_sums else None
    gx = None
    if need_x:
        r = rstd.view(bshape)
        wv = w.float().view(bshape) if has_w else None
        if batch_stats:
            n = per * g.shape[1] * g.shape[3]
            mean_g, proj = (sg / n).view(bshape), (sgx / n).view(bshape)
            if has_w:
                mean_g, proj = mean_g * wv, proj * wv
        outs = []
        for xh, gf in blocks:
            wg = gf * wv if has_w else gf
            outs.append(r * (wg - mean_g - xh * proj) if batch_stats else r * wg)
        gx = torch.cat(outs) if len(outs) > 1 else outs[0]
    return gx, (sgx if need_w else None), (sg if need_b else None)


class _BatchNorm(torch.autograd.Function):
    """BatchNorm over dim 1; train mode stores x̂ (one scale per (sample, channel) row),
    eval mode with a frozen weight stores nothing but 1/σ per channel. With batch
    statistics the outputs are (y, mean, biased variance), the statistics float64 and not
    differentiable (for the running averages); else y. y is shaped (per, N/per, C, S)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd, batch_stats: bool, eps: float, bits: int):
        ctx.set_materialize_grads(False)
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        keep_xhat = batch_stats or (weight is not None and weight.requires_grad)
        quant = (keep_xhat and ctx.needs_input_grad[0]) or (
            weight is not None and weight.requires_grad)
        per = _bn_planes(n, bits) if quant else 1
        cb = row_codebook(NORM_CODEBOOK, bits)
        _, mids = cb.tensors(x.device)
        eps_t = torch.tensor(eps, dtype=torch.float64, device=x.device)
        if batch_stats:
            mean = rstd = eps_t  # placeholders: the statistics come from the fused pass
        x4 = x.reshape(per, n // per, c, s)  # a view, for channels_last input too
        # (parameters go in detached: dynamo gives nn.Parameter inputs static shapes,
        # which would pin the channel count and recompile for every layer width)
        y, codes, scale, mean, var, rstd = RQ.run_fused(
            _bn_forward_body, x4, mean, rstd, eps_t,
            (weight if weight is not None else eps_t).detach(),
            (bias if bias is not None else eps_t).detach(), mids, bits=bits, rule=cb.rule,
            per=per, batch_stats=batch_stats, quant=quant, has_w=weight is not None,
            has_b=bias is not None, stack=x4.is_contiguous(), mids_str=_bn_tables(bits)[0])
        if quant:
            # a (sample, channel) row that is not finite decodes to NaN: its channel's weight
            # gradient is NaN, as natively (stored as 0 it came out finite)
            scale = RQ.stored_scale(scale, keep_nan=True)
            packed = codes if per > 1 else RQ.pack_codes(codes, bits)
        else:
            packed, scale = x.new_zeros(0, dtype=torch.uint8), x.new_zeros(0)
        ctx.save_for_backward(packed, scale, rstd, weight, bias)
        ctx.meta = ((per, n // per, c, s), x.shape, batch_stats, bits, x.dtype)
        # y stays (per, N/per, C, S): reshaped here it would be a view created inside the
        # Function, which autograd forbids modifying in place (an inplace ReLU after it).
        if not batch_stats:
            return y
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, g, *_):
        packed, scale, rstd, weight, bias = ctx.saved_tensors
        view, shape, batch_stats, bits, in_dtype = ctx.meta
        need_w = weight is not None and weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        need_x = ctx.needs_input_grad[0]
        if g is None:
            return (None,) * 8
        g4 = g.reshape(view)
        if packed.numel():
            cb = row_codebook(NORM_CODEBOOK, bits)
            levels, _ = cb.tensors(g.device)
            per = view[0]
            codes = packed if per > 1 else RQ.unpack_codes(
                packed, bits, math.prod(view)).view(view)
            _, levels_str, symmetric = _bn_tables(bits)
            gx, gw, gb = RQ.run_fused(
                _bn_backward_body, codes, scale, levels, g4, rstd,
                (weight if weight is not None else rstd).detach(), bits=bits, rule=cb.rule,
                per=per, batch_stats=batch_stats, need_x=need_x, need_w=need_w, need_b=need_b,
                has_w=weight is not None, stack=g4.is_contiguous(), levels_str=levels_str,
                symmetric=symmetric)
        else:  # eval mode, frozen weight: grad x = rstd * w * g, nothing stored
            gf = g4.float()
            bshape = (1, 1, -1, 1)
            gw = None
            gb = gf.sum((0, 1, 3)) if need_b else None
            gx = None
            if need_x:
                gx = rstd.view(bshape) * (gf * weight.float().view(bshape) if weight is not None
                                          else gf)
        gx = gx.reshape(shape).to(in_dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gx, gw, gb, None, None, None, None, None


def _affine_batch_norm(x, mean, rstd, weight, bias):
    """Eval-mode BatchNorm with a frozen weight is ``x * a + (bias - mean * a)``, a per
    channel. As one native ``addcmul`` autograd keeps only ``a`` (C floats) and the
    backward is native too: no Python Function and no compiled call per layer, which
    dominated the step time of small CNNs (EfficientNet-Lite0 at 64 px: 147 of them)."""
    a = rstd * weight.detach().float() if weight is not None else rstd
    shift = -mean * a
    if bias is not None:
        shift = bias.float() + shift
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    if x.dtype == torch.float32:
        return torch.addcmul(shift.view(shape), x, a.view(shape))
    # half inputs: computed in float32 and rounded once, as the native kernel does; the
    # casts keep nothing for backward
    return torch.addcmul(shift.view(shape), x.float(), a.view(shape)).to(x.dtype)


def batch_norm(
    x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, bits: int = 4,
) -> torch.Tensor:
    """``F.batch_norm`` storing the normalised input low-bit (or nothing in eval mode with
    frozen affine); float64 input runs natively (its kernels compute in float32)."""
    _check_row_bits(bits, "batch_norm")
    if (not _needs_grad(x, weight, bias) or x.numel() == 0 or x.dtype == torch.float64
            or (not training and (running_mean is None or running_var is None))):  # the last: F's error
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        mean = running_mean.float()
        rstd = torch.rsqrt(running_var.float() + eps)
        if x.dim() >= 2 and not (weight is not None and weight.requires_grad):
            return _affine_batch_norm(x, mean, rstd, weight, bias)
        return _BatchNorm.apply(x, weight, bias, mean, rstd, False, eps, bits).reshape(x.shape)
    if training and x.numel() // x.shape[1] == 1:
        # As F.batch_norm: a batch variance of one value is 0, and the output would be silently 0.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    # Batch statistics, computed in the fused forward pass.
    y, mean, var = _BatchNorm.apply(x, weight, bias, None, None, True, eps, bits)
    y = y.reshape(x.shape)
    if training and running_mean is not None:
        # As F.batch_norm: the unbiased variance, the update computed in float64 from the
        # float64 statistics and rounded once.
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            unbiased = var * (n / max(n - 1, 1))
            for buf, new in ((running_mean, mean), (running_var, unbiased)):
                buf.copy_(buf.double() * (1 - momentum) + new * momentum)
    return y


# --- dropout ------------------------------------------------------------------------


def _fresh_seed() -> torch.Tensor:
    # Drawn from the default generator, so torch.manual_seed makes runs reproducible.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _mask_from_seed(seed, shape, p: float, device, dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # no Generator object in a traced graph: the hashed mask
        return kernels.dropout_mask(shape, seed, p, device).to(dtype)
    return _bernoulli_mask(seed, shape, p, device, dtype)


@torch.compiler.disable  # a backward traced by compiled autograd must draw the forward's mask, not the hash
def _bernoulli_mask(seed, shape, p: float, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    keep = torch.empty(shape, device=device, dtype=torch.float32).bernoulli_(1 - p, generator=gen)
    return keep.to(dtype)


def _hashed(device: torch.device) -> bool:
    # CPU: the mask is a counter-based hash of (seed, index), recomputed inside the
    # compiled pass that applies it (kernels.dropout_apply): ~2x cheaper than
    # bernoulli_. Other devices, and the bitmask mode, keep bernoulli_ (but not under
    # torch.compile: a Generator object or int(seed) would break the graph).
    return device.type == "cpu" or torch.compiler.is_compiling()


def _dropout_masked(x: torch.Tensor, p: float, regenerate: bool):
    """(output, seed, keep mask or None, hashed): the mask drawn from one seed of the default
    generator, with or without autograd: a reentrant checkpoint runs the forward without
    grad and recomputes it with grad, and both must draw the same mask. The output is
    flat when ``hashed`` (callers view it as ``x.shape``), else shaped like ``x``."""
    seed = _fresh_seed()
    hashed = regenerate and _hashed(x.device)
    if hashed:
        return kernels.dropout_apply(x, seed, p), seed, None, True
    keep = _mask_from_seed(seed, x.shape, p, x.device, x.dtype)
    return x * keep * (1.0 / (1 - p)), seed, keep, False


def dropout_replay(t: torch.Tensor, state: torch.Tensor, meta: tuple) -> torch.Tensor:
    """``t`` times the mask (and 1 / (1 - p)) that a dropout drew, from what it saved
    (``state``, ``meta``): its backward, and the dropped tensor again from its input."""
    p, regenerate, shape, hashed = meta
    if regenerate:
        if hashed:
            return kernels.dropout_apply(t, state, p).view(shape)
        keep = _bernoulli_mask(state, shape, p, t.device, t.dtype)  # drawn so, whoever traces this
    else:
        keep = unpack(state, 1, t.numel()).view(shape).to(t.dtype)
    return t * keep * (1.0 / (1 - p))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, regenerate: bool, sink: list | None = None):
        y, seed, keep, hashed = _dropout_masked(x, p, regenerate)
        # 8 bytes (the mask is drawn again from the same seed in backward) or 1 bit per element
        state = seed if regenerate else pack(keep.to(torch.uint8), 1)
        ctx.save_for_backward(state)
        ctx.meta = (p, regenerate, x.shape, hashed)
        if sink is not None:  # the caller replays the mask elsewhere (see dropout_replay)
            sink.append((state, ctx.meta))
        return y

    @staticmethod
    def backward(ctx, g):
        (state,) = ctx.saved_tensors
        return dropout_replay(g, state, ctx.meta), None, None, None


def dropout(
    x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, mode: str = "regenerate",
    *, sink: list | None = None,
) -> torch.Tensor:
    """``F.dropout`` whose mask costs 0 bytes (``regenerate``) or 1 bit per element (``bitmask``).

    ``sink``: a list that receives ``(state, meta)`` for :func:`dropout_replay` when a mask
    was drawn with autograd recording."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if mode not in ("regenerate", "bitmask"):
        raise ValueError(f"dropout mode {mode!r} is not supported; choose 'regenerate' or 'bitmask'")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return F.dropout(x, p, training, inplace)
    if not _needs_grad(x):
        y = _dropout_masked(x, p, mode == "regenerate")[0]
    else:
        # The Function may return the flat output: viewed here, outside it, the result can
        # be modified in place (a view made inside an autograd Function cannot).
        y = _Dropout.apply(x, p, mode == "regenerate", sink)
    y = y.view(x.shape)
    # inplace: x itself holds the result, as with F.dropout (with grad, autograd records the
    # copy; a leaf that requires grad raises, as natively).
    return x.copy_(y) if inplace else y


class _DropPath(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep_prob: float, scale_by_keep: bool):
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        factor = keep / keep_prob if scale_by_keep and keep_prob > 0 else keep
        ctx.save_for_backward(pack(keep.reshape(-1).to(torch.uint8), 1))
        ctx.meta = (shape, keep_prob, scale_by_keep, x.shape[0])
        return x * factor

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, keep_prob, scale_by_keep, n = ctx.meta
        keep = unpack(packed, 1, n).view(shape).to(g.dtype)
        if scale_by_keep and keep_prob > 0:
            keep = keep / keep_prob
        return g * keep, None, None


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth (timm semantics) keeping one bit per sample."""
    if drop_prob == 0.0 or not training:
        return x
    if not _needs_grad(x):
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - drop_prob)
        return x * (keep / (1 - drop_prob) if scale_by_keep and drop_prob < 1 else keep)
    return _DropPath.apply(x, 1.0 - drop_prob, scale_by_keep)


# --- frozen convolution -------------------------------------------------------------


class _FrozenConv(torch.autograd.Function):
    """Convolution whose weight is frozen: grad_input needs only the weight, so the
    input is not kept (PyTorch's own convolution keeps it regardless). Under autocast the
    weight is cast here and the parameter itself is kept (no cast copy lives until backward,
    which casts it again)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        y = torch.ops.aten.convolution(x, w, bias, stride, padding, dilation, False,
                                       [0] * len(stride), groups)
        del w
        ctx.save_for_backward(weight)
        ctx.meta = (x.shape, x.dtype, stride, padding, dilation, groups,
                    None if bias is None else list(bias.shape))
        return y

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups, bias_shape = ctx.meta
        gx = gb = None
        if ctx.needs_input_grad[0]:
            # grad_input is the transposed convolution of g. convolution_backward would need
            # an input tensor (only its shape is read); a stand-in for it made oneDNN up to
            # 4x slower on strided depthwise layers, the transposed convolution is not
            # (and gives the same values).
            k = weight.shape[2:]
            out_pad = [shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                       + dilation[i] * (k[i] - 1) + 1) for i in range(len(k))]
            w = weight if weight.dtype == g.dtype else weight.to(g.dtype)
            gx = torch.ops.aten.convolution(g, w, None, stride, padding, dilation, True, out_pad,
                                            groups).to(dtype)
        if bias_shape is not None and ctx.needs_input_grad[2]:
            gb = g.sum([0, *range(2, g.dim())])
        return gx, None, gb, None, None, None, None


class _FrozenLinear(torch.autograd.Function):
    """``F.linear`` under autocast with a frozen weight: natively autograd keeps autocast's
    low-precision copy of the weight until backward (a parameter's worth of bytes per layer,
    whatever the batch size); this keeps the parameter itself and casts it again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        w = weight.to(x.dtype)
        y = torch.ops.aten.linear(x, w, None if bias is None else bias.to(x.dtype))
        del w
        ctx.save_for_backward(weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.matmul(g, weight.to(g.dtype))
        if ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return gx, None, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; under autocast with a frozen weight it keeps no cast copy of the weight."""
    cast = _autocast_dtype(x.device.type)
    if (cast is None or weight.requires_grad or not x.is_floating_point() or weight.dtype == cast
            or not _needs_grad(x, bias)):
        return F.linear(x, weight, bias)
    return _FrozenLinear.apply(x.to(cast), weight, bias)


def _tuple(v, n: int) -> list[int]:
    if isinstance(v, (tuple, list)):
        return list(v) * n if len(v) == 1 else list(v)  # ATen expands (2,) as it does 2
    return [int(v)] * n


def conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
) -> torch.Tensor:
    """``F.conv{1,2,3}d`` that keeps no input when the weight is frozen."""
    d = weight.dim() - 2
    native = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    if weight.requires_grad or isinstance(padding, str) or not _needs_grad(x, bias):
        return native(x, weight, bias, stride, padding, dilation, groups)
    cast = _autocast_dtype(x.device.type)
    if cast is not None and x.is_floating_point():
        # Autocast does not reach the aten call inside the Function: cast as it would have
        # (the weight inside, so that its cast copy is not what backward keeps).
        x = x.to(cast)
        bias = bias.to(cast) if bias is not None else None
    unbatched = x.dim() == d + 1
    if unbatched:
        x = x.unsqueeze(0)
    y = _FrozenConv.apply(x, weight, bias, _tuple(stride, d), _tuple(padding, d),
                          _tuple(dilation, d), groups)
    return y.squeeze(0) if unbatched else y
