"""Tests for the low-bit softmax and scaled-dot-product attention."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from s2a.activations import attention as A
from s2a.activations.attention import DEFAULT_MODE, scaled_dot_product_attention, softmax
from s2a.activations.packing import packed_nbytes

MODES = ("probs", "recompute")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(F.cosine_similarity(a, b, dim=0))


def saved_tensors_of(fn):
    """Run ``fn`` (forward + backward) and return every tensor passed to saved_tensors_hooks."""
    seen: list[torch.Tensor] = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def no_tensor_attributes(grad_fn) -> bool:
    def has_tensor(obj) -> bool:
        if isinstance(obj, torch.Tensor):
            return True
        if isinstance(obj, (tuple, list)):
            return any(has_tensor(o) for o in obj)
        if isinstance(obj, dict):
            return any(has_tensor(o) for o in obj.values())
        return False

    return not any(has_tensor(v) for v in vars(grad_fn).values())


# ----------------------------------------------------------------------------- softmax


def softmax_grads(x, g, fn, dim):
    xr = x.detach().clone().requires_grad_()
    y = fn(xr)
    y.backward(g)
    return y, xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_forward_exact(dtype, dim):
    x = (torch.randn(6, 9, 33) * 3).to(dtype).requires_grad_()
    y = softmax(x, dim)
    assert y.dtype == dtype
    assert torch.equal(y, torch.softmax(x.detach(), dim))


@pytest.mark.parametrize("bits,threshold", [(4, 0.99), (8, 0.999)])
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_grad_cosine(bits, threshold, dim):
    x = torch.randn(4, 12, 50, 50) * 3
    g = torch.randn_like(x)
    _, ref = softmax_grads(x.double(), g.double(), lambda t: torch.softmax(t, dim), dim)
    _, got = softmax_grads(x, g, lambda t: softmax(t, dim, bits=bits), dim)
    assert got.dtype == torch.float32
    assert cosine(got, ref) >= threshold


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_half_grad(dtype):
    x = torch.randn(8, 40, 64) * 3
    g = torch.randn_like(x)
    _, ref = softmax_grads(x.double(), g.double(), lambda t: torch.softmax(t, -1), -1)
    _, got = softmax_grads(x.to(dtype), g.to(dtype), lambda t: softmax(t, -1), -1)
    assert got.dtype == dtype
    assert cosine(got, ref) >= 0.99


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    row=st.integers(8, 96),
    rows_extra=st.integers(16, 64),
    sigma=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31 - 1),
    dim_from_end=st.booleans(),
)
def test_softmax_backward_cosine_property(shape, row, rows_extra, sigma, seed, dim_from_end):
    # Any shape with at least 16 rows of at least 8 entries: 4-bit cosine >= 0.99.
    gen = torch.Generator().manual_seed(seed)
    full = [rows_extra, *shape, row] if dim_from_end else [row, rows_extra, *shape]
    dim = -1 if dim_from_end else 0
    x = torch.randn(full, generator=gen) * sigma
    g = torch.randn(full, generator=gen)
    _, ref = softmax_grads(x.double(), g.double(), lambda t: torch.softmax(t, dim), dim)
    _, got = softmax_grads(x, g, lambda t: softmax(t, dim, bits=4), dim)
    assert cosine(got, ref) >= 0.99


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_saved_bytes_exact(bits, dim):
    x = torch.randn(3, 7, 13, requires_grad=True)
    saved, y = saved_tensors_of(lambda: softmax(x, dim, bits=bits))
    n, row_len = x.numel(), x.shape[dim]
    rows = n // row_len
    assert nbytes(saved) == packed_nbytes(n, bits) + 4 * rows
    if bits != 3:  # planar 3-bit packing may use up to 2 bytes more
        assert packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert len(saved) == 2
    assert no_tensor_attributes(y.grad_fn)
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape


def test_softmax_nan_rows():
    x = torch.randn(5, 16) * 2
    x[1, 3] = float("nan")
    g = torch.randn_like(x)
    y, got = softmax_grads(x, g, lambda t: softmax(t, -1), -1)
    y_ref, ref = softmax_grads(x, g, lambda t: torch.softmax(t, -1), -1)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.isnan(got[1]).all()
    assert torch.isfinite(got[[0, 2, 3, 4]]).all()


def test_softmax_empty_and_no_grad():
    x = torch.randn(0, 7, requires_grad=True)
    y = softmax(x)
    y.sum().backward()
    assert y.shape == (0, 7) and x.grad.shape == (0, 7)
    xs = torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(softmax(xs), torch.softmax(xs, -1))
    saved, _ = saved_tensors_of(lambda: softmax(torch.randn(4, 5)))
    assert saved == []


@pytest.mark.parametrize("bad", [5, 0, 1, "4", 4.0, True, None])
def test_invalid_bits_raise(bad):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 8\]"):
        softmax(x, bits=bad)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 8\]"):
        scaled_dot_product_attention(q, q, q, bits=bad)
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 8\]"):
        scaled_dot_product_attention(q, q, q, qkv_bits=bad)


@pytest.mark.parametrize("bad", ["prob", "", None, 4, "PROBS"])
def test_invalid_mode_raises(bad):
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="probs"):
        scaled_dot_product_attention(q, q, q, mode=bad)


# --------------------------------------------------------------------------- attention


def make_qkv(B=2, H=4, L=64, S=None, E=64, Ev=None, sigma=3.0, Hkv=None, dtype=torch.float32):
    """q, k scaled so logits q.k/sqrt(E) have std ``sigma`` (realistic attention)."""
    S = L if S is None else S
    Ev = E if Ev is None else Ev
    Hkv = H if Hkv is None else Hkv
    a = math.sqrt(sigma)
    q = torch.randn(B, H, L, E) * a
    k = torch.randn(B, Hkv, S, E) * a
    v = torch.randn(B, Hkv, S, Ev)
    g = torch.randn(B, H, L, Ev)
    return [t.to(dtype) for t in (q, k, v, g)]


def attn_grads(fn, q, k, v, g, **kw):
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*xs, **kw)
    out.backward(g)
    return out, [x.grad for x in xs]


def reference(q, k, v, g, **kw):
    """Exact float64 autograd through the native op."""
    kw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None and m.is_floating_point():
        kw["attn_mask"] = m.double()
    return attn_grads(
        F.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(), **kw
    )


def ours(mode=DEFAULT_MODE, **extra):
    return lambda *x, **kw: scaled_dot_product_attention(*x, **kw, mode=mode, **extra)


def assert_grads_close(got, ref, threshold):
    for name, a, b in zip("qkv", got, ref, strict=True):
        c = cosine(a, b)
        assert c >= threshold, f"d{name} cosine {c:.5f} < {threshold}"


def test_default_mode_is_probs():
    assert DEFAULT_MODE == "probs"
    assert set(A.SDPA_MODES) == set(MODES)


@pytest.mark.parametrize("op", ["softmax", *MODES])
def test_outputs_can_be_modified_in_place(op):
    # As native outputs: `y = op(x); y += 1` works (no view created inside the Function).
    q, k, v, _ = make_qkv(L=10, S=12)

    def run(in_place: bool):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        y = softmax(xs[0], -1) if op == "softmax" else ours(op, bits=8)(*xs)
        y = y.add_(1) if in_place else y + 1
        return torch.autograd.grad(y, xs[0], torch.ones_like(y))

    assert torch.equal(run(True)[0], run(False)[0])


@pytest.mark.parametrize("mode", MODES)
def test_attention_zero_key_rows_at_small_scale(mode):
    # Rows of zeros (padding keys) are stored with scale 0 and decode to exactly 0; with scale
    # 1 they decoded to about 1/255, which dwarfs keys of magnitude 0.01 (dq error 0.25).
    q, k, v, g = make_qkv(L=6, S=9, E=8)
    k = k * 0.01
    k[:, :, -3:] = 0.0
    _, got = attn_grads(ours(mode, bits=8), q, k, v, g)
    _, ref = reference(q, k, v, g)
    for a, b in zip(got, ref, strict=True):
        assert (a.double() - b).norm() / b.norm() < 0.02


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [A.CHUNK_ELEMS, 3 * 12])  # one chunk; 3 query rows at a time
def test_attention_unbatched_2d(monkeypatch, mode, chunk):
    # (L, E) query, key and value, as the native op takes (no batch dim at all).
    monkeypatch.setattr(A, "CHUNK_ELEMS", chunk)
    q, k, v, g = (t[0, 0] for t in make_qkv(L=10, S=12, E=8))
    mask = torch.rand(10, 12) > 0.3
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g, attn_mask=mask)
    ref_out, ref = reference(q, k, v, g, attn_mask=mask)
    assert out.shape == (10, 8)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)


@pytest.mark.parametrize("mode", MODES)
def test_attention_forward_matches_native(mode):
    q, k, v, g = make_qkv(L=50, S=70)
    out, _ = attn_grads(ours(mode, bits=8), q, k, v, g)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_4bit_cosine_vit_like():
    # ViT-B-like head (N=197, d=64), logits std 3: default mode at 4 bits.
    q, k, v, g = make_qkv(B=1, H=4, L=197, E=64)
    _, ref = reference(q, k, v, g)
    _, got = attn_grads(ours(), q, k, v, g)
    assert_grads_close(got, ref, 0.99)


@pytest.mark.parametrize("mode", MODES)
def test_attention_8bit_cosine(mode):
    q, k, v, g = make_qkv(B=1, H=4, L=128, E=64)
    _, ref = reference(q, k, v, g)
    _, got = attn_grads(ours(mode, bits=8), q, k, v, g)
    assert_grads_close(got, ref, 0.999)


def test_recompute_4bit_is_less_accurate_but_sane(monkeypatch):
    # Documented trade-off: recompute at 4 bits misses 0.99 (that is why it is not the default).
    # Forced here: at logit std 3 the guard would keep P instead.
    monkeypatch.setattr(A, "RECOMPUTE_MAX_LOGIT_ERROR", math.inf)
    q, k, v, g = make_qkv(B=1, H=4, L=128, E=64)
    _, ref = reference(q, k, v, g)
    _, got = attn_grads(ours("recompute", bits=4), q, k, v, g)
    assert_grads_close(got, ref, 0.85)


def _recompute_call(q, k, v, g, bits, **kw):
    """(saved tensors, gradients, warnings) of one recompute-mode call."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(A, "_warned_recompute", False)
        saved, (_, grads) = saved_tensors_of(lambda: attn_grads(ours("recompute", bits=bits), q, k, v, g, **kw))
    return saved, grads, [w for w in caught if "too large to recompute" in str(w.message)]


