"""The compiled kernels give bit-identical results to their eager references."""

from functools import partial

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
    # with the runs the compiled kernel compares instead of looking up: same bytes
    assert torch.equal(K.encode_lut(x, lut, bits, cb.nan_code, cb.runs), packed)
    g = torch.randn(n).to(dtype)
    out = K.decode_lut(packed, g, levels, bits)
    ref = K._decode_lut_eager(packed, g, levels, bits)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh", "hardswish", "softplus"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compare_chain_matches_table_at_cell_edges(name, bits):
    """Inputs on every run boundary, one ulp either side of it, outside the grid and NaN."""
    cb = get_codebook(name, bits)
    lut, _ = cb.tensors(torch.device("cpu"))
    edges = torch.tensor([a / 256.0 - 8.0 for a, _ in cb.runs], dtype=torch.float32)
    x = torch.cat([edges, edges.nextafter(torch.tensor(-1e9)), edges.nextafter(torch.tensor(1e9)),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), -8.0, 8.0, -9.0, 9.0]),
                   torch.randn(997) * 5])
    nan = -1 if cb.nan_code is None else cb.nan_code
    ref = K._encode_lut_eager(x, lut, bits, nan)
    assert torch.equal(K.encode_lut(x, lut, bits, cb.nan_code, cb.runs), ref)


@pytest.mark.parametrize(("hi", "inclusive"), [(None, False), (None, True), (6.0, True), (6.0, False)])
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


@pytest.mark.parametrize("compiled", [True, False])
def test_norm_channel_of_zeros_decodes_to_zero(monkeypatch, compiled):
    # Scale 0 is stored for it (the codebook has no zero level): it decodes to exactly 0.
    from s2a.activations.rowquant import row_codebook

    monkeypatch.setenv("S2A_COMPILE", "1" if compiled else "0")
    x = torch.randn(40, 96) * 1e-3
    x[:, 7] = 0.0
    rstd = torch.ones(40, 1)
    levels, mids = row_codebook("normal", 4).tensors(torch.device("cpu"))
    packed, scale = K.norm_encode(x, rstd, rstd, mids, 4, True)
    assert scale[7] == 0
    _, gw = K.norm_backward(packed, scale, levels, rstd, torch.ones(40, 96), torch.ones(96), 4,
                            True, True)
    assert gw[7] == 0


@pytest.mark.parametrize("n", [1, 7, 1001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_kernel_matches_eager(n, dtype):
    x = (torch.randn(n) * 3).to(dtype)
    x[0] = float("inf")
    for seed, p in ((0, 0.1), (2**62 - 1, 0.5), (12345, 0.9)):
        out = K.dropout_apply(x, seed, p)
        ref = K._dropout_eager(x, *K._dropout_args(x, seed, p))
        assert out.dtype == dtype
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())
        keep = K.dropout_mask((n,), seed, p, x.device)
        assert torch.equal(out[1:] != 0, keep[1:] & (x[1:] != 0))


def test_eager_switch(monkeypatch):
    monkeypatch.setenv("S2A_COMPILE", "0")
    assert not K.compile_enabled()


# --- row-wise kernels (softmax probabilities, Q/K/V, BatchNorm / LayerNorm inputs) -------

ROW_CASES = [
    ("probs", 4, (6, 197)),  # odd row length: the planar layout crosses rows
    ("probs", 2, (3, 5, 33)),
    ("probs", 8, (4, 7)),
    ("uniform", 8, (5, 64)),
    ("uniform", 4, (2, 3, 65)),
    ("normal", 4, (9, 50)),
    ("normal", 2, (4, 31)),
    ("normal", 3, (5, 19)),
]


def row_inputs(kind, shape, dtype):
    x = torch.randn(shape) * 3
    if kind == "probs":
        x = torch.softmax(x, -1)
    x = x.reshape(-1, shape[-1])
    x[1] = 0.0  # a row of zeros
    x[2, 3] = float("nan")
    x[-1, 0] = float("inf")
    return x.reshape(shape).to(dtype)


def _row_eager(monkeypatch_env, fn, *args, **kwargs):
    monkeypatch_env.setenv("S2A_COMPILE", "0")
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch_env.setenv("S2A_COMPILE", "1")


@pytest.mark.parametrize(("kind", "bits", "shape"), ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep_nan", [False, True])
def test_row_kernels_match_eager(monkeypatch, kind, bits, shape, dtype, keep_nan):
    from s2a.activations import rowquant as R

    cb = R.row_codebook(kind, bits)
    x = row_inputs(kind, shape, dtype)
    packed, scale = R.quantize_rows(x, cb, keep_nan=keep_nan)
    ref_packed, ref_scale = _row_eager(monkeypatch, R.quantize_rows, x, cb, keep_nan=keep_nan)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scale.isnan(), ref_scale.isnan())
    assert torch.equal(scale.nan_to_num(), ref_scale.nan_to_num())
    from s2a.activations.packing import packed_nbytes

    assert packed.numel() == packed_nbytes(x.numel(), bits)
    for renorm in (False, True) if kind == "probs" else (False,):
        out = R.dequantize_rows(packed, scale, cb, x.shape, renorm=renorm)
        ref = _row_eager(monkeypatch, R.dequantize_rows, packed, scale, cb, x.shape, renorm=renorm)
        # the decode itself is exact; renormalisation sums in another order
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=0 if not renorm else 1e-6,
                                   atol=0 if not renorm else 1e-7)
    if kind == "probs":
        g = torch.randn(shape).to(dtype)
        dx = R.softmax_backward_rows(packed, scale, cb, g)
        ref = _row_eager(monkeypatch, R.softmax_backward_rows, packed, scale, cb, g)
        torch.testing.assert_close(dx, ref, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "bits", "shape"), ROW_CASES)
