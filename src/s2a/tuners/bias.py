"""The bias module: every bias of the frozen backbone is trainable.

For ``y = W x + b`` with ``W`` frozen, ``dL/db = sum dL/dy`` and ``dL/dx = W^T dL/dy``:
the layer's input never has to be stored for the bias gradient. The biases are those of
Linear / Conv / Norm layers, and the bias vectors other modules keep apart from their layer
(``q_bias`` / ``v_bias`` of BEiT, SwinV2 and EVA attention, which compute
``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``; ``in_proj_bias`` of
``nn.MultiheadAttention``; the ``bias`` of a custom norm such as GRN). Layers without a bias
get a zero-initialised one (``add_missing_bias``), registered as an ``nn.Parameter``
named ``bias`` so that it is saved and loaded with the module; the output at
initialisation is unchanged (adding 0.0 is exact). An added bias that the model's output
does not depend on (that parent module reads only the layer's weight, as above) would never
get a gradient: given a dry forward (``probe``), :func:`add_bias` takes it out again.

Layers whose forward reads ``self.bias`` (Linear, ConvNd, BatchNorm / InstanceNorm,
LayerNorm, GroupNorm) simply get the parameter. RMSNorm-type layers, whose forward
has no bias term, get the parameter plus a forward hook that adds it to the output
(``out + b``: its gradient needs nothing stored either).

The norm module (``train_norm_weights``) lives here too: it trains the other half of a
normalisation layer's affine, its scale.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd


def _is_rms_norm(module: nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower() and isinstance(
        getattr(module, "weight", None), nn.Parameter)


def bias_shape(module: nn.Module) -> tuple[int, ...] | None:
    """Shape a bias of ``module`` would have, or None if it is not a Linear/Conv/Norm."""
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, _ConvNd):
        return (module.out_channels,)
    if isinstance(module, _NormBase):
        return (module.num_features,)
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return (module.num_channels,)
    if _is_rms_norm(module):
        return tuple(module.weight.shape)
    return None


def _add_output_bias(module: nn.Module, args, output):
    b = module.bias
    if output.dim() == 4 and "2d" in type(module).__name__.lower():  # NCHW norms
        b = b.view(-1, 1, 1)
    return output + b.to(output.dtype)


def _is_bias(module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` of ``module`` is a bias: the ``bias`` of a Linear / Conv / Norm,
    or a vector named ``bias`` / ``*_bias`` of any module (see the module docstring), or one
    such vector per expert of a mixture of experts (GPT-OSS's ``gate_up_proj_bias``: its
    gradient, too, is a sum over the tokens routed there). Tables such as
    ``relative_position_bias_table`` or LeViT's 2-D ``attention_biases`` are not."""
    if name == "bias" and bias_shape(module) is not None:
        return True
    if name.endswith("_bias") and p.dim() == 2 and p.shape[0] == getattr(module, "num_experts", None):
        return True
    return (name == "bias" or name.endswith("_bias")) and p.dim() <= 1


@dataclass
class _AddedBias:
    """A zero bias :func:`add_bias` registered, and how to take it out again."""

    path: str
    module: nn.Module
    before: str  # what ``module.bias`` was: "parameter" (None), "attribute" (None) or "absent"
    hook: Any = None  # RMSNorm: the forward hook that adds it

    @property
    def name(self) -> str:
        return f"{self.path}.bias" if self.path else "bias"

    def remove(self) -> None:
        del self.module._parameters["bias"]
        if self.hook is not None:
            self.hook.remove()
        if self.before == "parameter":
            self.module.register_parameter("bias", None)
        elif self.before == "attribute":
            self.module.bias = None


def _drop_saved(_tensor: torch.Tensor) -> None:
    """saved-tensors pack hook of the probe: no backward runs, so nothing needs keeping."""
    return None


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _leaves_reached(out: Any) -> set[int] | None:
    """ids of the tensors requiring grad that ``out`` depends on (its autograd graph's leaves),
    or None when no output tensor has a graph (nothing can be told from it)."""
    roots = [t for t in _tensors(out) if t.requires_grad]
    if not roots:
        return None
    reached = {id(t) for t in roots if t.grad_fn is None}
    stack, seen = [t.grad_fn for t in roots if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def _probe_graph(probe: Callable[[], Any], modules: Any) -> tuple[set[int] | None, set[int]]:
    """(:func:`_leaves_reached` of ``probe()``'s output, ids of those of ``modules`` that ran in it)."""
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: ran.add(id(mod)))
             for m in {id(m): m for m in modules}.values()]
    try:
        # Only the graph's structure is read, never a gradient: drop what a backward would need.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _drop_saved):
            out = probe()
    finally:
        for h in hooks:
            h.remove()
    return _leaves_reached(out), ran


def _runner(model: nn.Module, path: str) -> nn.Module:
    """The module whose forward uses the parameters of the module at ``path``: itself, but for
    an ``nn.MultiheadAttention``'s out_proj (its weights are read inside the attention's)."""
    module = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if path else None
    return parent if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj else module


