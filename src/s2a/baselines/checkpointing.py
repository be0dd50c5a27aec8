"""Activation checkpointing of every block: ``full-ckpt``, ``bitfit-ckpt`` and ``lora-ckpt``.

Each backbone block's ``forward`` (the blocks of :func:`s2a.models.describe_backbone`) runs
under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while gradients are
enabled: only the block's inputs are kept and its inside is recomputed in the backward pass
(RNG state preserved, so dropout draws the same masks and the gradients equal those without
checkpointing). BatchNorm running statistics are restored after the recomputation, so a
step updates them once, as without checkpointing. Under ``no_grad`` (evaluation) the block
runs directly. The patch is an instance attribute, so parameters and state-dict keys are
unchanged.

Applied after the method that chooses what trains (full fine-tuning, or peft LoRA: the peft
layers live inside the blocks, whose module objects peft keeps).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from .registry import MethodContext, MethodResult

CKPT_FLAG = "_s2a_checkpointed"


class _RunningStatsKept:
    """Leave the block's BatchNorm running statistics as they were before a recomputation (a
    training-mode recompute would update them a second time in the same step). Reusable: a
    step may recompute a block more than once (``s2a.measure`` unpacks saved tensors too)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.saved: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def __enter__(self) -> None:
        self.saved = [
            (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
            for m in self.block.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, bufs in self.saved:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)
        self.saved = []


def _checkpointed(block: nn.Module, original, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _RunningStatsKept(block)), **kwargs)
    return original(*args, **kwargs)


def checkpoint_blocks(blocks: list[nn.Module]) -> int:
    """Wrap each block's forward in activation checkpointing (in place); returns the count."""
    for block in blocks:
        if getattr(block, CKPT_FLAG, False):
            continue
        block.forward = functools.partial(_checkpointed, block, block.forward)
        setattr(block, CKPT_FLAG, True)
    return len(blocks)


def _without_kv_cache(model: nn.Module, result: MethodResult) -> None:
    """A decoder that fills its key/value cache during the forward appends to it again when a
    block is recomputed, and the recomputation then sees twice the keys (transformers'
    ``gradient_checkpointing_enable`` turns the cache off for the same reason)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
        result.notes.append("key/value cache turned off (config.use_cache=False): a recomputed block would fill it twice")


def _checkpointed_method(model: nn.Module, ctx: MethodContext, apply) -> MethodResult:
    blocks = [b.module for b in ctx.info(model).blocks]  # before peft wraps the model
    result = apply(model, ctx)
    _without_kv_cache(model, result)
    n = checkpoint_blocks(blocks)
    result.notes.append(f"activation checkpointing of {n} blocks (torch.utils.checkpoint, non-reentrant)")
    return result


def apply_full_ckpt(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from .simple import apply_full

    return _checkpointed_method(model, ctx, apply_full)


def apply_bitfit_ckpt(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from .simple import apply_bitfit

    return _checkpointed_method(model, ctx, apply_bitfit)


def apply_lora_ckpt(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from .peft_methods import apply_lora

    return _checkpointed_method(model, ctx, apply_lora)