@pytest.mark.parametrize(("bits", "sigma"), [(8, 300.0), (4, 3.0)])
def test_recompute_keeps_probabilities_when_logits_are_too_large(monkeypatch, bits, sigma):
    # Logits in the hundreds (Visformer at random init reaches thousands): recomputed from
    # rounded Q and K they are off by nats and the gradient is lost. Such a call keeps P.
    q, k, v, g = make_qkv(B=2, H=3, L=40, E=32, sigma=sigma)
    _, ref = reference(q, k, v, g)
    saved, got, warned = _recompute_call(q, k, v, g, bits)
    assert len(warned) == 1 and "op_bits={'attention': 0}" in str(warned[0].message)
    want = sum(expected_bytes(t.shape, 8) for t in (q, k, v)) + expected_bytes((2, 3, 40, 40), bits)
    assert nbytes(saved) == want  # P at the call's bits, Q, K and V at qkv_bits (8)
    assert_grads_close(got, ref, 0.99)
    # without the guard the same call's gradient is far off
    monkeypatch.setattr(A, "RECOMPUTE_MAX_LOGIT_ERROR", math.inf)
    _, unguarded, _ = _recompute_call(q, k, v, g, bits)
    assert min(cosine(a, b) for a, b in zip(unguarded, ref, strict=True)) < 0.98


