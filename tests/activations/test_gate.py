"""Gated products (squeeze-and-excitation ``x * gate``): recognised shapes, exact forward and
input gradient, a close gate gradient, and the bytes kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2a
from helpers import cosine, saved_bytes
from s2a.activations.gate import gate_layout, gate_mul
from s2a.activations.packing import packed_nbytes


def feature_map(*shape):
    # post-SiLU feature maps: skewed, bounded below by -0.28, a few large values
    return F.silu(torch.randn(*shape) * 2 + 0.5)


def se_gate(x, w):
    return torch.sigmoid(x.mean((2, 3), keepdim=True) * w)


def computed(*shape, dtype=torch.float32):
    # a gate is computed from the feature map: not a leaf (a leaf is a trainable scale)
    leaf = torch.rand(shape, dtype=dtype, requires_grad=True)
    gate = leaf * 1
    gate.retain_grad()
    return gate


@pytest.mark.parametrize(("xs", "gs", "k"), [
    ((2, 8, 6, 6), (2, 8, 1, 1), 2),  # SE gate of a conv feature map
    ((1, 8, 6, 6), (8, 1, 1), 2),  # fewer dims, batch 1
    ((2, 8, 4, 6, 6), (2, 8, 1, 1, 1), 2),  # 3-D feature maps
    ((2, 8, 6, 1), (2, 8, 1, 1), 2),
])
def test_layout_recognises_gates_in_either_order(xs, gs, k):
    x, g = torch.randn(xs), computed(*gs)
    for a, b in ((x, g), (g, x)):
        got = gate_layout(a, b)
        assert got is not None and got[0] is x and got[1] is g and got[2] == k


@pytest.mark.parametrize(("xs", "gs"), [
    ((2, 8, 6, 6), (2, 8, 6, 6)),  # two full-size operands (SwiGLU): not a gate
    ((2, 8, 6, 6), (1, 8, 1, 1)),  # one scale for the whole batch (layer scale): k = 0
    ((2, 8, 6, 6), (8, 1, 1)),
    ((2, 8, 3, 1), (2, 8, 1, 1)),  # rows of 3 elements: not worth two floats each
    ((2, 8, 6, 6), ()),
    ((2, 8, 6, 6), (2, 8, 6, 1)),  # a gate per row of a channel: not a channel gate
    ((4, 20, 32), (4, 20, 1)),  # token rows (hand-written RMSNorm): outlier channels
    ((3, 16), (3, 1)),
])
def test_layout_rejects_other_products(xs, gs):
    assert gate_layout(torch.randn(xs), computed(*gs)) is None
    assert gate_layout(torch.randn(2, 8, 6, 6), computed(2, 8, 1, 1, dtype=torch.float64)) is None
    assert gate_layout(torch.randn(2, 8, 6, 6), 2.0) is None


def test_layout_rejects_a_trainable_scale():
    # LayerScale2d / GRN's weight at batch 1: x * gamma.view(1, C, 1, 1) has a gate's shape,
    # but gamma's gradient must stay exact (at batch 2 the shapes alone rule it out)
    gamma = nn.Parameter(torch.ones(8))
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    assert gate_layout(x, gamma.view(1, -1, 1, 1)) is None
    assert gate_layout(x, nn.Parameter(torch.ones(1, 8, 1, 1))) is None
    assert gate_layout(x, computed(1, 8, 1, 1)) is not None


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_forward_and_input_gradient_exact_gate_gradient_close(bits):
    torch.manual_seed(0)
    x0, w0 = feature_map(4, 32, 14, 14), torch.randn(1, 32, 1, 1)
    g = torch.randn(4, 32, 14, 14)
    outs = {}
    for name, mul in (("native", torch.mul), ("s2a", lambda a, b: gate_mul(a, b, bits))):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = mul(x, se_gate(x, w))
        y.backward(g)
        outs[name] = (y, x.grad, w.grad)
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = outs["native"], outs["s2a"]
    assert torch.equal(y, y_ref)
    # dx = g * gate exactly, plus the gate's gradient through the mean: close
    assert cosine(gx, gx_ref) > 0.9999
    # w's gradient comes through the gate alone, the one approximate path: worst case
    # (measured 0.925 / 0.997 / 0.99997)
    assert cosine(gw, gw_ref) > {2: 0.9, 4: 0.995, 8: 0.9999}[bits]


def test_input_gradient_is_exact_when_only_it_is_needed():
    x = feature_map(2, 8, 6, 6).requires_grad_()
    gate = torch.rand(2, 8, 1, 1)  # no gradient: gate_mul runs the native product
    y = gate_mul(x, gate)
    assert y.grad_fn.name() == "MulBackward0"
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gx, gate.expand_as(x))


def test_saved_bytes_are_codes_and_two_floats_per_row():
    n, c, hw = 4, 32, 14 * 14
    x = feature_map(n, c, 14, 14).requires_grad_()
    gate = computed(n, c, 1, 1)
    _, native = saved_bytes(torch.mul, x, gate)
    assert native == (n * c * hw + n * c) * 4
    _, ours = saved_bytes(gate_mul, x, gate, 4)
    assert ours == packed_nbytes(n * c * hw, 4) + n * c * 4 + 2 * n * c * 4
    assert ours / native < 0.14


def test_nan_row_gives_nan_gate_gradient_like_pytorch():
    x0 = feature_map(2, 4, 5, 5)
    x0[1, 2, 3, 3] = float("nan")
    grads = []
    for mul in (torch.mul, gate_mul):
        x, gate = x0.clone().requires_grad_(), computed(2, 4, 1, 1)
        mul(x, gate).sum().backward()
        grads.append(gate.grad.flatten())
    ref, ours = grads
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.isnan(ours).sum() == 1
    assert torch.isfinite(ours[~torch.isnan(ref)]).all()


def test_half_precision():
    x = feature_map(2, 16, 8, 8).bfloat16().requires_grad_()
    gate = computed(2, 16, 1, 1, dtype=torch.bfloat16)
    y = gate_mul(x, gate)
    assert torch.equal(y, x * gate) and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == gate.grad.dtype == torch.bfloat16


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class SwiGLU(nn.Module):
    def forward(self, x):
        return F.silu(x) * x


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), SqueezeExcite(16), nn.Conv2d(16, 8, 1),
                         SwiGLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _biases_only(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    return model


def test_compress_activations_routes_se_products_and_strict_names_the_rest():
    x = torch.randn(4, 3, 16, 16)
    ref, model = _biases_only(_model()), _biases_only(_model())
    s2a.compress_activations(model)
    grads = []
    for m in (ref, model):
        m(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    assert cosine(grads[1], grads[0]) > 0.999
    names = {type(n).__name__ for n in _nodes(model(x).grad_fn)}
    assert "_GateMulBackward" in names
    # the SwiGLU product of two full-size activations is not a gate: strict mode names it
    strict = _biases_only(_model())
    s2a.compress_activations(strict, strict=True)
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"4: mul"):
        strict(x)
    # ops= without "gate": the SE product stays native (and strict names it too)
    native = _biases_only(_model())
    s2a.compress_activations(native, 4, ops=["silu", "relu", "sigmoid"])
    assert "_GateMulBackward" not in {type(n).__name__ for n in _nodes(native(x).grad_fn)}


def _nodes(fn):
    seen, stack = [], [fn]
    while stack:
        n = stack.pop()
        if n is not None and n not in seen:
            seen.append(n)
            stack.extend(m for m, _ in n.next_functions)
    return seen
