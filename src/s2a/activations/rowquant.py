"""Row-wise low-bit storage for tensors that are not pointwise-derivative codes.

Used by the non-pointwise operators (LayerNorm/RMSNorm/BatchNorm inputs, softmax
probabilities, attention Q/K/V): each row of the last dimension gets one scale
(its absolute maximum) and every element becomes the index of the nearest level
of a fixed codebook in [-1, 1] (signed) or [0, 1] (unsigned). Saved state is the
packed codes plus one scalar per row.

Encoding speed. Codebooks whose levels follow a formula are encoded and decoded
with arithmetic instead of ``bucketize``/gather (several times faster on CPU):
uniform levels by rounding, and the ``probs`` levels ``(i/(k-1))**2`` by
``round(sqrt(x*(k-1)**2 - 1/4))``, which is exactly the nearest level: the
midpoint between levels c and c+1 is (c*c + c + 1/2)/(k-1)**2. Other codebooks
use ``bucketize`` on midpoints (compiled: a count of midpoint compares).

Compiled kernels. Each step is written once in plain torch ops (the eager
reference) and, unless ``S2A_COMPILE=0``, run through ``torch.compile`` (dynamic
shapes, one variant per bit width / codebook / dtype; a failed compile falls back
to the same code eagerly after one warning):

* encode: row max + encode in one loop per row (``_quantize_body``); packing is a
  second, uint8-only loop (``pack_codes``). Fused into one loop, the planar layout
  (byte k holds codes k and k + n/2, from different rows) needs a division per
  element to find each code's row scale and inductor no longer vectorises it.
* decode: unpack (``unpack_codes``) then decode per row, with the consumer fused in
  (softmax backward ``p * (g - sum(g p))`` with p renormalised, BatchNorm backward in
  ``functional.py``).

Compiled and eager give the same bytes and scales; decoded values are equal, and
everything that sums over a row (renormalisation, backward formulas) agrees to
float32 rounding (the sums run in another order); ``tests/activations/test_kernels.py``.
Rows of zeros are stored with scale 0, so they decode to exactly 0 (the signed
codebooks have no zero level). Rows that are not finite are encoded as rows of zeros
(their codes carry nothing: the scale is NaN with ``keep_nan``, else 0).
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch

from . import kernels
from .packing import check_bits, pack, packed_nbytes, unpack

ROW_BITS = (2, 3, 4, 8)


def _normal_levels(k: int) -> list[float]:
    # Quantiles of a standard normal at evenly spaced probabilities, mapped to [-1, 1]
    # with both ends hit exactly so the row maximum is reproduced without error
    # (the NF4 idea of QLoRA, applied per row).
    nd = NormalDist()
    probs = [0.5 / k + i / k for i in range(k)]
    q = [nd.inv_cdf(p) for p in probs]
    top = max(abs(q[0]), abs(q[-1]))
    return [v / top for v in q]


def _uniform_levels(k: int, signed: bool) -> list[float]:
    if signed:
        return [-1.0 + 2.0 * i / (k - 1) for i in range(k)]
    return [i / (k - 1) for i in range(k)]


def _power_levels(k: int, gamma: float) -> list[float]:
    # Dense near 0, where most softmax probabilities (scaled by their row max) lie.
    # gamma = 2 is within 1e-4 gradient cosine of the Lloyd-Max codebook fitted to
    # softmax rows of Gaussian logits (std 2-4) at 2, 3 and 4 bits; gamma = 1
    # (uniform) is clearly worse at 4 bits (dq cosine 0.989 vs 0.998).
    return [(i / (k - 1)) ** gamma for i in range(k)]


@dataclass(frozen=True)
class RowCodebook:
    name: str
    bits: int
    levels: tuple[float, ...]
    # How codes are computed: "table" (bucketize on midpoints, gather to decode),
    # "uniform" (levels evenly spaced: round), "square" (levels (i/(k-1))**2).
    rule: str = "table"

    @property
    def signed(self) -> bool:
        return self.levels[0] < 0

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, midpoints) float32 on ``device``, cached; the CPU pair is made at import.
        Under ``torch.compile`` a missing entry is the CPU pair moved in the graph, not
        cached: a traced autograd Function may not mutate module state."""
        key = (self.name, self.bits, device)
        cached = _TENSOR_CACHE.get(key)
        if cached is not None:
            return cached
        if torch.compiler.is_compiling():
            lv, mids = _TENSOR_CACHE[(self.name, self.bits, torch.device("cpu"))]
            return lv.to(device), mids.to(device)
        lv = torch.tensor(self.levels, dtype=torch.float32, device=device)
        _TENSOR_CACHE[key] = (lv, (lv[1:] + lv[:-1]) / 2)
        return _TENSOR_CACHE[key]


