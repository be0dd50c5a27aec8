"""The compiled kernels give bit-identical results to their eager references."""

import pytest
import torch

from s2a.activations import kernels as K
from s2a.activations.codebooks import get_codebook


@pytest.fixture(autouse=True)
def _always_compiled(monkeypatch):
    # Small tensors normally take the eager path; here every size must hit the compiler.
    monkeypatch.setattr(K, "SMALL", 0)


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


def test_norm_kernels_match_eager():
    from s2a.activations.rowquant import row_codebook

    x = torch.randn(40, 96) * 2
    x[3, 5] = float("nan")
    mean, rstd = x.mean(-1, keepdim=True), torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)
    for bits in (2, 4, 8):
        levels, mids = row_codebook("normal", bits).tensors(torch.device("cpu"))
        packed, scale = K.norm_encode(x, mean, rstd, mids, bits, False)
        ref_packed, ref_scale = K._norm_encode_eager(x, mean, rstd, mids, bits, False)
        assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)
        assert packed.shape == (40, 96 * bits // 8)
        g, w = torch.randn(40, 96), torch.rand(96)
        gx, gw = K.norm_backward(packed, scale, levels, rstd, g, w, bits, False, True)
        ref_gx, ref_gw = K._norm_backward_eager(packed, scale, levels, rstd, g, w, bits, False, True)
        torch.testing.assert_close(gx, ref_gx, equal_nan=True)
        torch.testing.assert_close(gw, ref_gw, equal_nan=True)


def test_eager_switch(monkeypatch):
    monkeypatch.setenv("S2A_COMPILE", "0")
    assert not K.compile_enabled()
