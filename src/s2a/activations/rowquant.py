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
use ``bucketize`` on midpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

from .packing import check_bits, pack, unpack

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
        key = (self.name, self.bits, device)
        if key not in _TENSOR_CACHE:
            lv = torch.tensor(self.levels, dtype=torch.float32, device=device)
            mids = (lv[1:] + lv[:-1]) / 2
            _TENSOR_CACHE[key] = (lv, mids)
        return _TENSOR_CACHE[key]


_TENSOR_CACHE: dict = {}


def row_codebook(kind: str, bits: int) -> RowCodebook:
    """Codebooks by kind: ``normal`` (signed, Gaussian-shaped data), ``uniform``
    (signed), ``probs`` (unsigned, heavy mass near zero)."""
    check_bits(bits, ROW_BITS, what=f"bits for {kind} row storage")
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


@dataclass
class RowQuantized:
    """Packed codes + one scale per row: everything needed to rebuild the tensor."""

    packed: torch.Tensor
    scale: torch.Tensor  # shape (*rows, 1), float32
    shape: torch.Size
    dtype: torch.dtype


def _to_codes(w: torch.Tensor) -> torch.Tensor:
    # float -> uint8 by truncation; via int16 it is ~3x faster on CPU than directly.
    return w.to(torch.int16).to(torch.uint8)


def quantize_rows(
    x: torch.Tensor, codebook: RowCodebook, *, keep_nan: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (packed codes, per-row float32 scale of shape ``x.shape[:-1] + (1,)``).

    Codes are the nearest level of ``x / scale`` (ties may go either way). With
    ``keep_nan=True`` a row holding a NaN or an infinity gets scale NaN, so it
    dequantizes to NaN everywhere (NaN propagates to gradients as in the exact
    operator); by default such a row gets scale 1 (its codes are then meaningless).
    """
    xf = x.float()
    if codebook.signed:
        scale = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg_())
    else:  # unsigned codebooks hold non-negative data (probabilities): the max
        scale = xf.amax(dim=-1, keepdim=True)
    # A row of zeros (or an empty one) gets scale 1 so the division stays finite.
    finite = torch.isfinite(scale)
    safe = torch.where((scale > 0) & finite, scale, torch.ones_like(scale))
    k = 1 << codebook.bits
    top = float(k - 1)
    if codebook.rule == "table":
        _, mids = codebook.tensors(x.device)
        codes = torch.bucketize(xf / safe, mids).to(torch.uint8)
    else:
        # |x| <= scale in finite rows, so no clamping is needed; rows that are not
        # finite get factor 0. Adding 1/2 then truncating rounds to nearest.
        if codebook.rule == "square":
            # nearest level (c/(k-1))**2 is round(sqrt(u*(k-1)**2 - 1/4)) (module doc);
            # clamp at 5/16 rather than 1/4: sqrt(0) is very slow on some CPUs.
            f = torch.where(finite, (top * top) / safe, torch.zeros_like(safe))
            w = (xf * f).clamp_min_(0.3125).sub_(0.25).sqrt_().add_(0.5)
        elif codebook.signed:
            f = torch.where(finite, (top / 2) / safe, torch.zeros_like(safe))
            w = (xf * f).add_(top / 2 + 0.5)
        else:
            f = torch.where(finite, top / safe, torch.zeros_like(safe))
            w = (xf * f).clamp_min_(0.0).add_(0.5)
        codes = _to_codes(w)
        if codebook.bits < 8:
            codes.bitwise_and_(k - 1)  # NaN entries cast to arbitrary bytes: keep codes in range
    if keep_nan:
        safe = torch.where(finite, safe, torch.full_like(safe, float("nan")))
    return pack(codes, codebook.bits), safe


def dequantize_rows(
    packed: torch.Tensor,
    scale: torch.Tensor,
    codebook: RowCodebook,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    codes = unpack(packed, codebook.bits, numel).view(shape)
    top = float((1 << codebook.bits) - 1)
    # (uint8 * float tensors is not vectorised on CPU: convert first, then scale.)
    if codebook.rule == "square":
        sq = (codes * codes).float() if codebook.bits <= 4 else codes.float().square_()
        out = sq.mul_(scale / (top * top))
    elif codebook.rule == "uniform" and codebook.signed:
        out = codes.float().mul_(scale * (2.0 / top)).sub_(scale)
    elif codebook.rule == "uniform":
        out = codes.float().mul_(scale / top)
    else:
        levels, _ = codebook.tensors(packed.device)
        out = levels[codes.long()] * scale
    return out.to(dtype)
