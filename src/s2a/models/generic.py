"""The generic fallback: the blocks are the largest group (by parameters, then by count)
of >= 2 same-class children of one ``nn.ModuleList`` / ``nn.Sequential``; the layout is
inferred from the dry run; the head is a top-level ``head`` / ``fc`` / ``classifier`` /
``score`` child."""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import BlockSpec, HeadSpec, ModelAdapter, default_image_input, is_classifier_layer

HEAD_NAMES = ("head", "fc", "classifier", "score")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class GenericAdapter(ModelAdapter):
    name = "generic"

    def _blocks(self, model: nn.Module) -> list[str]:
        """Paths of the largest group (by parameters, then count) of >= 2 same-class
        children of one ModuleList / Sequential."""
        best, best_key = [], None
        for name, m in model.named_modules():
            if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
                continue
            groups: dict[type, list[tuple[str, nn.Module]]] = {}
            for child_name, child in m.named_children():
                groups.setdefault(type(child), []).append((child_name, child))
            for members in groups.values():
                if len(members) < 2:
                    continue
                key = (sum(_numel(c) for _, c in members), len(members))
                if key[0] > 0 and (best_key is None or key > best_key):
                    prefix = f"{name}." if name else ""
                    best, best_key = [f"{prefix}{n}" for n, _ in members], key
        return best

    def matches(self, model: nn.Module) -> bool:
        return bool(self._blocks(model))

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(n) for n in self._blocks(model)]

    def head(self, model: nn.Module) -> HeadSpec | None:
        children = dict(model.named_children())
        for n in HEAD_NAMES:
            m = children.get(n)
            if m is None:
                continue
            if is_classifier_layer(m):
                return HeadSpec(names=(n,), classifiers=(n,))
            layers = [f"{n}.{k}" for k, c in m.named_modules() if is_classifier_layer(c)]
            if layers:
                return HeadSpec(names=(n,), classifiers=(layers[-1],))
        return None

    def example_input(self, model: nn.Module) -> Any:
        return default_image_input(model)


GENERIC = GenericAdapter()
