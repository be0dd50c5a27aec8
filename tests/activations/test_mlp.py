"""The chunked frozen-weight MLP and the lean timm Mlp / Attention forwards."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn

import s2a
from helpers import count_calls
from s2a.activations import functional as S
from s2a.activations import mlp as M
from s2a.memory import measure


def _weights(c=24, h=96, o=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(h, c, generator=g, dtype=dtype) / c**0.5
    b1 = (torch.randn(h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    w2 = torch.randn(o, h, generator=g, dtype=dtype) / h**0.5
    b2 = torch.randn(o, generator=g, dtype=dtype).requires_grad_()
    return w1, b1, w2, b2


def _unfused(x, w1, b1, w2, b2, name="gelu", bits=4):
    return F.linear(S.activation(F.linear(x, w1, b1), name, bits), w2, b2)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
@pytest.mark.parametrize("chunk", [M.CHUNK_ELEMS, 96 * 7])  # one chunk; 7-row chunks, ragged last
def test_frozen_mlp_equals_the_unfused_compressed_block(monkeypatch, name, chunk):
    monkeypatch.setattr(M, "CHUNK_ELEMS", chunk)
    w1, b1, w2, b2 = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    g = torch.randn(3, 17, 20)
    y = M.frozen_mlp(x, w1, b1, w2, b2, name, 4)
    gx, gb1, gb2 = torch.autograd.grad(y, (x, b1, b2), g)
    y0 = _unfused(x, w1, b1, w2, b2, name)
    gx0, gb10, gb20 = torch.autograd.grad(y0, (x, b1, b2), g)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for a, b in ((gx, gx0), (gb1, gb10), (gb2, gb20)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the same saved bytes as the unfused block: the derivative codes, nothing else
    fused, plain = (measure(_Block(w1, b1, w2, b2, name, f), x) for f in (True, False))
    assert fused.saved_bytes == plain.saved_bytes == 3 * 17 * 96 * 4 // 8 + 4 * 3 * 17 * 20
    assert fused.by_kind == plain.by_kind


def test_frozen_mlp_output_can_be_modified_in_place():
    # As F.linear's output: `y = mlp(x); y += 1` works (not a view made inside the Function).
    w1, b1, w2, b2 = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    y = M.frozen_mlp(x, w1, b1, w2, b2)
    y += 1
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (ref,) = torch.autograd.grad(M.frozen_mlp(x, w1, b1, w2, b2), x, torch.ones_like(y))
    assert torch.equal(gx, ref)


class _Block(nn.Module):
    def __init__(self, w1, b1, w2, b2, name, fused):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(w1, requires_grad=False), nn.Parameter(w2, requires_grad=False)
        self.b1, self.b2 = nn.Parameter(b1.detach()), nn.Parameter(b2.detach())
        self.name, self.fused = name, fused

    def forward(self, x):
        f = M.frozen_mlp if self.fused else _unfused
        return f(x, self.w1, self.b1, self.w2, self.b2, self.name, 4)


def test_frozen_mlp_dtypes_and_autocast():
    w1, b1, w2, b2 = _weights(dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    y = M.frozen_mlp(x, w1, b1, w2, b2)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _unfused(x, w1, b1, w2, b2))
    gx, gb1 = torch.autograd.grad(y.sum(), (x, b1))
    assert gx.dtype == gb1.dtype == torch.float64
    # bf16 autocast: computed in bf16 like F.linear would; gradients in the parameters' dtype
    w1, b1, w2, b2 = _weights()
    x = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = M.frozen_mlp(x, w1, b1, w2, b2)
        y0 = _unfused(x, w1, b1, w2, b2)
    assert y.dtype == y0.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y0.float(), rtol=2e-2, atol=2e-2)
    gx, gb1, gb2 = torch.autograd.grad(y.float().sum(), (x, b1, b2))
    assert gx.dtype == gb1.dtype == gb2.dtype == torch.float32
    gx0 = torch.autograd.grad(y0.float().sum(), x)[0]
    assert F.cosine_similarity(gx.flatten(), gx0.flatten(), dim=0) > 0.999


def test_frozen_mlp_only_biases_or_only_input_need_grad():
    w1, b1, w2, b2 = _weights()
    x = torch.randn(4, 24)
    y = M.frozen_mlp(x, w1, b1, w2, None)
    (gb1,) = torch.autograd.grad(y.sum(), (b1,))
    (gb10,) = torch.autograd.grad(_unfused(x, w1, b1, w2, None).sum(), (b1,))
    torch.testing.assert_close(gb1, gb10)
    xg = x.clone().requires_grad_()
    y = M.frozen_mlp(xg, w1, None, w2, b2.detach())
    (gx,) = torch.autograd.grad(y.sum(), (xg,))
    torch.testing.assert_close(gx, torch.autograd.grad(_unfused(xg, w1, None, w2, None).sum(), xg)[0])


def test_frozen_mlp_bad_input():
    w1, b1, w2, b2 = _weights()
    x = torch.randn(4, 24, requires_grad=True)
    with pytest.raises(ValueError, match="weights must be frozen"):
        M.frozen_mlp(x, w1.clone().requires_grad_(), b1, w2, b2)
    with pytest.raises(ValueError, match="do not chain"):
        M.frozen_mlp(torch.randn(4, 23), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="unknown activation"):
        M.frozen_mlp(x, w1, b1, w2, b2, "relu")
    # NaN rows give NaN there and finite gradients elsewhere, as the unfused block
    xn = torch.randn(4, 24)
    xn[1, 3] = float("nan")
    xn.requires_grad_()
    y = M.frozen_mlp(xn, w1, b1, w2, b2)
    (gx,) = torch.autograd.grad(y.sum(), xn)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.isfinite(gx[[0, 2, 3]]).all()


def _vit(**kw):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, **kw)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("head"))
    return model


def _step(model, x):
    torch.manual_seed(1)
    out = model(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _unpatch_lean(model):
    for module, kind, *_ in model._s2a_compression.patched:
        if kind.startswith("frozen_mlp") or kind == "attention":
            module.__dict__.pop("forward")


def test_lean_timm_blocks_change_nothing_but_the_forward_peak(monkeypatch):
    # 17-row chunks of the 136 x 768 hidden layer: the whole layer never exists at once
    monkeypatch.setattr(M, "CHUNK_ELEMS", 17 * 768)
    model = _vit()
    x = torch.randn(8, 3, 64, 64)
    s2a.compress_activations(model)
    summary = s2a.compression_summary(model)
    assert summary["blocks.0.mlp"] == "frozen_mlp:gelu@4" and summary["blocks.0.attn"] == "attention@8"
    lean_out, lean_grads = _step(model, x)
    lean = measure(model, x)
    _unpatch_lean(model)
    out, grads = _step(model, x)
    plain = measure(model, x)
    torch.testing.assert_close(lean_out, out, rtol=1e-5, atol=1e-6)
    assert lean_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(lean_grads[n], grads[n], rtol=1e-4, atol=1e-6)
    assert lean.saved_bytes == plain.saved_bytes and lean.by_kind == plain.by_kind
    if lean.forward_peak_bytes is not None:
        # timm's block holds fc1's output and GELU's (2 x 8 x 17 tokens x 768 fp32) at its peak,
        # the chunked one 17-row pieces: at least half a hidden layer less (measured: 0.84)
        assert lean.forward_peak_bytes <= plain.forward_peak_bytes - 8 * 17 * 768 * 4 // 2
    s2a.restore(model)
    assert "forward" not in model.blocks[0].mlp.__dict__ and "forward" not in model.blocks[0].attn.__dict__


def test_lean_mlp_falls_back_where_fusing_would_change_something(monkeypatch):
    from s2a.activations import _timm

    fused_calls = count_calls(monkeypatch, _timm, "frozen_mlp")
    model = _vit()
    x = torch.randn(2, 3, 64, 64)
    s2a.compress_activations(model)
    mlp = model.blocks[0].mlp

    def fused_in_block0(fn) -> bool:
        """Every block ran fused (calls: one per block and forward) or block 0 did not."""
        storage = s2a.compression_summary(model)["blocks.0.mlp"].split("@")[1]
        fused_calls.clear()
        fn()
        fused = bool(fused_calls) and len(fused_calls) % len(model.blocks) == 0
        assert (storage == "4") == fused  # the summary told beforehand
        return fused

    assert fused_in_block0(lambda: _step(model, x))
    # measure's own path-tracking hooks do not prevent fusing
    assert fused_in_block0(lambda: measure(model, x))
    # a user's hook on fc1 must still fire: that block runs unfused
    seen = []
    h = mlp.fc1.register_forward_hook(lambda *a: seen.append(1))
    assert not fused_in_block0(lambda: _step(model, x)) and seen
    h.remove()
    # a trainable weight: its gradient needs fc1's input
    mlp.fc1.weight.requires_grad_(True)
    assert not fused_in_block0(lambda: _step(model, x))
    mlp.fc1.weight.requires_grad_(False)
    # dropout between the activation and fc2, in training mode
    mlp.drop1.p = 0.5
    assert not fused_in_block0(lambda: _step(model, x))
    model.eval()
    assert fused_in_block0(lambda: _step(model, x))
    mlp.drop1.p = 0.0
    # no gradient at all: the plain forward
    fused_calls.clear()
    with torch.no_grad():
        model(x)
    assert not fused_calls
    s2a.restore(model)


def test_lean_forwards_only_for_the_exact_timm_classes():
    class MyMlp(Mlp):
        def forward(self, x):
            return super().forward(x) * 2

    wrapped = Mlp(16, 32)
    own = wrapped.forward
    wrapped.forward = lambda x: own(x) + 1  # e.g. an adapter set on the instance
    trains = Mlp(16, 32)
    model = nn.Sequential(MyMlp(16, 32), Attention(16, num_heads=2), wrapped, Mlp(16, 32), trains)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("4."))
    s2a.compress_activations(model)
    kinds = dict(s2a.compression_summary(model))
    assert "0" not in kinds  # a subclass keeps its own forward
    assert kinds.get("1") == "attention@8"
    assert "2" not in kinds and kinds.get("3") == "frozen_mlp:gelu@4"
    assert "4" not in kinds  # its weights train: fc1 and fc2 need their inputs
    x = torch.randn(2, 16)
    torch.testing.assert_close(wrapped(x), own(x) + 1)
    s2a.restore(model)


def test_attention_lean_forward_with_mask_and_restore():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True)
    for n, p in attn.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    x = torch.randn(3, 9, 32, requires_grad=True)
    mask = torch.rand(3, 1, 9, 9) > 0.2
    mask[..., 0] = True
    fused_attn = attn.fused_attn
    s2a.compress_activations(attn)
    y = attn(x, attn_mask=mask)
    gx = torch.autograd.grad(y.sum(), x)[0]
    lean = attn.__dict__.pop("forward")
    y0 = attn(x, attn_mask=mask)  # timm's forward, the same compressed attention underneath
    gx0 = torch.autograd.grad(y0.sum(), x)[0]
    attn.forward = lean
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gx, gx0)
    s2a.restore(attn)
    assert "forward" not in attn.__dict__ and attn.fused_attn == fused_attn


def test_lean_mlp_runs_a_layer_wrapped_after_compression():
    # An adapter wrapped around fc1 after compress_activations (peft after s2a) must run: the
    # block falls back to timm's own forward instead of reading fc1's frozen weight.
    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1.0

    model = _vit()
    reference = copy.deepcopy(model)
    s2a.compress_activations(model)
    x = torch.randn(2, 3, 64, 64)
    for m in (model, reference):
        m.blocks[0].mlp.fc1 = Shifted(m.blocks[0].mlp.fc1)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


# --- one kept copy per input ------------------------------------------------------------


def test_input_copy_is_shared_while_the_input_lives_unchanged():
    from s2a.activations import mlp as M

    leaf = torch.randn(2, 5, 8, requires_grad=True)
    x = leaf * 1  # an activation of the graph being recorded
    assert M.input_copy(leaf, torch.bfloat16) is not M.input_copy(leaf, torch.bfloat16)  # a leaf: never
    a = M.input_copy(x, torch.bfloat16)
    torch.testing.assert_close(a, x.to(torch.bfloat16), rtol=0, atol=0)
    b = M.input_copy(x.view(-1, 8), torch.bfloat16)  # a view of the same input: the same copy
    assert b.shape == (10, 8) and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert M.input_copy(x, torch.float16).dtype == torch.float16  # another dtype: another copy
    c = M.input_copy(x, torch.bfloat16)
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()  # replaced by fp16's
    x.add_(1)  # changed in place (its version counter): a fresh copy of the new values
    d = M.input_copy(x, torch.bfloat16)
    assert d.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()
    torch.testing.assert_close(d, x.to(torch.bfloat16), rtol=0, atol=0)
    assert M.input_copy(x[:, 1:], torch.bfloat16).untyped_storage().data_ptr() != d.untyped_storage().data_ptr()
    assert M.input_copy(x.transpose(0, 1), torch.bfloat16).shape == (5, 2, 8)  # not contiguous: plain copy
    assert M.input_copy(x, torch.float32) is x
    y = torch.randn(3, 8, requires_grad=True) * 1
    M.input_copy(y, torch.bfloat16)
    del y  # the input is freed: its copy is let go (its memory could hold other data)
    assert M._last_copy is None
    z = torch.randn(3, 8, requires_grad=True) * 1
    with torch.inference_mode():  # an inference tensor could not be saved for backward later
        M.input_copy(z, torch.bfloat16)
    assert M._last_copy is None


def test_a_buffer_refilled_in_place_without_a_version_bump_gets_a_fresh_copy():
    # a persistent input refilled through .data (or numpy) keeps its version counter: the
    # gated MLP must not reuse the previous step's copy (it would train on stale inputs)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, mlp_bias=True))
    for n, p in mlp.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    reference = copy.deepcopy(mlp)
    s2a.compress_activations(mlp, ops={"silu": 4})
    buffer = torch.randn(4, 16, requires_grad=True)
    for step in range(2):
        buffer.data.copy_(torch.randn(4, 16))
        out, out0 = mlp(buffer), reference(buffer)
        g = torch.randn_like(out)
        (gb,), (gb0,) = (torch.autograd.grad(o, m.gate_proj.bias, g) for o, m in ((out, mlp), (out0, reference)))
        assert torch.nn.functional.cosine_similarity(gb, gb0, dim=0) > 0.9999, step
