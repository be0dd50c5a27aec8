"""The generic fallback: the blocks are the largest group (by parameters, then by count)
of >= 2 same-class children of one ``nn.ModuleList`` / ``nn.Sequential`` (failing that, of
any module: stages registered as plain attributes, timm's RegNet ``s1``..``s4``, each then
opened to the blocks it holds, ``s1.b1``, ``s3.b1``..); the layout is
inferred from the dry run; the head is what a timm model's ``get_classifier()`` names
(every classifier it averages, distillation heads included), else a top-level ``head`` /
``fc`` / ``classifier`` / ``score`` / ``classification_head`` / ``heads`` child (for a
transformers model, the one with its ``num_labels`` outputs, or every ``*head*`` /
``*classifier*`` child with them where the model averages several)."""

from __future__ import annotations

import inspect
import numbers
import re
from typing import Any

import torch
from torch import nn

from .registry import (
    BlockInfo,
    BlockSpec,
    HeadSpec,
    ModelAdapter,
    classifier_features,
    default_image_input,
    is_classifier_layer,
    module_path,
    text_input,
)

HEAD_NAMES = ("head", "fc", "classifier", "score", "classification_head", "qa_outputs", "logits_proj", "heads")
# transformers task layers before the classifier, new in a *For* model like the classifier
# (Wav2Vec2's projector, XLNet's sequence summary): trained with it
PRE_HEAD_NAMES = ("pre_classifier", "projector", "sequence_summary")
TRUNK_SHARE = 0.6


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_timm_style(model: nn.Module) -> bool:
    return callable(getattr(model, "get_classifier", None)) and callable(getattr(model, "reset_classifier", None))


def _output_layers(module: nn.Module) -> list[str]:
    """Relative paths ("" for the module itself) of the output layers in one classifier
    module: its last Linear / 1x1 Conv2d and every other one of the same output width.
    A container may hold parallel heads (RepViT's ``head`` holds ``head.l`` and
    ``head_dist.l``, EfficientViM's ``heads`` one per stage) whose outputs are averaged, so
    all of them must change width together; a pre-logits layer has another width."""
    layers = [(n, m) for n, m in module.named_modules() if is_classifier_layer(m)]
    if not layers:
        return []  # nn.Identity: a timm model built with num_classes=0
    width = classifier_features(layers[-1][1])[1]
    return [n for n, m in layers if classifier_features(m)[1] == width]


