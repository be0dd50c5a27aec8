"""Max / average pooling keeping (almost) nothing for backward: outputs and gradients
bit-identical to native."""

import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import s2a
from helpers import saved_bytes
from s2a.activations import pooling as P
from s2a.memory import measure

NATIVE = {
    "max": (F.max_pool1d, F.max_pool2d, F.max_pool3d),
    "avg": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
    "adaptive": (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
}
OURS = {"max": P.max_pool, "avg": P.avg_pool, "adaptive": P.adaptive_avg_pool}
SHAPES = {1: (2, 3, 13), 2: (2, 3, 11, 9), 3: (1, 2, 7, 6, 5)}


def run(kind, d, x, *args):
    """(output, grad) of the native and of the s2a op for one upstream gradient."""
    results = []
    g = None
    for fn in (NATIVE[kind][d - 1], lambda t, *a: OURS[kind](t, d, *a)):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi, *args)
        if g is None:
            g = torch.randn(y.shape).to(y.dtype)
        (gx,) = torch.autograd.grad(y, xi, g)
        results.append((y, gx))
    return results


def assert_same(native, ours):
    for a, b in zip(native, ours, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_native_for_every_window_geometry(d, ties):
    # integer-valued input: many windows hold their maximum twice (the first one wins)
    for k, s, p, dil, ceil in itertools.product((1, 2, 3), (None, 1, 2, 3), (0, 1), (1, 2),
                                               (False, True)):
        if p > k // 2:
            continue
        x = torch.randn(SHAPES[d])
        x = x.mul(2).round() if ties else x
        try:
            native, ours = run("max", d, x, k, s, p, dil, ceil)
        except RuntimeError:  # output would be empty: native raises as well
            continue
        assert_same(native, ours)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_avg_pool_matches_native_for_every_window_geometry(d):
    for k, s, p, ceil, count_pad in itertools.product((1, 2, 3), (None, 1, 2), (0, 1),
                                                     (False, True), (True, False)):
        if p > k // 2:
            continue
        assert_same(*run("avg", d, torch.randn(SHAPES[d]), k, s, p, ceil, count_pad))
    if d > 1:
        assert_same(*run("avg", d, torch.randn(SHAPES[d]), 3, 2, 1, True, False, 5))  # divisor


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_adaptive_avg_pool_matches_native(d, size):
    assert_same(*run("adaptive", d, torch.randn(SHAPES[d]), size))


LAYOUTS = {
    "channels_last": lambda: torch.randn(2, 4, 10, 9).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(2, 3, 6, 7, 5).to(memory_format=torch.channels_last_3d),
    "transposed": lambda: torch.randn(2, 4, 9, 10).transpose(2, 3),
    "strided": lambda: torch.randn(2, 4, 20, 9)[:, :, ::2],
    "channels_last_slice": lambda: torch.randn(2, 6, 10, 9).to(memory_format=torch.channels_last)[:, 1:5],
    "unbatched": lambda: torch.randn(4, 10, 9),
}
ARGS = {"max": (3, 2, 1), "avg": (3, 2, 1), "adaptive": ((3, 4),)}


@pytest.mark.parametrize("kind", ["max", "avg", "adaptive"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_layouts_and_dtypes(kind, layout, dtype):
    x = LAYOUTS[layout]().to(dtype)
    d = 3 if layout == "channels_last_3d" else 2
    args = ((2, 3, 4),) if kind == "adaptive" and d == 3 else ARGS[kind]
    try:
        native = NATIVE[kind][d - 1](x, *args)
    except NotImplementedError:  # CPU avg_pool3d has no bf16 / fp16 kernel: nor do we
        with pytest.raises(NotImplementedError):
            OURS[kind](x.requires_grad_(), d, *args)
        return
    # overlapping windows: with bf16 / fp16 the order of the additions shows
    assert_same(*run(kind, d, x, *args))
    assert native.stride() == OURS[kind](x, d, *args).stride()


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_nan_inf_and_all_minus_inf_windows(channels_last):
    x = torch.randn(2, 3, 10, 10)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 5, 5] = float("inf")
    x[1, 2] = -float("inf")  # every window -inf: the first element in bounds wins
    x[1, 1, :4, :4] = float("nan")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_same(*run("max", 2, x, 3, 2, 1))
    assert_same(*run("max", 2, x, 2, 1, 1, 2, True))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_pool_window_positions_in_int64(monkeypatch, d):
    # planes too large for int32 arithmetic take the int64 path: same positions
    monkeypatch.setattr(P, "_INT32_LIMIT", 0)
    assert_same(*run("max", d, torch.randn(SHAPES[d]).round(), 3, 2, 1))


def test_max_pool_large_windows_keep_int16():
    x = torch.randn(1, 2, 40, 40)
    assert_same(*run("max", 2, x, 17, 3, 8))
    assert_same(*run("max", 3, torch.randn(1, 1, 9, 9, 9), 7, 2, 3))  # 343 > 256
    assert [P.code_bits(v) for v in (4, 256, 257, 32768, 32769)] == [8, 8, 16, 16, 32]


def test_saved_bytes_are_one_byte_per_output_element():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y, nbytes = saved_bytes(lambda t: F.max_pool2d(t, 3, 2, 1), x, exclude=[x])
    assert y.shape == (2, 3, 4, 4)
    # natively: the output-sized int64 indices (the input x is excluded here)
    assert nbytes == 2 * 3 * 4 * 4 * 8
    y, nbytes = saved_bytes(lambda t: P.max_pool(t, 2, 3, 2, 1), x, exclude=[x])
    assert nbytes == 2 * 3 * 4 * 4  # uint8 window positions, and not the input
    _, nbytes = saved_bytes(lambda t: P.max_pool(t, 2, 17, 1, 8), x)
    assert nbytes == 2 * 3 * 8 * 8 * 2  # 289-element windows: int16
    _, nbytes = saved_bytes(lambda t: F.avg_pool2d(t, 3, 2, 1), x)
    assert nbytes == x.numel() * 4  # natively: the whole input
    for op in (lambda t: P.avg_pool(t, 2, 3, 2, 1), lambda t: P.adaptive_avg_pool(t, 2, 3),
               lambda t: P.adaptive_avg_pool(t, 2, 1), lambda t: P.avg_pool(t[0], 2, 2)):
        assert saved_bytes(op, x)[1] == 0


def test_without_grad_runs_natively():
    x = torch.randn(2, 3, 8, 8)
    xg = x.clone().requires_grad_()
    for op, native in ((lambda t: P.max_pool(t, 2, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1)),
                       (lambda t: P.avg_pool(t, 2, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
                       (lambda t: P.adaptive_avg_pool(t, 2, 3), lambda t: F.adaptive_avg_pool2d(t, 3))):
        y = op(x)
        assert y.grad_fn is None and torch.equal(y, native(x))
        with torch.no_grad():
            y = op(xg)
        assert y.grad_fn is None and torch.equal(y, native(x))


def test_the_input_stand_in_is_never_read(monkeypatch):
    # the native backward ops get a stand-in for the input: its values must not matter
    def nan_stand_in(g, shape, fmt):
        return torch.full(shape, float("nan"), dtype=g.dtype).contiguous(memory_format=fmt)

    x = torch.randn(2, 3, 9, 9)
    cases = [("max", 2, x, 3, 2, 1), ("max", 1, x[0], 3, 2, 1), ("avg", 2, x, 3, 2, 1, True),
             ("avg", 1, x[0], 3, 2, 1), ("adaptive", 2, x, 4), ("adaptive", 1, x[0], 4),
             ("max", 2, x.to(memory_format=torch.channels_last), 3, 2, 1)]
    expected = []
    for c in cases:
        torch.manual_seed(0)
        expected.append(run(*c))
    monkeypatch.setattr(P, "_stand_in", nan_stand_in)
    for c, (native, _) in zip(cases, expected, strict=True):
        torch.manual_seed(0)
        assert_same(native, run(*c)[1])


def test_double_backward_is_refused():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    for op in (lambda t: P.max_pool(t, 2, 2), lambda t: P.avg_pool(t, 2, 2)):
        with pytest.raises(RuntimeError, match="differentiated twice"):
            torch.autograd.grad(op(x).pow(2).sum(), x, create_graph=True)


def test_outputs_can_be_modified_in_place():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for op in (lambda t: P.max_pool(t, 2, 2), lambda t: P.avg_pool(t, 2, 2),
               lambda t: P.adaptive_avg_pool(t[0], 2, 3)):
        y = op(x)
        y.relu_()
        y.sum().backward()


# --- maxima over dimensions (Hiera's unit pooling) ---------------------------------------


@pytest.mark.parametrize("dim,keepdim", [(1, False), ((1, 3), True), (-1, False), ([0, 2], False)])
def test_amax_is_exact_with_ties_and_keeps_a_bit_per_element(dim, keepdim):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 8)
    x[0, :, 0, 0] = 1.0  # a window of ties: native splits its gradient evenly
    x[1, 0, 1, :] = float("nan")
    x.requires_grad_()
    y, y0 = P.amax(x, dim, keepdim), torch.amax(x, dim, keepdim)
    torch.testing.assert_close(y, y0, equal_nan=True, rtol=0, atol=0)
    g = torch.randn_like(y)
    (gx,), (gx0,) = torch.autograd.grad(y, x, g), torch.autograd.grad(y0, x, g)
    torch.testing.assert_close(gx, gx0, equal_nan=True, rtol=0, atol=0)
    _, nbytes = saved_bytes(P.amax, x, dim, keepdim)
    assert nbytes == 2 * 4 * 6 * 8 // 8  # natively the input and the output, in float32


def test_max_along_a_dimension_keeps_uint8_indices():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, requires_grad=True)
    for dim, keepdim in [(1, False), (-1, True)]:
        (v, i), (v0, i0) = P.max_along(x, dim, keepdim), torch.max(x, dim, keepdim)
        assert torch.equal(v, v0) and torch.equal(i, i0) and i.dtype == torch.int64
        g = torch.randn_like(v)
        (gx,), (gx0,) = torch.autograd.grad(v, x, g), torch.autograd.grad(v0, x, g)
        torch.testing.assert_close(gx, gx0, rtol=0, atol=0)
    _, nbytes = saved_bytes(lambda t: P.max_along(t, 1).values, x)
    assert nbytes == 3 * 5  # one uint8 per output (natively int64)


def test_hiera_unit_pooling_is_compressed():
    model = timm.create_model("hiera_tiny_224", num_classes=3, img_size=64)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    s2a.compress_activations(model, ops={"max_pool": 8}, strict=False)
    fused, native = measure(model, x), measure(reference, x)
    assert "AmaxBackward0" in native.by_kind and "AmaxBackward0" not in fused.by_kind
    assert fused.by_kind["max_pool (s2a)"] * 30 < native.by_kind["AmaxBackward0"]
    out, out0 = model(x), reference(x)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    out.sum().backward()
    out0.sum().backward()
    for p, p0 in zip(model.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p0.grad)


def test_amax_counts_many_ties_in_half_precision():
    # 90000 tied maxima: a float16 count would overflow to inf (a zero gradient)
    x = torch.zeros(1, 300, 300, dtype=torch.float16, requires_grad=True)
    (gx,), (gx0,) = (torch.autograd.grad(f(x, (1, 2)).sum(), x) for f in (P.amax, torch.amax))
    torch.testing.assert_close(gx, gx0, rtol=0, atol=0)
    assert gx.abs().sum() > 0
