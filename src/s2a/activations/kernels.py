"""Fused encode-and-pack / unpack-and-scale kernels for pointwise derivative codes.

Each kernel has an eager reference written with plain torch ops and, by default,
a ``torch.compile``d version of that same code: inductor fuses the cell look-up,
the NaN test and the bit packing into one loop (C++/OpenMP on CPU, Triton on
CUDA). Where a compiled body differs from the eager one (``is_compiling()``
branches) it computes the same bytes with ops that vectorise on CPU: the codebook
table look-up becomes a chain of compares on the run boundaries, bit planes are
summed in float rather than shifted as uint8 masks (each ~4-9x faster). Measured
on 2 CPU cores (benchmarks/ops.py, fp32): encode of 38.7M GELU inputs 270 -> 60 ms
(native GELU forward ~145 ms), ReLU mask of 25.7M inputs 120 -> 13 ms.

Set ``S2A_COMPILE=0`` to force the eager path (same results; slower, and a higher step peak
from the unfused temporaries). If the compiler is unavailable the eager path is used after one warning.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
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


def _lut_codes(x: torch.Tensor, lut: torch.Tensor, nan_code: int, runs: str = "") -> torch.Tensor:
    xf = x.float()
    if runs and torch.compiler.is_compiling():
        codes = _run_codes(xf, runs, nan_code)
        return codes.to(torch.uint8)
    cell = torch.nan_to_num(((xf - GRID_LO) * GRID_SCALE).floor().clamp(0, GRID_CELLS - 1), nan=0.0)
    codes = lut[cell.long()]
    if nan_code >= 0:
        codes = torch.where(torch.isnan(xf), nan_code, codes).to(torch.uint8)
    return codes


def runs_key(runs: tuple[tuple[int, int], ...]) -> str:
    """A codebook's runs as the static string the compiled encoder takes (empty: too
    many runs for a compare chain, the table look-up is used)."""
    return "" if len(runs) > MAX_CHAIN_RUNS else ";".join(f"{a}:{c}" for a, c in runs)


# A compare chain costs two vector ops per run; beyond this the (scalar) gather wins.
MAX_CHAIN_RUNS = 48


def _run_codes(xf: torch.Tensor, runs: str, nan_code: int) -> torch.Tensor:
    """``lut[cell(x)]`` as float codes without the table: the codes are constant on runs
    of cells, and ``floor(t) >= s`` equals ``t >= s`` for an integer ``s``, so a chain of
    compares and selects on ``t = (x - lo) * scale`` gives the same codes (NaN fails every
    compare and lands in the first run, as ``nan_to_num`` puts it in cell 0). Vectorises;
    a gather from the table runs one element at a time."""
    pairs = [(float(a), float(c)) for a, c in (r.split(":") for r in runs.split(";"))]
    t = (xf - GRID_LO) * GRID_SCALE
    codes = torch.full_like(t, pairs[0][1]) if len(pairs) == 1 else torch.where(
        t >= pairs[1][0], pairs[1][1], pairs[0][1])
    for start, code in pairs[2:]:
        codes = torch.where(t >= start, code, codes)
    if nan_code >= 0:
        codes = torch.where(xf != xf, float(nan_code), codes)
    return codes


def _combine_float(planes: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Float codes, one (m,) tensor per plane -> packed bytes: one weighted sum in float
    (exact below 256) and a single conversion; inductor vectorises float arithmetic, not
    uint8 masks. (Computed plane by plane, not on the (planes, m) view, so that the codes
    and the sum fuse into one loop over the m bytes with no intermediate buffer.)"""
    out = planes[0]
    for j in range(1, len(planes)):
        out = out + planes[j] * float(1 << (bits * j))
    return out.to(torch.uint8)


def _encode_lut_eager(
    flat: torch.Tensor, lut: torch.Tensor, bits: int, nan_code: int, runs: str = ""
) -> torch.Tensor:
    if bits == 8:
        return _lut_codes(flat, lut, nan_code, runs)
    if bits == 3:
        return pack(_lut_codes(flat, lut, nan_code, runs), bits)
    planes, _ = _planes(flat, bits)
    if runs and torch.compiler.is_compiling():
        return _combine_float([_run_codes(p.float(), runs, nan_code) for p in planes], bits)
    return _combine(_lut_codes(planes, lut, nan_code), bits)