_TENSOR_CACHE: dict = {}
ROW_KINDS = ("normal", "uniform", "probs")


def row_codebook(kind: str, bits: int) -> RowCodebook:
    """Codebooks by kind: ``normal`` (signed, Gaussian-shaped data), ``uniform``
    (signed), ``probs`` (unsigned, heavy mass near zero)."""
    check_bits(bits, ROW_BITS, what=f"bits for {kind} row storage")
    cb = _ROW_CODEBOOKS.get((kind, bits)) if isinstance(kind, str) else None
    if cb is None:
        raise ValueError(f"unknown row codebook kind {kind!r}; choose normal, uniform or probs")
    return cb


def _build_row_codebook(kind: str, bits: int) -> RowCodebook:
    k = 1 << bits
    if kind == "normal":
        if bits == 8:
            levels, rule = _uniform_levels(k, True), "uniform"
        else:
            levels, rule = _normal_levels(k), "table"
    elif kind == "uniform":
        levels, rule = _uniform_levels(k, True), "uniform"
    elif kind == "probs":
        levels, rule = _power_levels(k, 2.0), "square"
    else:
        raise ValueError(f"unknown row codebook kind {kind!r}; choose normal, uniform or probs")
    return RowCodebook(kind, bits, tuple(levels), rule)


# All of them, built once at import: ``row_codebook`` runs inside traced autograd Functions,
# where ``torch.compile`` cannot call ``statistics.NormalDist`` but reads this dict as constants.
_ROW_CODEBOOKS = {(kind, bits): _build_row_codebook(kind, bits) for kind in ROW_KINDS for bits in ROW_BITS}
for _cb in _ROW_CODEBOOKS.values():
    _cb.tensors(torch.device("cpu"))


def _to_codes(w: torch.Tensor) -> torch.Tensor:
    # float -> uint8 by truncation; via int16 it is ~3x faster on CPU than directly.
    return w.to(torch.int16).to(torch.uint8)


