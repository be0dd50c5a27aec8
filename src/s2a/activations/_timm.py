"""Leaner forwards for timm's ``Mlp`` and ``Attention``: same results, smaller peaks.

Once activations are stored at 4 bits, the peak of a ViT step is set by what a block
holds *transiently* while the last block runs, not by what it saves:

* ``Mlp``: ``fc1``'s output and the activation's output, each 4x the width. With both
  weights frozen (when ``compress_activations`` runs, and still at each call) the block
  runs as :func:`.mlp.frozen_mlp`, in chunks of rows.
* ``SwiGLU`` / ``GluMlp``: both factors of the gated product, each the hidden width. With
  the weights frozen the block runs as :func:`.gated_mlp.frozen_gated_mlp`, which keeps
  only its input.
* ``Attention``: timm's forward keeps ``q``, ``k``, ``v`` (views of the 3x-width ``qkv``
  output) as locals until it returns, through the output projection, although attention
  has already stored what its backward needs. The forward here is timm's with those
  locals dropped right after attention.

Each is used only for the exact timm class whose forward reads exactly the attributes
below (checked on the code object), so a timm release that changes the block falls back
to timm's own forward instead of being silently mis-run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import _needs_grad
from .gated_mlp import frozen_gated_mlp, frozen_gated_mlp_applies
from .mlp import frozen_mlp, frozen_mlp_applies, fusable_kind, fused_forward, has_foreign_hooks

# Names each timm forward reads (co_names of timm 1.0.x). Any other: not ours to rewrite.
_MLP_NAMES = frozenset({"act", "drop1", "drop2", "fc1", "fc2", "norm"})
_SWIGLU_NAMES = frozenset({"act", "drop1", "drop2", "fc1_g", "fc1_x", "fc2", "norm"})
_GLU_MLP_NAMES = frozenset({"act", "chunk", "chunk_dim", "drop1", "drop2", "fc1", "fc2", "gate_last", "norm"})
_ATTENTION_NAMES = frozenset({
    "F", "attn_dim", "attn_drop", "fused_attn", "gate", "head_dim", "k_norm", "maybe_add_mask",
    "norm", "num_heads", "p", "permute", "proj", "proj_drop", "q_norm", "qkv", "reshape",
    "resolve_self_attn_mask", "scale", "scaled_dot_product_attention", "shape", "sigmoid",
    "softmax", "training", "transpose", "unbind",
})


def _timm_class(name: str) -> Any:
    try:
        from timm import layers
    except ImportError:
        return None
    cls = getattr(layers, name, None)
    return cls if isinstance(cls, type) else None


def _reads_exactly(cls: type, names: frozenset[str]) -> bool:
    code = getattr(cls.forward, "__code__", None)
    return code is not None and frozenset(code.co_names) == names


def lean_timm_forward(
    module: nn.Module, path: str, state: Any,
    act_kind: Callable[[nn.Module], str | None], skipped: Callable[[str], bool],
) -> tuple[str, Callable[..., torch.Tensor]] | None:
    """``(kind, forward)`` replacing ``module.forward``, or None if ``module`` is not one of ours.

    A module whose forward was already replaced on the instance (an adapter wrapping it,
    say) is left alone: the replacement would be lost."""
    if "forward" in vars(module):
        return None
    mlp, attention = _timm_class("Mlp"), _timm_class("Attention")
    if mlp is not None and type(module) is mlp and _reads_exactly(mlp, _MLP_NAMES):
        return _mlp_forward(module, path, state, act_kind, skipped)
    swiglu, glu = _timm_class("SwiGLU"), _timm_class("GluMlp")
    if swiglu is not None and type(module) is swiglu and _reads_exactly(swiglu, _SWIGLU_NAMES):
        return _gated_forward(module, path, state, act_kind, skipped, ("fc1_g", "fc1_x"))
    if glu is not None and type(module) is glu and _reads_exactly(glu, _GLU_MLP_NAMES):
        if module.chunk_dim != -1:  # the use_conv variant
            return None
        return _gated_forward(module, path, state, act_kind, skipped, ("fc1",))
    if (attention is not None and type(module) is attention and _reads_exactly(attention, _ATTENTION_NAMES)
            and state.spec.enabled("attention")):
        return "attention", _attention_forward(module)
    return None


def _timm_mlp_kind(module, path, state, act_kind, skipped, fc1_names) -> str | None:
    if type(module.norm) is not nn.Identity or type(module.drop1) is not nn.Dropout:
        return None  # a norm between the hidden layer and fc2 would need the hidden layer itself
    parts = [f"{path}.{c}" if path else c for c in (*fc1_names, "act", "drop1", "fc2")]
    linears = [getattr(module, n) for n in (*fc1_names, "fc2")]
    return fusable_kind(linears, module.act, parts, state, act_kind, skipped)


def _mlp_forward(module, path, state, act_kind, skipped):
    kind = _timm_mlp_kind(module, path, state, act_kind, skipped, ("fc1",))
    if kind is None:
        return None
    bits = state.spec.bits_for(kind)
    # partials, not closures: a deepcopy of the model rebinds them to the copy's modules
    return f"frozen_mlp:{kind}", partial(_fused_mlp_forward, module, state, kind, bits)


def _mlp_runs_own(module: nn.Module, state: Any, *_: object) -> bool:
    fcs = (module.fc1, module.fc2)
    return (state.disabled
            or any(type(fc) is not nn.Linear or fc.weight.requires_grad for fc in fcs)  # wrapped or trained since
            or (module.drop1.training and module.drop1.p > 0)
            or has_foreign_hooks(*fcs, module.act, module.drop1, module.norm))


@fused_forward(_mlp_runs_own)
def _fused_mlp_forward(module: nn.Module, state: Any, kind: str, bits: int, x: torch.Tensor) -> torch.Tensor:
    if _mlp_runs_own(module, state):
        return type(module).forward(module, x)
    fc1, fc2 = module.fc1, module.fc2
    b1, b2 = fc1.bias, fc2.bias
    if not frozen_mlp_applies(x, fc1.weight, fc2.weight, kind) or not _needs_grad(x, b1, b2):
        return type(module).forward(module, x)
    return module.drop2(frozen_mlp(x, fc1.weight, b1, fc2.weight, b2, kind, bits))


def _gated_forward(module, path, state, act_kind, skipped, fc1_names):
    kind = _timm_mlp_kind(module, path, state, act_kind, skipped, fc1_names)
    if kind is None:
        return None
    return f"gated_mlp:{kind}", partial(_fused_gated_forward, module, state, kind)


def _gate_and_up(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """(gate weight, gate bias, up weight, up bias) of a SwiGLU or GluMlp; GluMlp's halves
    of ``fc1`` are views, through which the bias gradients reach ``fc1.bias``."""
    if hasattr(module, "fc1_g"):
        return module.fc1_g.weight, module.fc1_g.bias, module.fc1_x.weight, module.fc1_x.bias
    w1, w2 = module.fc1.weight.chunk(2)
    b = module.fc1.bias
    b1, b2 = (None, None) if b is None else b.chunk(2)
    # gate_last: x1 * act(x2), the second half is the gate
    return (w2, b2, w1, b1) if module.gate_last else (w1, b1, w2, b2)


def _gated_runs_own(module: nn.Module, state: Any, *_: object) -> bool:
    fcs = [m for n, m in module.named_children() if n.startswith("fc")]
    return (state.disabled
            or any(type(fc) is not nn.Linear or fc.weight.requires_grad for fc in fcs)  # wrapped or trained since
            or (module.drop1.training and module.drop1.p > 0)
            or has_foreign_hooks(*fcs, module.act, module.drop1, module.norm))


@fused_forward(_gated_runs_own)
def _fused_gated_forward(module: nn.Module, state: Any, kind: str, x: torch.Tensor) -> torch.Tensor:
    if _gated_runs_own(module, state):
        return type(module).forward(module, x)
    fc2 = module.fc2
    wg, bg, wu, bu = _gate_and_up(module)
    if not frozen_gated_mlp_applies(x, wg, wu, fc2.weight, kind) or not _needs_grad(x, bg, bu, fc2.bias):
        return type(module).forward(module, x)
    return module.drop2(frozen_gated_mlp(x, wg, bg, wu, bu, fc2.weight, fc2.bias, kind))


def _attention_forward(m: nn.Module) -> Callable[..., torch.Tensor]:
    return partial(_lean_attention_forward, m)


def _lean_attention_forward(
    m: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    if not m.fused_attn:  # the eager path materialises the probabilities anyway
        return type(m).forward(m, x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, _ = x.shape
    gate = m.gate(x).sigmoid() if m.gate is not None else None
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    del qkv
    q, k = m.q_norm(q), m.k_norm(k)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=m.attn_drop.p if m.training else 0.0, is_causal=is_causal
    )
    del q, k, v  # the 3x-width qkv output: attention stored its own copy for backward
    y = y.transpose(1, 2).reshape(B, N, m.attn_dim)
    y = m.norm(y)
    if gate is not None:
        y = y * gate
    return m.proj_drop(m.proj(y))
