"""``compress_activations``: the in-place transform that makes a model's backward
state low-bit, and ``restore`` that undoes it.

Two mechanisms, both reversible:

* Module patching. Known activation, norm, dropout, drop-path and convolution
  modules of torch.nn, timm and transformers get an instance-level ``forward``
  that calls the compressed operator. Parameters, buffers, state-dict keys and
  hooks stay exactly where they were. Attention modules are switched to their
  SDPA code path (timm ``fused_attn``, transformers ``attn_implementation``) so
  that attention reaches the compressed ``scaled_dot_product_attention``.
* A ``TorchFunctionMode`` active while the model's forward runs routes the
  functional calls made inside forward (``F.gelu``, ``torch.softmax``,
  ``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.dropout``,
  ``F.conv2d`` ...) to the same operators.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import math
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from . import functional as S
from . import gate as G
from . import pooling as P
from . import probs as PR
from ._hf import LLAMA_SPELLING, RMSNormSpelling, lean_hf_forward, rms_norm_spelling
from ._timm import lean_timm_forward
from .codebooks import SMOOTH_FUNCTIONS
from .grn import global_response_norm
from .mlp import observer_hook, runs_own_forward
from .packing import check_bits
from .products import activation_matmul, activation_matmul_applies
from .rowquant import ROW_BITS

POINTWISE_KINDS = (*SMOOTH_FUNCTIONS, *S.EXACT_FUNCTIONS)
OP_KINDS = (
    *POINTWISE_KINDS, "softmax", "attention", "layer_norm", "rms_norm", "batch_norm", "group_norm",
    "dropout", "drop_path", "conv", "linear", "max_pool", "avg_pool", "gate", "matmul", "grn", "star_relu",
)
_ROW_KINDS = ("softmax", "attention", "layer_norm", "rms_norm", "batch_norm", "group_norm", "gate", "matmul",
              "grn", "star_relu")
# kinds whose default is 8 bits whatever ``bits`` says: what they keep is an operand itself,
# not a derivative or a normalised row (as SDPA keeps q, k, v at 8 bits)
_EIGHT_BIT_KINDS = ("matmul", "star_relu")


def bits_allowed(kind: str) -> tuple[int, ...]:
    """Bit widths operator ``kind`` can store at: row-wise kinds (norms, softmax,
    attention) need 2-8 bits, pointwise ones also take 1."""
    return ROW_BITS if kind in _ROW_KINDS else S.POINTWISE_BITS


class UncoveredOperatorsError(RuntimeError):
    """Raised in strict mode when operators that keep activations would stay uncompressed."""


@dataclass
class CompressionSpec:
    bits: int = 4
    op_bits: dict[str, int] = field(default_factory=dict)
    ops: frozenset[str] = frozenset(OP_KINDS)
    skip: tuple[str, ...] = ()
    attention_mode: str | None = None
    dropout_mode: str = "regenerate"
    strict: bool = False

    def bits_for(self, kind: str) -> int:
        return self.op_bits.get(kind, 8 if kind in _EIGHT_BIT_KINDS else self.bits)

    def enabled(self, kind: str) -> bool:
        return kind in self.ops

    def matmul_bits(self) -> int | None:
        """Bits per element of the operands kept by products of two activations (eager
        attention's Q K^T and P V; :mod:`.products`): 8 unless ``ops`` says otherwise, as SDPA
        keeps Q, K and V; None where the kind is left out."""
        return self.bits_for("matmul") if self.enabled("matmul") else None

    def attention_storage(self) -> tuple[str, int]:
        """(mode, bits) for attention. Default: Q/K/V at 8 bits, probabilities
        recomputed. Measured on ViT-B shapes (benchmarks/results/attention_modes.md)
        it keeps 482 KB per block and sample at gradient cosine >= 0.9997, where
        4-bit probabilities + 8-bit Q/K/V keep 725 KB at 0.9976 and 4-bit Q/K/V with
        recomputation reach only 0.93-0.97."""
        mode = self.attention_mode or "recompute"
        default = 8 if mode == "recompute" else self.bits
        return mode, self.op_bits.get("attention", default)


def validate_compression(bits, ops, dropout_mode, attention_mode) -> CompressionSpec:
    check_bits(bits, S.POINTWISE_BITS, what="bits")
    op_bits: dict[str, int] = {}
    if ops is None:
        kinds = set(OP_KINDS)
    elif isinstance(ops, str):
        raise TypeError(f"ops must be a list of operator kinds or a dict kind->bits, not the string {ops!r}")
    elif isinstance(ops, Mapping):
        kinds = set(ops)
        op_bits = dict(ops)
    elif isinstance(ops, Iterable):
        kinds = set(ops)
    else:
        raise TypeError(f"ops must be None, a list of operator kinds or a dict kind->bits, got {type(ops).__name__}")
    unknown = sorted(kinds - set(OP_KINDS))
    if unknown:
        raise ValueError(f"unknown operator kind(s) {unknown}; known kinds: {list(OP_KINDS)}")
    for kind, b in op_bits.items():
        check_bits(b, bits_allowed(kind), what=f"bits for {kind}")
    defaulted = [k for k in OP_KINDS if k in kinds and k not in op_bits and k not in _EIGHT_BIT_KINDS
                 and bits not in bits_allowed(k)]
    if defaulted:
        raise ValueError(
            f"bits={bits} does not suit {defaulted} (they take {list(ROW_BITS)}); give them their "
            "own width with ops={kind: bits, ...}, or leave them out of ops"
        )
    if dropout_mode not in ("regenerate", "bitmask"):
        raise ValueError(f"dropout_mode={dropout_mode!r}; choose 'regenerate' or 'bitmask'")
    if attention_mode not in (None, "probs", "recompute"):
        raise ValueError(f"attention_mode={attention_mode!r}; choose 'probs', 'recompute' or None (default)")
    return CompressionSpec(bits, op_bits, frozenset(kinds), (), attention_mode, dropout_mode)


# --- the compressed callables, shared by module patches and the function mode -------


def _softmax(spec, x, dim=None, dtype=None, **_):
    from .attention import softmax

    if dim is None:  # torch's legacy implicit dim, which nn.Softmax() and F.softmax(x) use
        dim = 0 if x.dim() in (0, 1, 3) else 1
    if dtype is not None:
        x = x.to(dtype)
    bits = spec.bits_for("softmax")
    if torch.compiler.is_compiling():
        return softmax(x, dim, bits=bits)
    # tagged with its codes: a matmul(probs, V) after it keeps them, not the probabilities
    sink: list = []
    return PR.tag_softmax(softmax(x, dim, bits=bits, sink=sink), dim, bits, sink)


def _sdpa(spec, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    from .attention import scaled_dot_product_attention

    mode, bits = spec.attention_storage()
    return scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, bits=bits, mode=mode,
    )


def _act(kind, spec, x, *args, **kwargs):
    inplace = kwargs.pop("inplace", False)
    y = _act_value(kind, spec, x, *args, **kwargs)
    # As natively, x itself must hold the result (a caller may ignore the return value): the
    # compressed op writes a new tensor, copied into x (autograd records the copy; a leaf
    # that requires grad raises, as natively). Only inplace calls pay for the copy.
    return x.copy_(y) if inplace else y


def _act_value(kind, spec, x, *args, **kwargs):
    if kind == "gelu":
        approximate = kwargs.pop("approximate", args[0] if args else "none")
        kind = "gelu_tanh" if approximate == "tanh" else "gelu"
    elif kind == "leaky_relu":
        slope = kwargs.pop("negative_slope", args[0] if args else 0.01)
        return S.activation(x, kind, spec.bits_for(kind), negative_slope=slope)
    elif kind == "hardtanh":
        lo = kwargs.pop("min_val", args[0] if args else -1.0)
        hi = kwargs.pop("max_val", args[1] if len(args) > 1 else 1.0)
        return S.activation(x, kind, spec.bits_for(kind), min_val=lo, max_val=hi)
    elif kind == "softplus":
        beta = kwargs.get("beta", args[0] if args else 1.0)
        threshold = kwargs.get("threshold", args[1] if len(args) > 1 else 20.0)
        if beta != 1 or threshold != 20:
            return F.softplus(x, beta, threshold)
    return S.activation(x, kind, spec.bits_for(kind))


def _layer_norm(spec, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return S.layer_norm(x, normalized_shape, weight, bias, eps, bits=spec.bits_for("layer_norm"))


def _rms_norm(spec, x, normalized_shape, weight=None, eps=None):
    return S.rms_norm(x, normalized_shape, weight, eps, bits=spec.bits_for("rms_norm"))


def _group_norm(spec, x, num_groups, weight=None, bias=None, eps=1e-5):
    return S.group_norm(x, num_groups, weight, bias, eps, bits=spec.bits_for("group_norm"))


def _batch_norm(spec, x, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    return S.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        bits=spec.bits_for("batch_norm"))


def _dropout(spec, x, p=0.5, training=True, inplace=False):
    tag = None if torch.compiler.is_compiling() else PR.tag_of(x)
    if tag is not None:  # softmax probabilities on their way to a matmul
        out = PR.dropout(tag, x, p, training, inplace, spec.dropout_mode)
        if out is not NotImplemented:
            return out
    return S.dropout(x, p, training, inplace, mode=spec.dropout_mode)


def _conv(spec, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return S.conv(x, weight, bias, stride, padding, dilation, groups)


def _linear(spec, input, weight, bias=None):
    return S.linear(input, weight, bias)


def _max_pool(d, spec, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              return_indices=False):
    if return_indices:  # the caller wants the int64 indices: native (strict mode reports it)
        return NotImplemented
    return P.max_pool(input, d, kernel_size, stride, padding, dilation, ceil_mode)


def _amax(spec, input, dim=(), keepdim=False):
    return P.amax(input, dim, keepdim)


def _max(spec, input, dim=None, keepdim=False):
    # only a maximum along one dimension; max(x) and max(x, other) are left to PyTorch
    if not isinstance(dim, int) or isinstance(dim, bool):
        return NotImplemented
    return P.max_along(input, dim, keepdim)


def _avg_pool(d, spec, input, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    return P.avg_pool(input, d, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override)


def _adaptive_avg_pool(d, spec, input, output_size):
    return P.adaptive_avg_pool(input, d, output_size)


def _gate_mul(spec, a, b, *rest, **kwargs):
    # only plain two-operand products; anything else (alpha=, a gate that needs no
    # gradient, two full-size operands) is left to PyTorch and judged by strict mode
    out = None if rest or kwargs else G.compressed_gate_mul(a, b, spec.bits_for("gate"))
    return NotImplemented if out is None else out


def _matmul(spec, a, b, *rest, **kwargs):
    # plain two-operand products of two batched activations; anything else (a weight, a
    # broadcast, out=) is left to PyTorch and judged by strict mode
    if rest or kwargs or not activation_matmul_applies(a, b):
        return NotImplemented
    return activation_matmul(a, b, spec.matmul_bits())


def _baddbmm(spec, input, batch1, batch2, *, beta=1, alpha=1):
    # (the bias may be float32 beside bf16 factors under autocast, which casts it as natively)
    if not (isinstance(input, torch.Tensor) and activation_matmul_applies(batch1, batch2) and batch1.dim() == 3):
        return NotImplemented
    return activation_matmul(batch1, batch2, spec.matmul_bits(), bias=input, beta=beta, alpha=alpha)


def _function_table() -> dict:
    table = {}

    def add(kind, handler, *funcs):
        for f in funcs:
            table[f] = (kind, handler)

    for kind, funcs in {
        "gelu": (F.gelu,),
        "silu": (F.silu,),
        "relu": (F.relu, torch.relu, torch.Tensor.relu),
        "relu6": (F.relu6,),
        "leaky_relu": (F.leaky_relu,),
        "hardtanh": (F.hardtanh,),
        "hardsigmoid": (F.hardsigmoid,),
        "hardswish": (F.hardswish,),
        "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid),
        "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh),
        "mish": (F.mish,),
        "softplus": (F.softplus,),
    }.items():
        add(kind, partial(_act, kind), *funcs)
    add("softmax", _softmax, F.softmax, torch.softmax, torch.Tensor.softmax)
    add("attention", _sdpa, F.scaled_dot_product_attention)
    add("layer_norm", _layer_norm, F.layer_norm)
    add("rms_norm", _rms_norm, F.rms_norm)
    add("batch_norm", _batch_norm, F.batch_norm)
    add("group_norm", _group_norm, F.group_norm)
    add("dropout", _dropout, F.dropout)
    add("conv", _conv, F.conv1d, F.conv2d, F.conv3d)
    add("linear", _linear, F.linear)
    add("gate", _gate_mul, torch.mul, torch.Tensor.mul, torch.Tensor.__mul__)
    add("matmul", _matmul, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
    add("matmul", _baddbmm, torch.baddbmm, torch.Tensor.baddbmm)
    for d in (1, 2, 3):
        add("max_pool", partial(_max_pool, d), getattr(F, f"max_pool{d}d"), getattr(torch, f"max_pool{d}d"))
        add("avg_pool", partial(_avg_pool, d), getattr(F, f"avg_pool{d}d"))
        add("avg_pool", partial(_adaptive_avg_pool, d), getattr(F, f"adaptive_avg_pool{d}d"))
    add("max_pool", _amax, torch.amax, torch.Tensor.amax)
    add("max_pool", _max, torch.max, torch.Tensor.max)
    add("avg_pool", partial(_adaptive_avg_pool, 2), torch._C._nn.adaptive_avg_pool2d)
    add("avg_pool", partial(_adaptive_avg_pool, 3), torch._C._nn.adaptive_avg_pool3d)
    return table


_FUNCTIONS = _function_table()

_MAX_POOL_INDICES = "max_pool(return_indices=True)"
# Functional calls that keep activations and that we do not compress: reported by strict mode.
_UNCOVERED_FUNCTIONS = {
    F.elu: "elu", F.selu: "selu", F.celu: "celu", F.glu: "glu",
    F.instance_norm: "instance_norm", F.prelu: "prelu",
    F.logsigmoid: "logsigmoid", F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    F.softsign: "softsign", torch.erf: "erf", torch.exp: "exp", torch.rsqrt: "rsqrt",
    F.dropout1d: "dropout1d", F.dropout2d: "dropout2d", F.dropout3d: "dropout3d",
    F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose",
    # These keep their whole input and int64 indices (max_pool*d with return_indices=False
    # is compressed; with return_indices=True its handler declines and it is reported too).
    **{f: _MAX_POOL_INDICES for f in (
        F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
        torch.max_pool1d_with_indices, torch._C._nn.max_pool2d_with_indices,
        torch._C._nn.max_pool3d_with_indices)},
    **{f: "adaptive_max_pool" for f in (
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
        F.adaptive_max_pool1d_with_indices, F.adaptive_max_pool2d_with_indices,
        F.adaptive_max_pool3d_with_indices)},
    **{f: "fractional_max_pool" for f in (F.fractional_max_pool2d, F.fractional_max_pool3d)},
    # a Python composite: while the mode handles it, its inner softmax / SDPA run natively
    F.multi_head_attention_forward: "multi_head_attention_forward",
}


class _CompressMode(TorchFunctionMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.state
        if not state.running.entered:  # left on the stack by an interrupted forward, then cleared
            return func(*args, **kwargs)
        entry = _FUNCTIONS.get(func)
        # Compressed softmax probabilities: reshapes, casts and dropout pass their codes on, and
        # matmul(probs, V) keeps the codes instead of the probabilities (see probs.py).
        tag = (PR.tag_of(args[0]) if args and state.disabled == 0 and "out" not in kwargs
               and not torch.compiler.is_compiling() else None)
        if tag is not None:
            mode = state.spec.dropout_mode if state.spec.enabled("dropout") else None
            out = PR.follow(func, args, kwargs, tag, mode, state.spec.matmul_bits())
            if out is not NotImplemented:
                return out
        # out= runs natively: such a call records no autograd history (with an input that
        # requires grad it raises, as natively), so there is nothing to compress.
        if entry is not None and state.disabled == 0 and "out" not in kwargs:
            kind, handler = entry
            # Random kinds are routed without grad too: a reentrant checkpoint runs the block
            # without grad, then recomputes it with grad, and both must draw s2a's mask.
            if (state.spec.enabled(kind) and (torch.is_grad_enabled() or kind in ("dropout", "attention"))
                    and (kind != "matmul" or state.in_attention())):
                out = handler(state.spec, *args, **kwargs)
                if out is not NotImplemented:
                    return out
                # the handler declined (max pooling asked for its indices): native, reported
                if state.spec.strict and kind == "max_pool" and handler is not _max:
                    state.report(_MAX_POOL_INDICES)
            if kind in ("gate", "matmul") or handler is _max:  # left native: judged as any native call
                entry = None
            else:
                return func(*args, **kwargs)
        if state.spec.strict and state.disabled == 0 and torch.is_grad_enabled():
            name = _UNCOVERED_FUNCTIONS.get(func)
            if name is not None:
                state.report(name)
            # (a kind that ops= left out is the caller's choice)
            elif entry is None and not _saved_tensors_hooked():
                first = torch.autograd._get_sequence_nr()  # the number of the next node created
                out = func(*args, **kwargs)
                if _keeps_activation(out, first, state.trainable):
                    state.report(_op_name(func))
                return out
        return func(*args, **kwargs)


# --- strict mode: what a native call saves for backward ---------------------------
#
# Any call the mode sees and does not route (``x * gate``, ``q @ k.transpose(-2, -1)``,
# ``x ** 2``, ``x.amax(dim)``, ``F.normalize``...) is looked at after it ran: the autograd
# nodes it created (walked from its outputs, down to the nodes numbered before the call) are
# read for the tensors each one saved for backward (``node._saved_*``). The call keeps a
# full-precision activation if one of them is floating-point, requires grad and is not a
# trainable parameter (nor a view of one): what autograd keeps of a frozen weight, a
# constant (``x * 0.5``, rotary tables, masks) or an input that needs no gradient is not
# reported.
# Products (mul, mm, bmm, baddbmm...) save each operand for the gradient of the other: they
# keep an activation for an activation's gradient only when both operands are activations
# (``x * trainable_scale`` keeps ``x`` only for the scale, as a trainable convolution keeps
# its input, which is not reported either). A quotient a / b needs b for a's gradient: it is
# reported when the saved divisor is an activation.

_PRODUCT_NODES = frozenset({
    "MulBackward0", "MmBackward0", "BmmBackward0", "AddmmBackward0", "BaddbmmBackward0",
    "AddbmmBackward0", "AddmvBackward0", "MvBackward0", "DotBackward0", "VdotBackward0",
    "LinalgVecdotBackward0", "OuterBackward0", "AddrBackward0",
})
_DIVISION_NODES = frozenset({"DivBackward0", "DivBackward2"})
_SAVED_ATTRS: dict[type, tuple[str, ...]] = {}
_WALK_LIMIT = 512  # nodes looked at per call (a composite: F.multi_head_attention_forward)


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (a non-reentrant checkpoint, ``s2a.measure``):
    reading a saved tensor back would then run their unpack hook, which for a checkpoint
    recomputes the block in the middle of the forward and keeps the result until backward.
    Strict mode then reports only the functions it knows by name."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _tensors(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)) and depth < 2:
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif isinstance(obj, dict) and depth < 2:
        for o in obj.values():
            yield from _tensors(o, depth + 1)


_OPERATORS = {  # Tensor.__mul__, __rmatmul__, __itruediv__... by the name of their function
    **{f"{r}{op}": op for op in ("mul", "matmul", "pow", "add", "sub") for r in ("", "r")},
    **{f"i{op}": f"{op}_" for op in ("mul", "matmul", "pow", "add", "sub")},
    "truediv": "div", "rtruediv": "div", "itruediv": "div_", "div": "div", "rdiv": "div",
    "floordiv": "floor_divide", "rfloordiv": "floor_divide", "getitem": "index",
    "setitem": "index_put_",
}


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name.startswith("__") and name.endswith("__"):
        name = _OPERATORS.get(name.strip("_"), name.strip("_"))
    return name


def _is_activation(t, trainable: set) -> bool:
    return (isinstance(t, torch.Tensor) and t.requires_grad
            and (t.is_floating_point() or t.is_complex())
            and t.untyped_storage().data_ptr() not in trainable)


def _saved(node) -> dict:
    names = _SAVED_ATTRS.get(type(node))
    if names is None:
        names = _SAVED_ATTRS[type(node)] = tuple(a for a in dir(node) if a.startswith("_saved_"))
    out = {}
    for a in names:
        try:
            out[a] = getattr(node, a)
        except RuntimeError:  # already freed (cannot happen in forward), or not unpackable
            continue
    return out


def _node_keeps_activation(node, trainable: set) -> bool:
    saved = _saved(node)
    if not saved:
        return False
    kind = node.name()
    if kind in _PRODUCT_NODES:
        tensors = [v for v in saved.values() if isinstance(v, torch.Tensor)]
        return len(tensors) >= 2 and all(_is_activation(t, trainable) for t in tensors)
    if kind in _DIVISION_NODES:
        return _is_activation(saved.get("_saved_other"), trainable)
    return any(_is_activation(t, trainable) for v in saved.values() for t in _tensors(v))


def _keeps_activation(out, first: int, trainable: set) -> bool:
    """Whether the autograd nodes that a native call created (reached from its outputs,
    numbered ``first`` or later: the graph before the call is not its doing) save a
    full-precision activation for backward."""
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    seen = set()
    while stack and len(seen) < _WALK_LIMIT:
        node = stack.pop()
        if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)
        if node._sequence_nr() < first:
            continue
        # built-in nodes only: a custom Function's context (s2a's own codes) is its own business
        custom = isinstance(node, torch.autograd.function.BackwardCFunction)
        if not custom and _node_keeps_activation(node, trainable):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


# --- module patching ---------------------------------------------------------------

_ACTIVATION_CLASSES = {
    "GELU": "gelu", "GELUActivation": "gelu", "AccurateGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "BloomGelu": "gelu_tanh", "QuickGELU": "quick_gelu", "QuickGELUActivation": "quick_gelu",
    "SiLU": "silu", "Swish": "silu", "SiLUActivation": "silu", "ReLU": "relu", "ReLU6": "relu6",
    "LeakyReLU": "leaky_relu", "Hardtanh": "hardtanh", "Hardsigmoid": "hardsigmoid", "Hardswish": "hardswish",
    "HardSwish": "hardswish", "Sigmoid": "sigmoid", "Tanh": "tanh", "Mish": "mish",
    "MishActivation": "mish", "Softplus": "softplus",
}
# Llama-style RMSNorm of transformers: weight * normalised(x.float()).to(input dtype). Besides
# these names, any class whose code is one of transformers' spellings (_hf.rms_norm_spelling).
_HF_RMSNORM = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
               "T5LayerNorm", "OlmoRMSNorm", "GraniteRMSNorm", "SmolLM3RMSNorm")
# Modules whose forward (their own or inherited) only makes functional calls that the mode
# already routes; but for attention, compression_summary lists them under their main call's kind.
_ROUTED_KINDS = {"BatchNormAct2d": "batch_norm", "FrozenBatchNormAct2d": "batch_norm",
                 "SyncBatchNormAct": "batch_norm", "LayerNormAct": "layer_norm",
                 "LayerNormAct2d": "layer_norm", "MaxPool2dSame": "max_pool", "GroupNorm1": "group_norm",
                 "GroupNormAct": "group_norm"}
_COVERED_BY_MODE = (*_ROUTED_KINDS, "Attention", "SelfAttention")
_SUSPECT_WORDS = ("GELU", "ReLU", "SiLU", "Swish", "Mish", "Sigmoid", "Tanh", "Softmax", "Norm",
                  "Dropout", "DropPath", "ELU", "GLU", "Softplus", "Hardswish", "Activation", "MaxPool")


def _forward_owner(module: nn.Module) -> str:
    """Name of the class that defines the ``forward`` ``module`` runs (its own, or the parent
    class's that it inherits)."""
    return _forward_class(module).__name__


def _forward_class(module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls
    return type(module)


# Libraries whose activation classes are known by name: a user's own ``Swish`` may compute
# x * sigmoid(beta * x), not SiLU.
_KNOWN_LIBRARIES = ("torch", "timm", "transformers")


def _runs_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs a ``forward`` of PyTorch's own (not one defined in timm,
    transformers or user code, nor replaced on the instance)."""
    if "forward" in vars(module):
        return False
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls.__module__.startswith("torch.")
    return False


def _suspect_hook(state: _State, name: str, module, args) -> None:
    """Strict mode, a leaf module named like an operator that s2a does not patch (MobileBERT's
    ``NoNorm``, transformers' ``ConvNextLayerNorm``): its forward's calls are checked as they run, by name and by what
    their autograd nodes saved. Under saved-tensor hooks (a non-reentrant checkpoint) only
    names are checked: the module is then reported by its class name, as before it ran."""
    if state.disabled == 0 and torch.is_grad_enabled() and _saved_tensors_hooked():
        state.report(f"{name} (unchecked under saved-tensor hooks)")


def _module_op(module: nn.Module, spec: CompressionSpec):
    """(kind, patched forward) for modules we know how to compress, else None.

    Each forward is a ``partial`` of a module-level function over ``module``: a deepcopy of
    the model (an EMA or teacher copy) then rebinds it to the copy's own module, and the
    model still pickles; a closure would keep running on the original's tensors.

    Classes are recognised by the class whose ``forward`` they run: a subclass that only
    changes ``__init__`` (timm's ``LayerNorm2dNoBias``) is its parent's forward."""
    name = _forward_owner(module)
    library = _forward_class(module).__module__.partition(".")[0]
    kind = _ACTIVATION_CLASSES.get(name) if library in _KNOWN_LIBRARIES else None
    if type(module) is nn.ReLU6:  # PyTorch's runs Hardtanh's forward: its own name is clearer
        kind = "relu6"
    if kind is not None and not any(True for _ in module.parameters()):
        if kind == "gelu" and getattr(module, "approximate", "none") == "tanh":
            kind = "gelu_tanh"
        return kind, partial(_activation_forward, kind, spec, module)
    if isinstance(module, nn.Softmax):
        return "softmax", partial(_softmax_forward, spec, module)
    if isinstance(module, nn.LayerNorm) and type(module).forward in (nn.LayerNorm.forward, *_timm_ln()):
        return "layer_norm", partial(_layer_norm_forward, spec, module)
    if name == "LayerNorm2d" and hasattr(module, "normalized_shape"):
        return "layer_norm", partial(_layer_norm2d_forward, spec, module)
    if isinstance(module, nn.RMSNorm) or name == "RmsNorm":
        return "rms_norm", partial(_rms_norm_forward, spec, module)
    spelling = rms_norm_spelling(module)
    if spelling is None and name in _HF_RMSNORM and hasattr(module, "variance_epsilon"):
        spelling = LLAMA_SPELLING
    if spelling is not None:
        return "rms_norm", partial(_hf_rms_norm_forward, spec, module, spelling)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return "batch_norm", partial(_patched_batch_norm, module, spec)
    if type(module) is nn.GroupNorm:
        return "group_norm", partial(_group_norm_forward, spec, module)
    grn = _grn_layout(module, name)
    if grn is not None:
        return "grn", partial(_grn_forward, spec, module, *grn)
    if name == "StarReLU" and all(isinstance(getattr(module, a, None), torch.Tensor) for a in ("scale", "bias")):
        return "star_relu", partial(_star_relu_forward, spec, module)
    if type(module) is nn.Dropout:
        return "dropout", partial(_dropout_forward, spec, module)
    if name == "DropPath" and hasattr(module, "drop_prob"):
        return "drop_path", partial(_drop_path_forward, module)
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros":
        return "conv", partial(_conv_forward, spec, module)
    if type(module) in _MAX_POOLS and not module.return_indices:  # else: reported as uncovered
        return "max_pool", partial(_max_pool_forward, module)
    if type(module) in _AVG_POOLS:
        return "avg_pool", partial(_avg_pool_forward, module)
    if type(module) in _ADAPTIVE_AVG_POOLS:
        return "avg_pool", partial(_adaptive_avg_pool_forward, module)
    return None


def _grn_layout(module: nn.Module, name: str) -> tuple[tuple[int, ...], int, tuple[int, ...], float] | None:
    """(spatial dims, channel dim, shape of weight and bias, eps) of a ConvNeXt-V2 Global
    Response Norm: timm's ``GlobalResponseNorm`` (NHWC or NCHW) or transformers'
    ``ConvNextV2GRN`` (NHWC, eps 1e-6); else None."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
        return None
    if name == "GlobalResponseNorm" and hasattr(module, "spatial_dim") and hasattr(module, "wb_shape"):
        return tuple(module.spatial_dim), module.channel_dim, tuple(module.wb_shape), float(module.eps)
    if name == "ConvNextV2GRN" and weight.dim() == 4:
        return (1, 2), -1, tuple(weight.shape), 1e-6
    return None


def _grn_forward(spec: CompressionSpec, module: nn.Module, spatial, channel, wb_shape, eps, x):
    return global_response_norm(x, module.weight.view(wb_shape), module.bias.view(wb_shape), spatial, channel,
                                eps, bits=spec.bits_for("grn"))


def _group_norm_forward(spec: CompressionSpec, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _group_norm(spec, x, module.num_groups, module.weight, module.bias, module.eps)


def _star_relu_forward(spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return S.star_relu(x, module.scale, module.bias, spec.bits_for("star_relu"))


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _pool_dims(module: nn.Module, classes: tuple) -> int:
    return classes.index(type(module)) + 1


def _max_pool_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.return_indices:  # set after compress_activations: the caller wants the indices
        return type(module).forward(module, x)
    return P.max_pool(x, _pool_dims(module, _MAX_POOLS), module.kernel_size, module.stride,
                      module.padding, module.dilation, module.ceil_mode)


def _avg_pool_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return P.avg_pool(x, _pool_dims(module, _AVG_POOLS), module.kernel_size, module.stride,
                      module.padding, module.ceil_mode, module.count_include_pad,
                      getattr(module, "divisor_override", None))


def _adaptive_avg_pool_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return P.adaptive_avg_pool(x, _pool_dims(module, _ADAPTIVE_AVG_POOLS), module.output_size)


def _activation_forward(kind: str, spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # in place as the module was asked to be: a caller may read its input back (``act(h); h``)
    inplace = bool(getattr(module, "inplace", False))
    if kind == "leaky_relu":
        return _act(kind, spec, x, module.negative_slope, inplace=inplace)
    if kind == "hardtanh":
        return _act(kind, spec, x, module.min_val, module.max_val, inplace=inplace)
    if kind == "softplus":
        return _act(kind, spec, x, module.beta, module.threshold)
    return _act(kind, spec, x, inplace=inplace)


def _softmax_forward(spec: CompressionSpec, module: nn.Softmax, x: torch.Tensor) -> torch.Tensor:
    return _softmax(spec, x, module.dim)


def _layer_norm_forward(spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _layer_norm(spec, x, module.normalized_shape, module.weight, module.bias, module.eps)


def _layer_norm2d_forward(spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = _layer_norm(spec, x.permute(0, 2, 3, 1), module.normalized_shape, module.weight, module.bias, module.eps)
    return y.permute(0, 3, 1, 2)


def _rms_norm_forward(spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _rms_norm(spec, x, module.normalized_shape, module.weight, module.eps)


def _hf_rms_norm_forward(spec: CompressionSpec, module: nn.Module, spelling: RMSNormSpelling,
                         x: torch.Tensor) -> torch.Tensor:
    # A trainable scale (s2a's "norm" module) goes into the compressed op, whose stored x̂
    # also serves dL/dw; outside, autograd would keep y at full width.
    eps, bits = getattr(module, spelling.eps), spec.bits_for("rms_norm")
    if not spelling.scaled:
        return S.rms_norm(x.float(), (x.shape[-1],), None, eps, bits=bits).type_as(x)
    w = module.weight
    if spelling.round_first:
        # LLaMA: w * x̂.to(x.dtype). Inside the op, the product comes before the rounding:
        # one rounding apart in bf16 / fp16, identical in float32.
        inside = w.requires_grad
        y = S.rms_norm(x.float(), (x.shape[-1],), w if inside else None, eps, bits=bits)
        return y.to(torch.result_type(x, w)) if inside else w * y.to(x.dtype)
    # the others: (x̂ * scale) in float32, then x's dtype (Gemma's scale is 1 + w)
    scale = w.float() + spelling.offset if spelling.offset else w.float()
    inside = scale.requires_grad
    y = S.rms_norm(x.float(), (x.shape[-1],), scale if inside else None, eps, bits=bits)
    return (y if inside else y * scale).type_as(x)


def _dropout_forward(spec: CompressionSpec, module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return _dropout(spec, x, module.p, module.training, bool(getattr(module, "inplace", False)))


def _drop_path_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return S.drop_path(x, module.drop_prob, module.training, getattr(module, "scale_by_keep", True))


def _conv_forward(spec: CompressionSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _conv(spec, x, module.weight, module.bias, module.stride, module.padding, module.dilation,
                 module.groups)


def _timm_ln() -> tuple:
    try:
        from timm.layers import LayerNorm
    except ImportError:
        return ()
    return (LayerNorm.forward,)


def _patched_batch_norm(module: nn.modules.batchnorm._BatchNorm, spec: CompressionSpec, x):
    # Mirrors nn.BatchNorm's forward: input check, momentum / cumulative average and stats selection.
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    use_batch = module.training or (module.running_mean is None and module.running_var is None)
    return _batch_norm(
        spec, x,
        module.running_mean if not module.training or module.track_running_stats else None,
        module.running_var if not module.training or module.track_running_stats else None,
        module.weight, module.bias, use_batch, momentum, module.eps,
    )


def _switch_attention(module: nn.Module, state: _State) -> bool:
    """Route attention through SDPA, remembering how to undo it."""
    if hasattr(module, "fused_attn") and isinstance(module.fused_attn, bool):
        state.attrs.append((module, "fused_attn", module.fused_attn))
        module.fused_attn = True
        return True
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not hasattr(module, "set_attn_implementation"):
        return False
    listed = any(m.config is config for m in [*state.sdpa_models, *state.eager_models, *(m for m, _ in state.attn_impl)])
    if impl == "eager":
        with contextlib.suppress(ValueError, ImportError, AttributeError):
            module.set_attn_implementation("sdpa")
        if getattr(module.config, "_attn_implementation", None) != "sdpa":  # MPNet only logs its refusal
            if not listed:  # Gemma 2's softcapping: its softmax and products are compressed one by one
                state.eager_models.append(module)
            return False
        state.attn_impl.append((module, impl))
        return True
    if impl == "sdpa" and not listed:
        state.sdpa_models.append(module)  # already on SDPA: only compression_summary needs it
    return False


_UNRECORDED = "unrecorded"  # s2a's own forward, in a state pickled before it was recorded


class _Running(threading.local):
    """What the forwards now running in one thread are doing. Threads share a compressed model
    (a server's request threads, ``nn.DataParallel`` replicas) but not the function-mode stack,
    so each one enters its own mode and counts its own depth."""

    def __init__(self) -> None:
        self.mode: _CompressMode | None = None
        self.entered: list = []  # the modules whose _enter ran, innermost last (the depth)
        self.skipping: list = []  # the skipped modules whose _disable ran, innermost last
        self.paths: list = []  # module paths of the forwards now running
        self.trainable: set = set()  # storages of its trainable parameters (strict)


@dataclass
class _State:
    spec: CompressionSpec
    patched: list = field(default_factory=list)  # (module, kind, previous instance forward or None, ours)
    routed: list = field(default_factory=list)  # (module, kind): unpatched, its calls routed by the mode
    attrs: list = field(default_factory=list)
    attn_impl: list = field(default_factory=list)  # (transformers model, its own implementation)
    sdpa_models: list = field(default_factory=list)  # transformers models on SDPA before s2a
    eager_models: list = field(default_factory=list)  # transformers models that cannot switch to SDPA
    original_attn: int = 0  # depth of forwards that asked for attention weights (see _attn_hooks)
    attn_now: list = field(default_factory=list)  # (model, implementation) to go back to after them
    hub_kernels: list = field(default_factory=list)  # (transformers model, its kernels mode) turned off
    hooks: list = field(default_factory=list)
    uncovered_calls: set = field(default_factory=set)
    root: nn.Module | None = None  # the compressed model (a deepcopy's state holds the copy)
    running: _Running = field(default_factory=_Running)

    @property
    def disabled(self) -> int:
        """Depth of skipped subtrees now running in this thread."""
        return len(self.running.skipping)

    @property
    def paths(self) -> list:
        return self.running.paths

    @property
    def trainable(self) -> set:
        return self.running.trainable

    def __getstate__(self) -> dict:  # deepcopy / pickle: a copy starts with nothing running
        return {k: v for k, v in vars(self).items() if k != "running"}

    def __setstate__(self, values: dict) -> None:
        for key in ("depth", "disabled", "mode", "paths", "trainable"):  # pickled before _Running
            values.pop(key, None)
        values["patched"] = [entry if len(entry) == 4 else (*entry, _UNRECORDED)
                             for entry in values.get("patched", [])]
        for f in fields(self):  # added since it was pickled: its default (every field but spec has one)
            if f.name not in values and f.name != "running":
                values[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
        vars(self).update(values)
        self.running = _Running()

    attention_paths: frozenset = frozenset()  # paths of modules named like attention

    def in_attention(self) -> bool:
        """Whether an attention module is running: products of two activations are compressed
        there only (elsewhere a batched product may be of weights: MoE experts' gathered
        weights, a weight broadcast over a batch of one)."""
        return any(p in self.attention_paths for p in self.paths)

    def report(self, op: str) -> None:
        """Strict mode: ``op`` kept a full-precision activation in the innermost running module."""
        self.uncovered_calls.add(f"{self.paths[-1] if self.paths else '<root>'}: {op}")


_ATTENTION_WORDS = ("attention", "attn", "xca")  # BertSelfAttention, TalkingHeadAttn, XCiT's XCA...


def _names_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return any(w in name for w in _ATTENTION_WORDS)


def _check_skip(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Refuse a ``skip`` pattern that matches no module path: a typo would compress all."""
    paths = [p for p, _ in model.named_modules() if p]
    for pattern in patterns:
        if not any(_skipped(p, (pattern,)) for p in paths):
            raise ValueError(
                f"skip pattern {pattern!r} matches no module path of {type(model).__name__}; paths look like "
                f"{paths[:3]} (model.named_modules()), fnmatch wildcards allowed")


def _skipped(path: str, patterns: tuple[str, ...]) -> bool:
    parts = path.split(".") if path else []
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def compress_activations(
    model: nn.Module,
    bits: int = 4,
    ops: Iterable[str] | Mapping[str, int] | None = None,
    *,
    skip: Iterable[str] = (),
    strict: bool = False,
    attention_mode: str | None = None,
    dropout_mode: str = "regenerate",
) -> nn.Module:
    """Make ``model`` keep low-bit activations for backward, in place; returns ``model``.

    Args:
        bits: default bit width (1, 2, 3, 4 or 8; norms, softmax and attention take 2-8).
        ops: operator kinds to compress (default: all of ``OP_KINDS``), or a dict
            ``{kind: bits}``: only those kinds, each at its own width (kinds left out stay
            full precision; ``S2AConfig.op_bits`` instead overrides some kinds and keeps
            the rest at ``act_bits``).
        skip: ``fnmatch`` patterns of module paths left untouched (with their children).
        strict: raise :class:`UncoveredOperatorsError` listing operators that would keep
            full-precision activations, outside the ``skip`` subtrees: module classes now;
            at the end of each forward, as ``module: function``, the functional calls and
            native tensor ops (``x * gate``, ``q @ k^T``, ``x ** 2``, ``amax``...) whose
            autograd nodes saved an activation (see ``_keeps_activation``).
        attention_mode: ``"probs"`` (Q/K/V at 8 bits, probabilities at ``bits``) or
            ``"recompute"`` (Q/K/V at the attention bits, 8 unless ``ops`` says
            otherwise; probabilities recomputed). None: ``"recompute"``, see
            :meth:`CompressionSpec.attention_storage`.
        dropout_mode: ``"regenerate"`` (0 bytes) or ``"bitmask"`` (1 bit per element).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_activations expects an nn.Module, got {type(model).__name__}")
    refuse_compressed(model, "to change settings")
    spec = validate_compression(bits, ops, dropout_mode, attention_mode)
    if isinstance(skip, str):
        raise TypeError(f"skip must be a list of module path patterns (strings), got the string {skip!r}")
    skip = tuple(skip)  # (a generator is read once)
    if not all(isinstance(p, str) for p in skip):
        raise TypeError(f"skip must be a list of module path patterns (strings), got {skip!r}")
    spec.skip = skip
    spec.strict = strict
    _check_skip(model, spec.skip)
    state = _State(spec, root=model)
    try:
        _hub_kernels_off(model, state.hub_kernels)
        uncovered = _install(model, state)
    except BaseException:  # (even Ctrl-C) the model as it was: no patch, hook or kernels change left
        _undo(model, state)
        raise
    if strict and uncovered:
        _undo(model, state)
        raise UncoveredOperatorsError(
            "these modules keep full-precision activations and s2a cannot compress them "
            f"(pass skip=[...] to accept them): {uncovered}"
        )
    model._s2a_compression = state
    return model


def _install(model: nn.Module, state: _State) -> list[str]:
    """Patch, hook and switch what compress_activations compresses; returns the modules that
    keep full-precision activations and that s2a cannot compress."""
    spec, strict = state.spec, state.spec.strict
    state.attention_paths = frozenset((p or "<root>") for p, m in model.named_modules() if _names_attention(m))
    uncovered, replaced = [], []
    for path, module in model.named_modules():
        skipped = _skipped(path, spec.skip)
        if module is model or not skipped:
            # Every module outside skip enters the function mode (a no-op inside the root's
            # forward): activation checkpointing recomputes a block during backward, outside
            # the root's forward, and its functional calls must save what they saved the first
            # time. Marked as observers, so timm's fused MLP still fuses.
            where = path or "<root>"
            # prepended: a pre-hook of the user's that raises must not leave _exit unbalanced
            state.hooks.append(module.register_forward_pre_hook(
                observer_hook(partial(_enter, state, where)), prepend=True))
            state.hooks.append(module.register_forward_hook(observer_hook(partial(_exit, state)), always_call=True))
        if skipped:
            if path and module is not model:
                state.hooks.append(module.register_forward_pre_hook(partial(_disable, state), prepend=True))
                state.hooks.append(module.register_forward_hook(partial(_enable, state), always_call=True))
            continue
        lean_args = dict(act_kind=lambda m: (_module_op(m, spec) or (None,))[0],
                         skipped=lambda p: _skipped(p, spec.skip))
        lean = (lean_timm_forward(module, path, state, **lean_args)
                or lean_hf_forward(module, path, state, **lean_args))
        if lean is not None:  # its children are patched too: they still run inside it
            state.patched.append((module, lean[0], module.__dict__.get("forward"), lean[1]))
            module.forward = lean[1]
            if lean[0] != "attention":
                continue
        if spec.enabled("attention") and _switch_attention(module, state):
            continue
        # A forward replaced on the instance (accelerate's offload hooks, a user's wrapper) would
        # be lost: leave the module to the function mode, as lean_timm_forward does.
        if any(path.startswith(p) for p in replaced):  # inside a module whose forward no longer calls it
            continue
        found = None if "forward" in vars(module) else _module_op(module, spec)
        if found is not None:
            kind, fwd = found
            if spec.enabled(kind):
                state.patched.append((module, kind, module.__dict__.get("forward"), fwd))
                module.forward = fwd
                if kind == "star_relu":  # its own nn.ReLU child does not run any more
                    replaced.append(f"{path}.")
            continue
        routed = _ROUTED_KINDS.get(_forward_owner(module))
        if routed is not None and spec.enabled(routed) and "forward" not in vars(module):
            state.routed.append((module, routed))
        name = type(module).__name__
        leaf = not any(True for _ in module.children())
        if isinstance(module, nn.MultiheadAttention):  # its functional core runs natively
            uncovered.append(f"{path or '<root>'}: {name}")
        elif (leaf and any(w.lower() in name.lower() for w in _SUSPECT_WORDS)
              and _forward_owner(module) not in _COVERED_BY_MODE):
            if _runs_torch_forward(module):  # nn.ELU, nn.GroupNorm, nn.PReLU...: known
                uncovered.append(f"{path or '<root>'}: {name}")
            elif strict:  # Python code: what it keeps is seen when it runs (see _suspect_hook)
                state.hooks.append(module.register_forward_pre_hook(partial(_suspect_hook, state, name)))
    if state.attn_impl:
        _attn_hooks(model, state)
    return uncovered


def _hub_kernels_off(model: nn.Module, turned_off: list[tuple[nn.Module, object]]) -> None:
    """Turn off transformers' hub kernels (``use_kernels``, on by default in ``from_pretrained``
    since transformers 5 where the ``kernels`` package is installed) on every model inside
    ``model``, appending (model, its kernels mode) to ``turned_off`` as it goes: what
    :func:`restore`, or a compression that fails, turns back on. While they
    are on, each change of ``model.train()`` / ``eval()`` kernelizes again, which deletes the
    instance forward of every ``use_kernel_forward_from_hub`` module (LLaMA's RMSNorm, the
    activation modules): the forwards s2a patches there, silently (an RMSNorm kept its full
    input again after one ``eval()`` / ``train()``). The operators they would run are the ones s2a
    replaces anyway."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) is True and callable(getattr(module, "reset_kernels", None)):
            mode = getattr(module, "kernels_mode", None)
            module.reset_kernels()
            turned_off.append((module, mode))


def _attn_hooks(model: nn.Module, state: _State) -> None:
    """A forward of a transformers model that asks for the attention weights
    (``output_attentions=True``, or its config's) runs with the attention implementation the
    model had before s2a switched it to SDPA, which returns none: the weights must exist
    anyway, so SDPA would save nothing, and they are returned as without s2a. The switch
    back to SDPA follows the forward."""
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            state.hooks.append(module.register_forward_pre_hook(
                partial(_attn_enter, state), with_kwargs=True))
            state.hooks.append(module.register_forward_hook(
                partial(_attn_exit, state), always_call=True))


_OUTPUT_ATTENTIONS_AT: dict[type, int | None] = {}  # its positional index in forward, by class


def _output_attentions_at(module: nn.Module) -> int | None:
    cls = type(module)
    if cls not in _OUTPUT_ATTENTIONS_AT:
        try:
            names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
        except (TypeError, ValueError):
            names = []
        _OUTPUT_ATTENTIONS_AT[cls] = names.index("output_attentions") if "output_attentions" in names else None
    return _OUTPUT_ATTENTIONS_AT[cls]


def _asks_attentions(module: nn.Module, args, kwargs) -> bool:
    asked = kwargs.get("output_attentions")
    if asked is None:
        at = _output_attentions_at(module)
        if at is not None and len(args) > at:
            asked = args[at]
    if asked is None:
        asked = getattr(module.config, "output_attentions", False)
    return bool(asked)


def _attn_enter(state: _State, module, args, kwargs):
    if state.original_attn or _asks_attentions(module, args, kwargs):
        if state.original_attn == 0:
            state.attn_now = [(m, m.config._attn_implementation) for m, _impl in state.attn_impl]
            for m, impl in state.attn_impl:
                if m.config._attn_implementation != impl:
                    m.set_attn_implementation(impl)
        state.original_attn += 1


def _attn_exit(state: _State, module, args, output):
    # always_call: the outermost forward that switched (it counts itself) switches back to
    # what was set before it (SDPA, or what the user set since)
    if state.original_attn:
        state.original_attn -= 1
        if state.original_attn == 0:
            for m, impl in state.attn_now:
                if m.config._attn_implementation != impl:
                    m.set_attn_implementation(impl)
            state.attn_now = []


def _enter(state: _State, path: str, module, args):
    run = state.running
    if path == "<root>" and module is not state.root and state.root is not None:
        raise RuntimeError(
            "this model was compressed by s2a and then copied without its compression state "
            "(nn.DataParallel's replicas, copy.copy): the copy would run s2a's patched forwards on "
            "the original's weights. Use DistributedDataParallel (torchrun) or one device, and "
            "copy.deepcopy for copies"
        )
    if path == "<root>" and run.entered:  # a forward left without its exit (Ctrl-C): start afresh
        _clear_running(state)
    if not run.entered:
        if run.mode is None:
            run.mode = _CompressMode(state)
        run.mode.__enter__()
        if state.spec.strict:  # what a trainable weight keeps is not an activation s2a could store
            run.trainable = {p.untyped_storage().data_ptr() for p in module.parameters()
                             if p.requires_grad}
    run.entered.append(module)
    run.paths.append(path)


def _exit(state: _State, module, args, output):
    run = state.running
    if not run.entered or run.entered[-1] is not module:
        return  # its _enter never ran: a forward pre-hook before it raised
    run.entered.pop()
    run.paths.pop()
    if not run.entered:
        run.mode.__exit__(None, None, None)
        run.trainable = set()
        PR.clear_tags()
        if state.spec.strict and state.uncovered_calls:
            calls = sorted(state.uncovered_calls)
            state.uncovered_calls.clear()
            raise UncoveredOperatorsError(
                "the forward pass called functions that keep full-precision activations "
                f"(module: function): {calls}; add those modules to skip=[...], or pass "
                "strict=False to accept them"
            )


def _clear_running(state: _State) -> None:
    """Forget this thread's forwards that never exited (a KeyboardInterrupt skips the exit
    hooks that an exception runs), taking their mode off the stack if it is on top."""
    run = state.running
    stack = _get_current_function_mode_stack()
    if run.entered and run.mode is not None and stack and stack[-1] is run.mode:
        run.mode.__exit__(None, None, None)
    run.entered, run.skipping, run.paths, run.trainable = [], [], [], set()
    PR.clear_tags()


def _disable(state: _State, module, args):
    state.running.skipping.append(module)


def _enable(state: _State, module, args, output):
    run = state.running
    if run.skipping and run.skipping[-1] is module:  # (not when a pre-hook before _disable raised)
        run.skipping.pop()


def _undo(model: nn.Module, state: _State) -> None:
    replaced = []
    for module, kind, previous, ours in state.patched:
        if ours is not _UNRECORDED and module.__dict__.get("forward") is not ours:  # replaced since: kept
            replaced.append(kind)
        elif previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    for obj, attr, old in state.attrs:
        setattr(obj, attr, old)
    for module, impl in state.attn_impl:
        module.set_attn_implementation(impl)
    for h in state.hooks:
        h.remove()
    _clear_running(state)
    for module, mode in state.hub_kernels:
        try:  # in the mode of now: train() / eval() since changed it while the kernels were off
            if mode is not None:
                Mode = type(mode)  # kernels.Mode (transformers' dependency, not ours)
                now = Mode.TRAINING if module.training else Mode.INFERENCE
                mode = now | Mode.TORCH_COMPILE if Mode.TORCH_COMPILE in mode else now
            module.set_use_kernels(True, mode=mode)
        except Exception as exc:  # (a hub kernel that cannot be fetched now): the torch forwards stay
            warnings.warn(f"restore: could not turn transformers' hub kernels back on for "
                          f"{type(module).__name__} ({type(exc).__name__}: {exc}); it runs its torch forwards",
                          RuntimeWarning, stacklevel=3)
    if replaced:
        warnings.warn(
            f"restore: {len(replaced)} module forward(s) patched by s2a ({sorted(set(replaced))}) were "
            "replaced since by something else (a wrapper, accelerate's hooks) and are left as they are: "
            "they may still call s2a's compressed forward",
            RuntimeWarning,
            stacklevel=3,
        )


def _compressed_in(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of ``model`` and its submodules that hold a compression (read from the
    instance: peft's and DDP's wrappers forward attribute reads to the model they hold)."""
    return [(p or "<root>", m) for p, m in model.named_modules() if vars(m).get("_s2a_compression") is not None]


def refuse_compressed(model: nn.Module, why: str) -> None:
    """Raise if ``model`` or one of its submodules is compressed already."""
    done = _compressed_in(model)
    if done or getattr(model, "_s2a_compression", None) is not None:  # (a wrapper that forwards it)
        where = f" (its submodule {done[0][0]})" if done and done[0][0] != "<root>" else ""
        raise RuntimeError(f"model is already compressed{where}; call s2a.restore(model) first {why}")


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compress_activations` on ``model`` and on any of its submodules it was
    applied to (a peft or DDP wrapper around a compressed model); a no-op where there is none.
    Also clears what a forward interrupted by Ctrl-C left running in this thread."""
    for _path, module in _compressed_in(model):
        state = vars(module)["_s2a_compression"]
        _undo(module, state)
        del module._s2a_compression
    return model


def _batch_norm_keeps_nothing(module: nn.Module) -> bool:
    """Whether a BatchNorm runs as a per-channel affine map that keeps nothing of its input:
    its weight frozen, and on its running statistics (eval mode, or a forward pre-hook marked
    ``keeps_running_stats``, as ``s2a.apply``'s frozen statistics are)."""
    weight = getattr(module, "weight", None)
    if (isinstance(weight, torch.Tensor) and weight.requires_grad) or getattr(module, "running_mean", None) is None:
        return False
    return not module.training or any(getattr(h, "keeps_running_stats", False)
                                      for h in module._forward_pre_hooks.values())


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper runs: the wrapper's parameter, state-dict and
    module names carry an ``_orig_mod.`` prefix that the names s2a recorded do not."""
    while type(model).__name__ == "OptimizedModule" and isinstance(model._modules.get("_orig_mod"), nn.Module):
        model = model._modules["_orig_mod"]
    return model


def compression_summary(model: nn.Module) -> dict[str, str]:
    """Module path -> ``"kind@storage"`` for every patched module of a compressed model.

    ``storage`` is what the operator keeps for backward, as of now: a bit width per element
    (ReLU-type functions always 1, exact; ``drop_path`` 1 bit per sample; attention the
    width of Q/K/V; ``max_pool`` 8 bits per output element, 16 for windows of over 256
    elements), ``seed`` (dropout regenerating its mask), ``none`` (a convolution whose
    weight is frozen keeps no input, nor does a BatchNorm with a frozen weight on its running
    statistics; average pooling keeps nothing) or ``native`` (a
    convolution with a trainable weight keeps its full-precision input, as PyTorch does) or
    ``unfused`` (a fused block, MLP or experts, whose weights train since, or that peft wrapped
    or a hook watches: it runs its own forward, each operator inside as listed).
    ``attention:eager`` names a transformers model whose attention cannot run on SDPA (Gemma 2's
    logit softcapping): its softmax is compressed at the width given, its products at
    ``matmul``'s, call by call.
    """
    model = unwrap_compiled(model)  # a torch.compile wrapper: the eager paths
    state = getattr(model, "_s2a_compression", None)
    if state is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    spec = state.spec

    def storage(kind: str, module: nn.Module) -> str | int:
        op = kind.split(":")[-1]
        if kind == "attention":
            return spec.attention_storage()[1]
        if kind == "attention:eager":
            return spec.bits_for("softmax") if spec.enabled("softmax") else "native"
        if kind.startswith(("gated_mlp", "moe_experts", "frozen_mlp")) and runs_own_forward(module):
            return "unfused"
        if kind.startswith(("gated_mlp", "moe_experts")):
            return "input"
        if op in S.EXACT_FUNCTIONS or op == "drop_path":
            return 1
        if op == "dropout":
            return 1 if spec.dropout_mode == "bitmask" else "seed"
        if op == "max_pool":
            d = _pool_dims(module, _MAX_POOLS)
            return P.code_bits(math.prod(P._ints(module.kernel_size, d, "kernel_size")))
        if op == "avg_pool":
            return "none"
        if op == "conv":
            weight = getattr(module, "weight", None)
            return "native" if isinstance(weight, torch.Tensor) and weight.requires_grad else "none"
        if op == "batch_norm" and _batch_norm_keeps_nothing(module):
            return "none"
        return spec.bits_for(op)

    entries = [(m, k) for m, k, _, _ in state.patched] + state.routed
    # attention that runs through SDPA by a flag, a transformers implementation switch, or
    # a transformers model's own choice of SDPA
    entries += [(m, "attention") for m, attr, _ in state.attrs if attr == "fused_attn"]
    entries += [(m, "attention") for m, _ in state.attn_impl] + [(m, "attention") for m in state.sdpa_models]
    entries += [(m, "attention:eager") for m in state.eager_models]
    return {names.get(id(m), "?"): f"{k}@{storage(k, m)}" for m, k in entries}
