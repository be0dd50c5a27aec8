"""Measure the memory of one training step: saved-for-backward bytes, breakdowns, peak.

:func:`measure` runs the step twice on the same batch with the same RNG state:

* **Run A (instrumented)**: forward + loss under ``torch.autograd.graph.saved_tensors_hooks``.
  The pack hook records every saved tensor's storage (``untyped_storage().data_ptr()`` and
  device; each storage counts once, with its full ``nbytes``), skipping storages of the model's
  parameters and buffers, and the module path on top of a stack kept by forward pre/post hooks.
  Then the autograd graph is walked from the loss: each node's saved tensors are unpacked
  (``_saved_*`` attributes of built-in nodes, ``saved_tensors`` of custom Function nodes) while
  the node is "current", so the unpack hook learns which node owns each packed token. The graph
  is then dropped without a backward.
* **Run B (allocator)**: a plain forward + loss without any hook, where the allocator's live
  bytes are read before and after (the cross-check), then the backward (peak), gradients, and
  optionally an optimizer step. The peak is exact on CUDA (the caching allocator's counters)
  and on CPU (the profiler's allocation events); only the fallback CPU probe (glibc counters,
  when a profiler is already running) samples it, between autograd nodes. With an optimizer,
  its state is allocated at the start of the window, so the peak is that of a steady-state
  step (any step but the first), state alive throughout.

Everything observable about the model is restored afterwards: hooks, ``.grad`` (of parameters
and of batch tensors), buffers (the same tensor objects, with their values: BatchNorm running
statistics), parameters (after an optimizer step), ``training`` and ``requires_grad`` flags, and
the global RNG state.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from s2a.activations.mlp import observer_hook
from s2a.memory.allocator import AllocatorProbe, probe_for
from s2a.memory.kinds import COMPILED_KIND, custom_origin, kind_from_class_name, node_kind
from s2a.memory.report import MemoryReport, format_bytes

__all__ = ["default_loss", "measure", "storage_key"]

ROOT_PATH = "<root>"
LOSS_PATH = "<loss>"
OUTSIDE_PATH = "<outside>"
OTHER_KIND = "other"

StorageKey = tuple[Any, ...]
LossFn = Callable[[Any, Any], torch.Tensor]


# ---------------------------------------------------------------------------- tensor helpers
def storage_key(t: torch.Tensor) -> tuple[StorageKey, int]:
    """``(key, nbytes)`` of the storage under ``t``: two views of one storage share the key.
    A tensor held in several storages (sparse indices and values, a tensor subclass such as a
    jagged nested tensor) gets a key made of theirs, and their bytes summed; see
    :func:`_storages`. A tensor whose storage cannot be read is keyed by ``id(t)``, valid only
    while ``t`` lives."""
    parts = _storages(t)
    if len(parts) == 1 and parts[0][0] is not None:
        return parts[0][0], parts[0][1]
    keys = [key if key is not None else ("tensor", id(leaf)) for key, _, leaf in parts]
    return ("parts", *keys), sum(n for _, n, _ in parts)


def _storages(t: torch.Tensor) -> list[tuple[StorageKey | None, int, torch.Tensor]]:
    """``(key, nbytes, leaf)`` for each storage holding ``t``'s data, ``leaf`` the plain tensor
    viewing it: ``t`` itself, the index and value tensors of a sparse tensor, the inner tensors
    of a wrapper subclass (``__tensor_flatten__``: a jagged nested tensor's values and offsets,
    TwoTensor's two halves), whose own storage holds no data. Storages without memory (the meta
    device, fake tensors) are told apart by their storage object, not their address. Key None:
    the storage cannot be read (an odd subclass); ``nbytes`` is then the tensor's own size."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)
        parts = [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
        return parts or [(None, t.numel() * t.element_size(), t)]  # no inner tensor to read
    if t.layout != torch.strided and not t.is_nested:
        parts = _sparse_parts(t)
        if parts:
            return [s for p in parts for s in _storages(p)]
    try:
        storage = t.untyped_storage()
        nbytes = int(storage.nbytes())
        ptr = int(storage.data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return [(None, t.numel() * t.element_size(), t)]
    if nbytes == 0:
        return [(("empty",), 0, t)]
    if ptr == 0:
        return [((t.device.type, t.device.index, "storage", storage._cdata), nbytes, t)]
    return [((t.device.type, t.device.index, ptr), nbytes, t)]


def _storage_keys(tensors: Iterable[torch.Tensor]) -> set[StorageKey]:
    return {key for t in tensors for key, _, _ in _storages(t) if key is not None}


class _Preexisting:
    """The storages alive before the step that the graph may keep (batch tensors, plain tensor
    attributes of modules), with weak references to the tensors holding them. A key counts only
    while one of them lives: a forward that rebinds an attribute (``self.cache = ...``) frees the
    old storage, and an activation allocated at its address must not pass for preexisting. (A
    strong reference would keep the old storage alive and raise the measured peak.)"""

    def __init__(self, tensors: Iterable[torch.Tensor], excluded: set[StorageKey]) -> None:
        self._refs: dict[StorageKey, list[weakref.ref]] = {}
        for t in tensors:  # t itself, not its parts: a sparse tensor's are made per call
            for key, _, _ in _storages(t):
                if key is not None and key not in excluded:
                    self._refs.setdefault(key, []).append(weakref.ref(t))

    def __contains__(self, key: object) -> bool:
        return any(r() is not None for r in self._refs.get(key, ()))  # type: ignore[arg-type]

    def live_keys(self) -> set[StorageKey]:
        return {key for key in self._refs if key in self}


def _sparse_parts(t: torch.Tensor) -> list[torch.Tensor]:
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []


def _iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside nested tuples/lists/dicts/ModelOutputs/dataclass-like objects."""
    if _depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v, _depth + 1)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _iter_tensors(v, _depth + 1)
    elif hasattr(obj, "get_seq_length"):
        # a transformers KV cache (a forward with use_cache on): its layers' keys and values,
        # an encoder-decoder's two caches
        for layer in getattr(obj, "layers", None) or ():
            for name in ("keys", "values"):
                yield from _iter_tensors(getattr(layer, name, None), _depth + 1)
        for name in ("self_attention_cache", "cross_attention_cache"):
            yield from _iter_tensors(getattr(obj, name, None), _depth + 1)
    elif hasattr(obj, "logits") or hasattr(obj, "last_hidden_state"):
        for name in ("loss", "logits", "last_hidden_state", "pooler_output"):
            v = getattr(obj, name, None)
            if v is not None:
                yield from _iter_tensors(v, _depth + 1)


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def default_loss(output: Any, batch: Any = None) -> torch.Tensor:
    """The loss used when :func:`measure` gets none.

    ``output.loss`` if the model computed one; otherwise the sum over every floating-point
    output tensor that requires grad (``logits``, ``last_hidden_state``, ``pooler_output``,
    plain tensors, nested tuples...) of ``mean(t ** 2)``: deterministic, and its gradient
    reaches every output, hence every trainable parameter that influences one. (Its ``pow``
    saves each output tensor: that cost is reported under module ``<loss>``.)
    """
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    tensors = [t for t in _unique(_iter_tensors(output)) if t.is_floating_point() or t.is_complex()]
    with_grad = [t for t in tensors if t.requires_grad]
    chosen = with_grad or tensors
    if not chosen:
        raise TypeError(
            f"default_loss: no floating-point tensor in the model output ({type(output).__name__});"
            " pass loss_fn=..."
        )
    terms = [t.float().pow(2).mean() for t in chosen]
    return functools.reduce(operator.add, terms)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _model_device(model: nn.Module, batch: Any) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    for t in _iter_tensors(batch):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- saved tensors
class _Packed:
    """What the pack hook hands to autograd: the tensor plus a token naming this save."""

    __slots__ = ("__weakref__", "tensor", "token")

    def __init__(self, token: int, tensor: torch.Tensor) -> None:
        self.token = token
        self.tensor = tensor


@dataclass
class _Record:
    key: StorageKey
    nbytes: int
    path: str
    preexisting: bool
    tokens: list[int] = field(default_factory=list)
    refs: list[weakref.ref] = field(default_factory=list)
    span: tuple[int, int] | None = None  # preexisting: the bytes the saved views reach

    def alive(self) -> bool:
        return any(r() is not None for r in self.refs)

    def reach(self, t: torch.Tensor, storage_bytes: int) -> None:
        """A batch that is a slice of a larger tensor (a dataset in memory) keeps that tensor
        alive whether or not the graph saves the slice: count only the bytes the saved views
        span."""
        lo, hi = _view_span(t)
        if self.span is not None:
            lo, hi = min(lo, self.span[0]), max(hi, self.span[1])
        self.span = (lo, hi)
        self.nbytes = min(storage_bytes, hi - lo)


def _view_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte of ``t``'s storage that ``t`` reads."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * size


class _SavedTensorTracer:
    """saved_tensors_hooks pair recording storages, module paths and owning graph nodes.

    The packed object holds the tensor, so autograd owns it exactly as without hooks (freed when
    the graph is); records keep only weak references to packed objects. A storage whose packed
    objects all died (a discarded branch of the graph) is retired, so a new storage that reuses
    its address is counted anew, and the old one no longer counts.
    """

    def __init__(self, excluded: set[StorageKey], preexisting: _Preexisting) -> None:
        self.excluded = excluded
        self.preexisting = preexisting
        self.path_stack: list[str] = []
        self.records: dict[StorageKey, _Record] = {}
        self.num_packed = 0
        self.token_kind: dict[int, str] = {}
        self.token_origin: dict[int, str] = {}  # tokens of custom nodes naming no operator
        self.current_kind: str | None = None
        self.current_origin: str | None = None

    # --- hooks
    def pack(self, t: torch.Tensor) -> _Packed:
        token = self.num_packed
        self.num_packed += 1
        # Detached: a saved output (softmax, tanh, ...) would otherwise hold its own grad_fn,
        # a cycle through C++ that Python's collector cannot see, leaking the whole graph.
        packed = _Packed(token, t.detach())
        for key, nbytes, leaf in _storages(t):
            if key is None:  # a storage that cannot be read: this save counts on its own
                key = ("unread", token)
            if key in self.excluded:
                continue
            rec = self.records.get(key)
            if rec is not None and not rec.alive():
                rec = None
            if rec is None:
                path = self.path_stack[-1] if self.path_stack else OUTSIDE_PATH
                rec = _Record(key, nbytes, path, key in self.preexisting)
                self.records[key] = rec
            if rec.preexisting and leaf is t and t.layout == torch.strided and not t.is_nested:
                rec.reach(t, nbytes)
            rec.tokens.append(token)
            rec.refs.append(weakref.ref(packed))
        return packed

    def unpack(self, packed: _Packed) -> torch.Tensor:
        if self.current_kind is not None and packed.token not in self.token_kind:
            self.token_kind[packed.token] = self.current_kind
            if self.current_origin is not None:
                self.token_origin[packed.token] = self.current_origin
        return packed.tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    # --- graph walk
    def walk(self, roots: list[Any]) -> int:
        """Unpack every saved tensor of every node reachable from ``roots``; number of nodes.

        Saved tensors of activation-checkpointed regions hold no data: unpacking one outside
        a backward pass makes ``torch.utils.checkpoint`` recompute the whole region, once per
        tensor (each access gets a fresh graph-task id), which for a checkpointed model costs
        many forward passes and their memory (a MiniLM step reached 10 GB). Those tensors were
        packed by the checkpoint's hooks, not ours, so they carry nothing to attribute: any
        module forward or torch function starting during the walk (a checkpointed plain
        function runs no module) is a recomputation, and is stopped at once.
        """
        seen: dict[int, Any] = {}  # holding the wrappers keeps their ids stable
        stack = [r for r in roots if r is not None]
        stop_recompute = torch.nn.modules.module.register_module_forward_pre_hook(_refuse_recompute)
        try:
            with _RefuseTorchFunctions():
                return self._walk(stack, seen)
        finally:
            stop_recompute.remove()

    def _walk(self, stack: list[Any], seen: dict[int, Any]) -> int:
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            kind = node_kind(node)
            origin = custom_origin(node)
            self.current_kind = kind
            # a custom node left unnamed: its record may still be named after its module
            self.current_origin = origin if origin is not None and kind == type(node).__name__ else None
            try:
                _touch_saved(node)
            finally:
                self.current_kind = self.current_origin = None
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        return len(seen)

    def live_records(self) -> list[_Record]:
        return [rec for rec in self.records.values() if rec.alive()]

    def kind_of(self, rec: _Record, module_types: Mapping[str, type]) -> str:
        kind, origin = OTHER_KIND, None
        for token, ref in zip(rec.tokens, rec.refs, strict=True):
            if ref() is not None and token in self.token_kind:
                kind, origin = self.token_kind[token], self.token_origin.get(token)
                break
        module_name = getattr(module_types.get(rec.path), "__name__", "")
        if kind == "mul":
            # On CPU dropout is computed as input * (bernoulli mask / (1 - p)), so the mask is
            # saved by a plain MulBackward0 (CUDA names it NativeDropoutBackward): name it after
            # the module that ran it, or, for a functional dropout inside another module (e.g.
            # transformers' eager attention), after what it holds.
            low = module_name.lower().replace("_", "")
            if "droppath" in low or "stochasticdepth" in low:
                return "drop_path"
            if "dropout" in low or any(_is_dropout_mask(ref()) for ref in rec.refs):
                return "dropout"
        if origin is not None and module_name:
            by_module = kind_from_class_name(module_name, custom=True, origin=origin)
            if by_module != module_name:
                return by_module
        return kind


def _is_dropout_mask(packed: _Packed | None) -> bool:
    """A saved tensor that holds 0s and one value above 1: a dropout mask scaled by 1 / (1 - p)."""
    t = None if packed is None else packed.tensor
    if t is None or not t.is_floating_point() or t.device.type == "meta" or t.numel() < 2 or not t.is_contiguous():
        return False  # (a mask is a fresh tensor)
    flat = t.view(-1)
    # a prefix first: any other product (gate x up, a scale) fails it without a pass over the whole
    head = flat[:4096]
    top = head.max()
    if not top > 1 or not bool(((head == 0) | (head == top)).all()):
        return False
    return bool(((flat == 0) | (flat == top)).all()) and bool((flat == 0).any())


_SAVED_ATTRS: dict[type, tuple[str, ...]] = {}


class _RecomputeRefused(RuntimeError):
    """Raised into a checkpoint recomputation triggered by the graph walk (see ``walk``)."""


def _refuse_recompute(module: nn.Module, args: Any) -> None:
    raise _RecomputeRefused(f"{type(module).__name__}: no recomputation during the saved-tensor walk")


class _RefuseTorchFunctions(torch.overrides.TorchFunctionMode):
    """The walk itself calls no torch function: one called is a recomputation (see ``walk``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise _RecomputeRefused(f"{getattr(func, '__name__', func)}: no recomputation during the saved-tensor walk")


def _touch_saved(node: Any) -> None:
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        with contextlib.suppress(RuntimeError):  # already freed, or saved something odd
            node.saved_tensors  # noqa: B018 - the access runs the unpack hooks
        return
    cls = type(node)
    names = _SAVED_ATTRS.get(cls)
    if names is None:
        names = tuple(n for n in dir(node) if n.startswith("_saved_"))
        _SAVED_ATTRS[cls] = names
    for name in names:
        with contextlib.suppress(RuntimeError):
            getattr(node, name)  # the access runs the unpack hook


# ---------------------------------------------------------------------------- model state
class _ModuleStack:
    """Forward pre/post hooks on every submodule keeping the path of the innermost one."""

    def __init__(self, model: nn.Module, stack: list[str], on_event: Callable[[], None] | None):
        self.handles: list[Any] = []
        for name, module in model.named_modules():
            path = name or ROOT_PATH
            if isinstance(module, torch.jit.ScriptModule):  # takes no hooks: counted to its parent
                continue

            @observer_hook
            def pre(_m, _args, path=path):
                stack.append(path)
                if on_event is not None:
                    on_event()

            @observer_hook
            def post(_m, _args, _out, path=path):
                if on_event is not None:
                    on_event()
                if stack and stack[-1] == path:
                    stack.pop()
                elif path in stack:  # a forward that raised inside: unwind to it
                    del stack[len(stack) - 1 - stack[::-1].index(path) :]

            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _SavedState:
    """Everything :func:`measure` may touch, to put back afterwards."""

    def __init__(self, model: nn.Module, batch_tensors: list[torch.Tensor]) -> None:
        self.params = list(model.parameters())
        self.grads = [p.grad for p in self.params]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.training = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        # a forward may rebind a buffer (self.ema = ...) instead of updating it in place
        self.buffer_slots = [
            (m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None
        ]
        self.batch = [(t, t.grad) for t in batch_tensors if t.is_leaf and t.requires_grad]
        self.param_data: list[tuple[nn.Parameter, torch.Tensor]] = []

    def snapshot_trainable(self) -> None:
        self.param_data = [(p, p.detach().clone()) for p in self.params if p.requires_grad]

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None
        for t, _ in self.batch:
            t.grad = None

    def restore(self) -> None:
        for m, name, b in self.buffer_slots:
            m._buffers[name] = b
        with torch.no_grad():
            for p, data in self.param_data:
                p.copy_(data)
            for b, data in self.buffers:
                b.copy_(data)
        for p, g, rg in zip(self.params, self.grads, self.requires_grad, strict=True):
            p.grad = g
            p.requires_grad_(rg)
        for t, g in self.batch:
            t.grad = g
        for m, flag in self.training:
            m.training = flag


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """Version counters, bumped by every in-place change (None: an inference tensor has none)."""
    out: list[int | None] = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:
            out.append(None)
    return out


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _storages_bytes(tensors: list[torch.Tensor], skip: set[StorageKey]) -> dict[StorageKey, int]:
    """Bytes of each storage holding ``tensors``, those keyed in ``skip`` left out."""
    out: dict[StorageKey, int] = {}
    for i, t in enumerate(tensors):
        for key, nbytes, _ in _storages(t):
            key = key if key is not None else ("unread", i)  # cannot be matched: counted apart
            if key not in skip:
                out[key] = nbytes
    return out


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_optimizer(spec: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec is True:
        return torch.optim.AdamW(params, lr=1e-3)
    return spec(params)


# ---------------------------------------------------------------------------- measure
def measure(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    optimizer_step: bool | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = False,
    accumulating: bool = False,
    name: str | None = None,
) -> MemoryReport:
    """Measure one training step of ``model`` on ``batch``; see :class:`MemoryReport`.

    ``batch``: a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a mapping
    (``model(**batch)``). ``loss_fn(output, batch) -> scalar`` defaults to :func:`default_loss`.
    ``optimizer_step``: also take an optimizer step (``True``: AdamW; or a factory
    ``params -> Optimizer``) and report its state; the parameters are restored afterwards. The
    state is allocated before the forward (one step on zero gradients at learning rate 0), so
    ``peak_bytes`` is that of a steady-state step, not of a first step.
    ``accumulating``: the step is a gradient-accumulation micro-batch after the first, whose
    forward and backward run with the gradients already alive (allocated before the forward).
    The model runs in its current ``training`` mode and is left exactly as it was. On CUDA the
    allocator's peak counter is reset (``torch.cuda.reset_peak_memory_stats``) to read the
    step's own peak: read ``torch.cuda.max_memory_allocated`` first if you track your own.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure expects an nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (output, batch) -> scalar loss, got {loss_fn!r}")
    if not (isinstance(optimizer_step, bool) or callable(optimizer_step)):
        raise TypeError(
            f"optimizer_step must be True, False or a factory params -> Optimizer, got {optimizer_step!r}"
        )
    if torch.is_inference_mode_enabled():
        # enable_grad does not lift inference mode: autograd would record nothing, and every
        # count read 0. Tensors made in inference mode cannot be saved for backward at all, so
        # measure does not leave it by itself either.
        raise ValueError(
            "measure cannot run inside torch.inference_mode(): no graph is recorded there, so "
            "nothing would be saved for backward; call measure outside the inference_mode block "
            "(with a model and batch created outside it)"
        )
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"the model has uninitialised lazy parameters ({lazy[:3]}): run one forward first")
    loss_fn = loss_fn or default_loss
    device = _model_device(model, batch)
    probe = probe_for(device)
    params = list(model.parameters())
    batch_tensors = _unique(_iter_tensors(batch))
    if any(t.requires_grad and not t.is_leaf for t in batch_tensors):
        # its backward would run on into the graph that made it: gradients in parameters
        # outside the model, the caller's graph freed, and their bytes in this step's figures
        raise ValueError(
            "the batch holds a tensor with autograd history (made by a computation that requires "
            "grad, e.g. features of a trainable module outside the model): measure would "
            "backpropagate into that graph; pass it detached, x.detach(), or x.detach().requires_grad_() "
            "to count its gradient as part of this step"
        )

    excluded = _storage_keys(params) | _storage_keys(model.buffers())
    # storages alive before the step that the graph may keep: batch tensors, and plain tensor
    # attributes of modules (neither parameter nor buffer); counted as saved, but as
    # "preexisting" they add nothing to the allocator's growth during the step
    attributes = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    preexisting = _Preexisting([*batch_tensors, *attributes], excluded)
    del attributes  # weakly held from here: a rebound attribute is freed as in a real step
    batch_versions = _versions(batch_tensors)

    state = _SavedState(model, batch_tensors)
    notes: list[str] = []
    report = MemoryReport(saved_bytes=0, model_name=name or type(model).__name__, device=str(device))
    report.total_params = sum(p.numel() for p in params)
    report.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    report.param_bytes = sum(p.numel() * p.element_size() for p in params)
    report.trainable_param_bytes = sum(
        p.numel() * p.element_size() for p in params if p.requires_grad
    )

    with torch.random.fork_rng(devices=_rng_devices(device)), torch.enable_grad():
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

        def reset_rng() -> None:
            torch.set_rng_state(rng_cpu)
            if rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda, device)

        try:
            state.clear_grads()
            # Inside autocast, the low-precision copies of trainable weights are cached until the
            # outermost autocast exits: each run makes its own, as a training step would.
            torch.clear_autocast_cache()
            fwd_peak = _instrumented_run(
                model, batch, loss_fn, probe, excluded, preexisting, report, reset_rng
            )
            if _versions(batch_tensors) != batch_versions:
                notes.append(
                    "the forward (or the loss) modified the batch in place: the allocator run (peak, gradients, "
                    "cross-check) was measured on the altered input, and the caller's batch was changed"
                )
            if optimizer_step:
                state.snapshot_trainable()
            torch.clear_autocast_cache()
            _allocator_run(model, batch, loss_fn, probe, report, reset_rng, optimizer_step, fwd_peak,
                           accumulating)
        finally:
            if probe is not None:
                probe.close()  # an exception mid-step must not leave the profiler running
            state.restore()
    if COMPILED_KIND in report.by_kind:
        notes.append(
            f"torch.compile'd regions save {format_bytes(report.by_kind[COMPILED_KIND])}, reported as "
            f"'{COMPILED_KIND}' and not split by operator (the compiler fuses them): measure the "
            "uncompiled model for that split"
        )
    if probe is None:
        notes.append(f"no allocator statistics for device {device}: peak and cross-check skipped")
    unexplained = _unexplained_live_bytes(report, probe is not None and probe.exact_peak)
    if unexplained:
        notes.append(unexplained)
    report.notes.extend(notes)
    return report


def _unexplained_live_bytes(report: MemoryReport, exact: bool) -> str | None:
    """A note when the allocator's live bytes after the forward and the saved-tensor hooks'
    count disagree by more than 5 % and 1 MiB (a quarter with a sampled allocator): something keeps tensors the hooks cannot
    see (a custom autograd Function's ``ctx.attr``, a module caching its input), and
    ``saved_bytes`` then undercounts (or, the other way, counts what is freed anyway)."""
    live, expected = report.forward_live_bytes, report.expected_forward_live_bytes
    # an exact allocator (CUDA's, CPU's profiler) matched the hooks to the byte on every model
    # measured but for autocast's weight copies; a sampled one (glibc's) is looser
    share = 0.05 if exact else 0.25
    if live is None or expected is None or abs(live - expected) <= max(2**20, share * max(live, expected)):
        return None
    mib = 2**20
    if live > expected:
        return (f"cross-check: {live / mib:.1f} MiB stay live after the forward, but the saved-tensor hooks "
                f"account for {expected / mib:.1f} MiB: something keeps tensors outside save_for_backward "
                "(e.g. ctx attributes of a custom autograd Function), which saved_bytes does not count")
    return (f"cross-check: the saved-tensor hooks count {expected / mib:.1f} MiB, but only {live / mib:.1f} MiB "
            "stay live after the forward: saved_bytes counts tensors that are freed or shared anyway")


def _instrumented_run(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    probe: AllocatorProbe | None,
    excluded: set[StorageKey],
    preexisting: _Preexisting,
    report: MemoryReport,
    reset_rng: Callable[[], None],
) -> int | None:
    """Run A: forward + loss under saved-tensor hooks, graph walk; returns the forward peak."""
    tracer = _SavedTensorTracer(excluded, preexisting)
    sample = probe.sample if probe is not None and not probe.exact_peak else None
    modules = _ModuleStack(model, tracer.path_stack, sample)
    reset_rng()
    base = probe.start() if probe is not None else 0
    try:
        with _no_gc(), tracer.hooks():
            output = _call(model, batch)
            tracer.path_stack[:] = [LOSS_PATH]
            loss = loss_fn(output, batch)
            tracer.path_stack.clear()
    finally:
        modules.remove()
    fwd_peak = probe.peak() - base if probe is not None else None
    report.forward_peak_bytes = fwd_peak

    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    out_tensors = _unique(_iter_tensors(output))
    roots = [loss.grad_fn] + [t.grad_fn for t in out_tensors]
    tracer.walk(roots)

    records = tracer.live_records()
    by_kind: dict[str, int] = {}
    by_module: dict[str, int] = {}
    module_types = {name or ROOT_PATH: type(m) for name, m in model.named_modules()}
    for rec in records:
        kind = tracer.kind_of(rec, module_types)
        by_kind[kind] = by_kind.get(kind, 0) + rec.nbytes
        by_module[rec.path] = by_module.get(rec.path, 0) + rec.nbytes
    report.saved_bytes = sum(rec.nbytes for rec in records)
    report.saved_input_bytes = sum(rec.nbytes for rec in records if rec.preexisting)
    report.num_saved_storages = len(records)
    report.num_saved_tensors = len(
        {tok for rec in records for tok, r in zip(rec.tokens, rec.refs, strict=True) if r() is not None}
    )  # a tensor held in several storages (sparse, subclass) is one tensor
    # largest first; ties keep forward order (records are created in forward order)
    report.by_kind = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    report.by_module = dict(sorted(by_module.items(), key=lambda kv: -kv[1]))

    # What run B's allocator delta after forward + loss should be. Alive at that moment are:
    #   (1) the storages the graph saved, minus those that existed before the step (batch,
    #       module tensor attributes): saved_bytes - saved_input_bytes;
    #   (2) the output tensors and the loss, which the caller holds, unless (1) has them
    #       already (the default loss saves the outputs) or they are parameters/preexisting;
    #   (3) small C++ objects (autograd nodes, SavedVariable, TensorImpl) and allocator
    #       rounding: not modelled, tens of bytes per node.
    # Nothing else: temporaries of each op are freed by then, and no hook runs in run B.
    saved_keys = {rec.key for rec in records}
    alive = _storages_bytes([*out_tensors, loss], excluded | preexisting.live_keys() | saved_keys)
    report.output_bytes = sum(_storages_bytes(out_tensors, excluded).values())
    report.expected_forward_live_bytes = (
        report.saved_bytes - report.saved_input_bytes + sum(alive.values())
    )
    del output, loss, out_tensors, roots, records
    return fwd_peak


def _allocator_run(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    probe: AllocatorProbe | None,
    report: MemoryReport,
    reset_rng: Callable[[], None],
    optimizer_step: Any,
    fwd_peak: int | None,
    accumulating: bool = False,
) -> None:
    """Run B: hook-free forward + loss (cross-check), backward (peak, grads), optimizer step."""
    reset_rng()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if probe is not None:
        gc.collect()  # garbage from before the step must not be freed inside the window
    with _no_gc():  # ... nor by an automatic collection between the two readings
        base = probe.start() if probe is not None else 0
        opt = None
        primed = 0
        if optimizer_step and trainable:
            # Every step but the first runs with the optimizer state alive from forward to
            # the update; a first step allocates it only at its end, after the activations
            # are gone, and would understate the peak of methods with many trainable
            # parameters. So the state is allocated here, inside the window.
            opt = _make_optimizer(optimizer_step, trainable)
            _allocate_state(opt, trainable)
        if accumulating:
            for p in trainable:
                p.grad = torch.zeros_like(p)
        if opt is not None or accumulating:
            primed = probe.live() - base if probe is not None else 0
        output = _call(model, batch)
        loss = loss_fn(output, batch)
        if probe is not None:
            report.forward_live_bytes = probe.live() - base - primed
            probe.sample()
    del output  # the loss keeps the graph alive; the outputs are not needed any more

    handles = []
    if loss.requires_grad:
        if probe is not None and not probe.exact_peak:
            handles = _sample_in_backward(loss.grad_fn, probe)
        try:
            loss.backward()
        finally:
            for h in handles:
                h.remove()
    del loss
    if probe is not None:
        probe.sample()

    grads = _storages_bytes([p.grad for p in trainable if p.grad is not None], set())
    report.grad_bytes = sum(grads.values())

    if opt is not None:
        opt.step()
        if probe is not None:
            probe.sample()
        state_tensors = [
            v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        ]
        report.optimizer_state_bytes = sum(_storages_bytes(state_tensors, set()).values())
        del opt, state_tensors

    if probe is not None:
        peak = probe.peak() - base
        if fwd_peak is not None:  # run A's forward, which ran without the optimizer state
            peak = max(peak, fwd_peak + primed)
        report.peak_bytes = peak
        report.peak_method = probe.method


def _allocate_state(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Have ``opt`` allocate its per-parameter state without changing any parameter.

    One step on zero gradients with every learning rate set to 0 (AdamW's decoupled weight
    decay is scaled by the learning rate too); the zero gradients are freed afterwards.
    """
    saved_lrs = [group.get("lr") for group in opt.param_groups]
    for group in opt.param_groups:
        if "lr" in group:
            group["lr"] = 0.0 if not isinstance(group["lr"], torch.Tensor) else group["lr"] * 0
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        opt.step()
    finally:
        for p in params:
            p.grad = None
        for group, lr in zip(opt.param_groups, saved_lrs, strict=True):
            if lr is not None:
                group["lr"] = lr


def _sample_in_backward(root: Any, probe: AllocatorProbe) -> list[Any]:
    """Pre/post hooks on every autograd node reachable from ``root`` that sample ``probe``."""

    def pre(_grad_outputs):
        probe.sample()

    def post(_grad_inputs, _grad_outputs):
        probe.sample()

    handles = []
    seen: dict[int, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        handles.append(node.register_prehook(pre))
        handles.append(node.register_hook(post))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return handles
