"""Readable operator kinds for autograd graph nodes.

``node_kind(node)`` maps an autograd node (``loss.grad_fn`` and its ancestors) to a short,
stable label used in the per-operator breakdown of :class:`~s2a.memory.MemoryReport`:

* built-in nodes: ``GeluBackward0`` -> ``gelu``, ``AddmmBackward0`` -> ``linear``, ...;
  unknown built-in nodes keep their class name (``UnsafeViewBackward0``);
* custom :class:`torch.autograd.Function` nodes whose class name contains a known operator
  (``_GELUFunctionBackward``, ``PackedSoftmaxBackward``) -> that operator with a suffix telling
  who defined it: ``" (s2a)"`` for functions defined in the ``s2a`` package, ``" (custom)"``
  otherwise; a generic custom node may name its operator in ``ctx.name`` instead. Custom nodes
  naming no known operator keep their class name, unless the module that ran them names one
  (``measure`` then uses the module's class: a ``_MaskActivation`` inside ``nn.ReLU`` is
  ``relu (s2a)``).
* the node of a ``torch.compile``'d region (``CompiledFunctionBackward``) -> ``compiled region``:
  its saved tensors belong to whatever operators the compiler fused, not to one operator, and
  not to the module running it.
"""

from __future__ import annotations

import re

import torch

__all__ = ["COMPILED_KIND", "custom_origin", "kind_from_class_name", "node_kind"]

COMPILED_KIND = "compiled region"

# Built-in nodes: exact base names (class name without the trailing "Backward<N>").
_BUILTIN: dict[str, str] = {
    "Gelu": "gelu",
    "Silu": "silu",
    "Mish": "mish",
    "Relu": "relu",
    "Threshold": "relu",
    "Hardtanh": "relu6",
    "Hardswish": "hardswish",
    "Hardsigmoid": "hardsigmoid",
    "LeakyRelu": "leaky_relu",
    "Elu": "elu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "NativeLayerNorm": "layer_norm",
    "LayerNorm": "layer_norm",
    "NativeGroupNorm": "group_norm",
    "NativeBatchNorm": "batch_norm",
    "CudnnBatchNorm": "batch_norm",
    "MiopenBatchNorm": "batch_norm",
    "NativeBatchNormLegit": "batch_norm",
    "NativeBatchNormLegitFunctional": "batch_norm",
    "NativeBatchNormLegitNoTraining": "batch_norm",
    "BatchNormWithUpdate": "batch_norm",
    "RmsNorm": "rms_norm",
    "FusedRmsNorm": "rms_norm",
    "Convolution": "conv",
    "ConvolutionBackwardOverrideable": "conv",
    "MkldnnConvolution": "conv",
    "CudnnConvolution": "conv",
    "ThnnConv2D": "conv",
    "SlowConv2D": "conv",
    "ConvDepthwise2D": "conv",
    "Addmm": "linear",
    "Mm": "linear",
    "Linear": "linear",
    "MkldnnLinear": "linear",
    "Bmm": "matmul",
    "Baddbmm": "matmul",
    "Matmul": "matmul",
    "Softmax": "softmax",
    "SafeSoftmax": "softmax",
    "LogSoftmax": "log_softmax",
    "NativeDropout": "dropout",
    "FusedDropout": "dropout",
    "Dropout": "dropout",
    "Embedding": "embedding",
    "EmbeddingBag": "embedding",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "MaxPool2DWithIndices": "max_pool",
    "MaxPool2D": "max_pool",
    "MaxPool3DWithIndices": "max_pool",
    "AvgPool2D": "avg_pool",
    "AvgPool3D": "avg_pool",
    "AdaptiveAvgPool2D": "avg_pool",
    "AdaptiveAvgPool3D": "avg_pool",
    "NllLoss": "loss",
    "NllLoss2D": "loss",
    "MseLoss": "loss",
    "CrossEntropyLoss": "loss",
}

# Substrings (checked in order, on the lower-cased name) for attention kernels, which come in
# many backend-specific flavours (flash / efficient / math / cudnn / for-CPU ...).
_ATTENTION_RE = re.compile(r"attention", re.IGNORECASE)

