"""The compressed autograd operators against PyTorch's own."""

import copy
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2a
from helpers import cosine, saved_bytes
from s2a.activations import functional as S
from s2a.activations.packing import packed_nbytes

NATIVE = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "silu": F.silu,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "softplus": F.softplus,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "hardtanh": F.hardtanh,
    "hardsigmoid": F.hardsigmoid,
}
SMOOTH = [n for n in NATIVE if n not in S.EXACT_FUNCTIONS]


def realistic(*shape, dtype=torch.float32):
    # Pre-activations of a transformer MLP: shifted, wider than unit, a few outliers.
    x = torch.randn(*shape) * 1.6 - 0.4
    x.view(-1)[:: max(1, x.numel() // 50)] *= 4
    return x.to(dtype)


def grads(fn, x, g):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y, x.grad


@pytest.mark.parametrize("name", list(NATIVE))
def test_forward_exact_and_backward_close(name):
    x = realistic(32, 197, 96)
    g = torch.randn_like(x)
    y_ref, gx_ref = grads(NATIVE[name], x, g)
    y, gx = grads(lambda t: S.activation(t, name, 4), x, g)
    assert torch.equal(y, y_ref)
    if name in S.EXACT_FUNCTIONS:
        assert torch.equal(gx, gx_ref)
    else:
        assert cosine(gx, gx_ref) >= 0.99


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh"])
def test_more_bits_more_accurate(name):
    x = realistic(4096)
    g = torch.randn_like(x)
    _, ref = grads(NATIVE[name], x, g)
    errs = [(grads(lambda t, b=b: S.activation(t, name, b), x, g)[1] - ref).norm() for b in (1, 2, 3, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert cosine(grads(lambda t: S.activation(t, name, 8), x, g)[1], ref) > 0.9999


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_saved_bytes_are_the_packed_codes(bits):
    x = torch.randn(1000, requires_grad=True)
    _, nbytes = saved_bytes(S.activation, x, "gelu", bits)
    assert nbytes == packed_nbytes(1000, bits)
    _, nbytes = saved_bytes(S.activation, x, "relu", bits)
    assert nbytes == 125  # ReLU family: always one exact bit


@pytest.mark.parametrize("name", ["gelu", "silu", "relu", "hardswish", "hardsigmoid"])
def test_nan_and_inf(name):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -1.0, 100.0, -100.0])
    g = torch.ones_like(x)
    _, ref = grads(NATIVE[name], x, g)
    y, gx = grads(lambda t: S.activation(t, name, 4), x, g)
    assert torch.equal(torch.isnan(y), torch.isnan(NATIVE[name](x)))
    finite = torch.isfinite(ref)
    assert torch.isfinite(gx[finite]).all()
    if torch.isnan(ref[0]):
        assert torch.isnan(gx[0])
    else:  # PyTorch's ReLU and Hardswish pass the gradient at a NaN input; we match them
        assert gx[0] == pytest.approx(ref[0].item(), abs=0.02)


def test_hardsigmoid_edges_match_pytorch():
    # The slope 1/6 holds strictly inside (-3, 3): PyTorch gives 0 at -3, at 3 and at NaN.
    x = torch.tensor([-3.0, 3.0, -3.0001, 2.9999, -2.9999, 3.0001, float("nan"), 0.0, -100.0, 100.0])
    g = torch.full_like(x, 6.0)
    _, ref = grads(F.hardsigmoid, x, g)
    _, gx = grads(lambda t: S.activation(t, "hardsigmoid"), x, g)
    assert torch.equal(gx, ref)
    assert gx.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["gelu", "relu"])
def test_empty_noncontiguous_channels_last(name):
    e = torch.empty(0, 5, requires_grad=True)
    y = S.activation(e, name)
    y.sum().backward()
    assert y.shape == (0, 5) and e.grad.shape == (0, 5)

    base = realistic(8, 16, 12, 12)
    for x in (base.transpose(1, 3), base.contiguous(memory_format=torch.channels_last)):
        g = torch.randn_like(x)
        _, ref = grads(NATIVE[name], x, g)
        y, gx = grads(lambda t: S.activation(t, name), x, g)
        assert torch.equal(y, NATIVE[name](x))
        assert cosine(gx, ref) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gelu", "silu", "relu6", "leaky_relu", "hardsigmoid"])
def test_half_precision(name, dtype):
    x = realistic(64, 256, dtype=dtype)
    g = torch.randn_like(x)
    y_ref, ref = grads(NATIVE[name], x, g)
    y, gx = grads(lambda t: S.activation(t, name), x, g)
    assert y.dtype == dtype and gx.dtype == dtype
    assert torch.equal(y, y_ref)
    if name in S.EXACT_FUNCTIONS:  # the slope (0.01, 1/6) multiplies in float32, rounded once, as PyTorch's
        assert torch.equal(gx, ref)
    else:
        assert cosine(gx, ref) > 0.99


def test_inside_autocast():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(16, 64)
    outs = []
    for fn in (F.gelu, lambda t: S.activation(t, "gelu")):
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(lin(x))
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append(lin.weight.grad.clone())
    assert cosine(outs[0], outs[1]) > 0.99


@pytest.mark.parametrize("bits", [0, 5, 7, "4", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="choose one of"):
        S.activation(torch.randn(3, requires_grad=True), "gelu", bits)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        S.activation(torch.randn(3, requires_grad=True), "elu")


def test_no_grad_runs_native():
    x = torch.randn(10)
    _, nbytes = saved_bytes(S.activation, x, "gelu")
    assert nbytes == 0


# --- norms ------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", ["all", "bias", "none"])
def test_layer_norm(trainable):
    ln = torch.nn.LayerNorm(384)
    torch.nn.init.normal_(ln.weight, 1.0, 0.3)
    torch.nn.init.normal_(ln.bias, 0.0, 0.3)
    ln.weight.requires_grad_(trainable == "all")
    ln.bias.requires_grad_(trainable in ("all", "bias"))
    x = realistic(16, 197, 384)
    x[..., 7] += 30  # an outlier channel, as in pretrained ViTs and BERTs
    g = torch.randn_like(x)
    y_ref, gx_ref = grads(ln, x, g)
    ref_grads = [p.grad.clone() if p.grad is not None else None for p in (ln.weight, ln.bias)]
    ln.zero_grad(set_to_none=True)
    y, gx = grads(lambda t: S.layer_norm(t, (384,), ln.weight, ln.bias, ln.eps), x, g)
    assert torch.equal(y, y_ref)
    assert cosine(gx, gx_ref) > 0.99
    # Input gradients: >= 0.99 (the operator target); parameter gradients: >= 0.98.
    for p, ref in zip((ln.weight, ln.bias), ref_grads, strict=True):
        if ref is not None:
            assert cosine(p.grad, ref) > 0.98


def test_layer_norm_saved_bytes():
    x = torch.randn(8, 50, 256, requires_grad=True)
    w, b = torch.ones(256), torch.zeros(256, requires_grad=True)
    _, nbytes = saved_bytes(S.layer_norm, x, (256,), w, b, 1e-5, exclude=(w, b))
    rows = 8 * 50
    # 4-bit codes + one fp32 scale per channel + one fp32 1/sigma per row
    assert nbytes == 8 * 50 * 256 // 2 + 256 * 4 + rows * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_half_precision(dtype):
    ln = torch.nn.LayerNorm(256).to(dtype)
    x = realistic(4, 50, 256, dtype=dtype)
    g = torch.randn_like(x)
    y_ref, gx_ref = grads(ln, x, g)
    y, gx = grads(lambda t: S.layer_norm(t, (256,), ln.weight, ln.bias, ln.eps), x, g)
    assert y.dtype == dtype and gx.dtype == dtype
    assert torch.equal(y, y_ref)
    assert cosine(gx, gx_ref) > 0.99


def test_layer_norm_nan_row_and_empty():
    x = realistic(6, 64)
    x[2, 5] = float("nan")
    g = torch.randn_like(x)
    _, ref = grads(lambda t: F.layer_norm(t, (64,)), x, g)
    _, gx = grads(lambda t: S.layer_norm(t, (64,), torch.ones(64, requires_grad=True)), x, g)
    assert torch.isnan(gx[2]).all() and torch.isnan(ref[2]).all()
    keep = torch.arange(6) != 2
    assert torch.isfinite(gx[keep]).all()
    assert cosine(gx[keep], ref[keep]) > 0.99
    e = torch.empty(0, 64, requires_grad=True)
    S.layer_norm(e, (64,), torch.ones(64, requires_grad=True)).sum().backward()
    assert e.grad.shape == (0, 64)


@pytest.mark.parametrize("bits", [4, 3])  # the fused kernels; the generic row storage
def test_norms_of_constant_rows_give_zero_weight_grad(bits):
    # x̂ is 0 everywhere: stored with scale 0 it decodes to 0, so dL/dw = sum(g x̂) is 0
    # (with scale 1 every x̂ decoded to a codebook level near 0, dL/dw = -0.25 per row).
    w = torch.ones(64, requires_grad=True)
    x = torch.full((6, 64), 3.0, requires_grad=True)
    (gw,) = torch.autograd.grad(S.layer_norm(x, (64,), w, None, bits=bits), w, torch.ones(6, 64))
    assert not gw.any()
    x = torch.randn(6, 64)
    x[:, 5] = 0.0  # a channel of zeros for RMSNorm
    (gw,) = torch.autograd.grad(S.rms_norm(x.requires_grad_(), (64,), w, bits=bits), w,
                                torch.ones(6, 64))
    assert gw[5] == 0


def test_batch_norm_constant_channel_gives_zero_weight_grad():
    w = torch.ones(4, requires_grad=True)
    x = torch.randn(8, 4, 5, 5) * 1e-3
    x[:, 2] = 0.5
    y = S.batch_norm(x.requires_grad_(), None, None, w, None, True)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert gw[2] == 0


@pytest.mark.parametrize("bits", [4, 3])  # the fused kernels; the generic row storage
@pytest.mark.parametrize("rms", [False, True])
def test_norm_weight_grad_keeps_the_nan_of_a_nan_row(bits, rms):
    # Natively a NaN row's x̂ is NaN and makes every dL/dw NaN, even where g is 0 on that row.
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    w = torch.ones(8, requires_grad=True)
    g = torch.ones(4, 8)
    g[1] = 0.0
    ours = S.rms_norm(x, (8,), w, bits=bits) if rms else S.layer_norm(x, (8,), w, None, bits=bits)
    ref = F.rms_norm(x, (8,), w) if rms else F.layer_norm(x, (8,), w)
    (gw,) = torch.autograd.grad(ours, w, g)
    (gw_ref,) = torch.autograd.grad(ref, w, g)
    assert gw_ref.isnan().all() and gw.isnan().all()


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_weight_grad_keeps_the_nan_of_a_nan_channel(training):
    # its non-finite (sample, channel) rows were stored as zeros: dL/dw of the channel came out finite
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[1, 2, 0, 0] = float("nan")
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    g = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    grads_of = {}
    for name, fn in (("native", F.batch_norm), ("s2a", functools.partial(S.batch_norm, bits=4))):
        y = fn(x, torch.zeros(3), torch.ones(3), w, b, training)
        grads_of[name] = torch.autograd.grad((y * g).sum(), (w, b))
    (gw_ref, gb_ref), (gw, gb) = grads_of["native"], grads_of["s2a"]
    assert gw_ref[2].isnan() and gw[2].isnan() and torch.isfinite(gw[:2]).all()
    torch.testing.assert_close(gb, gb_ref)


def test_rms_norm():
    w = torch.randn(256, requires_grad=True)
    x = realistic(8, 64, 256)
    g = torch.randn_like(x)
    y_ref, gx_ref = grads(lambda t: F.rms_norm(t, (256,), w, 1e-6), x, g)
    gw_ref, w.grad = w.grad.clone(), None
    y, gx = grads(lambda t: S.rms_norm(t, (256,), w, 1e-6), x, g)
    torch.testing.assert_close(y, y_ref)
    assert cosine(gx, gx_ref) > 0.99 and cosine(w.grad, gw_ref) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_default_eps_is_atens(dtype):
    # eps=None: ATen adds the epsilon of its float32 compute type, not bf16's 7.8e-3,
    # which would shrink the output of small-magnitude input (RMS 0.47 instead of 1).
    x = (torch.randn(4, 33, 64) * 0.05).to(dtype).requires_grad_()
    w = torch.randn(64, dtype=dtype, requires_grad=True)
    for weight in (None, w):
        assert torch.equal(S.rms_norm(x, (64,), weight), F.rms_norm(x, (64,), weight))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(training):
    bn = torch.nn.BatchNorm2d(16).train(training)
    bn.running_var.fill_(2.0)
    torch.nn.init.normal_(bn.weight, 1.0, 0.3)
    x = realistic(8, 16, 14, 14) + 1
    g = torch.randn_like(x)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    y_ref, gx_ref = grads(bn, x, g)
    ref_stats = (bn.running_mean.clone(), bn.running_var.clone())
    gw_ref = bn.weight.grad.clone()
    bn.weight.grad = None
    bn.running_mean.copy_(stats[0])
    bn.running_var.copy_(stats[1])
    y, gx = grads(lambda t: S.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                          training, 0.1, bn.eps), x, g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_mean, ref_stats[0])
    torch.testing.assert_close(bn.running_var, ref_stats[1])
    assert cosine(gx, gx_ref) > 0.99 and cosine(bn.weight.grad, gw_ref) > 0.98


def test_batch_norm_one_value_per_channel_raises_in_training():
    x = torch.randn(1, 4, requires_grad=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        S.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    rm, rv = torch.zeros(4), torch.ones(4)  # eval mode: one sample is fine
    w = torch.ones(4, requires_grad=True)
    assert torch.equal(S.batch_norm(x, rm, rv, w), F.batch_norm(x, rm, rv, w))


def test_batch_norm_eval_without_running_stats_raises_as_natively():
    # s2a normalised by the batch's statistics where F.batch_norm refuses
    x, w = torch.randn(3, 4, requires_grad=True), torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        S.batch_norm(x, None, None, w, training=False)


def test_frozen_conv_one_element_stride_padding_dilation():
    # (2,) is expanded by ATen in the forward; the backward indexed stride[1]: IndexError
    w = torch.randn(4, 3, 3, 3)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    args = ((2,), (1,), (2,))
    y_ref = F.conv2d(x, w, None, *args)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    y = S.conv(x, w, None, *args)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_batch_norm_eval_frozen_keeps_no_activation():
    bn = torch.nn.BatchNorm2d(16).eval().requires_grad_(False)
    bn.bias.requires_grad_(True)
    x = torch.randn(8, 16, 14, 14, requires_grad=True)
    _, nbytes = saved_bytes(S.batch_norm, x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            False, 0.1, bn.eps, exclude=(bn.weight, bn.bias))
    assert nbytes == 16 * 4  # 1/sigma per channel, nothing per element
    _, native = saved_bytes(bn, x, exclude=(bn.weight, bn.bias, bn.running_mean, bn.running_var))
    assert native >= x.numel() * 4  # PyTorch keeps the whole input


@pytest.mark.parametrize("shape", [(8, 16, 14, 14), (64, 16), (8, 16, 30)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_eval_frozen_weight_is_native_affine(shape, channels_last):
    """Eval mode, frozen weight, float32: one native addcmul (keeps C floats), outputs and
    gradients as F.batch_norm to float32 rounding, NaN confined as natively."""
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4 dims")
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    x.view(-1)[7] = float("nan")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, rm, rv = 1 + 0.1 * torch.randn(c, generator=gen), torch.randn(c, generator=gen), 1 + torch.rand(c, generator=gen)
    g = torch.randn(shape, generator=gen)
    out = {}
    for name, fn in (("s2a", S.batch_norm), ("native", F.batch_norm)):
        xi, b = x.clone().requires_grad_(), torch.zeros(c, requires_grad=True)
        y, nbytes = saved_bytes(fn, xi, rm, rv, w, b, False, 0.1, 1e-5)
        y.backward(g)
        out[name] = (y, xi.grad, b.grad, nbytes)
    (y, gx, gb, nbytes), (y_ref, gx_ref, gb_ref, _) = out["s2a"], out["native"]
    assert nbytes == c * 4
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref, equal_nan=True)
    assert torch.isnan(y).sum() == 1 and torch.isfinite(gx).all()
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


# Inputs above the compiled kernels' size floor (kernels.SMALL elements), so the default
# path runs compiled: (shape, dtype, channels_last, training).
BN_COMPILED_CASES = [
    ((8, 16, 24, 24), torch.float32, False, True),  # even batch: codes packed in the forward
    ((8, 16, 24, 24), torch.float32, True, True),  # channels_last
    ((7, 16, 25, 25), torch.float32, False, True),  # odd batch: packed afterwards
    ((4096, 24), torch.float32, False, True),  # BatchNorm1d (N, C)
    ((16, 12, 400), torch.float32, False, True),  # BatchNorm1d (N, C, L)
    ((8, 16, 24, 24), torch.float16, False, True),
    ((8, 16, 24, 24), torch.bfloat16, False, True),
    ((8, 16, 24, 24), torch.float32, False, False),  # eval mode, trainable weight
]


def _bn_run(shape, dtype, channels_last, training, fn):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
    x.view(-1)[:: max(1, x.numel() // 50)] *= 4
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(c, generator=gen)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(c, generator=gen)).to(dtype).requires_grad_()
    rm = (0.1 * torch.randn(c, generator=gen)).to(dtype)
    rv = (1 + torch.rand(c, generator=gen)).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x, rm, rv, w, b, training, 0.1, 1e-5)
    y.backward(g)
    return {"y": y, "gx": x.grad, "gw": w.grad, "gb": b.grad, "rm": rm, "rv": rv,
            "saved": saved, "x": x}


@pytest.mark.parametrize(("shape", "dtype", "channels_last", "training"), BN_COMPILED_CASES)
def test_batch_norm_compiled(monkeypatch, shape, dtype, channels_last, training):
    """Compiled path: output and running statistics as F.batch_norm, the saved codes and
    scales byte-identical to the eager kernels (S2A_COMPILE=0), gradients equal to float32
    rounding, memory format kept."""
    from s2a.activations import kernels

    assert math.prod(shape) >= kernels.SMALL
    case = (shape, dtype, channels_last, training)
    got = _bn_run(*case, lambda *a: S.batch_norm(*a, bits=4))
    ref = _bn_run(*case, F.batch_norm)
    monkeypatch.setenv("S2A_COMPILE", "0")
    eager = _bn_run(*case, lambda *a: S.batch_norm(*a, bits=4))

    assert got["y"].dtype == dtype and got["gx"].dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got["y"], ref["y"])
    else:  # computed in float32 then rounded, as natively: at most one unit in the last place
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got["y"].float(), ref["y"].float(), rtol=eps, atol=eps)
    # running statistics: momentum 0.1, unbiased variance, as natively
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got["rm"], ref["rm"], **tol)
    torch.testing.assert_close(got["rv"], ref["rv"], **tol)
    assert cosine(got["gx"], ref["gx"]) > 0.99 and cosine(got["gw"], ref["gw"]) > 0.98
    # (sums of 10^4 terms in another order: float32 rounding well above 1e-5)
    sum_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(got["gb"], ref["gb"], **sum_tol)
    # saved: packed codes, row scales, 1/sigma (then weight, bias)
    assert len(got["saved"]) == len(eager["saved"])
    for a, e in zip(got["saved"][:3], eager["saved"][:3], strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)
    assert got["saved"][0].numel() == math.prod(shape) // 2  # 4 bits per element
    for k in ("y", "gx", "gw", "gb", "rm", "rv"):
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got["y"].is_contiguous(memory_format=fmt)
    assert got["gx"].stride() == got["x"].stride()


