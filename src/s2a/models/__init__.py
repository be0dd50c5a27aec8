"""Model-family adapters: where a backbone's blocks, layouts, dims and head are.

:func:`describe_backbone` returns a :class:`BackboneInfo` for a model: the ordered
blocks (the modules whose INPUT gets the low-rank prompt and whose OUTPUT feeds the
side branch), each block's layout (``"tokens"`` (B, N, D), ``"nchw"`` or ``"nhwc"``),
input/output shapes and channel dims (measured by one no-grad eval forward), the
number of prefix tokens (class / distillation / register tokens), the classifier head
and how the backbone pools its features (:meth:`BackboneInfo.pooled_features`).

Built-in adapters: timm ``VisionTransformer`` (vit_*, deit_*, distilled, register
tokens), ``SwinTransformer``, ``ResNet``, ``ConvNeXt``, ``EfficientNet``; transformers
BERT / RoBERTa / DistilBERT / MiniLM encoders (with or without a head), ``ViTModel`` /
``ViTForImageClassification`` and Llama-style decoders. Anything else goes to the
generic fallback (the largest group of >= 2 same-class children of one
``ModuleList``/``Sequential``; a timm model's head from ``get_classifier()``, distillation
heads included); a model nothing handles raises :class:`UnsupportedModelError` listing the
module classes it contains. A feature-map block whose layout (NCHW or NHWC) neither its
layers' channel counts nor a neighbouring block decide is refused: declare it in an adapter.

Adding an adapter
-----------------
Subclass :class:`ModelAdapter`, implement ``matches`` and ``blocks`` (and ``head`` when
the model has a classifier), and register it; registered adapters are tried before
the built-in ones::

    from s2a.models import BlockSpec, HeadSpec, ModelAdapter, register_adapter

    @register_adapter
    class MyNetAdapter(ModelAdapter):
        name = "mynet"

        def matches(self, model):
            return type(model).__name__ == "MyNet"

        def blocks(self, model):              # forward order; layout None = infer
            return [BlockSpec(f"encoder.{i}", layout="tokens", prefix_tokens=1)
                    for i in range(len(model.encoder))]

        def head(self, model):                # trainable modules, final nn.Linear(s)
            return HeadSpec(names=("head",), classifiers=("head",))

        def pooling(self, model):             # "cls" | "mean" | "last"
            return "cls"

        def example_input(self, model):       # input of the dry forward
            return torch.zeros(1, 3, 224, 224)

Optional hooks: ``num_prefix_tokens``, ``max_positions`` (text: the prompt covers this
many positions and is sliced to the sequence length), ``position_ids_kwarg`` (decoders
whose blocks receive position ids, so that prompts follow a KV cache) and
``replace_head`` (default: swap each classifier ``nn.Linear`` / 1x1 ``nn.Conv2d``).
"""

from . import hf_adapters, timm_adapters  # noqa: F401  (register the built-in adapters)
from .generic import GENERIC, GenericAdapter
from .registry import (
    LAYOUTS,
    BackboneInfo,
    BlockInfo,
    BlockSpec,
    HeadSpec,
    ModelAdapter,
    UnsupportedModelError,
    describe_backbone,
    find_adapter,
    first_tensor,
    hidden_from_call,
    refresh_head,
    register_adapter,
    registered_adapters,
    runs_children,
    unregister_adapter,
)

__all__ = [
    "GENERIC",
    "LAYOUTS",
    "BackboneInfo",
    "BlockInfo",
    "BlockSpec",
    "GenericAdapter",
    "HeadSpec",
    "ModelAdapter",
    "UnsupportedModelError",
    "describe_backbone",
    "find_adapter",
    "first_tensor",
    "hidden_from_call",
    "refresh_head",
    "register_adapter",
    "registered_adapters",
    "runs_children",
    "unregister_adapter",
]
