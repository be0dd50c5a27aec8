"""Pooling that keeps (almost) nothing for backward.

* Max pooling (1-3 spatial dims): natively autograd keeps the whole input and one int64
  index per output element. Backward needs only where each window's maximum was, so
  :func:`max_pool` keeps that position *inside the window*: one uint8 per output element
  (kernels of up to 256 elements; int16 up to 32768, else int32). Forward is the native
  ``max_pool*d_with_indices`` (same output, same argmax: ties, NaN and padding as
  natively); backward rebuilds the int64 flat input indices from the output grid and
  the stored positions and hands them to the native backward op, which scatter-adds the
  gradient into zeros of the input's shape: overlapping windows accumulate exactly as
  natively, on every device and dtype (``scatter_add_`` would not: on CPU it rounds
  bf16 / fp16 sums differently, on CUDA it adds atomically, in no fixed order).
* Maxima over dimensions (Hiera's unit pooling, ``x.view(B, 4, -1, C).amax(1)`` in timm,
  ``.max(dim=1).values`` in transformers): :func:`amax` keeps 1 bit per input element (where
  the maxima are; ties split the gradient as natively), :func:`max_along` the argmax in
  uint8 rather than int64 (natively amax keeps input and output).
* Average pooling (plain and adaptive): backward needs only the input's shape.
  :func:`avg_pool` / :func:`adaptive_avg_pool` keep nothing and call the native backward
  ops with a stand-in for the input, made at backward time, which those kernels never
  read (:func:`_stand_in`). An adaptive pool to size 1 is a native mean, which keeps
  nothing already, and runs natively.

Calls whose input needs no gradient run natively. Inside the autograd Functions every
call goes through ``torch.ops.aten``, which the function mode of :mod:`.apply` does not
route (nor report in strict mode).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._once import once_differentiable
from .functional import _needs_grad
from .packing import pack, unpack

_aten = torch.ops.aten
_INT32_LIMIT = 2**31


def _ints(v: Any, d: int, what: str) -> list[int]:
    if isinstance(v, (tuple, list, torch.Size)):
        v = [int(t) for t in v]
        if len(v) == 1:
            return v * d
        if len(v) != d:
            raise RuntimeError(f"{what} must be an int or a tuple of {d} ints, got {v}")
        return v
    return [int(v)] * d


def code_bits(volume: int) -> int:
    """Bits per output element that max pooling keeps for a window of ``volume`` elements."""
    return 8 if volume <= 256 else 16 if volume <= 32768 else 32


def _code_dtype(volume: int) -> torch.dtype:
    return {8: torch.uint8, 16: torch.int16, 32: torch.int32}[code_bits(volume)]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout ATen's pooling gives its output and gradient (``suggest_memory_format``)."""
    if x.dim() not in (4, 5):
        return torch.contiguous_format
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # older torch: exact channels_last strides only
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return fmt if x.is_contiguous(memory_format=fmt) and not x.is_contiguous() else torch.contiguous_format
    return suggest_memory_format(x)


def _grid(out: int, stride: int, pad: int, dim: int, nd: int, device) -> torch.Tensor:
    """Window starts along spatial dim ``dim`` (of ``nd``), shaped to broadcast over (N, C, *out)."""
    start = torch.arange(out, device=device, dtype=torch.int64) * stride - pad
    return start.view((out,) + (1,) * (nd - 1 - dim))


def _stand_in(g: torch.Tensor, shape, fmt: torch.memory_format) -> torch.Tensor:
    """What the native pooling backward ops take for the input: they read its shape, dtype
    and layout (the gradient's layout follows it), never its values. On CPU, for a
    contiguous input, a zero-stride expanded scalar (no memory); else an uninitialised
    tensor in the input's layout (CUDA kernels make the input contiguous first)."""
    if fmt == torch.contiguous_format and g.device.type == "cpu":
        return g.new_zeros(()).expand(shape)
    return torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=fmt)