def test_batch_norm_compiled_nan_channel(monkeypatch):
    """A NaN poisons its channel (as natively) and nothing else; same bytes as eager."""
    def run():
        x = torch.randn(8, 16, 24, 24, generator=torch.Generator().manual_seed(0))
        x[3, 5, 2, 2] = float("nan")
        x.requires_grad_()
        rm, rv = torch.zeros(16), torch.ones(16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            y = S.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, bits=4)
        y.backward(torch.ones_like(y))
        return y, x.grad, rm, saved

    y, gx, rm, saved = run()
    bad = torch.zeros(16, dtype=torch.bool)
    bad[5] = True
    assert y[:, bad].isnan().all() and not y[:, ~bad].isnan().any()
    assert gx[:, bad].isnan().all() and not gx[:, ~bad].isnan().any()
    assert rm[5].isnan() and not rm[~bad].isnan().any()
    monkeypatch.setenv("S2A_COMPILE", "0")
    _, gx_eager, _, saved_eager = run()
    assert torch.equal(saved[0], saved_eager[0])
    assert torch.equal(saved[1].isnan(), saved_eager[1].isnan())
    assert torch.equal(saved[1].nan_to_num(), saved_eager[1].nan_to_num())
    torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_norm_bad_bits(op):
    x = torch.randn(2, 4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=f"bits for {op}"):
        if op == "layer_norm":
            S.layer_norm(x, (3,), bits=1)
        else:
            S.batch_norm(x, None, None, training=True, bits=5)


