"""Shared helpers of the baseline tests: tiny real-architecture models and one training step."""

from __future__ import annotations

import torch
from tuner_zoo import build, call, output

from s2a.train.methods import apply_method

HEADS = {
    "vit": ("head",),
    "swin": ("head.fc",),
    "efficientnet": ("classifier",),
    "bert_cls": ("classifier",),
    "distilbert_cls": ("pre_classifier", "classifier"),
}


def prepared(family: str, method: str, act_bits: int | None = None, seed: int = 0):
    """(reference output of the untouched model, MethodResult, batch)."""
    model, batch = build(family, seed)
    with torch.no_grad():
        ref = output(call(model, batch)).clone()
    res = apply_method(model, method, head_names=HEADS[family], act_bits=act_bits, example_input=batch)
    return ref, res, batch


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def step(model: torch.nn.Module, batch) -> set[str]:
    """Two AdamW steps on a loss that reaches every output (two: a zero-initialised tensor
    behind another zero one, e.g. an adapter's down-projection bias, gets its first gradient
    in the second); returns the names of the parameters whose values changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = output(call(model, batch)).float()
        (out.pow(2).mean() + out.mean()).backward()
        opt.step()
        opt.zero_grad()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


__all__ = ["HEADS", "build", "call", "output", "prepared", "step", "trainable"]
