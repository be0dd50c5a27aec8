"""The bias module: every Linear / Conv / Norm bias of the frozen backbone is trainable.

For ``y = W x + b`` with ``W`` frozen, ``dL/db = sum dL/dy`` and ``dL/dx = W^T dL/dy``:
the layer's input never has to be stored for the bias gradient. Layers without a bias
get a zero-initialised one (``add_missing_bias``), registered as an ``nn.Parameter``
named ``bias`` so that it is saved and loaded with the module; the output at
initialisation is unchanged (adding 0.0 is exact).

Layers whose forward reads ``self.bias`` (Linear, ConvNd, BatchNorm / InstanceNorm,
LayerNorm, GroupNorm) simply get the parameter. RMSNorm-type layers, whose forward
has no bias term, get the parameter plus a forward hook that adds it to the output
(``out + b``: its gradient needs nothing stored either).

The norm module (``train_norm_weights``) lives here too: it trains the other half of a
normalisation layer's affine, its scale.
"""

from __future__ import annotations

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


def add_bias(model: nn.Module, add_missing: bool = True, exclude: tuple[str, ...] = ()) -> tuple[list[str], list]:
    """Make every Linear/Conv/Norm bias of ``model`` trainable (in place).

    Returns (names of the bias parameters made trainable, hook handles to remove on undo).
    Modules whose path starts with one of ``exclude`` are left alone.
    """
    names, handles = [], []
    for path, module in list(model.named_modules()):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        shape = bias_shape(module)
        if shape is None:
            continue
        bias = module._parameters.get("bias") if "bias" in module._parameters else None
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
        elif add_missing:
            if hasattr(module, "bias") and "bias" not in module._parameters and module.bias is not None:
                continue  # a buffer or property named bias (frozen layers): leave alone
            ref = module.weight if isinstance(getattr(module, "weight", None), torch.Tensor) else None
            kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
            if "bias" in module.__dict__:
                del module.__dict__["bias"]
            module.register_parameter("bias", nn.Parameter(torch.zeros(shape, **kw)))
            if _is_rms_norm(module):
                handles.append(module.register_forward_hook(_add_output_bias))
        else:
            continue
        names.append(f"{path}.bias" if path else "bias")
    return names, handles


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm)) or _is_rms_norm(module)


def train_norm_weights(model: nn.Module) -> list[str]:
    """Make the scale (``weight``) of every normalisation layer of ``model`` trainable (in place).

    The "norm" module. ``dL/dw = sum dL/dy * x̂`` needs the normalised input x̂, which a
    LayerNorm / RMSNorm whose input needs a gradient stores for its own backward anyway, so
    there it costs no activation memory. Returns the names of the weights made trainable;
    norms without an affine weight are skipped."""
    names = []
    for path, module in model.named_modules():
        weight = module._parameters.get("weight") if _is_norm(module) else None
        if isinstance(weight, nn.Parameter):
            weight.requires_grad_(True)
            names.append(f"{path}.weight" if path else "weight")
    return names