def _is_torch_layer(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn")


_CONTAINERS = (nn.ModuleList, nn.Sequential)


def _container_members(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of ``m`` if it is a container; else the children of its container
    children together, in registration order: blocks split over sibling containers (CoaT's
    ``serial_blocks1..4``, Visformer's ``stage1..3``) are one group, not one stage of it."""
    if isinstance(m, _CONTAINERS):  # a ModuleList member is never called: its members are (Twins)
        return [(f"{n}.{k}", b) if type(c) is nn.ModuleList else (n, c) for n, c in m.named_children()
                for k, b in (c.named_children() if type(c) is nn.ModuleList else [("", c)])]
    lists = [(n, c) for n, c in m.named_children() if isinstance(c, _CONTAINERS) and n not in HEAD_NAMES]
    if len(lists) < 2:
        return []
    return [(f"{n}.{k}", b) for n, c in lists for k, b in c.named_children() if not _is_torch_layer(type(b))]


def _classifier_tops(model: nn.Module) -> set[str]:
    """Top-level children that are the classifier, whose layers are never blocks: the one
    timm's ``get_classifier()`` lies in (EfficientViT-MIT's ``head``; SelecSLS's ``head`` is
    trunk, its classifier ``fc``), else a head-named child of torch layers only (torchvision
    VGG's ``classifier``)."""
    if _is_timm_style(model):
        found = model.get_classifier()
        paths = [module_path(model, f) for f in (found if isinstance(found, (tuple, list)) else (found,))
                 if isinstance(f, nn.Module)]
        return {p.split(".")[0] for p in paths if p}
    return {n for n, c in model.named_children()
            if n in HEAD_NAMES and all(_is_torch_layer(type(x)) for x in c.modules())}


def _largest_group(model: nn.Module, containers_only: bool) -> list[str]:
    best, best_key = [], None
    skip, total = _classifier_tops(model), _numel(model)
    for name, m in model.named_modules():
        if name.split(".")[0] in skip:
            continue
        groups: dict[type, list[tuple[str, nn.Module]]] = {}
        across = containers_only and not isinstance(m, _CONTAINERS)
        for child_name, child in (_container_members(m) if containers_only else m.named_children()):
            groups.setdefault(type(child), []).append((child_name, child))
        for cls, members in groups.items():
            if len(members) < 2:
                continue
            # attribute children: blocks, not torch's own layers (conv1, fc1..fc3, head)
            if not containers_only and (_is_torch_layer(cls) or any(n in HEAD_NAMES for n, _ in members)):
                continue
            # blocks gathered across sibling containers must be the trunk, as attribute stages
            # must (parallel branches of one stem or one Inception module are not)
            if across and sum(_numel(c) for _, c in members) < TRUNK_SHARE * total:
                continue
            key = (sum(_numel(c) for _, c in members), len(members))
            if key[0] > 0 and (best_key is None or key > best_key):
                prefix = f"{name}." if name else ""
                best, best_key = [f"{prefix}{n}" for n, _ in members], key
    return best


def _heaviest_class(module: nn.Module) -> type | None:
    """The class of ``module``'s children holding the most parameters; None if none has
    parameters or that class is one of torch's own layers (a stage of plain convolutions is
    itself the block)."""
    weight: dict[type, int] = {}
    for child in module.children():
        weight[type(child)] = weight.get(type(child), 0) + _numel(child)
    if not weight or max(weight.values()) == 0:
        return None
    cls = max(weight, key=weight.__getitem__)
    return None if _is_torch_layer(cls) else cls


# Rows of a generic text model's low-rank prompt at most (a decoder's 128k-1M positions
# would make hundreds of MB of trainable rows no fine-tuning batch reaches).
PROMPT_ROWS = 8192


class GenericAdapter(ModelAdapter):
    name = "generic"

    def _blocks(self, model: nn.Module) -> list[str]:
        """Paths of the largest group (by parameters, then count) of >= 2 same-class
        children of one ModuleList / Sequential; failing that, of any module, opened one
        level when every member's heaviest class of children is the same one."""
        best = _largest_group(model, containers_only=True)
        if best:
            return best
        stages = _largest_group(model, containers_only=False)
        # Attribute stages must be the model's trunk (RegNet's hold 86-95% of its parameters);
        # a smaller group (Inception-v3's last two modules, 47%) would leave most of the network
        # without a prompt: refused, with the message that says to register an adapter.
        if not stages or sum(_numel(model.get_submodule(s)) for s in stages) < TRUNK_SHARE * _numel(model):
            return []
        # Stages registered as attributes (RegNet's RegStage: b1, b2, ...) hold the blocks
        # a prompt belongs before; a stage may hold a single block, so no ">= 2" per stage.
        heaviest = [_heaviest_class(model.get_submodule(s)) for s in stages]
        if None in heaviest or len(set(heaviest)) != 1:
            return stages
        return [f"{s}.{n}" for s in stages for n, c in model.get_submodule(s).named_children()
                if type(c) is heaviest[0]]

    def matches(self, model: nn.Module) -> bool:
        return bool(self._blocks(model))

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(n) for n in self._blocks(model)]

    # timm's token models outside VisionTransformer (BEiT, EVA, ...) say how they pool
    def pooling(self, model: nn.Module) -> str:
        return "cls" if _is_timm_style(model) and getattr(model, "global_pool", None) == "token" else "mean"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        n = getattr(model, "num_prefix_tokens", 0) if _is_timm_style(model) else 0
        if isinstance(n, torch.Tensor) and n.numel() == 1:
            n = n.item()
        return int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else 0

    @staticmethod
    def seen_prefix(blocks: list[BlockInfo], patches: tuple[int, ...] | None, pooling: str,
                    prefix: int) -> tuple[str, int]:
        """``pooling`` and ``prefix`` if a block's tokens are the patch embedding's (of output
        shape ``patches``) plus ``prefix`` ones (ConViT's class token joins its last blocks,
        MViTv2's stages pool the patches but keep it), else "mean" and 0: CaiT's and XCiT's
        class token joins after the blocks found here, whose token 0 is a patch. Without a
        prefix count or a patch embedding to compare with (CoaT: class token in every block,
        no ``num_prefix_tokens``), nothing is changed."""
        if prefix <= 0 or patches is None or len(patches) not in (3, 4):
            return pooling, prefix
        grids = {patches[1]} if len(patches) == 3 else {patches[1] * patches[2], patches[2] * patches[3]}
        if any(b.layout == "tokens" and n - prefix in grids
                              for b in blocks for n in (b.in_shape[0], b.out_shape[0])):
            return pooling, prefix
        return ("mean" if pooling == "cls" else pooling), 0

    def head(self, model: nn.Module) -> HeadSpec | None:
        if _is_timm_style(model):
            return self._timm_head(model)
        found = []
        for n, m in model.named_children():  # registration order: the output layer comes last
            if n not in HEAD_NAMES:
                continue
            if is_classifier_layer(m):
                found.append(HeadSpec(names=(n,), classifiers=(n,)))
                continue
            layers = [f"{n}.{k}" for k, c in m.named_modules() if is_classifier_layer(c)]
            if layers:
                found.append(HeadSpec(names=(n,), classifiers=(layers[-1],)))
        # A transformers classifier may hold a pre-classifier block under one of these names
        # too (ModernBERT: ``head`` = dense, activation, LayerNorm before ``classifier``): the
        # head is the one with the model's ``num_labels`` outputs, else the last one.
        config = getattr(model, "config", None)
        labels = getattr(config, "num_labels", None)
        chosen = next((spec for spec in found if isinstance(labels, int)
                       and classifier_features(model.get_submodule(spec.classifiers[0]))[1] == labels), None)
        transformers_model = config is not None and hasattr(model, "base_model_prefix")
        # a transformers feature model's "head" is its pooling (SigLIP's); a user's own
        # PreTrainedModel subclass or a *For* class keeps the fallback
        feature_model = (type(model).__module__.startswith("transformers.")
                         and not re.search(r"For[A-Z]", type(model).__name__))
        if chosen is None and found and not feature_model:
            chosen = found[-1]
        if transformers_model and not feature_model and isinstance(labels, int):
            chosen = self._averaged_heads(model, labels, chosen)
        if chosen is None or not transformers_model:
            return chosen
        pre = tuple(n for n, c in model.named_children() if n in PRE_HEAD_NAMES and _numel(c) > 0)
        return HeadSpec(names=pre + chosen.names, classifiers=chosen.classifiers) if pre else chosen

    def _averaged_heads(self, model: nn.Module, labels: int, chosen: HeadSpec | None) -> HeadSpec | None:
        """Every top-level ``*head*`` / ``*classifier*`` child of a transformers classifier
        whose output layers have its ``num_labels`` outputs: the distilled models average a
        class head and a distillation head (SwiftFormer's ``head`` + ``dist_head``, LeViT's
        ``classifier`` + ``classifier_distill``, DeiT's ``cls_classifier`` +
        ``distillation_classifier``), which must all train and change width together."""
        base = getattr(model, "base_model_prefix", "")
        names: list[str] = []
        classifiers: list[str] = []
        for n, m in model.named_children():
            layers = _output_layers(m) if n != base and re.search("head|classifier", n) else []
            if layers and classifier_features(m.get_submodule(layers[-1]))[1] == labels:
                names.append(n)
                classifiers += [f"{n}.{k}" if k else n for k in layers]
        if len(names) < 2:  # only widens a pick: a lone match may be an auxiliary head (BEiT segmentation's)
            return chosen
        return HeadSpec(names=tuple(names), classifiers=tuple(classifiers))

    def _timm_head(self, model: nn.Module) -> HeadSpec | None:
        """The head a timm model declares. ``get_classifier()`` returns one module or, for
        distilled models (LeViT, EfficientFormer, SwiftFormer, PiT), a tuple whose outputs
        the model averages at inference: every one of them must get ``num_classes`` outputs
        and train. A classifier inside a top-level head module (``head.fc``) trains with
        that whole module (its norm, pre-logits), as the model's own ``head`` does."""
        found = model.get_classifier()
        found = found if isinstance(found, (tuple, list)) else (found,)
        blocks = self._blocks(model)
        names: list[str] = []
        classifiers: list[str] = []
        for module in found:
            path = module_path(model, module) if isinstance(module, nn.Module) else None
            layers = _output_layers(module) if path else []
            if not layers:
                continue
            classifiers += [f"{path}.{n}" if n else path for n in layers]
            top = path.split(".")[0]
            holds_block = any(b == top or b.startswith(f"{top}.") for b in blocks)
            name = path if holds_block else top
            if name not in names:
                names.append(name)
        if not classifiers:
            return None
        aux = getattr(model, "aux_head", None)  # VOLO: token logits added to the head's
        if isinstance(aux, nn.Linear) and "aux_head" not in names:
            names.append("aux_head")
            classifiers.append("aux_head")
        return HeadSpec(names=tuple(names), classifiers=tuple(classifiers))

    def replace_head(self, model: nn.Module, num_classes: int) -> None:
        # Only the output layers change: a timm reset_classifier() would also rebuild the
        # head's pretrained parts (LeViT's NormLinear BatchNorm, a pre-logits layer).
        super().replace_head(model, num_classes)
        if _is_timm_style(model) and isinstance(getattr(model, "num_classes", None), int):
            model.num_classes = num_classes  # as reset_classifier keeps it

    def max_positions(self, model: nn.Module) -> int | None:
        """Positions a transformers text model's prompt covers (ModernBERT, GTE, Bloom...): its
        ``max_position_embeddings`` up to :data:`PROMPT_ROWS` (ALiBi models without one:
        that many), so that a batch longer than the dry run's fits; a dry run on a longer
        ``example_input`` covers more."""
        config = getattr(model, "config", None)
        try:
            takes_ids = config is not None and "input_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_ids = False
        if not takes_ids:
            return None
        n = getattr(config, "max_position_embeddings", None)
        valid = isinstance(n, int) and not isinstance(n, bool) and n > 0
        return min(n, PROMPT_ROWS) if valid else PROMPT_ROWS

    def example_input(self, model: nn.Module) -> Any:
        """A short token sequence for a transformers text model (one that takes ``input_ids``
        and has a vocabulary; not an encoder-decoder, whose decoder needs its own input), else
        an image at the model's own size."""
        config = getattr(model, "config", None)
        if (isinstance(getattr(config, "vocab_size", None), int) and not getattr(config, "is_encoder_decoder", False)
                and self.max_positions(model) is not None):
            return text_input(model)
        return default_image_input(model)


GENERIC = GenericAdapter()
