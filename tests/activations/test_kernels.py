"""The compiled kernels give bit-identical results to their eager references."""

import pytest
import torch

from s2a.activations import kernels as K
from s2a.activations.codebooks import get_codebook


def inputs(n, dtype):
    x = torch.randn(n) * 4
    if n > 10:
        x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 50.0])
    return x.to(dtype)


CASES = [(b, n, torch.float32) for b in (1, 2, 3, 4, 8) for n in (7, 1001)]
CASES += [(4, 1, torch.float32), (4, 4096, torch.bfloat16), (2, 33, torch.float16)]


@pytest.mark.parametrize(("bits", "n", "dtype"), CASES)
def test_lut_kernels_match_eager(bits, n, dtype):
    cb = get_codebook("gelu", bits)
    lut, levels = cb.tensors(torch.device("cpu"))
    nan = -1 if cb.nan_code is None else cb.nan_code
    x = inputs(n, dtype)
    packed = K.encode_lut(x, lut, bits, cb.nan_code)
    assert torch.equal(packed, K._encode_lut_eager(x, lut, bits, nan))
    g = torch.randn(n).to(dtype)
    out = K.decode_lut(packed, g, levels, bits)
    ref = K._decode_lut_eager(packed, g, levels, bits)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))


@pytest.mark.parametrize(("hi", "inclusive"), [(None, False), (None, True), (6.0, True)])
@pytest.mark.parametrize("n", [1, 9, 1000])
def test_mask_kernels_match_eager(hi, inclusive, n):
    x = inputs(n, torch.float32)
    packed = K.encode_mask(x, 0.0, hi, inclusive)
    t = torch.tensor
    ref = K._encode_mask_eager(x, t(0.0), t(hi or 0.0), inclusive, hi is not None)
    assert torch.equal(packed, ref)
    g = torch.randn(n)
    assert torch.equal(K.decode_mask(packed, g, 0.1, 1.0), K._decode_mask_eager(packed, g, t(0.1), t(1.0)))


def test_eager_switch(monkeypatch):
    monkeypatch.setenv("S2A_COMPILE", "0")
    assert not K.compile_enabled()
