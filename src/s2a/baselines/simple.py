"""Methods that only choose which existing parameters train: full, linear, bitfit; and s2a.

* ``full``: every parameter trains (the reference of every ratio).
* ``linear``: linear probing, only the classifier head trains.
* ``bitfit``: BitFit (Ben Zaken et al., 2022): every existing bias of Linear / Conv / Norm
  layers trains, plus the head. Unlike S2A's ``bias`` module no bias is added where a layer has
  none (a convolution before a BatchNorm then contributes nothing, its BN bias does) and the
  activations are stored natively.
* ``s2a``: :func:`s2a.apply` with ``S2AConfig(modules=..., act_bits=...)``.
"""

from __future__ import annotations

from torch import nn

from .registry import (
    MethodContext,
    MethodNotApplicable,
    MethodResult,
    find_heads,
    freeze,
    train_heads,
)


def apply_full(model: nn.Module, ctx: MethodContext) -> MethodResult:
    for p in model.parameters():
        p.requires_grad_(True)
    return MethodResult(model, ["full fine-tuning: every parameter trains"])


def apply_linear(model: nn.Module, ctx: MethodContext) -> MethodResult:
    heads = find_heads(model, ctx.head_names, ctx.method)  # before the model changes
    freeze(model)
    train_heads(model, tuple(heads), ctx.method)
    return MethodResult(model, [f"linear probe: only {heads} train"])


def apply_bitfit(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from s2a.tuners import add_bias

    heads = find_heads(model, ctx.head_names, ctx.method)  # before the model changes
    freeze(model)
    names, _ = add_bias(model, add_missing=False)
    train_heads(model, tuple(heads), ctx.method)
    return MethodResult(model, [f"BitFit: {len(names)} existing bias tensors and the head {heads} train"])


def apply_s2a(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from s2a import S2AConfig, apply

    try:
        cfg = S2AConfig(modules=tuple(ctx.modules), prompt_rank=ctx.prompt_rank, act_bits=ctx.act_bits)
    except (ValueError, TypeError) as exc:
        raise MethodNotApplicable(f"invalid --modules/--prompt-rank/--act-bits for s2a: {exc}") from None
    model = apply(model, cfg, example_input=ctx.example_input)
    rank = f", prompt_rank={ctx.prompt_rank}" if "prompt" in cfg.modules else ""
    return MethodResult(
        model, [f"s2a.apply(modules={list(ctx.modules)}{rank}, act_bits={ctx.act_bits})"], cfg.to_dict()
    )