def _unused(model: nn.Module, added: list[_AddedBias], existing: list[str],
            probe: Callable[[], Any]) -> tuple[list[_AddedBias], list[str]]:
    """(The added biases whose layer's parent module ran in ``probe()`` but that its output does
    not depend on, the existing biases whose own layer ran so): trainable, they would never get
    a gradient (CLIP's post_layernorm, SigLIP's pooling head beside a classifier that reads the
    token states). An ``nn.MultiheadAttention``'s out_proj never runs as a module: its attention
    does. A layer that did not run (an expert a router did not pick, a training-only branch) is
    kept: another input may use it."""
    parents = {a.path: model.get_submodule(a.path.rpartition(".")[0]) for a in added if a.path}
    owners = {name: _runner(model, name.rpartition(".")[0]) for name in existing}
    if not parents and not owners:
        return [], []
    reached, ran = _probe_graph(probe, [*parents.values(), *owners.values()])
    if reached is None:
        return [], []
    unused = [a for a in added if a.path in parents and id(parents[a.path]) in ran and id(a.module.bias) not in reached]
    idle = [n for n, m in owners.items() if id(m) in ran and id(model.get_parameter(n)) not in reached]
    return unused, idle


def unreached_trainable(model: nn.Module, probe: Callable[[], Any], exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the trainable parameters whose module ran in ``probe()`` (one forward of
    ``model``) but that its output does not depend on: they would never get a gradient (the
    pooler of a backbone whose output the side branch replaces). Modules under ``exclude``, and
    those that did not run (another input may use them), are left out."""
    owners = {}
    for path, module in model.named_modules():
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        for pn, p in module._parameters.items():
            if isinstance(p, nn.Parameter) and p.requires_grad:
                owners[f"{path}.{pn}" if path else pn] = (_runner(model, path), p)
    if not owners:
        return []
    reached, ran = _probe_graph(probe, [m for m, _ in owners.values()])
    if reached is None:
        return []
    return [n for n, (m, p) in owners.items() if id(m) in ran and id(p) not in reached]


def add_bias(model: nn.Module, add_missing: bool = True, exclude: tuple[str, ...] = (),
             probe: Callable[[], Any] | None = None) -> tuple[list[str], list]:
    """Make every bias of ``model`` trainable (in place; see the module docstring).

    Returns (names of the bias parameters made trainable, hook handles to remove on undo).
    Modules whose path starts with one of ``exclude`` are left alone. ``probe``: one forward
    of ``model`` (``s2a.apply`` passes its dry run in eval mode); with it, a bias added to a
    layer whose parent ran but whose bias the output does not depend on is removed again.
    """
    found: list[str | _AddedBias] = []  # in module order
    for path, module in list(model.named_modules()):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        for pn, p in module._parameters.items():
            if isinstance(p, nn.Parameter) and _is_bias(module, pn, p):
                p.requires_grad_(True)
                found.append(f"{path}.{pn}" if path else pn)
        shape = bias_shape(module)
        if not add_missing or shape is None or isinstance(module._parameters.get("bias"), nn.Parameter):
            continue
        if "bias" in module._parameters:
            before = "parameter"
        elif module.__dict__.get("bias", False) is None:
            before = "attribute"
            del module.__dict__["bias"]
        elif hasattr(module, "bias"):
            continue  # a buffer, property or tensor named bias (frozen layers): leave alone
        else:
            before = "absent"
        ref = module.weight if isinstance(getattr(module, "weight", None), torch.Tensor) else None
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        module.register_parameter("bias", nn.Parameter(torch.zeros(shape, **kw)))
        # an RMSNorm without a bias slot gets it added to its output; one that declares
        # ``bias = None`` (xLSTM's) adds it itself, and a hook would add it twice
        hook = module.register_forward_hook(_add_output_bias) if _is_rms_norm(module) and before == "absent" else None
        found.append(_AddedBias(path, module, before, hook))
    added = [a for a in found if isinstance(a, _AddedBias)]
    existing = [a for a in found if isinstance(a, str)]
    unused, idle = _unused(model, added, existing, probe) if probe is not None else ([], [])
    for a in unused:
        a.remove()
    for name in idle:
        model.get_parameter(name).requires_grad_(False)
    dropped = {id(a) for a in unused} | {id(a) for a in idle}
    kept = [a for a in found if id(a) not in dropped]
    names = [a.name if isinstance(a, _AddedBias) else a for a in kept]
    handles = [a.hook for a in kept if isinstance(a, _AddedBias) and a.hook is not None]
    return names, handles


def _is_named_norm(module: nn.Module) -> bool:
    """A normalisation layer of a class of its own (T5LayerNorm, MobileBERT's NoNorm, the RMSNorm
    spellings, timm's RmsNorm2d): a leaf whose class name ends in "Norm" (or "Norm2d"...), with a
    1-D ``weight`` parameter."""
    weight = module._parameters.get("weight")
    return (re.search(r"norm([123]d)?$", type(module).__name__.lower()) is not None and isinstance(weight, nn.Parameter)
            and weight.dim() == 1 and not module._modules)


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm)) or _is_rms_norm(module)
            or _is_named_norm(module))


def train_norm_weights(model: nn.Module) -> list[str]:
    """Make the scale (``weight``) of every normalisation layer of ``model`` trainable (in place).

    The "norm" module. ``dL/dw = sum dL/dy * x̂`` needs the normalised input x̂, which a
    LayerNorm / RMSNorm whose input needs a gradient stores for its own backward anyway, so
    there it costs no activation memory. Returns the names of the weights made trainable;
    norms without an affine weight are skipped."""
    weights = norm_weights(model)
    for weight in weights.values():
        weight.requires_grad_(True)
    return list(weights)


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> scale (``weight``) of every normalisation layer of ``model`` that has one."""
    weights = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight") if _is_norm(module) else None
        if isinstance(weight, nn.Parameter):
            weights[f"{path}.weight" if path else "weight"] = weight
    return weights
