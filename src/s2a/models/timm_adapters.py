"""Adapters for timm: VisionTransformer (vit_*, deit_*, distilled and register tokens),
SwinTransformer (NHWC blocks), ResNet, ConvNeXt, EfficientNet."""

from __future__ import annotations

import sys

from torch import nn

from .registry import (
    BlockSpec,
    HeadSpec,
    ModelAdapter,
    is_classifier_layer,
    module_path,
    register_adapter,
)


def _timm_class(module: str, name: str):
    # A model can only be an instance of a timm class if timm is imported already.
    if "timm" not in sys.modules:
        return None
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class TimmAdapter(ModelAdapter):
    """Shared parts: the head comes from ``get_classifier`` and is replaced with
    ``reset_classifier``; the default input is the model's own input size."""

    module = ""
    cls_name = ""

    def matches(self, model: nn.Module) -> bool:
        cls = _timm_class(self.module, self.cls_name)
        return cls is not None and isinstance(model, cls)

    def head(self, model: nn.Module) -> HeadSpec | None:
        clf = model.get_classifier()
        clfs = clf if isinstance(clf, (tuple, list)) else (clf,)
        names = tuple(n for n in (module_path(model, c) for c in clfs) if n)
        if not names:
            return None
        layers = tuple(n for n, c in zip(names, clfs, strict=True) if is_classifier_layer(c))
        return HeadSpec(names=names, classifiers=layers)

    def replace_head(self, model: nn.Module, num_classes: int) -> None:
        model.reset_classifier(num_classes)

    def pooling(self, model: nn.Module) -> str:
        return "mean"


@register_adapter
class TimmViTAdapter(TimmAdapter):
    name = "timm-vit"
    module, cls_name = "timm.models.vision_transformer", "VisionTransformer"

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(f"blocks.{i}", "tokens", 0, model.num_prefix_tokens)
                for i in range(len(model.blocks))]

    def pooling(self, model: nn.Module) -> str:
        return "cls" if getattr(model, "global_pool", "token") == "token" else "mean"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 0))


@register_adapter
class TimmSwinAdapter(TimmAdapter):
    name = "timm-swin"
    module, cls_name = "timm.models.swin_transformer", "SwinTransformer"

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(f"layers.{s}.blocks.{i}", "nhwc", s)
                for s, stage in enumerate(model.layers) for i in range(len(stage.blocks))]


@register_adapter
class TimmResNetAdapter(TimmAdapter):
    name = "timm-resnet"
    module, cls_name = "timm.models.resnet", "ResNet"

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(f"layer{s + 1}.{i}", "nchw", s)
                for s in range(4) for i in range(len(getattr(model, f"layer{s + 1}")))]


@register_adapter
class TimmConvNeXtAdapter(TimmAdapter):
    name = "timm-convnext"
    module, cls_name = "timm.models.convnext", "ConvNeXt"

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(f"stages.{s}.blocks.{i}", "nchw", s)
                for s, stage in enumerate(model.stages) for i in range(len(stage.blocks))]


@register_adapter
class TimmEfficientNetAdapter(TimmAdapter):
    name = "timm-efficientnet"
    module, cls_name = "timm.models.efficientnet", "EfficientNet"

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(f"blocks.{s}.{i}", "nchw", s)
                for s, stage in enumerate(model.blocks) for i in range(len(stage))]
