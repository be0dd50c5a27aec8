"""VPT-deep (Jia et al., 2022): learnable prompt tokens prepended at every transformer block.

Block ``i`` receives ``[prefix tokens, P_i (num_tokens x D), other tokens]``; its output loses
the ``num_tokens`` prompt positions again, so block ``i + 1`` sees fresh prompts ``P_{i+1}``
(exactly VPT-deep, where the outputs of a layer's prompts are discarded). Prompts go after the
class / distillation / register tokens (and after ``[CLS]`` for text), so the pooled token and
the positions of the others are unchanged. The attention mask of text models grows by the
prompt columns (every token may attend to the prompts; prompts attend like ``[CLS]``).

Prompts: ``uniform(-v, v)`` with ``v = sqrt(6 / (2 D))`` (Xavier for a D x D map, as VPT's
``sqrt(6 / (patch_dim + D))`` with ``patch_dim = D``). The backbone is frozen; the prompts and
the classifier head train. Unlike S2A's low-rank prompt (added to the tokens, zero at
initialisation) VPT changes the output at initialisation and lengthens every sequence, so every
block stores activations for ``N + num_tokens`` tokens.

Applies to blocks that take (B, N, D) token sequences with absolute positions added before the
first block: timm ViT / DeiT, transformers ViT, BERT-family and DistilBERT encoders. Swin
(windowed feature maps), CNNs and rotary-position decoders (Llama) are refused.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from .registry import MethodContext, MethodResult, find_heads, freeze, train_heads

VPT_FAMILIES = ("timm-vit", "hf-vit", "hf-bert", "hf-distilbert")
DEFAULT_TOKENS = 10
VPT_ATTR = "vpt_prompts"


def supports_vpt(info: Any) -> str | None:
    if info.family in VPT_FAMILIES:
        return None
    layouts = sorted(set(info.layouts))
    return (f"VPT prepends prompt tokens to (B, N, D) token sequences of ViT / BERT-style blocks "
            f"({', '.join(VPT_FAMILIES)}); this model's blocks have layout {layouts}")


class DeepPrompts(nn.Module):
    """``prompts[i]``: the (num_tokens, D) prompt of block ``i``."""

    def __init__(self, num_blocks: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (2 * dim))
        self.prompts = nn.Parameter(torch.empty(num_blocks, num_tokens, dim).uniform_(-bound, bound))

    @property
    def num_tokens(self) -> int:
        return self.prompts.shape[1]


def _extend_mask(mask: torch.Tensor, pos: int, p: int, n: int) -> torch.Tensor:
    """Grow a (B, 1, Nq, Nk) (or (B, 1, 1, Nk)) attention mask by ``p`` prompt positions at
    ``pos``: prompt keys visible to every query, prompt queries masked like the first query."""
    visible = torch.ones((), dtype=torch.bool) if mask.dtype == torch.bool else torch.zeros((), dtype=mask.dtype)
    cols = visible.to(mask.device).expand(*mask.shape[:-1], p)
    mask = torch.cat([mask[..., :pos], cols, mask[..., pos:]], dim=-1)
    if mask.shape[-2] == n:
        rows = mask[..., :1, :].expand(*mask.shape[:-2], p, mask.shape[-1])
        mask = torch.cat([mask[..., :pos, :], rows, mask[..., pos:, :]], dim=-2)
    return mask


def _insert(prompts: DeepPrompts, index: int, pos: int, module: nn.Module, args: tuple, kwargs: dict):
    args = list(args)
    positional = bool(args) and isinstance(args[0], torch.Tensor)
    x = args[0] if positional else kwargs["hidden_states"]
    b, n, _ = x.shape
    p = prompts.prompts[index].to(x.dtype).unsqueeze(0).expand(b, -1, -1)
    x = torch.cat([x[:, :pos], p, x[:, pos:]], dim=1)
    if positional:
        args[0] = x
    else:
        kwargs["hidden_states"] = x
    for i, a in enumerate(args[1:], start=1):  # positional attention mask (BERT, DistilBERT)
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-1] == n:
            args[i] = _extend_mask(a, pos, prompts.num_tokens, n)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == n:
        kwargs["attention_mask"] = _extend_mask(mask, pos, prompts.num_tokens, n)
    return tuple(args), kwargs


def _remove(p: int, pos: int, module: nn.Module, args: tuple, output: Any) -> Any:
    def drop(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :pos], t[:, pos + p:]], dim=1)

    if isinstance(output, torch.Tensor):
        return drop(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (drop(output[0]), *output[1:])
    raise TypeError(f"VPT: cannot find the hidden state in a block output of type {type(output).__name__}")


def add_deep_prompts(model: nn.Module, info: Any, num_tokens: int = DEFAULT_TOKENS) -> DeepPrompts:
    """Register ``model.vpt_prompts`` and the hooks that insert / remove them (in place)."""
    dims = {b.in_dim for b in info.blocks}
    if len(dims) != 1:
        raise ValueError(f"VPT needs blocks of one width, got {sorted(dims)}")
    ref = next(model.parameters())
    prompts = DeepPrompts(len(info.blocks), num_tokens, dims.pop()).to(ref.device)
    model.add_module(VPT_ATTR, prompts)
    for i, block in enumerate(info.blocks):
        pos = max(block.prefix_tokens, 1 if info.pooling == "cls" else 0)
        module = model.get_submodule(block.name)
        module.register_forward_pre_hook(functools.partial(_insert, prompts, i, pos), with_kwargs=True)
        module.register_forward_hook(functools.partial(_remove, num_tokens, pos))
    return prompts


def apply_vpt(model: nn.Module, ctx: MethodContext) -> MethodResult:
    info = ctx.info(model)
    heads = find_heads(model, ctx.head_names, ctx.method)  # before the model changes
    freeze(model)
    prompts = add_deep_prompts(model, info)
    train_heads(model, tuple(heads), ctx.method)
    return MethodResult(model, [
        f"VPT-deep: {prompts.num_tokens} prompt tokens at each of {len(info.blocks)} blocks "
        f"({prompts.prompts.numel():,} parameters) and the head {heads} train"
    ])
