"""Compressed softmax probabilities followed to the matmul that consumes them.

Eager attention (what transformers cannot switch to SDPA: MPNet, DeBERTa-v2, Bloom, Gemma2's
soft-capped attention, ...) computes ``softmax(scores) -> [cast] -> [dropout] -> [view] ->
matmul(probs, V)``. A native matmul keeps ``probs`` at full precision for V's gradient, so
compressing the softmax alone would keep its low-bit codes on top of them: more than native.

Here the output of a compressed softmax (over the last dim) is tagged with its codes. The calls
the function mode sees on a tagged tensor that only reshape it, cast it or drop it out pass the
tag on, with the step that rebuilds them; ``matmul`` / ``bmm`` of a tagged tensor with V runs
as :class:`_ProbsMatmul`, which keeps V (its rows at 8 bits, as SDPA keeps it, unless the
``matmul`` kind is left out) and the softmax's own codes (the same storage, counted once), not
the probabilities: dP = dY V^T, dV = P_hat^T dY reads P from the codes (as the ``"probs"``
attention mode does). A tensor modified in place loses its tag; any other
consumer runs natively (strict mode reports what it keeps).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import functional as S
from ._once import once_differentiable
from .products import keep_rows, rebuild_rows
from .rowquant import dequantize_rows, row_codebook

_ATTR = "_s2a_probs"
class _Tagged(threading.local):
    """Tensors tagged in the forward running in this thread (see clear_tags): a forward ending
    in one thread must not untag another's."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []


_TAGGED = _Tagged()


def _set(t: torch.Tensor, tag: _Tag) -> None:
    setattr(t, _ATTR, tag)
    _TAGGED.refs.append(weakref.ref(t))


def clear_tags() -> None:
    """Drop the tags of the forward that ended: the probabilities it returned (attention
    weights) must not hold the codes, nor carry them into a later forward."""
    for ref in _TAGGED.refs:
        t = ref()
        if t is not None and _ATTR in t.__dict__:
            delattr(t, _ATTR)
    _TAGGED.refs.clear()


@dataclass(frozen=True)
class ProbsChain:
    """How a tensor derived from a compressed softmax's output is rebuilt from its codes."""

    bits: int
    rows: torch.Size  # shape of the softmax output (its last dim the softmax's)
    dtype: torch.dtype  # dtype of the softmax output
    shape: torch.Size  # shape and dtype of the tensor after ``steps``
    out_dtype: torch.dtype
    steps: tuple = ()  # ("cast", dtype) | ("reshape", shape) | ("dropout", meta) | ("mask", scale)

    def rebuild(self, packed: torch.Tensor, scale: torch.Tensor, states) -> torch.Tensor:
        cdt = torch.promote_types(self.dtype, torch.float32)
        p = dequantize_rows(packed, scale, row_codebook("probs", self.bits), self.rows, cdt,
                            renorm=True).to(self.dtype)
        states = iter(states)
        for kind, arg in self.steps:
            if kind == "cast":
                p = p.to(arg)
            elif kind == "reshape":
                p = p.reshape(arg)
            elif kind == "dropout":
                p = S.dropout_replay(p, next(states), arg)
            else:  # "mask": torch.native_dropout's
                p = torch.ops.aten.native_dropout_backward(p, next(states), arg)
        return p


@dataclass(frozen=True)
class _Tag:
    chain: ProbsChain
    packed: torch.Tensor
    scale: torch.Tensor
    states: tuple = ()
    version: int = 0

    def then(self, out: torch.Tensor, step: tuple, state: torch.Tensor | None = None) -> None:
        chain = replace(self.chain, steps=(*self.chain.steps, step), shape=out.shape,
                        out_dtype=out.dtype)
        states = self.states if state is None else (*self.states, state)
        _set(out, replace(self, chain=chain, states=states, version=out._version))


def tag_softmax(y: torch.Tensor, dim: int, bits: int, sink: list) -> torch.Tensor:
    """Tag the output of a compressed softmax with the codes it saved (``sink``)."""
    if sink and y.dim() > 0 and dim % y.dim() == y.dim() - 1:
        packed, scale = sink[0]
        chain = ProbsChain(bits, y.shape, y.dtype, y.shape, y.dtype)
        _set(y, _Tag(chain, packed, scale, version=y._version))
    return y


def tag_of(t) -> _Tag | None:
    """The tag of ``t`` if it still holds what its chain rebuilds (not modified in place)."""
    tag = getattr(t, _ATTR, None) if isinstance(t, torch.Tensor) else None
    if tag is None or t._version != tag.version or t.shape != tag.chain.shape or t.dtype != tag.chain.out_dtype:
        return None
    return tag