def test_recompute_guard_warns_once_and_spares_ordinary_logits(monkeypatch):
    q, k, v, g = make_qkv(B=1, H=2, L=16, E=32, sigma=3.0)
    saved, _, warned = _recompute_call(q, k, v, g, 8)  # ViT-like logits at 8 bits: recomputed
    assert not warned and nbytes(saved) == sum(expected_bytes(t.shape, 8) for t in (q, k, v))
    monkeypatch.setattr(A, "_warned_recompute", False)
    big = [t * 20 for t in (q, k)]
    with pytest.warns(RuntimeWarning, match="too large to recompute"):
        attn_grads(ours("recompute", bits=8), *big, v, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn_grads(ours("recompute", bits=8), *big, v, g)  # reported once per process


def test_recompute_guard_pairs_query_and_key_heads_under_gqa():
    # GQA, 2 query heads per key head: query heads 0, 1 read key head 0, heads 2, 3 key head 1.
    q, k, v, g = make_qkv(B=1, H=4, Hkv=2, L=24, E=16, sigma=1.0)
    q[:, :2] *= 20  # large queries meet ordinary keys, large keys ordinary queries: each
    k[:, 1] *= 20  # head's logits grow 20x, within the limit (a max over all heads: 400x)
    _, _, warned = _recompute_call(q, k, v, g, 8, enable_gqa=True)
    assert not warned
    q[:, 2] *= 20  # now query head 2 meets the large key head
    _, _, warned = _recompute_call(q, k, v, g, 8, enable_gqa=True)
    assert len(warned) == 1


def test_recompute_guard_ignores_non_finite_heads_and_the_sign_of_scale():
    q, k, v, g = make_qkv(B=1, H=2, L=16, E=32, sigma=300.0)
    q[0, 0, 3, 5] = float("nan")  # head 0 is NaN in either mode; head 1 still needs P
    assert len(_recompute_call(q, k, v, g, 8)[2]) == 1
    q, k, v, g = make_qkv(B=1, H=2, L=16, E=32, sigma=300.0)
    assert len(_recompute_call(q, k, v, g, 8, scale=-1 / math.sqrt(32))[2]) == 1


def test_recompute_guard_leaves_meta_and_fake_tensors_alone():
    # shape-only runs (meta device, FakeTensorMode tracing) cannot read the estimate back
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device="cpu"):
        q, k, v = (torch.randn(1, 2, 8, 16, device=device, requires_grad=True) for _ in range(3))
        return ours("recompute", bits=8)(q, k, v).shape

    assert run("meta") == (1, 2, 8, 16)
    with FakeTensorMode():
        assert run() == (1, 2, 8, 16)