# --- dropout and drop path ------------------------------------------------------


@pytest.mark.parametrize("mode", ["regenerate", "bitmask"])
def test_dropout(mode):
    x = torch.randn(64, 100, requires_grad=True)
    y, nbytes = saved_bytes(S.dropout, x, 0.3, True, mode=mode)
    assert nbytes == (8 if mode == "regenerate" else 64 * 100 // 8)
    y.backward(torch.ones_like(y))
    assert torch.equal(y != 0, x.grad != 0)
    torch.testing.assert_close(y, x * x.grad)
    assert 0.25 < (y == 0).float().mean() < 0.35


def test_dropout_reproducible_and_validated():
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(5)
    a = S.dropout(x, 0.5)
    torch.manual_seed(5)
    b = S.dropout(x, 0.5)
    assert torch.equal(a, b)
    assert S.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="between 0 and 1"):
        S.dropout(x, 1.5)
    with pytest.raises(ValueError, match="mode"):
        S.dropout(x, 0.5, mode="zip")


@pytest.mark.parametrize("mode", ["regenerate", "bitmask"])
def test_dropout_in_place_with_grad(mode):
    # As F.dropout(inplace=True): x itself is dropped (a caller may ignore the return value)
    # and the gradient flows through the mask; a leaf that requires grad raises.
    leaf = torch.ones(64, 100, requires_grad=True)
    x = leaf * 1.0
    y = S.dropout(x, 0.3, True, inplace=True, mode=mode)
    assert y is x and 0.25 < (x == 0).float().mean() < 0.35
    x.backward(torch.ones_like(x))
    assert torch.equal(leaf.grad, x.detach())
    with pytest.raises(RuntimeError, match="leaf Variable"):
        S.dropout(leaf, 0.3, True, inplace=True, mode=mode)


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_hash_mask_is_bernoulli(p):
    """The CPU mask (hash of seed and index): keep rate 1 - p, no correlation between
    neighbours, strided positions (rows, channels, planes) or seeds."""
    from s2a.activations import kernels as K

    n = 1 << 20
    tol = 5 / math.sqrt(n)  # 5 sigma of a correlation / standardised mean on n samples
    masks = [K.dropout_mask((n,), seed, p, torch.device("cpu")) for seed in (0, 1, 2**40)]
    for keep in masks:
        assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        for lag in (1, 2, 3, 8, 16, 64, 197, 768, 3072, 4096, 65536):
            assert abs(_corr(keep[:-lag], keep[lag:])) < tol, lag
    for a, b in itertools.combinations(masks, 2):
        assert abs(_corr(a, b)) < tol


