"""mesa8 and fewbit2 are configurations of s2a's activation engine, set as documented."""

from __future__ import annotations

from util import prepared

from s2a import compression_summary
from s2a.activations.apply import POINTWISE_KINDS


def test_mesa8_stores_every_covered_operator_at_8_bits():
    _, res, _ = prepared("vit", "mesa8")
    model = res.model
    state = model._s2a_compression
    assert state.spec.bits == 8 and state.spec.op_bits == {}
    assert state.spec.attention_storage() == ("probs", 8)  # Q/K/V and probabilities at 8 bits
    summary = compression_summary(model)
    kinds = {v.split("@")[0] for v in summary.values()}
    assert {"gelu", "layer_norm"} <= kinds
    # every per-element width is 8; dropout keeps its seed and a trainable convolution its input
    widths = {v for v in summary.values() if not v.endswith(("@seed", "@native", "@1"))}
    assert widths and all(v.endswith("@8") for v in widths), summary
    assert summary["patch_embed.proj"] == "conv@native"
    assert all(p.requires_grad for p in model.parameters())


def test_fewbit2_touches_only_pointwise_nonlinearities_at_2_bits():
    _, res, _ = prepared("vit", "fewbit2")
    model = res.model
    spec = model._s2a_compression.spec
    assert set(spec.ops) == set(POINTWISE_KINDS)
    assert spec.bits_for("gelu") == 2 and spec.bits_for("silu") == 2
    summary = compression_summary(model)
    assert summary and all(v == "gelu@2" for v in summary.values()), summary
    assert not spec.enabled("layer_norm") and not spec.enabled("softmax") and not spec.enabled("attention")
    assert all(p.requires_grad for p in model.parameters())


def test_fewbit2_on_a_relu6_cnn_keeps_norms_native():
    _, res, _ = prepared("efficientnet", "fewbit2")
    kinds = {v for v in compression_summary(res.model).values()}
    assert kinds and all(k.split("@")[0] in POINTWISE_KINDS for k in kinds), kinds