def _decode_lut_eager(
    packed: torch.Tensor, g: torch.Tensor, levels: torch.Tensor, bits: int
) -> torch.Tensor:
    n = g.numel()
    if bits in (3, 8):
        codes = unpack(packed, bits, n)
        return (g.reshape(-1).float() * level_of(codes, levels, bits)).to(g.dtype)
    gp, _ = _planes(g.reshape(-1), bits)
    out = torch.stack(
        [gp[j].float() * level_of(c, levels, bits) for j, c in enumerate(_split(packed, bits))]
    )
    return out.view(-1)[:n].to(g.dtype)


def _encode_mask_eager(
    flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inclusive: bool, bounded: bool
) -> torch.Tensor:
    planes, _ = _planes(flat, 1)
    keep = [_keep(p, lo, hi, inclusive, bounded) for p in planes]
    if torch.compiler.is_compiling():
        # bit planes summed in float: vectorises (uint8 masks and shifts did not, 8x slower)
        return _combine_float([torch.where(k, 1.0, 0.0) for k in keep], 1)
    return _combine(torch.stack(keep).to(torch.uint8), 1)


def _keep(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inclusive: bool, bounded: bool):
    # The tests at the edges (x == lo, x == hi, NaN) follow PyTorch's own backward kernels.
    if inclusive:  # relu/hardtanh: passes unless x <= lo or x >= hi (NaN passes)
        blocked = x <= lo
        if bounded:
            blocked = blocked | (x >= hi)
        return ~blocked
    keep = x > lo  # leaky_relu, hardsigmoid: passes only strictly inside (NaN takes the other level)
    return keep & (x < hi) if bounded else keep


