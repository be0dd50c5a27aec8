"""Products of two activations (eager attention's Q K^T, P V) keeping 8-bit operands."""

import copy

import pytest
import torch
from torch import nn

import s2a
from helpers import cosine
from s2a.activations.products import activation_matmul, activation_matmul_applies
from s2a.memory import measure


def _operands(dtype=torch.float32, b=3, m=5, k=16, n=7):
    torch.manual_seed(0)
    a = torch.randn(b, 2, m, k, dtype=dtype, requires_grad=True)
    kt = torch.randn(b, 2, n, k, dtype=dtype, requires_grad=True)
    return a, kt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_native_product(dtype):
    a, k = _operands(dtype)
    y = activation_matmul(a, k.transpose(-1, -2))
    y0 = a @ k.transpose(-1, -2)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)  # the forward is exact
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (a, k), g)
    grads0 = torch.autograd.grad(y0, (a, k), g)
    for x, x0 in zip(grads, grads0, strict=True):
        assert x.dtype == dtype and cosine(x.float(), x0.float()) > 0.9999


def test_baddbmm_with_its_bias_and_factors():
    torch.manual_seed(0)
    q, k = torch.randn(6, 5, 8, requires_grad=True), torch.randn(6, 8, 9, requires_grad=True)
    bias = torch.randn(6, 1, 9, requires_grad=True)  # ALiBi-like, broadcast over the queries
    y = activation_matmul(q, k, bias=bias, beta=0.5, alpha=0.25)
    y0 = torch.baddbmm(bias, q, k, beta=0.5, alpha=0.25)
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, bias), g)
    grads0 = torch.autograd.grad(y0, (q, k, bias), g)
    torch.testing.assert_close(grads[2], grads0[2])  # exact: it needs nothing kept
    for x, x0 in zip(grads[:2], grads0[:2], strict=True):
        assert cosine(x, x0) > 0.9999


def test_each_operand_kept_at_8_bits_only_where_the_other_needs_it():
    a, k = _operands()
    b = k.transpose(-1, -2)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        activation_matmul(a, b)
    # per row of 16 channels: 16 one-byte codes and a float32 scale; 3 x 2 x (5 + 7) rows
    assert sum(t.numel() * t.element_size() for t in saved) == 3 * 2 * (5 + 7) * (16 + 4)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        activation_matmul(a, b.detach())  # b needs no gradient: a is not kept
    assert sum(t.numel() * t.element_size() for t in saved) == 3 * 2 * 7 * (16 + 4)


def test_only_batched_products_of_activations():
    a, k = _operands()
    w = nn.Parameter(torch.randn(3, 2, 16, 7))
    assert activation_matmul_applies(a, k.transpose(-1, -2))
    assert not activation_matmul_applies(a, torch.randn(16, 7))  # a weight: 2-D
    assert not activation_matmul_applies(a, torch.randn(1, 2, 16, 7))  # broadcast over the batch
    assert not activation_matmul_applies(a, w) and not activation_matmul_applies(a, w.transpose(-1, -2).mT)
    assert not activation_matmul_applies(a.detach(), k.detach().transpose(-1, -2))  # no gradient
    assert not activation_matmul_applies(a, k.transpose(-1, -2).double())
    with pytest.raises(ValueError, match="equal batch dimensions"):
        activation_matmul(a, torch.randn(16, 7))


def test_no_double_backward_and_nan_rows():
    a, k = _operands()
    y = activation_matmul(a, k.transpose(-1, -2))
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(y.sum(), a, create_graph=True)
    with torch.no_grad():
        k[0, 0, 3, 5] = float("nan")  # one key row
    y = activation_matmul(a, k.transpose(-1, -2))
    (ga,) = torch.autograd.grad(y, a, torch.ones_like(y))
    assert ga[0, 0].isnan().all() and not ga[1].isnan().any()  # as natively: where it reaches


