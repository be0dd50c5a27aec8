"""Fused encode-and-pack / unpack-and-scale kernels for pointwise derivative codes.

Each kernel has an eager reference written with plain torch ops and, by default,
a ``torch.compile``d version of that same code: inductor fuses the cell look-up,
the NaN test and the bit packing into one loop (C++/OpenMP on CPU, Triton on
CUDA). Measured on 2 CPU cores for 19.4M fp32 elements: eager bucketize + pack
costs ~6x the native GELU forward, the fused kernel ~1x (benchmarks/ops.py).

Set ``S2A_COMPILE=0`` to force the eager path (same results, slower). If the
compiler is unavailable the eager path is used after one warning.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable

import torch

from .codebooks import GRID_CELLS, GRID_LO, GRID_SCALE
from .packing import codes_per_group, pack, packed_nbytes, plane_length, unpack


def _planes(flat: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """View a flat tensor as (planes, m), zero-padding the tail when needed."""
    per = codes_per_group(bits)
    n = flat.numel()
    m = plane_length(n, bits)
    if per * m != n:
        flat = torch.nn.functional.pad(flat, (0, per * m - n))
    return flat.view(per, m), n


def _combine(planes: torch.Tensor, bits: int) -> torch.Tensor:
    out = planes[0]
    for j in range(1, planes.shape[0]):
        out = out | (planes[j] << (bits * j))
    return out


def _split(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    mask = (1 << bits) - 1
    return [(packed >> (bits * j)) & mask for j in range(8 // bits)]


# --- eager reference implementations ------------------------------------------------


def _lut_codes(x: torch.Tensor, lut: torch.Tensor, nan_code: int) -> torch.Tensor:
    xf = x.float()
    cell = torch.nan_to_num(((xf - GRID_LO) * GRID_SCALE).floor().clamp(0, GRID_CELLS - 1), nan=0.0)
    codes = lut[cell.long()]
    if nan_code >= 0:
        codes = torch.where(torch.isnan(xf), nan_code, codes).to(torch.uint8)
    return codes


def _encode_lut_eager(flat: torch.Tensor, lut: torch.Tensor, bits: int, nan_code: int) -> torch.Tensor:
    if bits == 8:
        return _lut_codes(flat, lut, nan_code)
    if bits == 3:
        return pack(_lut_codes(flat, lut, nan_code), bits)
    planes, _ = _planes(flat, bits)
    return _combine(_lut_codes(planes, lut, nan_code), bits)


def _decode_lut_eager(
    packed: torch.Tensor, g: torch.Tensor, levels: torch.Tensor, bits: int
) -> torch.Tensor:
    n = g.numel()
    if bits in (3, 8):
        codes = unpack(packed, bits, n)
        return (g.reshape(-1).float() * levels[codes.long()]).to(g.dtype)
    gp, _ = _planes(g.reshape(-1), bits)
    out = torch.stack(
        [gp[j].float() * levels[c.long()] for j, c in enumerate(_split(packed, bits))]
    )
    return out.view(-1)[:n].to(g.dtype)


def _encode_mask_eager(
    flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inclusive: bool, bounded: bool
) -> torch.Tensor:
    planes, _ = _planes(flat, 1)
    # The tests at the edges (x == lo, x == hi, NaN) follow PyTorch's own backward kernels.
    if inclusive:  # relu/hardtanh: passes unless x <= lo or x >= hi (NaN passes)
        blocked = planes <= lo
        if bounded:
            blocked = blocked | (planes >= hi)
        keep = ~blocked
    else:  # leaky_relu: passes only where x > lo (NaN takes the other level)
        keep = planes > lo
    return _combine(keep.to(torch.uint8), 1)


def _decode_mask_eager(
    packed: torch.Tensor, g: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    n = g.numel()
    gp, _ = _planes(g.reshape(-1), 1)
    scale = high - low
    out = torch.stack(
        [gp[j] * (c.to(gp.dtype) * scale + low) for j, c in enumerate(_split(packed, 1))]
    )
    return out.view(-1)[:n].to(g.dtype)


# --- dispatch between compiled and eager ---------------------------------------------

_COMPILED: dict[str, Callable] = {}
_FAILED: set[str] = set()


def compile_enabled() -> bool:
    return os.environ.get("S2A_COMPILE", "1") != "0"


def _bind_static(fn: Callable, args: tuple) -> Callable:
    """``fn`` with its non-tensor arguments frozen: returns ``g(*tensors)``.

    The frozen values are constants of the traced graph. Ints travel as strings:
    dynamo turns an int it reads (argument or closure) into a symbol under
    ``dynamic=True``, which blocks constant folding (shifts, masks, bit widths) and
    vectorisation. Each bound function gets a private code object: dynamo caches
    compiled graphs per code object, so variants do not share one recompile budget.
    """
    layout = tuple(
        None if isinstance(a, torch.Tensor) else (str(a), True) if type(a) is int else (a, False)
        for a in args
    )

    def bound(*tensors):
        full, k = [], 0
        for item in layout:
            if item is None:
                full.append(tensors[k])
                k += 1
            else:
                full.append(int(item[0]) if item[1] else item[0])
        return fn(*full)

    return types.FunctionType(bound.__code__.replace(), bound.__globals__, fn.__name__, None,
                              bound.__closure__)


# Below this many elements the fixed cost of a compiled call (guards, wrappers)
# exceeds the eager kernels' extra passes.
SMALL = 1 << 16


def _run(name: str, eager: Callable, *args):
    # One compiled variant per static configuration (non-tensor arguments and dtypes);
    # floats that vary travel as 0-d tensors (a Python float would be baked in).
    statics = "/".join(str(a) for a in args if not isinstance(a, torch.Tensor))
    name = f"{name}/{statics}/{args[0].dtype}/{args[1].dtype}/{args[0].device.type}"
    if not compile_enabled() or name in _FAILED or args[0].numel() < SMALL:
        return eager(*args)
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(_bind_static(eager, args), dynamic=True,
                                             fullgraph=True)
    try:
        return fn(*(a for a in args if isinstance(a, torch.Tensor)))
    except Exception as exc:  # compiler missing or unsupported platform: stay correct, warn once
        _FAILED.add(name)
        warnings.warn(
            f"s2a: torch.compile of the activation kernels failed ({type(exc).__name__}: {exc}); "
            "using the eager kernels (same results, slower). Set S2A_COMPILE=0 to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager(*args)


def encode_lut(x: torch.Tensor, lut: torch.Tensor, bits: int, nan_code: int | None) -> torch.Tensor:
    """Packed codes ``lut[cell(x)]`` (NaN -> ``nan_code``) for any-shaped ``x``."""
    if x.is_cuda:
        from . import triton_kernels

        if triton_kernels.use_triton(x, bits, lut=lut):
            return triton_kernels.encode_lut(x, lut, bits, nan_code)
    flat = x.reshape(-1)
    nc = -1 if nan_code is None else nan_code
    if flat.numel() == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    out = _run(f"enc{bits}/{nc}", _encode_lut_eager, flat, lut, bits, nc)
    assert out.numel() == packed_nbytes(flat.numel(), bits)
    return out


def decode_lut(packed: torch.Tensor, g: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``g * levels[code]`` elementwise, shaped like ``g``."""
    if g.is_cuda:
        from . import triton_kernels

        if triton_kernels.use_triton(g, bits, levels=levels):
            return triton_kernels.decode_lut(packed, g, levels, bits)
    if g.numel() == 0:
        return torch.empty_like(g)
    return _run(f"dec{bits}", _decode_lut_eager, packed, g, levels, bits).view(g.shape)