def key_padding(B, S, dtype=torch.bool):
    lengths = torch.randint(S // 2, S + 1, (B,))
    keep = torch.arange(S)[None, :] < lengths[:, None]
    keep[:, 0] = True
    if dtype == torch.bool:
        return keep[:, None, None, :]
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mask_kind",
    ["bool_pad", "float_pad", "float_full", "bool_2d", "bool_dead_row", "float_dead_row"],
)
def test_attention_masks(mode, mask_kind):
    B, H, L, S = 2, 4, 40, 48
    q, k, v, g = make_qkv(B=B, H=H, L=L, S=S)
    if mask_kind == "bool_pad":
        mask = key_padding(B, S)
    elif mask_kind == "float_pad":
        mask = key_padding(B, S, torch.float32)
    elif mask_kind == "float_full":
        mask = torch.randn(B, H, L, S)
    elif mask_kind == "bool_2d":
        mask = torch.rand(L, S) > 0.3
        mask[:, 0] = True
    elif mask_kind == "bool_dead_row":
        mask = torch.rand(B, 1, L, S) > 0.3
        mask[:, :, 5] = False  # query row 5 sees no key: native outputs 0
    else:
        mask = torch.zeros(L, S)
        mask[7] = float("-inf")
    ref_out, ref = reference(q, k, v, g, attn_mask=mask)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g, attn_mask=mask)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)
    if "dead" in mask_kind:
        row = 5 if mask_kind == "bool_dead_row" else 7
        assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
        assert torch.equal(got[0][:, :, row], torch.zeros_like(got[0][:, :, row]))
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    _, got4 = attn_grads(
        ours(mode if mode == "probs" else "probs", bits=4), q, k, v, g, attn_mask=mask
    )
    assert_grads_close(got4, ref, 0.99)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L,S", [(32, 32), (20, 36), (36, 20)])
def test_attention_causal(mode, L, S):
    q, k, v, g = make_qkv(L=L, S=S)
    ref_out, ref = reference(q, k, v, g, is_causal=True)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g, is_causal=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)