def _window_positions(idx, in_sz, out_sz, kernel, stride, padding, dilation) -> torch.Tensor:
    """Row-major position inside its window (0 .. kernel volume - 1) of each flat input
    index ``idx`` (N, C, *out) that native max pooling returns."""
    d = len(kernel)
    steps = [math.prod(in_sz[i + 1:]) for i in range(d)]  # input strides, per plane
    mults = [math.prod(kernel[i + 1:]) for i in range(d)]  # window strides
    # window start per output position, in window-stride units: sum_i start_i * mults_i
    base = sum(_grid(out_sz[i], stride[i], padding[i], i, d, idx.device) * mults[i] for i in range(d))
    if all(v == 1 for v in dilation):
        # With coordinates c_i of idx, the position is sum_i (c_i - start_i) * mults_i, and
        # c_i = q_i - in_i * q_(i-1) with q_i = idx // steps_i, so
        #   sum_i c_i * mults_i = idx + sum_(i < d-1) q_i * (mults_i - in_(i+1) * mults_(i+1)):
        # d - 1 divisions, in int32 where the values fit (about 3x faster than int64).
        small = math.prod(in_sz) * math.prod(kernel) < _INT32_LIMIT
        flat = idx.int() if small else idx
        code = flat
        for i in range(d - 1):
            code = torch.add(code, flat.div(steps[i], rounding_mode="floor"),
                             alpha=mults[i] - in_sz[i + 1] * mults[i + 1])
        return code - base.to(flat.dtype)
    code = None
    rem = idx
    for i in reversed(range(d)):
        if i > 0:
            coord = rem % in_sz[i]
            rem = rem.div(in_sz[i], rounding_mode="floor")
        else:
            coord = rem
        k = coord - _grid(out_sz[i], stride[i], padding[i], i, d, idx.device)
        if dilation[i] != 1:
            k = k.div(dilation[i], rounding_mode="floor")
        code = k if code is None else code.add_(k.mul_(mults[i]))
    return code


def _own(y: torch.Tensor, d: int) -> torch.Tensor:
    """``y`` as a tensor of its own: ATen's 1d pooling returns a view of its 2d result, and a
    view made inside an autograd Function cannot be modified in place (an ``inplace=True``
    activation after the pooling would raise). Under torch.compile by the dimension alone:
    ``_is_view`` breaks the graph."""
    if torch.compiler.is_compiling():
        return y.clone() if d == 1 else y
    return y.clone() if y._is_view() else y


