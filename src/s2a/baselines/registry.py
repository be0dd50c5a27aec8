"""The method registry: ``--method`` name -> description, apply function, storage rule.

Every fine-tuning method of ``s2a train`` (and of ``benchmarks/compare.py``) is one
:class:`MethodSpec` in :data:`METHOD_SPECS`. :func:`apply_spec` is the only way in: it runs the
method's apply function, turns "this method does not fit this model" into
:class:`MethodNotApplicable` naming the method, the model family and the methods that do fit,
and applies the optional extra activation compression (``act_bits``) uniformly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "METHOD_SPECS",
    "MethodContext",
    "MethodNotApplicable",
    "MethodResult",
    "MethodSpec",
    "apply_spec",
    "backbone_info",
    "register_method",
]

# How a method treats ``act_bits`` (--act-bits):
#   "optional": None = native storage; a width compresses every operator on top of the method
#   "default":  the method compresses itself at ctx.act_bits; the CLI resolves an unset --act-bits
#               to 4 (TrainConfig.resolved; 0 = off), while apply_spec takes ctx.act_bits as given
#               (None = native storage)
#   "fixed":    the method *is* a storage configuration (mesa8, fewbit2); --act-bits is refused
#   "never":    activation checkpointing recomputes instead of storing; --act-bits is refused
STORAGE_RULES = ("optional", "default", "fixed", "never")

# What a method does with the backbone's BatchNorm running statistics:
#   "frozen":  the backbone is frozen, so are its statistics (as s2a does): BatchNorm layers
#              normalise with their pretrained running statistics in training too
#   "trained": every weight trains (full fine-tuning and its storage / recompute variants), so
#              BatchNorm runs as usual: batch statistics, running statistics updated
#   "method":  the method decides (s2a: S2AConfig.freeze_norm_stats)
NORM_STATS_RULES = ("frozen", "trained", "method")


class MethodNotApplicable(ValueError):
    """A method that does not fit a model (VPT on a CNN, prompt tuning on an image model...).

    The message names the method, the model family and the methods that do apply."""


@dataclass
class MethodResult:
    """What a method did: the model to train (possibly a wrapper, e.g. a peft model), notes
    for the run's report, and the S2A configuration when ``s2a.apply`` was used."""

    model: nn.Module
    notes: list[str] = field(default_factory=list)
    s2a_config: dict[str, Any] | None = None