class _Attention(nn.Module):
    """Multi-head attention by hand, as timm's with ``fused_attn`` off."""

    def __init__(self, c=32, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(c, 3 * c), nn.Linear(c, c), heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


def test_hand_written_attention_keeps_8_bit_q_k_v():
    torch.manual_seed(0)
    model = nn.Sequential(_Attention(), nn.GELU(), _Attention())
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    reference = copy.deepcopy(model)
    s2a.compress_activations(model, ops={"softmax": 4, "matmul": 8}, strict=True)
    x = torch.randn(3, 17, 32)
    fused, native = (measure(m, x) for m in (model, reference))
    # natively q @ k^T keeps q and k, attn @ v v (and the probabilities, counted under the
    # softmax that keeps them too), in float32; here 8-bit rows of 16 channels and a scale
    assert native.by_kind["matmul"] == 2 * 3 * 3 * 2 * 17 * 16 * 4
    assert "matmul" not in fused.by_kind
    assert fused.by_kind["matmul (s2a)"] == 2 * 3 * 3 * 2 * 17 * (16 + 4)
    model(x).sum().backward()
    reference(x).sum().backward()
    for p, p0 in zip(model.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert cosine(p.grad, p0.grad) > 0.999
    # left out of ops: q @ k^T native, attn @ v keeps v as it is, beside the softmax's codes
    s2a.restore(model)
    s2a.compress_activations(model, ops=["softmax"])
    plain = measure(model, x)
    assert "matmul" in plain.by_kind and plain.saved_bytes > fused.saved_bytes + 2 * 3 * 3 * 2 * 17 * 16 * 3


class _Experts(nn.Module):
    """A batched product of gathered weights, as transformers' ``batched_mm`` experts: not attention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x, ids):  # x: (T, 16), ids: (T,)
        return torch.bmm(x.unsqueeze(1), self.w[ids]).squeeze(1)


def test_products_outside_attention_modules_stay_native():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    experts = _Experts()
    s2a.compress_activations(model)
    s2a.compress_activations(experts)
    x = model(torch.randn(6, 16))
    out = experts(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert out.grad_fn.name() != "_ActivationMatmulBackward"
    # the trainable experts' gradient from the exact input
    (gw,) = torch.autograd.grad(out.sum(), experts.w)
    ref = torch.zeros_like(experts.w).index_add_(0, torch.tensor([0, 1, 2, 3, 0, 1]),
                                                  x.detach()[:, :, None].expand(-1, -1, 8))
    torch.testing.assert_close(gw, ref)


class _AlibiAttention(_Attention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (t.reshape(B * self.heads, N, -1) for t in (q, k, v))
        alibi = torch.arange(N, dtype=torch.float32).expand(B * self.heads, 1, N) * -0.1
        scores = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=(C // self.heads) ** -0.5)
        return self.proj(torch.bmm(scores.softmax(-1), v).reshape(B, self.heads, N, -1).transpose(1, 2).reshape(B, N, C))


def test_alibi_baddbmm_is_compressed_under_autocast():
    torch.manual_seed(0)
    model = _AlibiAttention()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    s2a.compress_activations(model, strict=True)  # Bloom's: a float32 bias, bf16 factors
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert model.qkv.bias.grad is not None


def test_untagged_probabilities_keep_their_small_values():
    # probabilities mixed across heads (CaiT's talking heads) or with the softmax kind left
    # out reach P @ V untagged: kept on the probs codebook, not rounded to 0 over long rows
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 4096)
    logits[..., 0] += 8.0  # a sink key, as trained attention has
    p = logits.softmax(-1).requires_grad_()
    v = torch.randn(1, 2, 4096, 16, requires_grad=True)
    y, y0 = activation_matmul(p, v), p @ v
    g = torch.randn_like(y)
    (gv,), (gv0,) = torch.autograd.grad(y, v, g), torch.autograd.grad(y0, v, g)
    assert cosine(gv, gv0) > 0.9999