def test_dropout_same_mask_forward_backward_and_fresh_per_call(monkeypatch):
    from s2a.activations import kernels as K

    x = torch.randn(256, 1031)  # above kernels.SMALL: the compiled kernel
    for small in (K.SMALL, 1 << 30):  # compiled, then eager
        monkeypatch.setattr(K, "SMALL", small)
        xs = x.clone().requires_grad_()
        y = S.dropout(xs, 0.2, True)
        y.backward(torch.ones_like(y))
        assert torch.equal(y != 0, xs.grad != 0)
        assert torch.equal(y, x * xs.grad)
        assert abs((y == 0).double().mean().item() - 0.2) < 0.005
        z = S.dropout(xs, 0.2, True)
        assert 0.6 < ((z != 0) == (y != 0)).double().mean().item() < 0.72  # 0.8^2 + 0.2^2


def test_dropout_mask_drawn_by_bernoulli_is_replayed_under_compiled_autograd(monkeypatch):
    # Off the CPU an eager forward draws its mask by bernoulli_; a backward traced by
    # compiled autograd regenerated it by the hash instead: about half the gradients landed
    # on dropped elements. The non-CPU rule is set on the CPU here.
    from torch._dynamo import compiled_autograd

    monkeypatch.setattr(S, "_hashed", lambda device: torch.compiler.is_compiling())
    torch.manual_seed(0)
    x = torch.randn(4096, requires_grad=True)
    y = S.dropout(x, 0.5, True, mode="regenerate")
    with compiled_autograd._enable(torch.compile(backend="eager")):
        y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)