@pytest.mark.parametrize("mode", MODES)
def test_attention_gqa(mode):
    q, k, v, g = make_qkv(H=8, Hkv=2, L=40)
    ref_out, ref = reference(q, k, v, g, enable_gqa=True)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g, enable_gqa=True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert [t.shape for t in got] == [q.shape, k.shape, v.shape]
    assert_grads_close(got, ref, 0.999)
    # K/V are stored once per kv head, not repeated per query head.
    saved, _ = saved_tensors_of(lambda: attn_grads(ours(mode, bits=8), q, k, v, g, enable_gqa=True))
    want = sum(expected_bytes(t.shape, 8) for t in (q, k, v))
    if mode == "probs":
        want += expected_bytes((2, 8, 40, 40), 8)
    assert nbytes(saved) == want


def test_attention_broadcast_batch():
    q, k, v, g = make_qkv(B=3, L=24)
    k, v = k[:1], v[:1]
    ref_out, ref = reference(q, k, v, g)
    out, got = attn_grads(ours(bits=8), q, k, v, g)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert got[1].shape == k.shape
    assert_grads_close(got, ref, 0.999)


@pytest.mark.parametrize("mode", MODES)
def test_attention_value_wider_than_query_batch(mode):
    # V carries a batch dim that Q and K broadcast along: P is (H, L, S), dP is summed to it
    q, k, v, g = make_qkv(B=3, L=12)
    q, k = q[0], k[0]
    ref_out, ref = reference(q, k, v, g)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g)
    assert out.shape == ref_out.shape and got[0].shape == q.shape and got[2].shape == v.shape
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)


@pytest.mark.parametrize("mode", MODES)
def test_attention_custom_scale_and_value_dim(mode):
    q, k, v, g = make_qkv(L=30, S=50, E=32, Ev=48)
    ref_out, ref = reference(q, k, v, g, scale=0.3)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g, scale=0.3)
    assert out.shape == (2, 4, 30, 48)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)


@pytest.mark.parametrize("E", [32, 64, 128])
def test_attention_head_dims(E):
    q, k, v, g = make_qkv(B=1, H=4, L=96, E=E)
    ref_out, ref = reference(q, k, v, g)
    out, got = attn_grads(ours(), q, k, v, g)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.99)


@pytest.mark.parametrize("mode", MODES)
def test_attention_non_contiguous_qkv(mode):
    # timm: qkv = linear(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4); q, k, v = qkv.unbind(0)
    B, N, H, d = 2, 50, 4, 32
    base = torch.randn(B, N, 3 * H * d) * math.sqrt(3.0)
    g = torch.randn(B, H, N, d)

    def run(fn):
        x = base.clone().requires_grad_()
        q, k, v = x.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        out = fn(q, k, v)
        out.backward(g)
        return out, x.grad

    ref_out, ref = run(
        lambda q, k, v: F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    )
    out, got = run(lambda q, k, v: scaled_dot_product_attention(q, k, v, mode=mode, bits=8))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert cosine(got, ref) >= 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_attention_half_inputs(dtype, mode):
    q, k, v, g = make_qkv(B=1, L=64, dtype=dtype)
    ref_out, ref = reference(q, k, v, g)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g)
    assert out.dtype == dtype and all(t.dtype == dtype for t in got)
    native = F.scaled_dot_product_attention(q, k, v)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), native.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    assert_grads_close(got, ref, 0.99)


def test_attention_inside_autocast():
    q, k, v, g = make_qkv(B=1, L=64)
    _, ref = reference(q, k, v, g)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_dot_product_attention(*xs)
        native = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), native.float(), atol=3e-2, rtol=3e-2)
    out.backward(g.to(out.dtype))
    assert all(x.grad.dtype == torch.float32 for x in xs)
    assert_grads_close([x.grad for x in xs], ref, 0.99)


@pytest.mark.parametrize("mode", MODES)
def test_attention_empty_batch(mode):
    q, k, v, g = make_qkv(B=0, L=8)
    out, got = attn_grads(ours(mode), q, k, v, g)
    assert out.shape == (0, 4, 8, 64)
    assert [t.shape for t in got] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("mode", MODES)
