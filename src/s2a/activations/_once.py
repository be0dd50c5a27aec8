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

_MESSAGE = (b"s2a: an operator with compressed activations was differentiated twice "
            b"(create_graph=True: a gradient penalty, MAML...); it keeps what its first derivative "
            b"needs, not its second. Run s2a.restore(model) before such an objective")


def once_differentiable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (an autograd Function's ``backward``) without grad; under ``create_graph``
    its outputs lead to a node that raises the message above when differentiated."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        with torch.no_grad():
            outputs = fn(ctx, *args)
        # Under create_graph every gradient it returns leads to the error, even where the
        # incoming gradient needs none (a loss linear in the output: PyTorch's decorator would
        # then let the second derivative silently treat f' as a constant).
        if not torch.is_grad_enabled():
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        err = torch._C._functions.DelayedError(_MESSAGE, len(outs))
        return err(*[None if o is None else o.detach().requires_grad_() for o in outs])

    return wrapper
