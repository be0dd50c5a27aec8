import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2a.activations.packing import SUPPORTED_BITS, pack, packed_nbytes, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_round_trip_and_exact_size(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits)
    slack = 2 if bits == 3 else 0
    assert math.ceil(n * bits / 8) <= packed.numel() <= math.ceil(n * bits / 8) + slack
    assert torch.equal(unpack(packed, bits, n), codes)


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), shape=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_any_shape_and_stride(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.int64)
    strided = codes.transpose(0, -1) if codes.dim() > 1 else codes.flip(0)
    packed = pack(strided, bits)
    assert torch.equal(unpack(packed, bits, strided.numel()).view(strided.shape).long(), strided)


def test_exact_byte_counts():
    assert pack(torch.zeros(10**6, dtype=torch.uint8), 4).numel() == 500_000
    assert pack(torch.zeros(1001, dtype=torch.uint8), 1).numel() == 126
    assert pack(torch.zeros(7, dtype=torch.uint8), 2).numel() == 2


def test_pack_does_not_alias_8bit_input():
    codes = torch.arange(10, dtype=torch.uint8)
    packed = pack(codes, 8)
    codes[0] = 99
    assert packed[0] == 0


@pytest.mark.parametrize("bits", [0, 5, 6, 16, "4", 4.0, True])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="choose one of"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)


def test_wrong_buffer_size_is_an_error():
    with pytest.raises(ValueError, match="expected 2"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)