def _table_codes(v: torch.Tensor, mids: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest level = number of midpoints below ``v`` (``bucketize``;
    NaN -> the top code, as ``bucketize`` does)."""
    if not torch.compiler.is_compiling():  # eager: one bucketize pass
        return torch.bucketize(v, mids, out_int32=True).to(torch.uint8)
    return kernels.count_below(v, mids, bits)


def _safe_scale(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The scale to divide by: 1 for a row of zeros, so the division stays finite. Never the
    # one to store (see stored_scale).
    finite = torch.isfinite(scale)
    return finite, torch.where((scale > 0) & finite, scale, torch.ones_like(scale))


def stored_scale(scale: torch.Tensor, *, keep_nan: bool = False) -> torch.Tensor:
    """The per-row scale saved with the codes: 0 for a row of zeros, so that it decodes to
    exactly 0 (a signed codebook has no zero level: with the division's scale 1 such a row
    would decode to about +-1/k whatever the magnitude of the data); NaN (``keep_nan``) or
    0 for a row that is not finite."""
    bad = torch.full_like(scale, float("nan") if keep_nan else 0.0)
    return torch.where(torch.isfinite(scale), scale.clamp_min(0.0), bad)


def _scale_of(xf: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if signed:
        scale = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg())
    else:  # unsigned codebooks hold non-negative data (probabilities): the max
        scale = xf.amax(dim=-1, keepdim=True)
    return (scale, *_safe_scale(scale))


def _encode_codes(
    xf: torch.Tensor, finite: torch.Tensor, safe: torch.Tensor, mids: torch.Tensor,
    bits: int, rule: str, signed: bool,
) -> torch.Tensor:
    """uint8 codes (unpacked) of float32 ``xf`` given its per-row ``safe`` scale."""
    k = 1 << bits
    top = float(k - 1)
    # Rows that are not finite are encoded as rows of zeros (their codes carry no
    # information: such a row's scale is NaN or 1), so no NaN reaches a conversion.
    xf = torch.where(finite, xf, 0.0)
    if rule == "table":
        return _table_codes(xf / safe, mids, bits)
    # |x| <= scale, so no clamping is needed. Adding 1/2 then truncating rounds to nearest.
    # Divided by the scale first: a row whose max is under ~1e-34 made (k-1) / scale overflow
    # to inf, and x * inf gave every element code 0.
    u = xf / safe
    if rule == "square":
        # nearest level (c/(k-1))**2 is round(sqrt(u*(k-1)**2 - 1/4)) (module doc);
        # clamp at 5/16 rather than 1/4: sqrt(0) is very slow on some CPUs.
        w = (u * (top * top)).clamp_min(0.3125).sub(0.25).sqrt().add(0.5)
    elif signed:
        w = (u * (top / 2)).add(top / 2 + 0.5)
    else:
        w = (u * top).clamp_min(0.0).add(0.5)
    # compiled: a vectorised float -> uint8 conversion (values are in range)
    codes = w.to(torch.uint8) if torch.compiler.is_compiling() else _to_codes(w)
    return codes if bits == 8 else codes & (k - 1)


def _quantize_body(x, mids, *, bits: int, rule: str, signed: bool):
    """(uint8 codes shaped like ``x``, per-row max |x|): row max + encode in one loop per
    row when compiled. Packing is a separate cheap uint8 pass (``pack_codes``): fused
    into this loop, the planar layout's cross-row indexing defeats vectorisation."""
    xf = x.float()
    scale, finite, safe = _scale_of(xf, signed)
    return _encode_codes(xf, finite, safe, mids, bits, rule, signed), scale


def _decode_codes(
    codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, bits: int, rule: str,
    signed: bool,
) -> torch.Tensor:
    top = float((1 << bits) - 1)
    # (uint8 * float tensors is not vectorised on CPU: convert first, then scale.)
    if rule == "square":
        sq = (codes * codes).float() if bits <= 4 else codes.float().square()
        return sq * (scale / (top * top))
    if rule == "uniform" and signed:
        return codes.float() * (scale * (2.0 / top)) - scale
    if rule == "uniform":
        return codes.float() * (scale / top)
    return kernels.level_of(codes, levels, bits) * scale


def renorm_rows(p: torch.Tensor) -> torch.Tensor:
    """Rescale dequantised probability rows to sum to 1 again. Rounding breaks sum(p) == 1,
    and then the softmax backward no longer sums to zero over a row: a gradient leaks into
    directions where the exact one is 0 (e.g. the key bias, which softmax cannot see). Rows
    of zeros stay zero."""
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


def _decode_body(codes, scale, levels, *, bits: int, rule: str, signed: bool, renorm: bool):
    """float32 rows from unpacked codes (``renorm``: each row rescaled to sum 1)."""
    out = _decode_codes(codes, scale, levels, bits, rule, signed)
    return renorm_rows(out) if renorm else out


def _softmax_backward_body(codes, scale, levels, g, *, bits: int, rule: str):
    """dx = p * (g - sum(g * p)), p decoded and renormalised in the same loop."""
    p = renorm_rows(_decode_codes(codes, scale, levels, bits, rule, False))
    gf = g.float()
    return p * (gf - (gf * p).sum(-1, keepdim=True))


# --- compiled dispatch ------------------------------------------------------------

_COMPILED: dict = {}
_FAILED: set = set()


def _bind(body, static: dict):
    # Ints travel as strings: dynamo turns an int it reads (even from a closure) into a
    # symbol under dynamic=True, which blocks constant folding and vectorisation.
    ints = tuple(k for k, v in static.items() if type(v) is int)
    frozen = {k: str(v) if k in ints else v for k, v in static.items()}

    def bound(*tensors):
        return body(*tensors, **{k: int(v) if k in ints else v for k, v in frozen.items()})

    # A private code object per configuration: dynamo's recompile budget is per code
    # object, and the static ints/strings live in the closure, so they are constants
    # of the graph (a plain int argument would become symbolic under dynamic=True).
    code = bound.__code__.replace()
    return types.FunctionType(code, bound.__globals__, body.__name__, None, bound.__closure__)


def run_fused(body: Callable[..., Any], *tensors: torch.Tensor, **static: object) -> Any:
    """``body(*tensors, **static)``, ``torch.compile``d once per (body, static, dtypes,
    device) with dynamic shapes; eager when ``S2A_COMPILE=0``, for small inputs, or
    (after one warning) when the compiler fails."""
    if torch.compiler.is_compiling():
        # Inside a model the user compiles: traced into their graph (inductor fuses it there);
        # no nested compile, no size test, no exception handler on the traced path.
        return body(*tensors, **static)
    t0 = tensors[0]
    key = (body.__name__, tuple(sorted(static.items())),
           tuple(t.dtype for t in tensors), t0.device.type)
    if not kernels.compile_enabled() or key in _FAILED or t0.numel() < kernels.SMALL or t0.is_meta:
        return body(*tensors, **static)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(_bind(body, static), dynamic=True, fullgraph=True,
                                               options=kernels.COMPILE_OPTIONS)
    try:
        return kernels.call_compiled(fn, *tensors)
    except Exception as exc:  # compiler missing or unsupported platform: stay correct, warn once
        _FAILED.add(key)
        warnings.warn(
            f"s2a: torch.compile of the row kernels failed ({type(exc).__name__}: {exc}); "
            "using the eager kernels (same results, slower). Set S2A_COMPILE=0 to silence.",
            RuntimeWarning,
            stacklevel=3,
        )
        return body(*tensors, **static)


def _pack_body(codes: torch.Tensor, *, bits: int) -> torch.Tensor:
    planes, _ = kernels._planes(codes.reshape(-1), bits)  # zero codes pad the tail, as pack does
    return kernels._combine(planes, bits)


def _unpack_body(packed: torch.Tensor, *, bits: int) -> torch.Tensor:
    # (planes, m) codes as one broadcast op (affine indexing: vectorises when compiled).
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8).mul_(bits).view(per, 1)
    return (packed.view(1, -1) >> shifts) & ((1 << bits) - 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`packing.pack` of uint8 codes (same bytes), compiled for 1, 2 and 4 bits."""
    if bits in (3, 8) or codes.numel() == 0:
        return pack(codes, bits)
    # flattened outside: with several symbolic dims the generated loop is ~20x slower
    return run_fused(_pack_body, codes.reshape(-1), bits=bits)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """:func:`packing.unpack` (same codes), compiled for 1, 2 and 4 bits."""
    if bits in (3, 8) or numel == 0:
        return unpack(packed, bits, numel)
    if packed.numel() != packed_nbytes(numel, bits):
        return unpack(packed, bits, numel)  # raises the size error
    return run_fused(_unpack_body, packed, bits=bits).view(-1)[:numel]


def _static(codebook: RowCodebook) -> dict:
    return {"bits": codebook.bits, "rule": codebook.rule, "signed": codebook.signed}


def encode_rows(
    x: torch.Tensor, codebook: RowCodebook, *, keep_nan: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unpacked uint8 codes shaped like ``x``, per-row scale): see :func:`quantize_rows`."""
    _, mids = codebook.tensors(x.device)
    codes, scale = run_fused(_quantize_body, x, mids, **_static(codebook))
    return codes, stored_scale(scale, keep_nan=keep_nan)  # O(rows), eager


def quantize_rows(
    x: torch.Tensor, codebook: RowCodebook, *, keep_nan: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed codes, per-row float32 scale of shape ``x.shape[:-1] + (1,)``).

    Codes are the nearest level of ``x / scale`` (ties may go either way). With
    ``keep_nan=True`` a row holding a NaN or an infinity gets scale NaN, so it
    dequantizes to NaN everywhere (NaN propagates to gradients as in the exact
    operator); by default such a row gets scale 0 (it dequantizes to zeros). A row of
    zeros gets scale 0 and dequantizes to exactly 0.

    The row max and the encoding run as one ``torch.compile``d loop (``S2A_COMPILE=0``
    or a failed compile: the same code eagerly; same bytes either way).
    """
    codes, scale = encode_rows(x, codebook, keep_nan=keep_nan)
    return pack_codes(codes, codebook.bits), scale


def _codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    return unpack_codes(packed, bits, math.prod(shape)).view(tuple(shape))


def dequantize_rows(
    packed: torch.Tensor,
    scale: torch.Tensor,
    codebook: RowCodebook,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    renorm: bool = False,
) -> torch.Tensor:
    """Rebuild the rows (``renorm``: and rescale each row to sum 1, for probabilities)."""
    levels, _ = codebook.tensors(packed.device)
    codes = _codes(packed, codebook.bits, shape)
    out = run_fused(_decode_body, codes, scale, levels, renorm=renorm, **_static(codebook))
    return out.to(dtype)


def softmax_backward_rows(
    packed: torch.Tensor, scale: torch.Tensor, codebook: RowCodebook, g: torch.Tensor
) -> torch.Tensor:
    """``p * (g - sum(g * p))`` over the last dim, float32, with ``p`` the stored
    probabilities decoded and renormalised in the same fused loop."""
    levels, _ = codebook.tensors(packed.device)
    codes = _codes(packed, codebook.bits, g.shape)
    return run_fused(_softmax_backward_body, codes, scale, levels, g,
                     bits=codebook.bits, rule=codebook.rule)