@pytest.mark.parametrize("keep_nan", [False, True])
def test_rows_of_zeros_decode_to_zero(monkeypatch, kind, bits, shape, keep_nan):
    # Scale 0 is stored for them: the signed codebooks have no zero level, and with scale 1
    # a zero row decoded to about +-1/k whatever the (here small) magnitude of the data.
    from s2a.activations import rowquant as R

    cb = R.row_codebook(kind, bits)
    x = row_inputs(kind, shape, torch.float32) * 1e-3
    for run in (lambda f, *a, **k: f(*a, **k), partial(_row_eager, monkeypatch)):
        packed, scale = run(R.quantize_rows, x, cb, keep_nan=keep_nan)
        out = run(R.dequantize_rows, packed, scale, cb, x.shape).reshape(-1, shape[-1])
        assert torch.equal(out[1], torch.zeros(shape[-1]))
        if not keep_nan:  # rows that are not finite: their codes carry nothing, zeros too
            assert not out[2].any() and not out[-1].any()


@pytest.mark.parametrize(("kind", "bits"), [("uniform", 8), ("uniform", 4), ("probs", 8), ("probs", 4)])
def test_rows_of_tiny_values_keep_their_relative_precision(monkeypatch, kind, bits):
    # (k-1) / scale overflowed to inf for a row max under ~1e-34 (8-bit Q/K/V from 1e-37,
    # probabilities from 1e-36): every code came out 0, a signed row decoded to -scale
    from s2a.activations import rowquant as R

    cb = R.row_codebook(kind, bits)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 1e-37
    x = x.abs() if kind == "probs" else x
    for run in (lambda f, *a, **k: f(*a, **k), partial(_row_eager, monkeypatch)):
        packed, scale = run(R.quantize_rows, x, cb)
        out = run(R.dequantize_rows, packed, scale, cb, x.shape)
        assert ((out - x).abs().amax(-1) / x.abs().amax(-1)).max() < (0.01 if bits == 8 else 0.08)


