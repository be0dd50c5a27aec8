"""Fine-tuning methods of ``s2a train``: the trainer's single entry into :mod:`s2a.baselines`.

:func:`apply_method` looks ``method`` up in :data:`s2a.baselines.METHOD_SPECS` (full, linear,
bitfit, vpt, lora, ia3, prompt-tuning, adaptformer, lst, full-ckpt, bitfit-ckpt, lora-ckpt, mesa8, fewbit2,
s2a, s2a-lora; ``s2a train --help`` lists them with one line each) and turns a method that does
not fit the model into a :class:`TrainError` naming the method, the model family and the methods
that do fit. ``act_bits`` compresses the activations of the methods that leave storage native
(full, linear, the PEFT baselines: a baseline for "what does the structure add"); ``s2a`` and
``s2a-lora`` use it as their own storage width; ``mesa8`` / ``fewbit2`` / ``*-ckpt`` refuse it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from s2a.baselines import MethodContext, MethodNotApplicable, MethodResult, apply_spec
from s2a.models import UnsupportedModelError

from .config import TrainError

__all__ = ["MethodResult", "apply_method"]


def apply_method(
    model: nn.Module,
    method: str,
    *,
    head_names: tuple[str, ...],
    modules: tuple[str, ...] = ("bias", "prompt"),
    prompt_rank: int = 4,
    act_bits: int | None = None,
    example_input: Any = None,
    max_length: int | None = None,
    dropout: float | None = None,
) -> MethodResult:
    """Configure ``model`` for ``method``; returns the model to train (a peft wrapper for the
    peft methods) with notes for the report.

    ``example_input``: one preprocessed batch of the real data, for the dry run that finds the
    blocks (an image prompt is tied to the input size, which ``--img-size`` may change).
    ``max_length``: the longest token sequence of the text preprocessing (prompt tuning checks
    that its virtual tokens fit beside it). ``dropout``: --dropout, also for the dropout layers
    a method adds.
    """
    ctx = MethodContext(
        method, tuple(head_names), tuple(modules), act_bits, example_input, prompt_rank=prompt_rank,
        max_length=max_length, dropout=dropout,
    )
    try:
        return apply_spec(model, ctx)
    except MethodNotApplicable as exc:
        raise TrainError(str(exc)) from None
    except UnsupportedModelError as exc:  # s2a.apply looks for the blocks itself
        raise TrainError(f"--method {method}: {exc}") from None
