"""Triton versions of the fused encode-and-pack / unpack-and-scale kernels.

Same signatures and bit-exact results as the eager references in ``kernels.py``
(``_encode_lut_eager`` and friends; NaN outputs are NaN, payload aside). One
program handles a block of ``BLOCK`` byte positions ``k`` and every plane ``j`` of
them, so it reads ``8 // bits`` contiguous blocks of ``x`` (or ``g``), one per
plane, and writes one contiguous block of packed bytes (see ``packing.py`` for the
planar layout).

Covered: 1, 2, 4 and 8 bits, inputs and gradients in float32, float16 and
bfloat16, look-up tables in uint8 and levels in float32 (``supported``). Anything
else (3 bits, float64, other table dtypes) goes to the torch path of ``kernels.py``;
``kernels.py`` dispatches CUDA tensors here when ``use_triton`` says so.

Details that keep the results bit-exact:

* padding positions of the last byte see ``x = 0.0``, as in ``kernels._planes``
  (the eager code pads ``x`` with zeros, not the codes);
* the mask thresholds go float -> float32 -> input dtype before the comparison, as
  in the eager code (a float32 0-d tensor compared with the input);
* the two ``decode_mask`` multipliers ``c * (high - low) + low`` are computed once
  per (low, high, dtype, device) with the eager code's own torch ops, so they carry
  the same intermediate roundings.

Set ``S2A_TRITON=0`` to keep CUDA tensors on the torch path.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import kernels as _k
from .codebooks import GRID_CELLS, GRID_LO, GRID_SCALE
from .packing import packed_nbytes, plane_length

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

TRITON_BITS = (1, 2, 4, 8)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # byte positions per program (so 1024 * 8 // bits elements)
NUM_WARPS = 4
# Element count from which index arithmetic is int64 (indices reach n + 8 + BLOCK; tests
# lower it to cover the int64 path on small inputs).
INT64_FROM = 2**31 - 16 * BLOCK

_MODE_LUT, _MODE_ABOVE, _MODE_NOT_BELOW, _MODE_INSIDE, _MODE_STRICTLY_INSIDE = 0, 1, 2, 3, 4


def triton_available() -> bool:
    """True if triton imports and can run here (a CUDA device, or ``TRITON_INTERPRET=1``)."""
    if triton is None or os.environ.get("S2A_TRITON", "1") == "0":
        return False
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()


if triton is not None:
    # bfloat16 travels as int16 bits and is converted with integer ops: exactly what the
    # GPU's conversions do (widening; round to nearest even), while the interpreter's own
    # bf16 casts truncate and flush subnormals, which would hide or fake mismatches.

    @triton.jit
    def _bf16_bits_to_f32(bits):
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _f32_to_bf16_bits(y):
        u = y.to(tl.int32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest, ties to even
        return tl.where(y != y, 0x7FC0, r).to(tl.int16)  # NaN: quiet NaN

    @triton.jit
    def _encode_kernel(
        x_ptr,
        lut_ptr,
        out_ptr,
        n,
        m,
        nan_code,
        lo,
        hi,
        BITS: tl.constexpr,
        MODE: tl.constexpr,
        HAS_NAN_CODE: tl.constexpr,
        BF16: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
        GRID_LO: tl.constexpr,
        GRID_SCALE: tl.constexpr,
        GRID_CELLS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
            m = m.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        in_k = offs < m
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(8 // BITS):
            idx = offs + j * m
            # Positions past n are the zero padding of kernels._planes: x = 0.0 there.
            v = tl.load(x_ptr + idx, mask=in_k & (idx < n), other=0)
            v = _bf16_bits_to_f32(v) if BF16 else v.to(tl.float32)
            if MODE == 0:
                t = tl.floor((v - GRID_LO) * GRID_SCALE)
                t = tl.minimum(tl.maximum(t, 0.0), GRID_CELLS - 1.0)
                t = tl.where(v != v, 0.0, t)
                code = tl.load(lut_ptr + t.to(tl.int32)).to(tl.int32)
                if HAS_NAN_CODE:
                    code = tl.where(v != v, nan_code, code)
            elif MODE == 1:  # leaky_relu style: passes where x > lo (NaN does not)
                code = (v > lo).to(tl.int32)
            elif MODE == 2:  # relu style: blocked where x <= lo (NaN passes)
                code = (v <= lo).to(tl.int32) ^ 1
            elif MODE == 3:  # hardtanh style: blocked where x <= lo or x >= hi (NaN passes)
                code = ((v <= lo) | (v >= hi)).to(tl.int32) ^ 1
            else:  # hardsigmoid style: passes where lo < x < hi (NaN does not)
                code = ((v > lo) & (v < hi)).to(tl.int32)
            acc = acc | (code << (BITS * j))
        tl.store(out_ptr + offs, acc.to(tl.uint8), mask=in_k)

    @triton.jit
    def _decode_kernel(
        packed_ptr,
        g_ptr,
        levels_ptr,
        out_ptr,
        n,
        m,
        low,
        high,
        BITS: tl.constexpr,
        MASK_MODE: tl.constexpr,
        BF16: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
            m = m.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        in_k = offs < m
        byte = tl.load(packed_ptr + offs, mask=in_k, other=0).to(tl.int32)
        for j in tl.static_range(8 // BITS):
            idx = offs + j * m
            valid = in_k & (idx < n)
            code = (byte >> (BITS * j)) & ((1 << BITS) - 1)
            if MASK_MODE:
                scale = tl.where(code != 0, high, low)
            else:
                scale = tl.load(levels_ptr + code, mask=valid, other=0.0)
            g = tl.load(g_ptr + idx, mask=valid, other=0)
            g = _bf16_bits_to_f32(g) if BF16 else g.to(tl.float32)
            y = g * scale
            res = _f32_to_bf16_bits(y) if BF16 else y.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + idx, res, mask=valid)


def _wide(n: int) -> bool:
    return n >= INT64_FROM


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 tensors go to the kernels as their int16 bits (see the kernels)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _grid(m: int) -> tuple[int]:
    return (triton.cdiv(m, BLOCK),)


def _on(device: torch.device):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def supported(
    t: torch.Tensor,
    bits: int = 1,
    lut: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
) -> bool:
    """Whether the Triton kernels cover this case (else the wrappers use the torch path)."""
    return (
        bits in TRITON_BITS
        and t.dtype in TRITON_DTYPES
        and (lut is None or lut.dtype == torch.uint8)
        and (levels is None or levels.dtype == torch.float32)
    )


def use_triton(
    t: torch.Tensor,
    bits: int = 1,
    lut: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
) -> bool:
    """The dispatch test of ``kernels.py``: a CUDA tensor, triton usable, case covered.

    Must stay the exact complement of the wrappers' fallback test (``supported``):
    the fallback calls back into ``kernels.py``.
    """
    return t.is_cuda and triton_available() and supported(t, bits, lut, levels)


@functools.lru_cache(maxsize=64)
def _threshold(value: float, dtype: torch.dtype) -> float:
    """A mask threshold as the eager code compares it: a float32 0-d tensor cast to ``dtype``."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


