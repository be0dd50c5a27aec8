"""ConvNeXt-V2's Global Response Norm keeping its input at low bits."""

import copy

import pytest
import timm
import torch
from timm.layers.grn import GlobalResponseNorm

import s2a
from helpers import cosine, saved_bytes
from s2a.activations.grn import global_response_norm
from s2a.memory import measure


def _grn(channels_last: bool) -> tuple[GlobalResponseNorm, torch.Tensor]:
    torch.manual_seed(0)
    m = GlobalResponseNorm(16, channels_last=channels_last)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 5, 6, 16) if channels_last else torch.randn(2, 16, 5, 6)
    x[1, ..., 3] = 0.0  # an all-zero channel (NHWC) / column: its norm is 0
    return m, x.requires_grad_()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bits,floor", [(8, 0.9999), (4, 0.996)])
def test_matches_timm_with_every_gradient(channels_last, bits, floor):
    m, x = _grn(channels_last)
    ref = m(x)
    y = global_response_norm(x, m.weight.view(m.wb_shape), m.bias.view(m.wb_shape), m.spatial_dim,
                             m.channel_dim, m.eps, bits)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # the forward is timm's
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, m.weight, m.bias), g)
    grads0 = torch.autograd.grad(ref, (x, m.weight, m.bias), g)
    assert all(t.isfinite().all() for t in grads)
    for a, b in zip(grads, grads0, strict=True):
        assert cosine(a, b) > floor


def test_keeps_low_bit_rows_and_the_norms():
    m, x = _grn(True)
    _, nbytes = saved_bytes(global_response_norm, x, m.weight.view(m.wb_shape), m.bias.view(m.wb_shape),
                            m.spatial_dim, m.channel_dim, m.eps, 4, exclude=(m.weight,))
    # 60 rows of 16 channels: 8 bytes of 4-bit codes and a float32 scale each; G: 2 x 16 float32
    assert nbytes == 60 * (8 + 4) + 2 * 16 * 4


def test_timm_and_transformers_convnext_v2():
    import transformers

    model = timm.create_model("convnextv2_atto", num_classes=3)
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), act_bits=None), example_input=torch.randn(1, 3, 64, 64))
    reference = copy.deepcopy(model)
    s2a.compress_activations(model, ops={"grn": 8}, strict=True)
    assert s2a.compression_summary(model)["stages.0.blocks.0.mlp.grn"] == "grn@8"
    x = torch.randn(2, 3, 64, 64)
    fused, native = measure(model, x), measure(reference, x)
    # natively the norm keeps the input in float32 (and the product x * n another copy)
    assert "LinalgVectorNormBackward0" not in fused.by_kind
    assert fused.by_kind["grn (s2a)"] < 0.5 * native.by_kind["LinalgVectorNormBackward0"]
    model(x).sum().backward()
    reference(x).sum().backward()
    for (n, p), p0 in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert cosine(p.grad, p0.grad) > 0.9999, n

    config = transformers.ConvNextV2Config(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                           num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ConvNextV2ForImageClassification(config)
    for layer in hf.modules():
        if type(layer).__name__ == "ConvNextV2GRN":
            with torch.no_grad():
                layer.weight.normal_()
    s2a.compress_activations(hf, ops={"grn": 8})
    assert s2a.compression_summary(hf)["convnextv2.encoder.stages.0.layers.0.grn"] == "grn@8"
    pixels = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(hf)
    s2a.restore(reference)
    torch.testing.assert_close(hf(pixels).logits, reference(pixels).logits, rtol=1e-5, atol=1e-6)