# Operators recognised inside custom autograd.Function names; the longest match wins, so that
# hardswish beats swish and relu6 beats relu.
_CUSTOM_OPS: tuple[tuple[str, str], ...] = (
    ("layernorm", "layer_norm"),
    ("layer_norm", "layer_norm"),
    ("groupnorm", "group_norm"),
    ("group_norm", "group_norm"),
    ("batchnorm", "batch_norm"),
    ("batch_norm", "batch_norm"),
    ("rmsnorm", "rms_norm"),
    ("rms_norm", "rms_norm"),
    ("logsoftmax", "log_softmax"),
    ("log_softmax", "log_softmax"),
    ("softmax", "softmax"),
    ("attention", "attention"),
    ("attn", "attention"),
    ("sdpa", "attention"),
    ("dropout", "dropout"),
    ("droppath", "drop_path"),
    ("drop_path", "drop_path"),
    ("softplus", "softplus"),
    ("gelu", "gelu"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("hardswish", "hardswish"),
    ("hardsigmoid", "hardsigmoid"),
    ("relu6", "relu6"),
    ("relu", "relu"),
    ("mish", "mish"),
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
    ("linear", "linear"),
    ("conv", "conv"),
    ("matmul", "matmul"),
    ("maxpool", "max_pool"),
    ("max_pool", "max_pool"),
    ("avgpool", "avg_pool"),
    ("avg_pool", "avg_pool"),
    ("gatemul", "gate"),
    ("gatedmlp", "gated_mlp"),
    ("moeexperts", "moe_experts"),
    ("globalresponsenorm", "grn"),
    ("starrelu", "star_relu"),
)

_CUSTOM_OPS_LONGEST_FIRST = tuple(sorted(_CUSTOM_OPS, key=lambda it: -len(it[0])))
_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")


def _strip(name: str) -> str:
    return _BACKWARD_SUFFIX.sub("", name)


def kind_from_class_name(name: str, *, custom: bool = False, origin: str = "custom") -> str:
    """Map an autograd node class name to a readable operator kind.

    ``custom`` says whether the node belongs to a Python ``autograd.Function``; ``origin`` is the
    label appended to the kinds recognised in custom nodes (``"s2a"`` or ``"custom"``).
    """
    base = _strip(name)
    if custom:
        low = base.lower().lstrip("_")
        for needle, kind in _CUSTOM_OPS_LONGEST_FIRST:
            if needle in low:
                return f"{kind} ({origin})"
        return name
    if base in _BUILTIN:
        return _BUILTIN[base]
    if _ATTENTION_RE.search(base):
        return "attention"
    return name


def custom_origin(node: object) -> str | None:
    """``"s2a"`` or ``"custom"`` for nodes of Python autograd.Functions, None for built-ins."""
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        return None
    fwd = getattr(type(node), "_forward_cls", None)
    module = getattr(fwd, "__module__", "") or ""
    return "s2a" if module == "s2a" or module.startswith("s2a.") else "custom"


def _is_compiled(node: object) -> bool:
    """A node of a torch.compile'd region: its Function is built by AOTAutograd."""
    fwd = getattr(type(node), "_forward_cls", None)
    return (getattr(fwd, "__module__", "") or "").startswith("torch._functorch")


# ctx attributes a generic custom Function may use to say which operator it computes
_CTX_NAME_ATTRS = ("name", "op", "op_name", "kind", "activation")


def node_kind(node: object) -> str:
    """Readable operator kind of an autograd graph node (see module docstring).

    A custom Function whose class name names no operator (a generic ``_LUTActivation``) is
    also recognised by a string attribute it set on ``ctx``: ``name``, ``op``, ``op_name``,
    ``kind`` or ``activation`` (``ctx.name = "gelu"``).
    """
    name = type(node).__name__
    origin = custom_origin(node)
    if origin is None:
        return kind_from_class_name(name)
    if _is_compiled(node):
        return COMPILED_KIND
    kind = kind_from_class_name(name, custom=True, origin=origin)
    if kind != name:
        return kind
    for attr in _CTX_NAME_ATTRS:
        value = getattr(node, attr, None)
        if isinstance(value, str):
            by_attr = kind_from_class_name(value, custom=True, origin=origin)
            if by_attr != value:
                return by_attr
    return name
