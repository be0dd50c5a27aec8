"""Fine-tuning methods: which parameters train, and how activations are stored.

* ``full``: every parameter trains;
* ``linear``: only the classifier head trains (linear probing);
* ``s2a``: :func:`s2a.apply` with ``S2AConfig(modules=..., act_bits=...)`` (frozen backbone,
  tunable structure modules, classifier head, low-bit activation storage).

``full`` and ``linear`` take ``act_bits`` too: :func:`s2a.compress_activations` then stores
their activations at that width (a baseline for "what does the structure add").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import TrainError

__all__ = ["MethodResult", "apply_method"]


@dataclass
class MethodResult:
    model: nn.Module
    notes: list[str] = field(default_factory=list)
    s2a_config: dict[str, Any] | None = None


def _head_modules(model: nn.Module, head_names: tuple[str, ...]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in head_names if n in modules]


def apply_method(
    model: nn.Module,
    method: str,
    *,
    head_names: tuple[str, ...],
    modules: tuple[str, ...] = ("bias", "prompt"),
    act_bits: int | None = None,
    example_input: Any = None,
) -> MethodResult:
    """Configure ``model`` for ``method`` in place (or through ``s2a.apply``); see the module doc.

    ``example_input``: one preprocessed batch of the real data, for ``s2a.apply``'s dry run
    (an image prompt is tied to the input size, which ``--img-size`` may change).
    """
    notes: list[str] = []
    if method == "s2a":
        from s2a import S2AConfig, apply

        try:
            cfg = S2AConfig(modules=tuple(modules), act_bits=act_bits)
        except (ValueError, TypeError) as exc:
            raise TrainError(f"invalid --modules/--act-bits for s2a: {exc}") from None
        model = apply(model, cfg, example_input=example_input)
        notes.append(f"s2a.apply(modules={list(modules)}, act_bits={act_bits})")
        return MethodResult(model, notes, cfg.to_dict())

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "linear":
        heads = _head_modules(model, head_names)
        if not heads:
            raise TrainError(
                f"--method linear: cannot find the classifier head of {type(model).__name__} "
                f"(looked for {list(head_names)})"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for h in heads:
            for p in h.parameters():
                p.requires_grad_(True)
        notes.append(f"linear probe: only {list(head_names)} train")
    else:
        raise TrainError(f"unknown method {method!r}; choose full, linear or s2a")
    if act_bits:
        from s2a import compress_activations

        try:
            compress_activations(model, bits=act_bits)
        except (ValueError, TypeError) as exc:
            raise TrainError(f"--act-bits {act_bits}: {exc}") from None
        notes.append(f"activations stored at {act_bits} bits (s2a.compress_activations)")
    return MethodResult(model, notes, None)