class _ProbsMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, v, chain: ProbsChain, v_bits: int | None, packed, scale, *states):
        out = torch.matmul(p, v)
        need_p, need_v = ctx.needs_input_grad[:2]
        # V for dP (rows of V at v_bits, as SDPA keeps it), the softmax's codes (and dropout
        # state) for dV: not P itself
        if not need_p:
            kept_v = (None, None)
        elif v_bits is None or isinstance(v, torch.nn.Parameter):
            kept_v = (v, None)
        else:
            kept_v = keep_rows(v, v_bits)
        ctx.save_for_backward(*kept_v, *((packed, scale, *states) if need_v else ()))
        ctx.meta = (chain, p.dtype, v.dtype, v.shape, v_bits, len(states))
        return out

    @staticmethod
    @once_differentiable  # the stored codes give P, not its derivative: refuse double backward
    def backward(ctx, g):
        v, v_scale, *codes = ctx.saved_tensors
        chain, p_dtype, v_dtype, v_shape, v_bits, n_states = ctx.meta
        dp = dv = None
        if ctx.needs_input_grad[0]:
            if v_scale is not None:
                v = rebuild_rows(v, v_scale, v_shape, g.dtype, v_bits)
            dp = torch.matmul(g, v.to(g.dtype).transpose(-1, -2)).to(p_dtype)
        if ctx.needs_input_grad[1]:
            packed, scale, *states = codes
            p = chain.rebuild(packed, scale, states).to(g.dtype)
            dv = torch.matmul(p.transpose(-1, -2), g).to(v_dtype)
        return dp, dv, None, None, None, None, *([None] * n_states)


def _matmul(tag: _Tag, p: torch.Tensor, v, v_bits: int | None) -> torch.Tensor:
    if (not isinstance(v, torch.Tensor) or tag_of(v) is not None or p.dim() < 2
            or v.dim() != p.dim() or p.shape[:-2] != v.shape[:-2] or p.shape[-1] != v.shape[-2]
            or not (p.is_floating_point() and v.is_floating_point())
            or not (p.requires_grad or v.requires_grad)):
        return NotImplemented  # broadcasting, a vector, V from probabilities too: natively
    return _ProbsMatmul.apply(p, v, tag.chain, v_bits, tag.packed, tag.scale, *tag.states)


def dropout(tag: _Tag, x: torch.Tensor, p: float, training: bool, inplace: bool, mode: str | None):
    """Dropout of tagged probabilities: s2a's (``mode``) or, where the dropout kind is left
    out, ``torch.native_dropout`` (a boolean mask, as PyTorch keeps on GPUs); either way the
    output is tagged. NotImplemented where nothing is drawn or the call is in place."""
    if inplace or not training or not 0.0 < p < 1.0 or not x.requires_grad:
        return NotImplemented
    if mode is None:
        out, mask = torch.native_dropout(x, p, True)
        tag.then(out, ("mask", 1.0 / (1.0 - p)), mask)
        return out
    sink: list = []
    out = S.dropout(x, p, training, False, mode=mode, sink=sink)
    if sink:
        state, meta = sink[0]
        tag.then(out, ("dropout", meta), state)
    return out


_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                      torch.Tensor.bmm})
_RESHAPES = frozenset({torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous,
                       torch.Tensor.view_as, torch.Tensor.reshape_as})
_CASTS = frozenset({torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
                    torch.Tensor.double, torch.Tensor.type_as})


def follow(func, args, kwargs, tag: _Tag, dropout_mode: str | None, v_bits: int | None = None):
    """Run ``func`` on tagged probabilities (``args[0]``) if it is a step this module follows,
    passing the tag on; NotImplemented otherwise. ``dropout_mode``: s2a's dropout mode, or
    None where the dropout kind is left out; ``v_bits``: the bits V is kept at by
    ``matmul(probs, V)`` (None: as it is)."""
    x = args[0]
    if func in _MATMULS:
        if kwargs or len(args) != 2 or not torch.is_grad_enabled():
            return NotImplemented
        return _matmul(tag, x, args[1], v_bits)
    if func is F.dropout:
        bound = dict(zip(("input", "p", "training", "inplace"), args, strict=False), **kwargs)
        return dropout(tag, x, bound.get("p", 0.5), bound.get("training", True),
                       bound.get("inplace", False), dropout_mode)
    if func in _RESHAPES or func in _CASTS:
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out is x or out.device != x.device:
            return out
        if func in _RESHAPES and out.dtype == x.dtype and out.numel() == x.numel():
            tag.then(out, ("reshape", out.shape))
        elif func in _CASTS and out.shape == x.shape and out.is_floating_point():
            tag.then(out, ("cast", out.dtype))
        return out
    return NotImplemented