def encode_mask(x: torch.Tensor, lo: float, hi: float | None, inclusive: bool) -> torch.Tensor:
    """1-bit packed 'gradient passes' mask for ReLU-like functions (exact)."""
    if x.is_cuda:
        from . import triton_kernels

        if triton_kernels.use_triton(x):
            return triton_kernels.encode_mask(x, lo, hi, inclusive)
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    lo_t = torch.tensor(lo, dtype=torch.float32, device=flat.device)
    hi_t = torch.tensor(0.0 if hi is None else hi, dtype=torch.float32, device=flat.device)
    key = f"encmask/{inclusive}/{hi is not None}"
    return _run(key, _encode_mask_eager, flat, lo_t, hi_t, inclusive, hi is not None)


def decode_mask(packed: torch.Tensor, g: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``g * (high if bit else low)`` elementwise, shaped like ``g``."""
    if g.is_cuda:
        from . import triton_kernels

        if triton_kernels.use_triton(g):
            return triton_kernels.decode_mask(packed, g, low, high)
    if g.numel() == 0:
        return torch.empty_like(g)
    low_t = torch.tensor(low, dtype=torch.float32, device=g.device)
    high_t = torch.tensor(high, dtype=torch.float32, device=g.device)
    return _run("decmask", _decode_mask_eager, packed, g, low_t, high_t).view(g.shape)


# --- normalised inputs of LayerNorm / RMSNorm: one scale per channel -----------------
#
# Codes are packed *within each row*: plane j of a row holds channels
# [j*D/per, (j+1)*D/per), so the per-channel scale broadcasts over the packed
# bytes and a row of D codes takes exactly D*bits/8 bytes. Needs D % per == 0
# (true of every real hidden size); callers fall back otherwise.


def _norm_encode_eager(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, mids: torch.Tensor, bits: int, rms: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    xhat = xf * rstd if rms else (xf - mean) * rstd
    # A row holding NaN/inf must not spoil the scale of every other row: its own
    # gradient is NaN anyway through its 1/sigma.
    scale = torch.nan_to_num(xhat, nan=0.0, posinf=0.0, neginf=0.0).abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = torch.nan_to_num(xhat / scale, nan=0.0)
    if bits == 8:  # 8-bit levels are uniform on [-1, 1]: round instead of comparing 255 times
        codes = ((v + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.int16).to(torch.uint8)
    elif not torch.compiler.is_compiling():  # eager: one bucketize pass, same codes
        codes = torch.bucketize(v, mids, out_int32=True).to(torch.uint8)
    else:  # nearest level = number of midpoints below; the compares fuse into one loop
        # (counted in float: inductor vectorises that, not uint8 accumulation)
        count = torch.where(v > mids[0], 1.0, 0.0)
        for j in range(1, (1 << bits) - 1):
            count = count + torch.where(v > mids[j], 1.0, 0.0)
        codes = count.to(torch.uint8)
    per = 8 // bits
    rows, d = x.shape
    planes = codes.view(rows, per, d // per)
    out = planes[:, 0]
    for j in range(1, per):
        out = out | (planes[:, j] << (bits * j))
    return out, scale


def level_of(codes: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``levels[codes]`` (float32). Compiled: a chain of selects, which vectorises,
    where a gather from the table would run one element at a time."""
    if bits == 8 or not torch.compiler.is_compiling():
        return levels[codes.long()]
    c = codes.float()  # float compares and blends: no uint8 -> float mask conversions
    out = torch.where(c < 0.5, levels[0], levels[1])
    for j in range(2, 1 << bits):
        out = torch.where(c > j - 0.5, levels[j], out)
    return out


def _norm_decode(packed: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    # Row-wise planar bytes (rows, m) -> levels (rows, planes, m): one broadcast shift.
    # Kept 3-D: flattened to (rows, D), inductor indexes the bytes with x % m and x // m
    # and no longer vectorises the loops.
    per = 8 // bits
    rows, m = packed.shape
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8).mul_(bits).view(1, per, 1)
    codes = (packed.view(rows, 1, m) >> shifts) & ((1 << bits) - 1)
    return level_of(codes, levels, bits)


def _norm_backward_eager(
    packed: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, rstd: torch.Tensor,
    g: torch.Tensor, w: torch.Tensor, bits: int, rms: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, m = packed.shape
    per = 8 // bits
    d = per * m
    xhat = _norm_decode(packed, levels, bits) * scale.view(per, m)  # (rows, planes, m)
    gf = g.float().reshape(rows, per, m)
    wg = gf * (w.view(per, m) if w.dim() else w)
    proj = (wg * xhat).sum((1, 2), keepdim=True) / d
    centred = wg if rms else wg - wg.sum((1, 2), keepdim=True) / d
    gx = (rstd.view(rows, 1, 1) * (centred - xhat * proj)).view(rows, d)
    gw = (gf * xhat).sum(0).view(d) if need_w else None
    return gx, gw


def norm_encode(x2d, mean, rstd, mids, bits: int, rms: bool):
    """(packed (rows, D*bits/8) uint8, per-channel scale (D,)) of the normalised input."""
    return _run(f"normenc{bits}/{rms}", _norm_encode_eager, x2d, mean, rstd, mids, bits, rms)


def norm_backward(packed, scale, levels, rstd, g2d, w, bits: int, rms: bool, need_w: bool):
    """(grad of the input (rows, D) float32, grad of the weight (D,) float32 or None)."""
    key = f"normbwd{bits}/{rms}/{need_w}"
    return _run(key, _norm_backward_eager, packed, scale, levels, rstd, g2d, w, bits, rms, need_w)