def test_drop_path():
    x = torch.randn(32, 10, 8, requires_grad=True)
    y, nbytes = saved_bytes(S.drop_path, x, 0.5, True)
    assert nbytes == 4  # one bit per sample
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, x * x.grad)
    kept = (y.flatten(1) != 0).any(1)
    assert 0 < kept.sum() < 32


# --- frozen layers keep no inputs --------------------------------------------------


def test_frozen_linear_keeps_no_input_natively():
    # Guard on PyTorch's behaviour that S2A's bias module relies on.
    lin = torch.nn.Linear(64, 64).requires_grad_(False)
    lin.bias.requires_grad_(True)
    x = torch.randn(8, 64, requires_grad=True)
    _, nbytes = saved_bytes(lin, x, exclude=(lin.weight, lin.bias))
    assert nbytes == 0
    lin.weight.requires_grad_(True)
    _, nbytes = saved_bytes(lin, x, exclude=(lin.weight, lin.bias))
    assert nbytes == x.numel() * 4


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: torch.nn.Conv1d(8, 4, 3, padding=2, dilation=2), (2, 8, 20)),
        (lambda: torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (2, 8, 14, 14)),
        (lambda: torch.nn.Conv2d(8, 4, 5, padding=2, bias=False), (2, 8, 9, 9)),
        (lambda: torch.nn.Conv3d(4, 4, 3, padding=1), (1, 4, 6, 6, 6)),
        (lambda: torch.nn.Conv2d(8, 4, 3), (8, 9, 9)),  # unbatched
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_conv_keeps_no_input(make, shape, channels_last):
    conv = make()
    conv.weight.requires_grad_(False)
    x = torch.randn(shape)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    _, native = saved_bytes(conv, x.requires_grad_(), exclude=(conv.weight,))
    assert native >= x.numel() * 4  # PyTorch keeps the input of a frozen convolution
    g = torch.randn_like(conv(x))
    y_ref, gx_ref = grads(conv, x, g)
    gb_ref = conv.bias.grad.clone() if conv.bias is not None else None
    if conv.bias is not None:
        conv.bias.grad = None
    fn = lambda t: S.conv(t, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
    exclude = (conv.weight,) + ((conv.bias,) if conv.bias is not None else ())
    _, nbytes = saved_bytes(fn, x.detach().requires_grad_(), exclude=exclude)
    assert nbytes == 0
    y, gx = grads(fn, x, g)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    if gb_ref is not None:
        torch.testing.assert_close(conv.bias.grad, gb_ref)


def test_frozen_conv_under_bf16_autocast():
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    conv.weight.requires_grad_(False)
    x = torch.randn(4, 8, 15, 15)
    g = torch.randn(4, 8, 8, 8)
    fn = lambda t: S.conv(t, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, gx_ref = grads(conv, x, g.bfloat16())
        y, gx = grads(fn, x, g.bfloat16())
    assert y.dtype == y_ref.dtype == torch.bfloat16 and gx.dtype == gx_ref.dtype == torch.float32
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)


def test_frozen_conv_under_autocast_keeps_no_weight_copy():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, nbytes = saved_bytes(S.conv, x, conv.weight, conv.bias, 1, 1, 1, 1, exclude=(conv.weight,))
    assert nbytes == 0  # natively: the input and autocast's bf16 copy of the weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16)])
def test_frozen_linear_under_autocast_keeps_no_weight_copy(dtype, shape):
    lin = torch.nn.Linear(16, 32)
    lin.weight.requires_grad_(False)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 32)
    with torch.autocast("cpu", dtype=dtype):
        y_ref = F.linear(x, lin.weight, lin.bias)
        _, native_bytes = saved_bytes(F.linear, x, lin.weight, lin.bias, exclude=(lin.weight,))
        y, nbytes = saved_bytes(S.linear, x, lin.weight, lin.bias, exclude=(lin.weight,))
    assert native_bytes >= lin.weight.numel() * 2 and nbytes == 0
    assert y.dtype == y_ref.dtype == dtype and torch.equal(y, y_ref)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, lin.bias), g.to(dtype))
    gx, gb = torch.autograd.grad(y, (x, lin.bias), g.to(dtype))
    assert gx.dtype == torch.float32 and gb.dtype == torch.float32
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    torch.testing.assert_close(gb, g.to(dtype).float().reshape(-1, 32).sum(0))  # summed in float32
    torch.testing.assert_close(gb, gb_ref, rtol=2e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=dtype):  # a trainable weight, or no autocast: native
        assert S.linear(x, lin.weight.requires_grad_(True), lin.bias).grad_fn.name() != "_FrozenLinearBackward"