def test_attention_nan_propagates_like_native(mode):
    q, k, v, g = make_qkv(B=2, H=2, L=16)
    q[0, 1, 3, 5] = float("nan")
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref = attn_grads(F.scaled_dot_product_attention, q, k, v, g)
    out, got = attn_grads(ours(mode, bits=8), q, k, v, g)
    assert torch.isnan(out[torch.isnan(ref_out)]).all()
    for a, b in zip(got, ref, strict=True):
        assert torch.isnan(a[torch.isnan(b)]).all()
    # Heads without NaN stay finite.
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, 0]).all()
    assert all(torch.isfinite(t[1]).all() for t in got)


def test_attention_dropout_uses_same_mask_forward_and_backward():
    p = 0.3
    q, k, v, g = make_qkv(B=2, H=3, L=24, S=40, E=32)
    torch.manual_seed(123)
    out, got = attn_grads(ours(bits=8), q, k, v, g, dropout_p=p)

    # Rebuild the mask exactly as the op does: seed from the default generator.
    torch.manual_seed(123)
    gen = A._dropout_generator(A._draw_seed(), q.device)
    keep = A._keep_scale(gen, torch.empty(2, 3, 24, 40), p).double()
    assert 0.6 < float((keep > 0).double().mean()) < 0.8

    def math_ref(q, k, v):
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1)
        return (attn * keep) @ v

    ref_out, ref = attn_grads(math_ref, q.double(), k.double(), v.double(), g.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got, ref, 0.999)

    # Reproducible under torch.manual_seed; different seeds give different masks.
    torch.manual_seed(123)
    out2, got2 = attn_grads(ours(bits=8), q, k, v, g, dropout_p=p)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(got, got2, strict=True))
    torch.manual_seed(7)
    out3, _ = attn_grads(ours(bits=8), q, k, v, g, dropout_p=p)
    assert not torch.equal(out, out3)