class _MaxPool(torch.autograd.Function):
    """Max pooling over the trailing ``d`` dims of (N, C, *spatial) input; keeps the argmax's
    position inside its window, one small integer per output element."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode: bool):
        d = len(kernel)
        native = (_aten.max_pool1d_with_indices, _aten.max_pool2d_with_indices,
                  _aten.max_pool3d_with_indices)[d - 1]
        y, idx = native(x, kernel, stride, padding, dilation, ceil_mode)
        y = _own(y, d)
        in_sz, out_sz = list(x.shape[2:]), list(y.shape[2:])
        ctx.save_for_backward(_window_positions(idx, in_sz, out_sz, kernel, stride, padding,
                                                dilation).to(_code_dtype(math.prod(kernel))))
        ctx.meta = (x.shape, in_sz, kernel, stride, padding, dilation, ceil_mode, _memory_format(x))
        return y

    @staticmethod
    @once_differentiable  # the gradient is a scatter of g: refuse double backward
    def backward(ctx, g):
        (code,) = ctx.saved_tensors
        shape, in_sz, kernel, stride, padding, dilation, ceil_mode, fmt = ctx.meta
        d = len(kernel)
        out_sz = list(g.shape[2:])
        # flat input index = base (window start, per output position) + offset (per code)
        steps = [math.prod(in_sz[i + 1:]) for i in range(d)]
        offset = torch.zeros((), dtype=torch.int64, device=g.device)
        base = torch.zeros((), dtype=torch.int64, device=g.device)
        for i in range(d):
            k = torch.arange(kernel[i], dtype=torch.int64, device=g.device) * (dilation[i] * steps[i])
            offset = offset.unsqueeze(-1) + k
            base = base + _grid(out_sz[i], stride[i], padding[i], i, d, g.device) * steps[i]
        idx = offset.reshape(-1).index_select(0, code.reshape(-1).int()).view(code.shape)
        idx = idx.add_(base)
        if d == 1:  # as ATen: (N, C, L) pooled as (N, C, 1, L)
            shape, g, idx = (*shape[:2], 1, shape[2]), g.unsqueeze(-2), idx.unsqueeze(-2)
            kernel, stride, padding, dilation = ([1, *v] for v in (kernel, stride, padding, dilation))
            padding[0] = 0
        fn = (_aten.max_pool2d_with_indices_backward if len(shape) == 4
              else _aten.max_pool3d_with_indices_backward)
        gx = fn(g, _stand_in(g, shape, fmt), kernel, stride, padding, dilation, ceil_mode, idx)
        return (gx.squeeze(-2) if d == 1 else gx), None, None, None, None, None


def max_pool(
    x: torch.Tensor, d: int, kernel_size: Any, stride: Any = None, padding: Any = 0,
    dilation: Any = 1, ceil_mode: bool = False,
) -> torch.Tensor:
    """``F.max_pool{d}d`` (without ``return_indices``) keeping one uint8 per output element
    (the argmax's position in its window) instead of the input and int64 indices."""
    native = (torch.max_pool1d, torch.max_pool2d, torch.max_pool3d)[d - 1]
    if stride is None:
        stride = []
    if not _needs_grad(x) or x.numel() == 0 or x.dim() not in (d + 1, d + 2):
        return native(x, kernel_size, stride, padding, dilation, ceil_mode)
    kernel = _ints(kernel_size, d, "kernel_size")
    strides = _ints(stride, d, "stride") if (not isinstance(stride, (list, tuple)) or stride) else kernel
    unbatched = x.dim() == d + 1
    y = _MaxPool.apply(x.unsqueeze(0) if unbatched else x, kernel, strides,
                       _ints(padding, d, "padding"), _ints(dilation, d, "dilation"), bool(ceil_mode))
    return y.squeeze(0) if unbatched else y


# ------------------------------------------------------------------ maxima over dimensions
def _dims(dim: Any, ndim: int) -> tuple[int, ...] | None:
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    if not dims or not all(isinstance(d, int) and -ndim <= d < ndim for d in dims):
        return None
    dims = tuple(sorted({d % ndim for d in dims}))
    return dims


class _AmaxMaxPool(torch.autograd.Function):  # (the name files it under max_pool)
    @staticmethod
    def forward(ctx, x, dims: tuple[int, ...], keepdim: bool):
        out = _aten.amax(x, dims, True)
        # where each maximum is, ties all: 1 bit per input element (exact, as native splits
        # the gradient among ties)
        ctx.save_for_backward(pack(_aten.eq(x, out), 1))
        ctx.meta = (x.shape, dims, keepdim)
        return out if keepdim else _aten.squeeze(out, dims)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, dims, keepdim = ctx.meta
        mask = unpack(packed, 1, math.prod(shape)).view(shape).bool()
        if not keepdim:
            for d in dims:
                g = g.unsqueeze(d)
        # native's order: the gradient divided by the (int64) count of maxima, times the mask
        return g / mask.sum(dims, keepdim=True) * mask, None, None


def amax(x: torch.Tensor, dim: Any = (), keepdim: bool = False) -> torch.Tensor:
    """``torch.amax`` over given dimensions (Hiera's unit max pooling) keeping 1 bit per input
    element, where the maxima are, instead of the input and the output. Exact."""
    dims = _dims(dim, x.dim())
    if dims is None or not _needs_grad(x) or x.numel() == 0 or not x.is_floating_point():
        return torch.amax(x, dim, keepdim)
    return _AmaxMaxPool.apply(x, dims, bool(keepdim))


class _MaxPoolAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, keepdim: bool):
        values, indices = _aten.max(x, dim, keepdim)
        ctx.mark_non_differentiable(indices)
        # the argmax along ``dim`` in the smallest integer type that holds it, not int64
        ctx.save_for_backward(indices.to(_code_dtype(x.shape[dim])))
        ctx.meta = (x.shape, dim, keepdim)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _):
        (idx,) = ctx.saved_tensors
        shape, dim, keepdim = ctx.meta
        idx = idx.long()
        if not keepdim:
            g, idx = g.unsqueeze(dim), idx.unsqueeze(dim)
        return g.new_zeros(shape).scatter_(dim, idx, g), None, None


def max_along(x: torch.Tensor, dim: int, keepdim: bool = False):
    """``torch.max(x, dim)``: (values, indices), keeping the argmax in uint8 (int16 / int32 for
    dimensions over 256 / 32768) instead of int64. Exact."""
    dims = _dims(dim, x.dim())
    if dims is None or not _needs_grad(x) or x.numel() == 0 or not x.is_floating_point():
        return torch.max(x, dim, keepdim)
    values, indices = _MaxPoolAlongDim.apply(x, dims[0], bool(keepdim))
    return torch.return_types.max((values, indices))