def test_trainable_conv_is_native():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    _, nbytes = saved_bytes(S.conv, x, conv.weight, conv.bias, exclude=(conv.weight,))
    assert nbytes == x.numel() * 4
    assert math.isfinite(nbytes)


@pytest.mark.parametrize(("d", "bits"), [(16, 4), (15, 4), (16, 3)])  # the fast kernel, then the slow path twice
def test_layer_norm_with_an_infinite_token_keeps_the_other_rows_gradients(d, bits):
    torch.manual_seed(0)
    x = torch.randn(64, d)
    x[5, 3] = float("inf")
    x.requires_grad_(True)
    w, g = torch.randn(d, requires_grad=True), torch.randn(64, d)
    grads = []
    for fn in (lambda: S.layer_norm(x, (d,), w, None, 1e-5, bits), lambda: F.layer_norm(x, (d,), w, None, 1e-5)):
        (gx,) = torch.autograd.grad((fn() * g).sum(), x)
        grads.append(gx)
    finite = torch.ones(64, dtype=torch.bool)
    finite[5] = False
    assert cosine(grads[0][finite], grads[1][finite]) > 0.99


def test_norms_keep_native_dtypes():
    # F.rms_norm returns the input's dtype whatever the weight's; float64 runs natively (exact)
    w = torch.ones(8, requires_grad=True)
    assert S.rms_norm(torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True), (8,), w).dtype == torch.bfloat16
    x64 = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.equal(S.rms_norm(x64, (8,), w.double()), F.rms_norm(x64, (8,), w.double()))
    x64 = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.equal(S.batch_norm(x64, rm.clone(), rv.clone(), training=True),
                       F.batch_norm(x64, rm.clone(), rv.clone(), training=True))


