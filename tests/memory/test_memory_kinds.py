from __future__ import annotations

import pytest

from s2a.memory import kind_from_class_name


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("GeluBackward0", "gelu"),
        ("SiluBackward0", "silu"),
        ("NativeLayerNormBackward0", "layer_norm"),
        ("ConvolutionBackward0", "conv"),
        ("AddmmBackward0", "linear"),
        ("MmBackward0", "linear"),
        ("SoftmaxBackward0", "softmax"),
        ("SafeSoftmaxBackward0", "softmax"),
        ("ScaledDotProductFlashAttentionForCpuBackward0", "attention"),
        ("ScaledDotProductEfficientAttentionBackward0", "attention"),
        ("ScaledDotProductFlashAttentionBackward0", "attention"),
        ("ScaledDotProductCudnnAttentionBackward0", "attention"),
        ("NativeBatchNormBackward0", "batch_norm"),
        ("CudnnBatchNormBackward0", "batch_norm"),
        ("NativeDropoutBackward0", "dropout"),
        ("MaxPool2DWithIndicesBackward0", "max_pool"),
        ("MaxPool3DWithIndicesBackward0", "max_pool"),
        ("AvgPool3DBackward0", "avg_pool"),
        ("AdaptiveAvgPool3DBackward0", "avg_pool"),
        ("UnsafeViewBackward0", "UnsafeViewBackward0"),
    ],
)
def test_builtin_kinds(name, kind):
    assert kind_from_class_name(name) == kind


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("_GELUFunctionBackward", "gelu"),
        ("PackedSoftmaxBackward", "softmax"),
        ("_LayerNormFnBackward", "layer_norm"),
        ("CompressedSiLUBackward", "silu"),
        ("HardSwishFunctionBackward", "hardswish"),
        ("ReLU6Backward", "relu6"),
        ("_DropoutMaskBackward", "dropout"),
        ("QuantAttentionBackward", "attention"),
        ("_MaxPoolBackward", "max_pool"),
        ("_AvgPoolBackward", "avg_pool"),
        ("HardsigmoidBackward", "hardsigmoid"),
        ("_GateMulBackward", "gate"),
        ("_GatedMLPFrozenWeightsBackward", "gated_mlp"),
        ("_RMSNormBackward", "rms_norm"),
    ],
)
def test_custom_kinds(name, kind):
    assert kind_from_class_name(name, custom=True, origin="s2a") == f"{kind} (s2a)"
    assert kind_from_class_name(name, custom=True) == f"{kind} (custom)"


def test_custom_without_known_op_keeps_name():
    assert kind_from_class_name("MyThingBackward", custom=True) == "MyThingBackward"


def test_compressed_norms_are_filed_under_their_own_kind():
    import torch

    from s2a.activations import functional as S
    from s2a.memory import node_kind

    x = torch.randn(4, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    assert node_kind(S.rms_norm(x, (16,), w, 1e-6).grad_fn) == "rms_norm (s2a)"
    assert node_kind(S.layer_norm(x, (16,), w).grad_fn) == "layer_norm (s2a)"


def test_custom_operator_table_has_no_repeated_entry():
    from s2a.memory.kinds import _CUSTOM_OPS

    needles = [needle for needle, _ in _CUSTOM_OPS]
    assert len(needles) == len(set(needles))