def test_attention_dropout_mask_costs_eight_bytes():
    q, k, v, g = make_qkv(B=1, H=2, L=16, E=32)
    s0, _ = saved_tensors_of(lambda: attn_grads(ours(), q, k, v, g))
    s1, _ = saved_tensors_of(lambda: attn_grads(ours(), q, k, v, g, dropout_p=0.2))
    assert nbytes(s1) - nbytes(s0) == 8
    assert next(t for t in s1 if t.dtype == torch.int64).numel() == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_attention_chunked_equals_unchunked(monkeypatch, mode, dropout_p):
    B, H, L, S = 2, 2, 37, 29
    # logit std 0.5: small enough to recompute from 4-bit Q and K (no fallback to keeping P)
    q, k, v, g = make_qkv(B=B, H=H, L=L, S=S, sigma=0.5 if mode == "recompute" else 3.0)
    mask = key_padding(B, S)
    out1, got1 = attn_grads(ours(mode), q, k, v, g, attn_mask=mask)
    # 580 logits: one batch item per slice (2 slices), 10 query rows per chunk (4 per slice)
    monkeypatch.setattr(A, "CHUNK_ELEMS", B * H * S * 5)
    torch.manual_seed(5)
    saved, (out2, got2) = saved_tensors_of(
        lambda: attn_grads(ours(mode, bits=8), q, k, v, g, attn_mask=mask, dropout_p=dropout_p)
    )
    uint8 = sum(1 for t in saved if t.dtype == torch.uint8)
    assert uint8 == (3 * 2 + 8 if mode == "probs" else 3 * 2)  # Q, K, V per slice; P per chunk
    if dropout_p == 0.0:
        # Same codes per row: chunked 4-bit equals unchunked up to float summation order.
        out3, got3 = attn_grads(ours(mode), q, k, v, g, attn_mask=mask)
        torch.testing.assert_close(out1, out3, atol=1e-5, rtol=1e-5)
        for a, b in zip(got1, got3, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Rebuild the per-chunk dropout masks (drawn in slice, then chunk order from one generator).
    keep = torch.ones(B, H, L, S, dtype=torch.float64)
    if dropout_p > 0:
        torch.manual_seed(5)
        gen = A._dropout_generator(A._draw_seed(), q.device)
        chunks = A._chunk_bounds(L, H * S)
        assert len(chunks) == 4
        for b in range(B):
            for i0, i1 in chunks:
                keep[b : b + 1, :, i0:i1] = A._keep_scale(gen, torch.empty(1, H, i1 - i0, S), dropout_p)

    def math_ref(q, k, v):
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))
        return (torch.softmax(s, -1) * keep) @ v

    ref_out, ref = attn_grads(math_ref, q.double(), k.double(), v.double(), g.double())
    torch.testing.assert_close(out2.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got2, ref, 0.999)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case", ["plain", "gqa", "key_padding", "float_mask_per_item", "mask_broadcast", "causal", "k_broadcast"]
)
def test_attention_batch_slices_equal_one_pass(monkeypatch, mode, case):
    """Slicing the batch (so backward rebuilds Q, K, V and P a slice at a time) changes
    nothing but float summation order, whatever broadcasts along the batch."""
    B, H, L, S = 5, 4, 9, 7
    q, k, v, g = make_qkv(B=B, H=H, L=L, S=S, E=16, Hkv=2 if case == "gqa" else None)
    kw: dict = {"enable_gqa": True} if case == "gqa" else {}
    if case == "key_padding":
        kw["attn_mask"] = key_padding(B, S)
    elif case == "float_mask_per_item":
        kw["attn_mask"] = torch.randn(B, H, L, S)
    elif case == "mask_broadcast":
        kw["attn_mask"] = torch.rand(1, 1, L, S) > 0.3
        kw["attn_mask"][..., 0] = True
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "k_broadcast":  # K and V shared by the batch: no slicing, one pass
        k, v = k[:1], v[:1]
    fn = ours(mode, bits=8)
    out1, got1 = attn_grads(fn, q, k, v, g, **kw)
    monkeypatch.setattr(A, "CHUNK_ELEMS", 2 * H * L * S)  # two items per slice, last one alone
    batch = torch.Size((B, H))
    slices = A._batch_slices(q, k, v, kw.get("attn_mask"), batch, L, S)
    assert (slices is None) == (case == "k_broadcast")
    if slices is not None:
        assert [(s.start, s.stop) for s in slices] == [(0, 2), (2, 4), (4, 5)]
    out2, got2 = attn_grads(fn, q, k, v, g, **kw)
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=1e-5)
    for a, b in zip(got2, got1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ref_out, ref = reference(q, k, v, g, **kw)
    torch.testing.assert_close(out2.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert_grads_close(got2, ref, 0.999)


def test_attention_backward_rebuilds_one_slice_at_a_time(monkeypatch):
    """The backward's peak holds the gradients and one slice's Q, K, V and P, not the whole
    batch's: measured on a ViT-B-like call (12 heads, 197 tokens), exact CPU peak."""
    from s2a.memory import measure

    B, H, N, E = 8, 12, 197, 64
    q, k, v, _ = make_qkv(B=B, H=H, L=N, E=E)
    x = torch.cat([q, k, v], dim=-1).requires_grad_()

    class Step(torch.nn.Module):
        def forward(self, t):
            qq, kk, vv = t.split(E, dim=-1)
            return scaled_dot_product_attention(qq, kk, vv, bits=4)

    step = Step()
    monkeypatch.setattr(A, "CHUNK_ELEMS", B * H * N * N)  # the whole batch at once
    whole = measure(step, x)
    monkeypatch.setattr(A, "CHUNK_ELEMS", H * N * N)  # one item per slice
    sliced = measure(step, x)
    assert sliced.saved_bytes == whole.saved_bytes  # the same codes, in 8 pieces
    if whole.peak_bytes is None:
        pytest.skip("no allocator statistics on this platform")
    logits = B * H * N * N * 4  # one fp32 (B, H, N, N) tensor: 14.2 MiB
    assert sliced.peak_bytes < whole.peak_bytes - 2 * logits


def expected_bytes(shape, bits):
    n = math.prod(shape)
    rows = n // shape[-1]
    return packed_nbytes(n, bits) + 4 * rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("qkv_bits", [4, 8])
def test_attention_saved_bytes_exact_probs(bits, qkv_bits):
    B, H, L, S, E, Ev = 1, 3, 13, 11, 32, 24
    q, k, v, g = make_qkv(B=B, H=H, L=L, S=S, E=E, Ev=Ev)
    saved, (out, _) = saved_tensors_of(
        lambda: attn_grads(ours("probs", bits=bits, qkv_bits=qkv_bits), q, k, v, g)
    )
    want = (
        expected_bytes(q.shape, qkv_bits)
        + expected_bytes(k.shape, qkv_bits)
        + expected_bytes(v.shape, qkv_bits)
        + expected_bytes((B, H, L, S), bits)
    )
    assert nbytes(saved) == want
    assert no_tensor_attributes(out.grad_fn)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_attention_saved_bytes_exact_recompute(bits):
    q, k, v, g = make_qkv(B=2, H=3, L=13, S=11, E=32, sigma=0.05)  # small enough for 2-bit Q/K
    want = sum(expected_bytes(t.shape, bits) for t in (q, k, v))
    saved, (out, _) = saved_tensors_of(lambda: attn_grads(ours("recompute", bits=bits), q, k, v, g))
    assert nbytes(saved) == want
    assert no_tensor_attributes(out.grad_fn)
    mask = key_padding(2, 11)  # recompute keeps the (input) mask by reference
    saved, _ = saved_tensors_of(
        lambda: attn_grads(ours("recompute", bits=bits), q, k, v, g, attn_mask=mask)
    )
    assert nbytes(saved) == want + mask.numel()
    assert any(t is mask for t in saved)


def test_vit_b_block_budget():
    # Per ViT-B block per sample (12 heads, N=197, d=64): default mode at 4 bits.
    shape = (1, 12, 197, 64)
    total = 3 * expected_bytes(shape, 8) + expected_bytes((1, 12, 197, 197), 4)
    assert total < 740_000  # vs 2.42 MB for native fp32 SDPA (q, k, v, out)
    q, k, v, g = make_qkv(B=1, H=12, L=197, E=64)
    saved, _ = saved_tensors_of(lambda: attn_grads(ours(), q, k, v, g))
    assert nbytes(saved) == total


def test_attention_fallbacks_to_native():
    q, k, v, _ = make_qkv(B=1, H=2, L=16)
    with torch.no_grad():
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
        )
    # No input requires grad: nothing compressed, nothing saved.
    saved, _ = saved_tensors_of(lambda: scaled_dot_product_attention(q, k, v))
    assert saved == []
    qr = q.clone().requires_grad_()
    # Native argument errors surface unchanged.
    with pytest.raises(RuntimeError):
        scaled_dot_product_attention(
            qr, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool), is_causal=True
        )


