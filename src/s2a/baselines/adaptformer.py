"""AdaptFormer (Chen et al., 2022): a bottleneck adapter in parallel with each block's MLP.

``MLP(norm(x)) + s * up(dropout(ReLU(down(x))))`` with ``down: D -> 64``, ``up: 64 -> D``,
``s = 0.1`` and dropout 0.1 inside the adapter (AdaptFormer's image configuration: no adapter
LayerNorm, LoRA-style init); ``up`` starts at zero, so the model's output at initialisation is
the frozen backbone's. As upstream, the adapter reads the residual stream ``x`` that enters the
MLP sub-layer: in pre-LN blocks (timm ViT / Swin, transformers ViT, Llama) the input of the
norm before the MLP, caught by a pre-hook on that norm; in post-LN BERT and DistilBERT layers
the MLP's input is already the residual stream. Its output joins the MLP's before the residual
sum (BERT: before the output LayerNorm, by adding it to the residual input of ``BertOutput``,
which is the same sum). One difference: upstream adds it after the MLP's drop-path, here it
joins the MLP's output (the same sum without drop-path / layer scale, as in ViT-B/16).

The adapter is registered as a child ``adaptformer`` of the MLP module and the MLP's
``forward`` is patched on the instance, so every backbone state-dict key is unchanged. The
backbone is frozen; adapters and the classifier head train. CNNs have no MLP sub-layer:
refused.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from .registry import MethodContext, MethodResult, find_heads, freeze, train_heads

# family -> (path of the MLP inside a block, how it is called)
#   "mlp":    forward(x) -> MLP(x); the adapter reads x
#   "output": forward(hidden, input_tensor) -> LN(dense(hidden) + input_tensor) (BertOutput);
#             the adapter reads input_tensor and is added to it
MLP_PATHS: dict[str, tuple[str, str]] = {
    "timm-vit": ("mlp", "mlp"),
    "timm-swin": ("mlp", "mlp"),
    "hf-vit": ("mlp", "mlp"),
    "hf-llama": ("mlp", "mlp"),
    "hf-distilbert": ("ffn", "mlp"),
    "hf-bert": ("output", "output"),
}
# family -> the norm in front of the MLP of a pre-LN block (its input is the residual stream)
NORM_BEFORE_MLP: dict[str, str] = {
    "timm-vit": "norm2",
    "timm-swin": "norm2",
    "hf-vit": "layernorm_after",
    "hf-llama": "post_attention_layernorm",
}
ADAPTER_ATTR = "adaptformer"


def supports_adaptformer(info: Any) -> str | None:
    if info.family in MLP_PATHS:
        return None
    return (f"AdaptFormer puts an adapter beside the MLP of transformer blocks "
            f"({', '.join(MLP_PATHS)}); this model has no such MLP sub-layer")


class ParallelAdapter(nn.Module):
    """``scale * up(dropout(ReLU(down(x))))``, ``up`` zero-initialised. ``remember`` is a forward
    pre-hook for the norm in front of the MLP: the adapter then reads that norm's input."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.residual: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    def remember(self, _norm: nn.Module, args: tuple) -> None:
        self.residual = args[0]

    def source(self, mlp_input: torch.Tensor) -> torch.Tensor:
        """The residual stream caught by ``remember`` (once), else the MLP's own input."""
        x, self.residual = self.residual, None
        return mlp_input if x is None or x.shape != mlp_input.shape else x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _mlp_forward(original, adapter: ParallelAdapter, x: torch.Tensor, *args: Any, **kwargs: Any):
    return original(x, *args, **kwargs) + adapter(adapter.source(x))


def _output_forward(original, adapter: ParallelAdapter, hidden: torch.Tensor, input_tensor: torch.Tensor):
    return original(hidden, input_tensor + adapter(input_tensor))


def add_adapters(model: nn.Module, info: Any, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> list[str]:
    """Insert one :class:`ParallelAdapter` per block (in place); returns the MLP paths."""
    sub, call = MLP_PATHS[info.family]
    paths = []
    for block in info.blocks:
        path = f"{block.name}.{sub}"
        mlp = model.get_submodule(path)
        # the MLP's own weights give device and dtype (a bf16 / fp16 model: a bf16 / fp16 adapter)
        ref = next((p for p in mlp.parameters() if p.is_floating_point()), None)
        if ref is None:
            ref = next(p for p in model.parameters() if p.is_floating_point())
        adapter = ParallelAdapter(block.in_dim, bottleneck, scale, dropout).to(device=ref.device, dtype=ref.dtype)
        mlp.add_module(ADAPTER_ATTR, adapter)
        norm = NORM_BEFORE_MLP.get(info.family)
        if norm is not None:
            model.get_submodule(f"{block.name}.{norm}").register_forward_pre_hook(adapter.remember)
        fwd = _mlp_forward if call == "mlp" else _output_forward
        mlp.forward = functools.partial(fwd, mlp.forward, adapter)
        paths.append(path)
    return paths


def apply_adaptformer(model: nn.Module, ctx: MethodContext) -> MethodResult:
    info = ctx.info(model)
    heads = find_heads(model, ctx.head_names, ctx.method)  # before the model changes
    freeze(model)
    dropout = 0.1 if ctx.dropout is None else ctx.dropout
    paths = add_adapters(model, info, dropout=dropout)
    train_heads(model, tuple(heads), ctx.method)
    return MethodResult(model, [
        f"AdaptFormer: parallel adapters (bottleneck 64, scale 0.1, dropout {dropout:g}) reading the residual stream, beside {len(paths)} MLPs "
        f"and the head {heads} train"
    ])