_W = torch.randn(16, requires_grad=True)
_CONV_W = torch.randn(16, 16, 3, 3)
IN_PLACE_OPS = {
    "gelu": lambda t: S.activation(t, "gelu"),
    "relu": lambda t: S.activation(t, "relu"),
    "layer_norm": lambda t: S.layer_norm(t, (16,), _W, _W),
    "rms_norm": lambda t: S.rms_norm(t, (16,), _W),
    "rms_norm_2d": lambda t: S.rms_norm(t, (8, 16)),
    "batch_norm_train": lambda t: S.batch_norm(t, None, None, _W, _W, True),
    "batch_norm_eval": lambda t: S.batch_norm(t, torch.zeros(16), torch.ones(16), _W, _W, False),
    "dropout": lambda t: S.dropout(t, 0.3),
    "dropout_bitmask": lambda t: S.dropout(t, 0.3, mode="bitmask"),
    "drop_path": lambda t: S.drop_path(t, 0.3, True),
    "conv": lambda t: S.conv(t, _CONV_W, None, 1, 1),
}


@pytest.mark.parametrize("name", list(IN_PLACE_OPS))
def test_outputs_can_be_modified_in_place(name):
    # As native outputs: `y = op(x); y += 1` works (no view created inside the Function).
    fn = IN_PLACE_OPS[name]
    x = torch.randn(4, 16, 8, 16)

    def grad(in_place: bool) -> torch.Tensor:
        xs = x.clone().requires_grad_()
        torch.manual_seed(0)
        y = fn(xs)
        if in_place:
            y += 1
            y.mul_(2)
        else:
            y = (y + 1) * 2
        y.backward(torch.ones_like(y))
        return xs.grad

    assert torch.equal(grad(True), grad(False))



# --- MetaFormer's StarReLU ---------------------------------------------------------------


def test_star_relu_keeps_8_bit_relu_rows_with_native_gradients():
    from timm.models.metaformer import StarReLU

    from s2a.memory import measure

    torch.manual_seed(0)
    act = StarReLU(scale_value=0.8, bias_value=-0.1)
    block = nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 16))
    reference = copy.deepcopy(block)
    x = torch.randn(4, 7, 16)
    s2a.compress_activations(block, strict=True)
    assert s2a.compression_summary(block) == {"1": "star_relu@8"}  # not its unused nn.ReLU child
    out, out0 = block(x), reference(x)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)  # the forward is timm's
    g = torch.randn_like(out)
    out.backward(g)
    out0.backward(g)
    for p, p0 in zip(block.parameters(), reference.parameters(), strict=True):  # scale and bias train too
        assert cosine(p.grad, p0.grad) > 0.9999
    fused, native = measure(block, x).by_kind, measure(reference, x).by_kind
    # 28 rows of 32: one-byte codes and a float32 scale each, for x's and the scale's
    # gradients; natively relu(x) and relu(x)**2 in float32
    assert fused["star_relu (s2a)"] == 28 * (32 + 4) and native["relu"] + native["mul"] == 2 * 28 * 32 * 4
    with pytest.raises(ValueError, match="bits for star_relu"):
        S.star_relu(x, act.scale, act.bias, bits=5)


