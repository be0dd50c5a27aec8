"""The hook-based count against the allocator: a timm ViT block, batch 32 x 197 tokens."""

from __future__ import annotations

import pytest
import torch

from s2a.memory import measure, probe_for

pytestmark = pytest.mark.skipif(
    probe_for("cpu") is None, reason="no CPU allocator statistics in this process"
)


def test_vit_block_saved_bytes_agree_with_allocator():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=384, num_heads=6)
    x = torch.randn(32, 197, 384, requires_grad=True)
    report = measure(block, x)

    B, N, D, H = 32, 197, 384, 6
    act = B * N * D * 4  # one fp32 activation of the block: 9,682,944 bytes
    # By hand (CPU flash attention): x (norm1 input), norm1 out (qkv input), qkv out (3, q/k/v
    # are views), attention out (1; proj's input is a view of it), x + attn (norm2 input),
    # norm2 out (fc1 input), fc1 out (4, GELU input), GELU out (4, fc2 input), block output
    # (saved by the loss): 17 activations; plus mean and rstd of both LayerNorms (B*N floats
    # each) and the attention logsumexp (B*H*N floats).
    assert report.saved_bytes == 17 * act + 4 * B * N * 4 + B * H * N * 4
    assert report.saved_input_bytes == act
    assert report.output_bytes == act

    # Allocator growth after forward + loss in a hook-free run, against the prediction
    # saved - preexisting (x existed before) + outputs/loss not already saved (the default loss
    # saves the output, so only the 4-byte loss remains): within 5%.
    expected = report.saved_bytes - report.saved_input_bytes + 4
    assert report.expected_forward_live_bytes == expected
    assert report.forward_live_bytes is not None
    ratio = report.forward_live_bytes / expected
    assert abs(ratio - 1) < 0.05, (report.forward_live_bytes, expected)
    assert report.cross_check_ratio == pytest.approx(ratio)

    # the peak covers at least the forward graph; gradients are reported on their own
    assert report.peak_bytes is not None and report.peak_bytes >= report.forward_live_bytes
    assert report.grad_bytes == report.trainable_param_bytes == report.param_bytes
    assert sum(report.by_kind.values()) == report.saved_bytes
    for kind in ("linear", "attention", "gelu", "layer_norm"):
        assert report.by_kind[kind] > 0
