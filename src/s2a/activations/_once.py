"""PyTorch's ``once_differentiable``, with an error that names s2a and the way out.

A compressed operator's backward reads codes of ``f'``, not ``f''``: differentiating it again
(``create_graph=True``: gradient penalties, MAML) must fail, not return wrong numbers. PyTorch's
decorator fails with "trying to differentiate twice a function that was marked with
@once_differentiable", which says neither who nor what to do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_MESSAGE = ("s2a: an operator with compressed activations was differentiated twice "
            "(create_graph=True: a gradient penalty, MAML...); it keeps what its first derivative "
            "needs, not its second. Run s2a.restore(model) before such an objective")


def once_differentiable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (an autograd Function's ``backward``) without grad; under ``create_graph``
    raise the message above at once.

    PyTorch's way, a node on the gradients that raises when they are differentiated, is not
    enough: ``torch.autograd.grad(..., inputs=...)`` only runs the nodes on a path to its inputs,
    and that node, fed by detached tensors, is on none. A gradient penalty or a MAML outer step
    then silently summed the other paths (the second derivative through this operator dropped).
    """

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        if torch.is_grad_enabled():  # this backward runs under create_graph=True
            raise RuntimeError(_MESSAGE)
        with torch.no_grad():
            return fn(ctx, *args)

    return wrapper