class _AvgPool(torch.autograd.Function):
    """Plain (``adaptive`` False) or adaptive average pooling of (N, C, *spatial) input,
    1d run as 2d as ATen does; keeps nothing."""

    @staticmethod
    def forward(ctx, x, adaptive: bool, params: tuple):
        d = x.dim() - 2
        if adaptive:
            y = (_aten.adaptive_avg_pool1d, _aten.adaptive_avg_pool2d,
                 _aten.adaptive_avg_pool3d)[d - 1](x, *params)
        else:
            y = (_aten.avg_pool1d, _aten.avg_pool2d, _aten.avg_pool3d)[d - 1](x, *params)
        ctx.meta = (x.shape, _memory_format(x), adaptive, params)
        return _own(y, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        shape, fmt, adaptive, params = ctx.meta
        d = len(shape) - 2
        one_d = d == 1
        if one_d:  # as ATen: (N, C, L) pooled as (N, C, 1, L)
            shape, g = (*shape[:2], 1, shape[2]), g.unsqueeze(-2)
        stand_in = _stand_in(g, shape, fmt)
        if adaptive:
            fn = (_aten._adaptive_avg_pool2d_backward if len(shape) == 4
                  else _aten._adaptive_avg_pool3d_backward)
            gx = fn(g, stand_in)
        else:
            k, s, p, ceil_mode, count_include_pad, *divisor = params
            if one_d:
                k, s, p = [1, *k], [1, *s], [0, *p]
            fn = _aten.avg_pool2d_backward if len(shape) == 4 else _aten.avg_pool3d_backward
            gx = fn(g, stand_in, k, s, p, ceil_mode, count_include_pad,
                    divisor[0] if divisor else None)
        return gx.squeeze(-2) if one_d else gx, None, None


def avg_pool(
    x: torch.Tensor, d: int, kernel_size: Any, stride: Any = None, padding: Any = 0,
    ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None,
) -> torch.Tensor:
    """``F.avg_pool{d}d`` keeping nothing for backward (natively: the whole input)."""
    if stride is None:
        stride = []
    if d == 1:
        if divisor_override is not None:
            raise TypeError("avg_pool1d() takes no divisor_override")
        extra: tuple = ()
        native = (torch.avg_pool1d, kernel_size, stride, padding, ceil_mode, count_include_pad)
    else:
        extra = (divisor_override,)
        native = ((F.avg_pool2d, F.avg_pool3d)[d - 2], kernel_size, stride, padding, ceil_mode,
                  count_include_pad, divisor_override)
    if not _needs_grad(x) or x.numel() == 0 or x.dim() not in (d + 1, d + 2):
        return native[0](x, *native[1:])
    kernel = _ints(kernel_size, d, "kernel_size")
    strides = _ints(stride, d, "stride") if (not isinstance(stride, (list, tuple)) or stride) else kernel
    params = (kernel, strides, _ints(padding, d, "padding"), bool(ceil_mode), bool(count_include_pad),
              *extra)
    unbatched = x.dim() == d + 1
    y = _AvgPool.apply(x.unsqueeze(0) if unbatched else x, False, params)
    return y.squeeze(0) if unbatched else y


def adaptive_avg_pool(x: torch.Tensor, d: int, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool{d}d`` keeping nothing for backward (natively: the whole input,
    except for output size 1, a mean, which runs natively)."""
    native = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1]
    if not _needs_grad(x) or x.numel() == 0 or x.dim() not in (d + 1, d + 2):
        return native(x, output_size)
    sizes = output_size if isinstance(output_size, (tuple, list, torch.Size)) else [output_size]
    sizes = [x.shape[x.dim() - d + i] if v is None else int(v) for i, v in enumerate(
        list(sizes) * d if len(sizes) == 1 else sizes)]
    if len(sizes) != d or all(v == 1 for v in sizes):
        return native(x, output_size)
    unbatched = x.dim() == d + 1
    y = _AvgPool.apply(x.unsqueeze(0) if unbatched else x, True, (sizes,))
    return y.squeeze(0) if unbatched else y