@dataclass
class MethodContext:
    """Everything an apply function may use besides the model.

    ``head_names``: module paths of the classifier head (kept trainable); ``modules``:
    S2A modules and ``prompt_rank``: rank of S2A's low-rank prompt (``s2a`` only);
    ``act_bits``: storage width or None; ``example_input``: one preprocessed batch for dry runs
    (None: the adapter's default input); ``max_length``: the longest token sequence the text
    preprocessing produces (--max-length), None if unknown (prompt tuning checks it against the
    model's positions); ``dropout``: ``--dropout``, the rate of every dropout layer, also of
    those a method adds (AdaptFormer's adapters), None for each method's own."""

    method: str
    head_names: tuple[str, ...] = ()
    modules: tuple[str, ...] = ("bias", "prompt")
    act_bits: int | None = None
    example_input: Any = None
    prompt_rank: int = 4
    max_length: int | None = None
    dropout: float | None = None
    _info: Any = field(default=None, repr=False)

    def info(self, model: nn.Module) -> Any:
        """:func:`backbone_info` of ``model``, computed once per context."""
        if self._info is None:
            self._info = backbone_info(model, self.example_input)
        return self._info


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``apply(model, ctx) -> MethodResult``; ``supports(info) -> None or the reason
    it does not fit`` (None for methods that fit any model); ``storage``: see STORAGE_RULES;
    ``norm_stats``: see NORM_STATS_RULES."""

    name: str
    description: str
    apply: Callable[[nn.Module, MethodContext], MethodResult]
    supports: Callable[[Any], str | None] | None = None
    storage: str = "optional"
    norm_stats: str = "frozen"


METHOD_SPECS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.storage not in STORAGE_RULES:
        raise ValueError(f"{spec.name}: storage {spec.storage!r} not in {STORAGE_RULES}")
    if spec.norm_stats not in NORM_STATS_RULES:
        raise ValueError(f"{spec.name}: norm_stats {spec.norm_stats!r} not in {NORM_STATS_RULES}")
    METHOD_SPECS[spec.name] = spec
    return spec


def backbone_info(model: nn.Module, example_input: Any = None) -> Any:
    """:func:`s2a.models.describe_backbone` with the error turned into MethodNotApplicable."""
    from s2a.models import UnsupportedModelError, describe_backbone

    try:
        return describe_backbone(model, example_input)
    except UnsupportedModelError as exc:
        raise MethodNotApplicable(str(exc)) from None


def applicable_methods(info: Any) -> list[str]:
    """Names of the registered methods whose ``supports`` accepts ``info``."""
    return [n for n, s in METHOD_SPECS.items() if s.supports is None or s.supports(info) is None]


def not_applicable(method: str, info: Any, reason: str) -> MethodNotApplicable:
    return MethodNotApplicable(
        f"--method {method} does not apply to {info.model_class} (model family {info.family}): "
        f"{reason}. Methods that apply to it: {', '.join(applicable_methods(info))}"
    )


def apply_spec(model: nn.Module, ctx: MethodContext) -> MethodResult:
    """Configure ``model`` for ``ctx.method`` (in place where possible); see the module doc.

    Transactional: what can be checked (the method, its fit, ``act_bits``) is checked before the
    model changes, and a later failure (of the method, or of the activation compression after
    it) undoes the changes before the error propagates: the model is left as it was given
    (except after a failed ``s2a.apply``, which marks the model as half prepared itself)."""
    spec = METHOD_SPECS.get(ctx.method)
    if spec is None:
        raise MethodNotApplicable(f"unknown method {ctx.method!r}; choose one of {list(METHOD_SPECS)}")
    if spec.storage in ("fixed", "never") and ctx.act_bits:
        why = "it fixes its own activation storage" if spec.storage == "fixed" else (
            "activation checkpointing recomputes activations instead of storing them")
        raise MethodNotApplicable(f"--method {ctx.method} takes no --act-bits: {why}")
    if spec.supports is not None:
        info = ctx.info(model)
        reason = spec.supports(info)
        if reason is not None:
            raise not_applicable(ctx.method, info, reason)
    compress = spec.storage == "optional" and bool(ctx.act_bits)
    if compress:
        check_act_bits(ctx.act_bits)
    snapshot = ModelSnapshot(model)
    result = None
    try:
        result = spec.apply(model, ctx)
        if spec.norm_stats == "frozen" and keep_norm_stats(result.model):
            result.notes.append("BatchNorm layers keep the backbone's running statistics (frozen like its weights)")
        if compress:
            from s2a import compress_activations

            try:
                compress_activations(result.model, bits=ctx.act_bits)
            except (ValueError, TypeError) as exc:
                raise MethodNotApplicable(f"--act-bits {ctx.act_bits}: {exc}") from None
            result.notes.append(f"activations stored at {ctx.act_bits} bits (s2a.compress_activations)")
    except BaseException:
        if not _s2a_apply_failed(model):
            from s2a import restore

            for m in (model, None if result is None else result.model):
                if m is not None:
                    restore(m)  # activation compression, where any was installed
            snapshot.restore()
        raise
    return result


def check_act_bits(bits: int) -> None:
    """Refuse a storage width :func:`s2a.compress_activations` would refuse, before anything changes."""
    from s2a.activations.apply import validate_compression

    try:
        validate_compression(bits, None, "regenerate", None)
    except (ValueError, TypeError) as exc:
        raise MethodNotApplicable(f"--act-bits {bits}: {exc}") from None


def _s2a_apply_failed(model: nn.Module) -> bool:
    from s2a.tuners.model import FAILED_ATTR

    return FAILED_ATTR in model.__dict__


class ModelSnapshot:
    """The module tree of a model as it is now, to undo a method that failed part way.

    Records, for every module, its attributes (children, parameters, buffers, hook
    dictionaries, an instance-level ``forward``, ``training``...; containers by a shallow copy)
    and every parameter's ``requires_grad``. :meth:`restore` puts them back: modules and hooks a
    method added go, replaced children (a peft layer around a Linear, a ``modules_to_save``
    copy) return. Tensor values are not copied: the methods here do not write into the
    backbone's weights."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, {k: _shallow(v) for k, v in vars(m).items()}) for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, saved in self.modules:
            now = vars(module)
            for key in [k for k in now if k not in saved]:
                del now[key]
            for key, value in saved.items():
                current = now.get(key)
                if isinstance(value, (dict, set)) and type(current) is type(value) and current is not value:
                    current.clear()  # the same container object: other references to it stay valid
                    current.update(value)
                else:
                    now[key] = value
        for p, flag in self.grads:
            p.requires_grad_(flag)


def _shallow(value: Any) -> Any:
    return type(value)(value) if type(value) in (dict, set, OrderedDict) else value


# ---------------------------------------------------------------------------- shared helpers
def keep_norm_stats(model: nn.Module) -> int:
    """s2a's own treatment of a frozen backbone's BatchNorm (:func:`s2a.tuners.model.keep_norm_stats`)
    for every method with a frozen backbone, so that the comparison measures the tuned modules,
    not the BatchNorm mode. Returns the number of layers hooked."""
    from s2a.tuners.model import keep_norm_stats as keep

    return len(keep(model))


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def find_heads(model: nn.Module, head_names: tuple[str, ...], method: str) -> list[str]:
    """The classifier head(s) among ``head_names`` that ``model`` has (MethodNotApplicable if
    none); changes nothing, so a method looks its head up before it changes the model."""
    modules = dict(model.named_modules())
    found = [n for n in head_names if n in modules]
    if not found:
        raise MethodNotApplicable(
            f"--method {method}: cannot find the classifier head of {type(model).__name__} "
            f"(looked for {list(head_names)})"
        )
    return found


def train_heads(model: nn.Module, head_names: tuple[str, ...], method: str) -> list[str]:
    """Make the classifier head(s) trainable; returns the names found (error if none)."""
    found = find_heads(model, head_names, method)
    for n in found:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    return found
