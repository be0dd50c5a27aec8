"""Dense packing of b-bit codes into uint8 storage.

Layout is *planar*: the n codes are split into ``8 // bits`` equal planes and byte
``k`` holds code ``k`` of every plane (plane ``j`` at bit offset ``j * bits``).
Planes are contiguous, so packing and unpacking are a handful of vectorised
passes and fuse into one loop under ``torch.compile`` (see ``kernels.py``). 3-bit
codes do not tile a byte: groups of 8 planes are written as 3 byte planes.

``pack`` returns ``ceil(numel * bits / 8)`` bytes for 1, 2, 4 and 8 bits and at
most 2 bytes more for 3 bits; the caller keeps numel and shape (O(1) metadata).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{what}={bits!r} is not supported; choose one of {list(allowed)}")
    return bits


def codes_per_group(bits: int) -> int:
    """Codes that share one byte (or, for 3 bits, one 3-byte group): the plane count."""
    return 8 if bits == 3 else 8 // bits


def plane_length(numel: int, bits: int) -> int:
    return math.ceil(numel / codes_per_group(bits))


def packed_nbytes(numel: int, bits: int) -> int:
    m = plane_length(numel, bits)
    return 3 * m if bits == 3 else m * bits * codes_per_group(bits) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, stride, dtype) into a 1-D uint8 tensor."""
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    if bits == 8:
        if torch.compiler.is_compiling():
            # Dynamo cannot compare data pointers (a graph break): always a fresh tensor.
            return flat.clone()
        return flat.clone() if flat.data_ptr() == codes.data_ptr() and codes.numel() else flat
    n = flat.numel()
    per = codes_per_group(bits)
    m = plane_length(n, bits)
    if m * per != n:
        flat = torch.cat([flat, flat.new_zeros(m * per - n)])
    planes = flat.view(per, m)
    if bits == 3:
        word = planes[0].to(torch.int32)
        for j in range(1, 8):
            word = word | (planes[j].to(torch.int32) << (3 * j))
        return torch.cat([((word >> (8 * r)) & 0xFF).to(torch.uint8) for r in range(3)])
    out = planes[0].clone()
    for j in range(1, per):
        out |= planes[j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: a 1-D uint8 tensor of ``numel`` codes."""
    check_bits(bits)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)} "
            f"for {numel} codes of {bits} bits"
        )
    if bits == 8:
        return packed
    m = plane_length(numel, bits)
    if bits == 3:
        b = packed.view(3, m).to(torch.int32)
        word = b[0] | (b[1] << 8) | (b[2] << 16)
        planes = [((word >> (3 * j)) & 0x7).to(torch.uint8) for j in range(8)]
    else:
        mask = (1 << bits) - 1
        planes = [(packed >> (bits * j)) & mask for j in range(codes_per_group(bits))]
    return torch.cat(planes)[:numel]