@functools.lru_cache(maxsize=64)
def _mask_multipliers(
    low: float, high: float, dtype: torch.dtype, device: torch.device
) -> tuple[float, float]:
    """``c * (high - low) + low`` for c = 0, 1 with the eager code's ops and operands: float32
    whatever ``dtype`` (the kernel multiplies in float32 and rounds once, as the eager code
    and PyTorch's backward kernels do); one synchronisation per (low, high, dtype, device).
    """
    c = torch.tensor([0.0, 1.0], dtype=torch.float32, device=device)
    low_t = torch.tensor(low, dtype=torch.float32, device=device)
    high_t = torch.tensor(high, dtype=torch.float32, device=device)
    lo_mult, hi_mult = (c * (high_t - low_t) + low_t).tolist()
    return lo_mult, hi_mult


def encode_lut(x: torch.Tensor, lut: torch.Tensor, bits: int, nan_code: int | None) -> torch.Tensor:
    """Packed codes ``lut[cell(x)]`` (NaN -> ``nan_code``) for any-shaped ``x``."""
    if not supported(x, bits, lut=lut):
        return _k.encode_lut(x, lut, bits, nan_code)
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    flat = flat.contiguous()
    lut = lut.to(flat.device).contiguous()
    nc = -1 if nan_code is None else nan_code
    m = plane_length(n, bits)
    out = torch.empty(m, dtype=torch.uint8, device=flat.device)
    with _on(flat.device):
        _encode_kernel[_grid(m)](
            _as_bits(flat), lut, out, n, m, nc, 0.0, 0.0,
            BITS=bits, MODE=_MODE_LUT, HAS_NAN_CODE=nc >= 0, BF16=flat.dtype == torch.bfloat16,
            WIDE=_wide(n), BLOCK=BLOCK,
            GRID_LO=GRID_LO, GRID_SCALE=GRID_SCALE, GRID_CELLS=GRID_CELLS,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def decode_lut(
    packed: torch.Tensor, g: torch.Tensor, levels: torch.Tensor, bits: int
) -> torch.Tensor:
    """``g * levels[code]`` elementwise, shaped like ``g``."""
    if not supported(g, bits, levels=levels):
        return _k.decode_lut(packed, g, levels, bits)
    if g.numel() == 0:
        return torch.empty_like(g)
    return _decode(packed, g, levels, bits, 0.0, 0.0)


def encode_mask(x: torch.Tensor, lo: float, hi: float | None, inclusive: bool) -> torch.Tensor:
    """1-bit packed 'gradient passes' mask for ReLU-like functions (exact).

    ``inclusive``: passes unless ``x <= lo`` or (``hi`` given) ``x >= hi``, NaN passes;
    otherwise passes where ``x > lo`` (and ``x < hi``, ``hi`` given), NaN does not.
    """
    if not supported(x):
        return _k.encode_mask(x, lo, hi, inclusive)
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    flat = flat.contiguous()
    m = plane_length(n, 1)
    out = torch.empty(m, dtype=torch.uint8, device=flat.device)
    if inclusive:
        mode = _MODE_INSIDE if hi is not None else _MODE_NOT_BELOW
    else:
        mode = _MODE_STRICTLY_INSIDE if hi is not None else _MODE_ABOVE
    lo_t = _threshold(float(lo), flat.dtype)
    hi_t = _threshold(float(hi), flat.dtype) if hi is not None else 0.0
    with _on(flat.device):
        _encode_kernel[_grid(m)](
            _as_bits(flat), out, out, n, m, -1, lo_t, hi_t,
            BITS=1, MODE=mode, HAS_NAN_CODE=False, BF16=flat.dtype == torch.bfloat16,
            WIDE=_wide(n), BLOCK=BLOCK,
            GRID_LO=GRID_LO, GRID_SCALE=GRID_SCALE, GRID_CELLS=GRID_CELLS,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def decode_mask(packed: torch.Tensor, g: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``g * (high if bit else low)`` elementwise, shaped like ``g``."""
    if not supported(g):
        return _k.decode_mask(packed, g, low, high)
    if g.numel() == 0:
        return torch.empty_like(g)
    lo_mult, hi_mult = _mask_multipliers(float(low), float(high), g.dtype, g.device)
    return _decode(packed, g, None, 1, lo_mult, hi_mult)


def _decode(
    packed: torch.Tensor,
    g: torch.Tensor,
    levels: torch.Tensor | None,
    bits: int,
    low: float,
    high: float,
) -> torch.Tensor:
    n = g.numel()
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"packed buffer has {packed.numel()} {packed.dtype} elements, expected "
            f"{packed_nbytes(n, bits)} uint8 for {n} codes of {bits} bits"
        )
    gf = g.reshape(-1).contiguous()
    packed = packed.reshape(-1).contiguous()
    m = plane_length(n, bits)
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    mask_mode = levels is None
    # In mask mode the levels pointer is an unused placeholder.
    levels = packed if mask_mode else levels.to(g.device).contiguous()
    with _on(g.device):
        _decode_kernel[_grid(m)](
            packed, _as_bits(gf), levels, _as_bits(out), n, m, low, high,
            BITS=bits, MASK_MODE=mask_mode, BF16=g.dtype == torch.bfloat16, WIDE=_wide(n),
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