# --- GroupNorm --------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_group_norm_keeps_low_bit_rows_with_native_gradients(groups):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 6)
    x[1, :, 0, 0] = float("nan")  # a NaN stays in its own sample's groups, as natively
    x.requires_grad_()
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    for bits, floor in ((8, 0.9999), (4, 0.99)):
        y, y0 = S.group_norm(x, groups, w, b, 1e-5, bits), F.group_norm(x, groups, w, b, 1e-5)
        torch.testing.assert_close(y, y0, rtol=0, atol=0, equal_nan=True)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
        grads0 = torch.autograd.grad(y0, (x, w, b), g)
        ok = grads0[0].isfinite()
        assert torch.equal(grads[0].isfinite(), ok) and cosine(grads[0][ok], grads0[0][ok]) > floor
        assert cosine(grads[2], grads0[2]) > 0.99999
    y0 = F.group_norm(x[[0, 2]], groups, w, b)
    _, nbytes = saved_bytes(S.group_norm, x[[0, 2]].detach().requires_grad_(), groups, w, b, 1e-5, 4, exclude=(w, b))
    # 2 x 8 rows of 30 positions: 15 bytes of 4-bit codes and a float32 scale each; 1/σ per group
    assert nbytes == 2 * 8 * (15 + 4) + 2 * groups * 4


def test_group_norm_modules_and_small_maps():
    from timm.layers import GroupNorm1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), GroupNorm1(8))
    s2a.compress_activations(model, strict=True)
    summary = s2a.compression_summary(model)
    assert summary["1"] == "group_norm@4" and summary["3"] == "group_norm@4"  # GroupNorm1: F.group_norm routed
    model(torch.randn(2, 3, 10, 10)).sum().backward()
    # under 16 positions per row the scales would cost more than they save: native
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    assert S.group_norm(x, 2).grad_fn.name() == "NativeGroupNormBackward0"


def test_bad_dims_and_shapes_fail_as_natively():
    """The kernels read the normalised extent from the input, and softmax wrapped its dim:
    a wrong argument used another axis instead of failing."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    for shape in ((5,), (3, 5), (2, 3, 4, 4)):
        with pytest.raises(RuntimeError, match="normalized_shape"):
            S.layer_norm(x, shape)
        with pytest.raises(RuntimeError, match="normalized_shape"):
            S.rms_norm(x, shape)
    torch.testing.assert_close(S.layer_norm(x, (3, 4)), F.layer_norm(x, (3, 4)))

    class Norm(nn.Module):
        def forward(self, x):
            return F.layer_norm(x, (8,))

    class Soft(nn.Module):
        def forward(self, x):
            return x.softmax(-4)

    with pytest.raises(RuntimeError, match="normalized_shape"):
        s2a.compress_activations(Norm())(x)
    with pytest.raises(IndexError, match="out of range"):
        s2a.compress_activations(Soft())(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_batch_norm_on_running_stats_keeps_nothing_in_any_dtype(dtype):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn = bn.eval().to(dtype).requires_grad_(False)
    x = torch.randn(4, 16, 8, 8, dtype=dtype, requires_grad=True)
    ref = bn(x)
    (gr,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    s2a.compress_activations(bn)
    assert s2a.compression_summary(bn) == {"": "batch_norm@none"}
    assert saved_bytes(bn, x)[1] == 16 * 4  # one float32 per channel
    y = bn(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, gr, **tol)
    bn.train()  # batch statistics: the normalised input is kept
    assert s2a.compression_summary(bn) == {"": "batch_norm@4"}


def test_the_dispatcher_says_which_autocast_runs_norms_in_float32():
    for op in ("aten::layer_norm", "aten::group_norm", "aten::rms_norm"):
        assert (op, "cuda") in S._AUTOCAST_FLOAT32_NORMS  # CUDA autocast's float32 list
        assert (op, "cpu") not in S._AUTOCAST_FLOAT32_NORMS  # CPU autocast leaves them in the input's dtype


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm"])
def test_norms_follow_an_autocast_that_runs_them_in_float32(op, monkeypatch):
    # as CUDA autocast does natively: the norm computes in and returns float32, and the input's
    # gradient comes back in its own dtype through the cast (checked here on CPU autocast,
    # told to behave so, against the native op on the float32 cast)
    monkeypatch.setattr(S, "_AUTOCAST_FLOAT32_NORMS", frozenset({(f"aten::{op}", "cpu")}))
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32).bfloat16().requires_grad_()
    w = torch.randn(8 if op == "group_norm" else 32, requires_grad=True)
    call = {"layer_norm": lambda t, bits=None: (S.layer_norm(t, (32,), w, None, bits=bits) if bits
                                                else F.layer_norm(t, (32,), w)),
            "rms_norm": lambda t, bits=None: (S.rms_norm(t, (32,), w, bits=bits) if bits
                                              else F.rms_norm(t, (32,), w)),
            "group_norm": lambda t, bits=None: (S.group_norm(t, 2, w, None, bits=bits) if bits
                                                else F.group_norm(t, 2, w))}[op]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(x, bits=8)
    assert y.dtype == torch.float32
    ref = call(x.detach().float().requires_grad_())
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_()
    (gx_ref,) = torch.autograd.grad(call(x32), x32, g)
    assert cosine(gx.float(), gx_ref) > 0.999
