"""A transformer MLP block, ``fc2(act(fc1(x)))``, for when both weights are frozen.

Compressing the activation stores its derivative codes at 4 bits, but an unfused MLP
still materialises the whole hidden layer twice during forward: ``fc1``'s output (the
activation's input) and the activation's output (``fc2``'s input), each 4x the block's
width. In a ViT-B/16 at batch 64 that is 2 x 148 MiB at the moment the last block runs,
on top of everything stored for backward: the step's peak.

With frozen weights nothing in the block needs those tensors after the block, so they
are processed in chunks of rows: a chunk of ``fc1`` output is made, encoded, passed
through the activation and ``fc2``, and dropped. Backward does the same from the saved
codes (``dh = (dy @ W2) * f'(codes)``, ``dx = dh @ W1``). What is saved is exactly what
the unfused compressed block saves (the activation's codes; frozen linears keep no
input); only the transient memory changes. Trainable biases get their gradients.

If either weight requires grad (full fine-tuning, LoRA merged into the weight...) the
block runs unfused, each operator compressed on its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from ._once import once_differentiable
from .attention import _autocast_dtype
from .codebooks import SMOOTH_FUNCTIONS, get_codebook

# Hidden-layer elements materialised at a time (fp32: 32 MiB, for fc1's output and the
# activation's each). Larger chunks gain nothing measurable on CPU matmuls of this size.
CHUNK_ELEMS = 1 << 23

__all__ = ["CHUNK_ELEMS", "frozen_mlp", "frozen_mlp_applies", "fusable_kind", "fused_forward",
           "has_foreign_hooks", "input_copy", "observer_hook", "runs_own_forward"]

_OBSERVER = "_s2a_observer"
_Hook = TypeVar("_Hook", bound=Callable[..., object])


def observer_hook(fn: _Hook) -> _Hook:
    """Mark a module hook as one that only observes (``s2a.measure``'s path tracking): it does
    not stop the fused block from bypassing its submodules' forwards."""
    setattr(fn, _OBSERVER, True)
    return fn


def has_foreign_hooks(*modules: torch.nn.Module) -> bool:
    """Whether any hook other than an :func:`observer_hook` would see these modules run:
    fusing them would silently skip such a hook, so the block then runs unfused."""
    from torch.nn.modules import module as M

    dicts = [M._global_forward_pre_hooks, M._global_forward_hooks, M._global_backward_hooks,
             getattr(M, "_global_backward_pre_hooks", {})]
    for m in modules:
        dicts += [m._forward_pre_hooks, m._forward_hooks, m._backward_hooks, m._backward_pre_hooks]
    return any(not getattr(h, _OBSERVER, False) for d in dicts for h in d.values())


# a fused forward (the function a block's forward partial calls) -> the test, given the same
# leading arguments, of whether it will run the block's own forward whatever the input
_OWN_FORWARD_WHEN: dict[Callable, Callable[..., bool]] = {}


def fused_forward(runs_own: Callable[..., bool]) -> Callable[[_Hook], _Hook]:
    """Register a fused block forward with ``runs_own(module, state, ...)``: true when the
    block, as it is now, runs its own forward instead (weights trained or wrapped since, an
    active dropout inside, a hook watching a part it skips). The forward checks it on each
    call; :func:`compression_summary` asks it too, so the two cannot disagree."""
    def register(fn: _Hook) -> _Hook:
        _OWN_FORWARD_WHEN[fn] = runs_own
        return fn
    return register


def runs_own_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs its own forward rather than a fused one, as far as can be told
    before it runs (the input's dtype and whether anything needs a gradient decide the rest)."""
    fwd = vars(module).get("forward")
    runs_own = _OWN_FORWARD_WHEN.get(getattr(fwd, "func", None))
    return runs_own is None or runs_own(*fwd.args, **fwd.keywords)


def fusable_kind(
    linears: Sequence[nn.Module], act: nn.Module | str, parts: Sequence[str], state: Any,
    act_kind: Callable[[nn.Module], str | None], skipped: Callable[[str], bool],
) -> str | None:
    """The activation kind under which an MLP block may run fused, or None: every one of
    ``linears`` a plain ``nn.Linear`` (not timm's conv variant, not peft-wrapped) with a frozen
    weight (a weight that trains needs its input: nothing to fuse), none of the block's
    ``parts`` (module paths) skipped, and ``act`` a smooth function ``state`` compresses."""
    if any(type(fc) is not nn.Linear or fc.weight.requires_grad for fc in linears):
        return None
    if any(skipped(p) for p in parts):
        return None
    kind = act if isinstance(act, str) else act_kind(act)  # a name: a function the block calls
    return kind if kind in SMOOTH_FUNCTIONS and state.spec.enabled(kind) else None


def _row_chunks(rows: int, hidden: int, budget: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of about ``budget`` (default :data:`CHUNK_ELEMS`) hidden-layer elements each."""
    step = max(1, (CHUNK_ELEMS if budget is None else budget) // max(hidden, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


# (key, weak reference to the tensor the input views, the copy): the last copy made
_last_copy: tuple[tuple, weakref.ref, torch.Tensor] | None = None


def _forget(ref: weakref.ref) -> None:
    global _last_copy
    last = _last_copy
    if last is not None and last[1] is ref:
        _last_copy = None


def input_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, the same tensor again for the same values of the same input.

    A MoE block feeds one input to its shared expert (a gated MLP) and its routed experts,
    each fused op keeping a bf16 copy of it for backward: one copy then serves both. A copy is
    reused only for an activation of the graph being recorded (``x.grad_fn`` set), while the
    tensor ``x`` views is alive (so that its memory holds no other data) and unmodified (its
    version counter), for a contiguous ``x`` with the same first element, size and row width.
    The last copy is held until that tensor is freed (usually as its block returns) or another
    copy is made.
    """
    global _last_copy
    # Only an activation of the running graph (x.grad_fn): a persistent buffer refilled through
    # .data or numpy keeps its version counter, and a stale copy would be silently reused.
    # (A compiled graph: no Python state, the compiler may share the copy itself.)
    if (x.dtype == dtype or x.grad_fn is None or torch.compiler.is_compiling() or not x.is_contiguous()
            or torch.is_inference_mode_enabled()):
        return x.to(dtype)
    root = x if x._base is None else x._base
    key = (x.data_ptr(), x.numel(), x.shape[-1] if x.dim() else 1, x._version, dtype, x.device)
    last = _last_copy  # one read: another thread may replace it
    if last is not None and last[0] == key and last[1]() is root:
        return last[2].view(x.shape)
    copy = x.to(dtype)
    _last_copy = (key, weakref.ref(root, _forget), copy)
    return copy


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in here (autocast's, if it is on)."""
    return _autocast_dtype(x.device.type) or torch.promote_types(x.dtype, w.dtype)


class _MLPFrozenWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, name: str, bits: int):
        dtype = _compute_dtype(x, w1)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        b1c = None if b1 is None else b1.to(dtype)
        b2c = None if b2 is None else b2.to(dtype)
        cb = get_codebook(name, bits)
        lut, _ = cb.tensors(x.device)
        act = SMOOTH_FUNCTIONS[name]
        rows, hidden = x2.shape[0], w1.shape[0]
        # Allocated in its final shape and written through a 2-D view: returned as a view, the
        # output could not be modified in place by the caller (a view made inside a Function).
        out = x2.new_empty(*x.shape[:-1], w2.shape[0])
        out2 = out.view(rows, w2.shape[0])
        packed = []
        for r0, r1 in _row_chunks(rows, hidden):
            h = F.linear(x2[r0:r1], w1c, b1c)
            packed.append(kernels.encode_lut(h, lut, bits, cb.nan_code, cb.runs))
            a = act(h)
            del h
            if b2c is None:
                torch.mm(a, w2c.t(), out=out2[r0:r1])
            else:
                torch.addmm(b2c, a, w2c.t(), out=out2[r0:r1])
        ctx.save_for_backward(w1, w2, *packed)
        ctx.name, ctx.bits, ctx.dtype = name, bits, dtype
        ctx.x_meta = (x.shape, x.dtype)
        ctx.b_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
        return out

    @staticmethod
    @once_differentiable  # the stored codes give f'(x), not f'': refuse double backward
    def backward(ctx, g):
        w1, w2, *packed = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        b1_dtype, b2_dtype = ctx.b_dtypes
        dtype = ctx.dtype
        _, levels = get_codebook(ctx.name, ctx.bits).tensors(g.device)
        g2 = g.reshape(-1, g.shape[-1]).to(dtype)
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        need_x, need_b1, need_b2 = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        rows, hidden = g2.shape[0], w1.shape[0]
        gx = g2.new_empty(rows, w1.shape[1]) if need_x else None
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gb1 = g2.new_zeros(hidden, dtype=acc) if need_b1 else None
        for (r0, r1), codes in zip(_row_chunks(rows, hidden), packed, strict=True):
            da = torch.mm(g2[r0:r1], w2c)
            dh = kernels.decode_lut(codes, da, levels, ctx.bits)
            del da
            if need_b1:
                gb1 += dh.sum(0, dtype=acc)
            if need_x:
                torch.mm(dh, w1c, out=gx[r0:r1])
        gx = gx.reshape(x_shape).to(x_dtype) if need_x else None
        gb1 = gb1.to(b1_dtype) if need_b1 else None
        gb2 = g2.sum(0, dtype=acc).to(b2_dtype) if need_b2 else None
        return gx, None, gb1, None, gb2, None, None


def frozen_mlp_applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, name: str) -> bool:
    """Whether :func:`frozen_mlp` can stand in for the unfused block here."""
    return (
        torch.is_grad_enabled()
        and not w1.requires_grad
        and not w2.requires_grad
        and name in SMOOTH_FUNCTIONS
        and x.dim() >= 2
        and x.is_floating_point()
        and w1.dim() == 2
        and w2.dim() == 2
        and x.shape[-1] == w1.shape[1]
        and w2.shape[1] == w1.shape[0]
    )


def frozen_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str = "gelu",
    bits: int = 4,
) -> torch.Tensor:
    """``F.linear(act(F.linear(x, W1, b1)), W2, b2)`` with frozen ``W1``, ``W2``.

    Same saved state as the unfused compressed block (``bits``-bit codes of ``act``'s
    derivative), chunked so that the hidden layer never exists whole. Callers check
    :func:`frozen_mlp_applies` first; a weight that requires grad is refused here.
    """
    if fc1_weight.requires_grad or fc2_weight.requires_grad:
        raise ValueError("frozen_mlp: both weights must be frozen (requires_grad=False); "
                         "run the block unfused when a weight trains")
    if activation not in SMOOTH_FUNCTIONS:
        raise ValueError(f"frozen_mlp: unknown activation {activation!r}; supported: {sorted(SMOOTH_FUNCTIONS)}")
    if x.shape[-1] != fc1_weight.shape[1] or fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(
            f"frozen_mlp: shapes do not chain: x (..., {x.shape[-1]}), fc1 weight "
            f"{tuple(fc1_weight.shape)}, fc2 weight {tuple(fc2_weight.shape)}"
        )
    return _MLPFrozenWeights.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, bits)