def test_only_some_inputs_require_grad():
    q, k, v, g = make_qkv(B=1, H=2, L=32)
    _, ref = reference(q, k, v, g)
    vr = v.clone().requires_grad_()
    scaled_dot_product_attention(q, k, vr, bits=8).backward(g)
    assert cosine(vr.grad, ref[2]) >= 0.999


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(9, 7), (1, 4, 9, 7), (5, 1, 9, 7), (5, 4, 1, 7), (5, 4, 9, 7)])
@pytest.mark.parametrize("sliced", [False, True])
def test_attention_mask_that_requires_grad(monkeypatch, mode, shape, sliced):
    """A trainable additive mask (Swin's relative-position bias in full fine-tuning) gets
    dL/dlogits summed over the dims it broadcasts along, on the compressed path: it used to
    fall back to native SDPA, which stores Q, K, V and the probabilities in full."""
    B, H, L, S = 5, 4, 9, 7
    q, k, v, g = make_qkv(B=B, H=H, L=L, S=S, E=16)
    bias = torch.randn(shape)
    if sliced:  # batch slices and row chunks of one and two items
        monkeypatch.setattr(A, "CHUNK_ELEMS", 2 * H * L * S)

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
        out = fn(*xs[:3], attn_mask=xs[3])
        out.backward(g.to(dtype))
        return out, [x.grad for x in xs]

    saved, _ = saved_tensors_of(lambda: ours(mode, bits=8)(q.requires_grad_(), k, v, attn_mask=bias.requires_grad_()))
    q.requires_grad_(False)
    bias.requires_grad_(False)
    assert all(t.dtype in (torch.uint8, torch.float32, torch.int64) for t in saved)
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) < q.numel()  # scales (and a mask) only
    out, got = run(ours(mode, bits=8), torch.float32)
    ref_out, ref = run(F.scaled_dot_product_attention, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    assert got[3].shape == bias.shape
    for a, b in zip(got, ref, strict=True):
        assert cosine(a, b) >= 0.999