def test_row_kernels_non_contiguous_and_empty(monkeypatch):
    from s2a.activations import rowquant as R

    cb = R.row_codebook("probs", 4)
    x = torch.softmax(torch.randn(5, 37, 6) * 2, 1).transpose(1, 2)  # rows along dim 1
    assert not x.is_contiguous()
    packed, scale = R.quantize_rows(x, cb)
    ref_packed, ref_scale = R.quantize_rows(x.contiguous(), cb)
    assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)
    eager = _row_eager(monkeypatch, R.quantize_rows, x, cb)
    assert torch.equal(packed, eager[0])
    for bits in (2, 4, 8):
        cb = R.row_codebook("uniform", bits)
        e = torch.empty(0, 16)
        packed, scale = R.quantize_rows(e, cb)
        assert packed.numel() == 0 and scale.shape == (0, 1)
        assert R.dequantize_rows(packed, scale, cb, (0, 16)).shape == (0, 16)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_pack_codes_match_packing(bits, n):
    from s2a.activations import rowquant as R
    from s2a.activations.packing import pack

    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = R.pack_codes(codes, bits)
    assert torch.equal(packed, pack(codes, bits))
    assert torch.equal(R.unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_norm_compiled_matches_eager(monkeypatch, training, dtype):
    from s2a.activations import functional as S

    x0 = (torch.randn(4, 6, 5, 7) * 2 + 0.5).to(dtype)
    x0[1, 2, 0, 0] = float("nan")
    g = torch.randn(x0.shape).to(dtype)

    def run():
        x = x0.clone().requires_grad_()
        w = (1 + 0.1 * torch.randn(6, generator=torch.Generator().manual_seed(0))).requires_grad_()
        b = torch.zeros(6, requires_grad=True)
        rm, rv = torch.zeros(6), torch.ones(6)
        y = S.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, bits=4)
        y.backward(g)
        return y, x.grad, w.grad, b.grad, rm, rv

    got = run()
    ref = _row_eager(monkeypatch, run)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_dropout_keys_tensor_matches_python():
    """The keys computed with int64 tensor ops (torch.compile path, no int(seed)) are
    :func:`dropout_keys` bit for bit."""
    import random

    rng = random.Random(0)
    seeds = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1] + [rng.getrandbits(62) for _ in range(300)]
    for s in seeds:
        assert K.dropout_keys_tensor(torch.tensor([s])).tolist() == list(K.dropout_keys(s)), s


def _fresh_dynamo_only_kernels(monkeypatch) -> None:
    """Kernels compiled anew, by dynamo alone (the eager backend: no C++ to build, fast)."""
    from s2a.activations import rowquant as RQ

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(
        fn, backend="eager", dynamic=kw.get("dynamic"), fullgraph=kw.get("fullgraph", False)))
    for module in (K, RQ):
        monkeypatch.setattr(module, "_COMPILED", {})
        monkeypatch.setattr(module, "_FAILED", set())
    torch._dynamo.reset()


def test_compiled_kernels_are_not_recompiled_for_each_state_of_a_function_mode(monkeypatch):
    # s2a's own TorchFunctionMode reads how many forwards are running: traced into the kernel's
    # graph, each depth was one more recompile, until the limit sent the kernel back to eager
    import warnings

    from torch.overrides import TorchFunctionMode

    from s2a.activations import rowquant as RQ

    monkeypatch.setenv("S2A_COMPILE", "1")
    _fresh_dynamo_only_kernels(monkeypatch)

    class DepthMode(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.running: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not self.running:
                return func(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    def scaled(x, *, k):
        return x * k + 1

    x = torch.randn(1 << 16)
    want = K.dropout_apply(x, 1234, 0.1), scaled(x, k=3)
    mode = DepthMode()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("error")  # the fall-back to eager warns
        for depth in range(torch._dynamo.config.recompile_limit + 4):
            mode.running = [None] * depth
            assert torch.equal(K.dropout_apply(x, 1234, 0.1), want[0])
            assert torch.equal(RQ.run_fused(scaled, x, k=3), want[1])
    assert not K._FAILED and not RQ._FAILED
    assert len(K._COMPILED) == 1 and len(RQ._COMPILED) == 1


def test_compiled_kernels_keep_a_tensor_subclass_as_the_eager_ones_do(monkeypatch):
    # __torch_function__ is switched off around compiled kernels for plain tensors only
    _fresh_dynamo_only_kernels(monkeypatch)

    class Tagged(torch.Tensor):
        pass

    x = torch.randn(1 << 16).as_subclass(Tagged)
    for compiled in ("1", "0"):
        monkeypatch.setenv("S2A_COMPILE", compiled)
        assert type(K.dropout_apply(x, 1234, 0.1)) is Tagged, compiled