def _decode_mask_eager(
    packed: torch.Tensor, g: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    n = g.numel()
    gp, _ = _planes(g.reshape(-1), 1)
    scale = high - low
    # In float32 and rounded once, as PyTorch's own backward kernels do: a bfloat16 1/6
    # (Hardsigmoid) or 0.01 (LeakyReLU) would be off by an ulp in a fifth of the elements.
    out = torch.stack(
        [gp[j].float() * (c.float() * scale + low) for j, c in enumerate(_split(packed, 1))]
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


# cpp.dynamic_threads: without it inductor drops the OpenMP loop when the size hint of the
# first call is small, and the FX graph cache (keyed on the symbolic graph, not the hint)
# then serves that single-threaded kernel to every later size, in later processes too.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}

# Below this many elements the fixed cost of a compiled call (guards, wrappers)
# exceeds the eager kernels' extra passes.
SMALL = 1 << 16


_QUIET_LOCK = threading.Lock()


def call_compiled(fn: Callable, *tensors: torch.Tensor):
    """Call a compiled kernel with no ``__torch_function__`` handling: the kernels are plain
    tensor code, and a TorchFunctionMode on the stack (s2a's own, whose state follows the
    nesting of forwards) would be traced into the graph and guarded on, one recompile per
    state it is in, until the recompile limit fails the kernel over to eager. Not for tensor
    subclasses: their ``__torch_function__`` must run, as on the eager path."""
    if any(type(t) is not torch.Tensor for t in tensors):
        return fn(*tensors)
    if "torch.utils.cpp_extension" not in sys.modules and not torch.cuda.is_available():
        # the first compile imports it, which logs "No CUDA runtime is found, using CUDA_HOME=..."
        # on a CPU-only machine: an alarm about nothing s2a needs
        with _QUIET_LOCK:  # (threads: one level saved and restored at a time)
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                with torch._C.DisableTorchFunction():
                    return fn(*tensors)
            finally:
                log.setLevel(level)
    with torch._C.DisableTorchFunction():
        return fn(*tensors)


def _run(name: str, eager: Callable, *args):
    # One compiled variant per static configuration (non-tensor arguments and dtypes);
    # floats that vary travel as 0-d tensors (a Python float would be baked in).
    if torch.compiler.is_compiling():
        # Inside a model the user compiles: traced into their graph (inductor fuses it there);
        # no nested compile, no size test, no exception handler on the traced path.
        return eager(*args)
    statics = "/".join(str(a) for a in args if not isinstance(a, torch.Tensor))
    name = f"{name}/{statics}/{args[0].dtype}/{args[1].dtype}/{args[0].device.type}"
    if not compile_enabled() or name in _FAILED or args[0].numel() < SMALL or args[0].is_meta:
        return eager(*args)  # (meta: shapes only, which the eager code gives without compiling)
    fn = _COMPILED.get(name)
    if fn is None:
        fn = _COMPILED[name] = torch.compile(_bind_static(eager, args), dynamic=True,
                                             fullgraph=True, options=COMPILE_OPTIONS)
    try:
        return call_compiled(fn, *(a for a in args if isinstance(a, torch.Tensor)))
    except Exception as exc:  # compiler missing or unsupported platform: stay correct, warn once
        _FAILED.add(name)
        warnings.warn(
            f"s2a: torch.compile of the activation kernels failed ({type(exc).__name__}: {exc}); "
            "using the eager kernels (same results, slower). Set S2A_COMPILE=0 to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager(*args)


def _triton_for(t: torch.Tensor, bits: int = 1, **tables: torch.Tensor) -> types.ModuleType | None:
    """The hand-written Triton kernels module when they take ``t`` (see
    ``triton_kernels.use_triton``), else None. Never inside a model the user compiles:
    inductor writes the kernel there from the eager code."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return None
    from . import triton_kernels

    return triton_kernels if triton_kernels.use_triton(t, bits, **tables) else None


def encode_lut(
    x: torch.Tensor, lut: torch.Tensor, bits: int, nan_code: int | None,
    runs: tuple[tuple[int, int], ...] | None = None,
) -> torch.Tensor:
    """Packed codes ``lut[cell(x)]`` (NaN -> ``nan_code``) for any-shaped ``x``.

    ``runs``, the codebook's (first cell, code) runs that ``lut`` was built from, lets the
    compiled kernel replace the table look-up by a compare chain (same codes, faster)."""
    tk = _triton_for(x, bits, lut=lut)
    if tk is not None:
        return tk.encode_lut(x, lut, bits, nan_code)
    flat = x.reshape(-1)
    nc = -1 if nan_code is None else nan_code
    if flat.numel() == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    key = runs_key(runs) if runs else ""
    out = _run(f"enc{bits}/{nc}", _encode_lut_eager, flat, lut, bits, nc, key)
    assert out.numel() == packed_nbytes(flat.numel(), bits)
    return out


def decode_lut(packed: torch.Tensor, g: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """``g * levels[code]`` elementwise, shaped like ``g``."""
    tk = _triton_for(g, bits, levels=levels)
    if tk is not None:
        return tk.decode_lut(packed, g, levels, bits)
    if g.numel() == 0:
        return torch.empty_like(g)
    return _run(f"dec{bits}", _decode_lut_eager, packed, g, levels, bits).view(g.shape)


_SCALARS: dict = {}


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    # The mask levels and bounds are a handful of constants: one 0-d tensor each, made
    # once (a torch.tensor per call is a measurable share of a small CNN's step).
    if torch.compiler.is_compiling():  # a graph constant: a traced Function may not fill the cache
        return torch.tensor(value, dtype=torch.float32, device=device)
    key = (value, device)
    t = _SCALARS.get(key)
    if t is None:
        t = _SCALARS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return t


def encode_mask(x: torch.Tensor, lo: float, hi: float | None, inclusive: bool) -> torch.Tensor:
    """1-bit packed 'gradient passes' mask for ReLU-like functions (exact)."""
    tk = _triton_for(x)
    if tk is not None:
        return tk.encode_mask(x, lo, hi, inclusive)
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(0, dtype=torch.uint8)
    lo_t = _scalar(lo, flat.device)
    hi_t = _scalar(0.0 if hi is None else hi, flat.device)
    key = f"encmask/{inclusive}/{hi is not None}"
    return _run(key, _encode_mask_eager, flat, lo_t, hi_t, inclusive, hi is not None)


def decode_mask(packed: torch.Tensor, g: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``g * (high if bit else low)`` elementwise, shaped like ``g``."""
    tk = _triton_for(g)
    if tk is not None:
        return tk.decode_mask(packed, g, low, high)
    if g.numel() == 0:
        return torch.empty_like(g)
    low_t, high_t = _scalar(low, g.device), _scalar(high, g.device)
    return _run("decmask", _decode_mask_eager, packed, g, low_t, high_t).view(g.shape)


# --- normalised inputs of LayerNorm / RMSNorm: one scale per channel -----------------
#
# Codes are packed *within each row*: plane j of a row holds channels
# [j*D/per, (j+1)*D/per), so the per-channel scale broadcasts over the packed
# bytes and a row of D codes takes exactly D*bits/8 bytes. Needs D % per == 0
# (true of every real hidden size); callers fall back otherwise.


def count_below(v: torch.Tensor, mids: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest level = number of midpoints below ``v``, as compares that
    ``torch.compile`` fuses into one loop (where ``bucketize`` would not fuse); NaN counts
    as above every midpoint, as in ``bucketize``."""
    # counted in float: inductor vectorises that, not uint8 accumulation
    count = torch.where(v <= mids[0], 0.0, 1.0)
    for j in range(1, (1 << bits) - 1):
        count = count + torch.where(v <= mids[j], 0.0, 1.0)
    return count.to(torch.uint8)


def _norm_encode_eager(
    x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, mids: torch.Tensor, bits: int, rms: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    xhat = xf * rstd if rms else (xf - mean) * rstd
    # A row holding NaN/inf must not spoil the scale of every other row: its own
    # gradient is NaN anyway through its 1/sigma.
    scale = torch.nan_to_num(xhat, nan=0.0, posinf=0.0, neginf=0.0).abs().amax(0)
    # A channel of zeros divides by 1 but keeps scale 0, so that it decodes to exactly 0
    # (the codebook has no zero level).
    v = torch.nan_to_num(xhat / torch.where(scale > 0, scale, 1.0), nan=0.0)
    rows, d = x.shape
    if bits == 8:  # 8-bit levels are uniform on [-1, 1]: round instead of comparing 255 times
        return ((v + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.int16).to(torch.uint8), scale
    per = 8 // bits
    compiled = torch.compiler.is_compiling()
    if compiled:
        # Codes plane by plane, inside the packing: computed for the whole (rows, D) first,
        # inductor wrote them out as a float32 tensor before packing (4 bytes per element
        # written and read again; 1.3x the LayerNorm's forward + backward at (12608, 768)).
        planes = v.view(rows, per, d // per)
    else:  # eager: one bucketize pass, same codes
        codes = torch.bucketize(v.contiguous(), mids, out_int32=True).to(torch.uint8)  # else it warns and copies
        planes = codes.view(rows, per, d // per)
    out = None
    for j in range(per):
        plane = count_below(planes[:, j], mids, bits) if compiled else planes[:, j]
        out = plane if out is None else out | (plane << (bits * j))
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


def norm_encode(
    x2d: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, mids: torch.Tensor, bits: int,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (rows, D*bits/8) uint8, per-channel scale (D,)) of the normalised input."""
    return _run(f"normenc{bits}/{rms}", _norm_encode_eager, x2d, mean, rstd, mids, bits, rms)


def norm_backward(
    packed: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, rstd: torch.Tensor,
    g2d: torch.Tensor, w: torch.Tensor, bits: int, rms: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of the input (rows, D) float32, grad of the weight (D,) float32 or None)."""
    key = f"normbwd{bits}/{rms}/{need_w}"
    return _run(key, _norm_backward_eager, packed, scale, levels, rstd, g2d, w, bits, rms, need_w)


# --- dropout mask regenerated from (seed, element index) -----------------------------
#
# A counter-based hash instead of ``bernoulli_`` with a fresh generator: the mask of
# element i is ``mix(mix(i ^ k0) ^ k1) < (1 - p) * 2**32`` with two 32-bit keys drawn
# from the call's seed, so forward and backward each recompute it inside the one
# compiled pass that applies it (no mask tensor, no sequential generator). ``mix`` is a
# xorshift-multiply finaliser (lowbias32-style); every step is a bijection of 32-bit
# words, and all products stay below 2**63 (32-bit value times 31-bit odd constant), so
# the integer arithmetic is exact and identical eager and compiled, on any backend.

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x5BD1E995) & _M32
    return h ^ (h >> 16)


def dropout_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a 64-bit seed (splitmix64), so that nearby seeds give
    unrelated masks."""
    out = []
    for _ in range(2):
        seed = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = seed
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        out.append((z ^ (z >> 31)) & _M32)
    return out[0], out[1]


# The same keys from a seed held in a tensor, with tensor ops only: under torch.compile a
# seed drawn in the graph cannot become a Python int without a graph break. 64-bit words are
# (hi, lo) pairs of 32-bit limbs in int64 tensors; every product stays below 2**49, so no
# step overflows and the keys equal :func:`dropout_keys` bit for bit on any backend.

_M16 = 0xFFFF


def _mul_mod32(a: torch.Tensor, c: int) -> torch.Tensor:
    return (a * (c & _M16) + (((a * (c >> 16)) & _M16) << 16)) & _M32


def _mul64(h: torch.Tensor, lo: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, lo) * c mod 2**64."""
    c_lo, c_hi = c & _M32, c >> 32
    p0, p1 = lo * (c_lo & _M16), lo * (c_lo >> 16)  # lo * c_lo = p0 + p1 * 2**16
    t = p0 + ((p1 & _M16) << 16)
    carry = (t >> 32) + (p1 >> 16)  # floor(lo * c_lo / 2**32)
    return (carry + _mul_mod32(h, c_lo) + _mul_mod32(lo, c_hi)) & _M32, t & _M32


def _xor_shr64(h: torch.Tensor, lo: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z ^ (z >> s) for 0 < s < 32 (logical shift)."""
    return h ^ (h >> s), lo ^ (((lo >> s) | (h << (32 - s))) & _M32)


def dropout_keys_tensor(seed: torch.Tensor) -> torch.Tensor:
    """:func:`dropout_keys` of a non-negative int64 ``seed`` tensor (one element), as an
    int64 tensor ``[k0, k1]``, without leaving the graph."""
    s = seed.reshape(-1)[:1].to(torch.int64)
    h, lo = s >> 32, s & _M32
    gamma = 0x9E3779B97F4A7C15
    out = []
    for _ in range(2):
        lo = lo + (gamma & _M32)
        h, lo = (h + (gamma >> 32) + (lo >> 32)) & _M32, lo & _M32
        zh, zl = _mul64(*_xor_shr64(h, lo, 30), 0xBF58476D1CE4E5B9)
        zh, zl = _mul64(*_xor_shr64(zh, zl, 27), 0x94D049BB133111EB)
        out.append(_xor_shr64(zh, zl, 31)[1])
    return torch.cat(out)


def dropout_threshold(p: float) -> int:
    """Keep an element when its 32-bit hash is below this: P(keep) = 1 - p to 2**-32."""
    return min(round((1.0 - p) * 2**32), 2**32)


def _keep_mask(n: int, keys: torch.Tensor, thr: torch.Tensor, offset: int = 0) -> torch.Tensor:
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=keys.device)
    h = _mix32(_mix32((idx & _M32) ^ keys[0]) ^ (((idx >> 32) + keys[1]) & _M32))
    return h < thr


def _dropout_eager(x: torch.Tensor, keys: torch.Tensor, thr: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """``x * (scale if kept else 0)`` over the flat index of ``x`` (1-D, contiguous)."""
    keep = _keep_mask(x.numel(), keys, thr)
    cd = torch.promote_types(x.dtype, torch.float32)
    return (x.to(cd) * torch.where(keep, scale.to(cd), 0.0)).to(x.dtype)


def _dropout_args(x: torch.Tensor, seed: int | torch.Tensor, p: float):
    if isinstance(seed, torch.Tensor) and torch.compiler.is_compiling():
        keys = dropout_keys_tensor(seed).to(x.device)  # no int(seed): no graph break
    else:
        keys = torch.tensor(dropout_keys(int(seed)), dtype=torch.int64, device=x.device)
    thr = torch.tensor(dropout_threshold(p), dtype=torch.int64, device=x.device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64, device=x.device)
    return keys, thr, scale


def dropout_apply(x: torch.Tensor, seed: int | torch.Tensor, p: float) -> torch.Tensor:
    """``x`` times the dropout mask of ``seed`` (scaled by 1/(1-p)), flattened in row-major
    order: the caller views it in ``x``'s shape, outside any autograd Function (a view made
    inside one cannot be modified in place). The mask depends only on (seed, p, position in
    row-major order), not on strides or on the kernel used. ``seed`` may be a one-element
    int64 tensor (under ``torch.compile`` it is not read back to Python)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return flat.clone()
    return _run("dropout", _dropout_eager, flat, *_dropout_args(x, seed, p))


def dropout_mask(shape, seed: int | torch.Tensor, p: float, device, offset: int = 0) -> torch.Tensor:
    """The boolean keep mask that :func:`dropout_apply` applies (``offset``: of the elements
    from that flat index on, for a mask drawn in pieces)."""
    n = math.prod(shape)
    keys, thr, _ = _dropout_args(torch.empty(0, device=device), seed, p)
    return _keep_mask(n, keys, thr, offset).view(shape)
