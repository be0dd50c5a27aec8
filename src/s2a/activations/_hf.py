"""transformers' hand-written blocks, recognised by their code: gated MLPs and RMSNorms.

Gated MLPs (LLaMA, Mistral, Qwen, Gemma, Phi-3, GLM, ModernBERT, Granite 4, LFM2, GTE: 169 classes of
transformers 5.25).

Their forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (or the same with one packed
``gate_up_proj``): natively it keeps both factors of the product for backward, each the
intermediate width (2.7-8x the model's). With the weights frozen the block runs as
:func:`.gated_mlp.frozen_gated_mlp`, which keeps only ``x`` (bf16 / fp16 as it is, float32 in
bfloat16) and recomputes the rest.

A class is recognised by its ``forward``'s bytecode, names and constants, compared with the
seven spellings that transformers uses (below: separate or packed projections, the gate
first; a fixed SiLU; a dropout on the product, which must be off to fuse); a release or a
model that computes anything else (clamps, multipliers, a norm inside the MLP) falls back to
its own forward instead of being mis-run.

RMSNorms are recognised the same way, against the spellings transformers copies between
models: LLaMA's (``weight * x̂.to(x.dtype)`` with ``x̂ = normalised(x.float())``, 145 classes),
Gemma's (``(x̂ * (1 + weight.float())).type_as(x)``, 13), OLMo 2's and its kin (``(weight *
x̂).to(x.dtype)``, 26, Gemma 3n / 4 with an optional scale among them) and the weightless
``x̂.type_as(x)``; :func:`rms_norm_spelling` says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache, partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .codebooks import SMOOTH_FUNCTIONS
from .functional import _needs_grad
from .gated_mlp import frozen_gated_mlp, frozen_gated_mlp_applies
from .mlp import fusable_kind, fused_forward, has_foreign_hooks
from .moe_experts import frozen_moe_experts, frozen_moe_experts_applies


def _llama_mlp(self, x):  # LlamaMLP and the classes copied from it
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _inline_mlp(self, x):  # Qwen2MLP, IdeficsMLP...
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _packed_mlp(self, hidden_states):  # Phi3MLP, GlmMLP, Glm4MLP, DiaMLP...
    up_states = self.gate_up_proj(hidden_states)

    gate, up_states = up_states.chunk(2, dim=-1)
    up_states = up_states * self.activation_fn(gate)

    return self.down_proj(up_states)


def _dropped_mlp(self, x):  # GteMLP, T5GemmaMLP: a dropout on the product
    hidden_states = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
    hidden_states = self.dropout(hidden_states)
    down_proj = self.down_proj(hidden_states)
    return down_proj


def _modernbert_mlp(self, hidden_states):  # ModernBertMLP, ModernBertDecoderMLP
    input, gate = self.Wi(hidden_states).chunk(2, dim=-1)
    return self.Wo(self.drop(self.act(input) * gate))


def _granite_mlp(self, hidden_states):  # GraniteMoeSharedMLP, GraniteMoeHybridMLP (Granite 4)...
    hidden_states = self.input_linear(hidden_states)
    chunked_hidden_states = hidden_states.chunk(2, dim=-1)
    hidden_states = self.activation(chunked_hidden_states[0]) * chunked_hidden_states[1]
    hidden_states = self.output_linear(hidden_states)
    return hidden_states


def _lfm2_mlp(self, x):  # Lfm2MLP, Lfm2MoeMLP...: SiLU by name
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


# A layout: the block's (activation module, or the name of a fixed function), its linears
# (gate, up, down or packed gate_up, down: the gate is the first half) and the dropout on the
# product (None if none)
def _separate(module: nn.Module):
    return module.act_fn, (module.gate_proj, module.up_proj, module.down_proj), None


def _packed(module: nn.Module):
    return module.activation_fn, (module.gate_up_proj, module.down_proj), None


def _dropped(module: nn.Module):
    return module.act_fn, (module.gate_proj, module.up_proj, module.down_proj), module.dropout


def _modernbert(module: nn.Module):
    return module.act, (module.Wi, module.Wo), module.drop


def _granite(module: nn.Module):
    return module.activation, (module.input_linear, module.output_linear), None


def _lfm2(module: nn.Module):
    return "silu", (module.w1, module.w3, module.w2), None


def _gate_and_up(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor | None, ...]:
    """(gate weight, gate bias, up weight, up bias). A packed ``gate_up_proj`` holds the gate in
    the first half of its rows: views of its weight and bias, through which the bias gradient
    reaches ``gate_up_proj.bias``."""
    if len(linears) == 3:
        gate, up, _ = linears
        return gate.weight, gate.bias, up.weight, up.bias
    fc = linears[0]
    wg, wu = fc.weight.chunk(2)
    bg, bu = (None, None) if fc.bias is None else fc.bias.chunk(2)
    return wg, bg, wu, bu


def _code_key(fn) -> tuple:
    code = fn.__code__
    return code.co_code, code.co_names, code.co_consts, code.co_argcount


_LAYOUTS = {_code_key(_llama_mlp): _separate, _code_key(_inline_mlp): _separate,
            _code_key(_packed_mlp): _packed, _code_key(_dropped_mlp): _dropped,
            _code_key(_modernbert_mlp): _modernbert, _code_key(_granite_mlp): _granite,
            _code_key(_lfm2_mlp): _lfm2}


def _layout(module: nn.Module):
    forward = type(module).forward
    return _LAYOUTS.get(_code_key(forward)) if hasattr(forward, "__code__") else None


class _LlamaRMSNorm(nn.Module):  # the reference spellings, as in transformers 5.x
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _Llama4RMSNorm(nn.Module):
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class _GemmaRMSNorm(nn.Module):
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        # Llama does x.to(float16) * w whilst Gemma is (x * w).to(float16)
        # See https://github.com/huggingface/transformers/pull/29402
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class _Olmo2RMSNorm(nn.Module):  # also GPT-OSS, OLMo 3, DeepSeek-V4...
    def forward(self, hidden_states) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)  # main diff with Llama


class _HeliumRMSNorm(nn.Module):  # also Nemotron-H
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)


class _MoshiRMSNorm(nn.Module):
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * self.weight.float()
        return output.type_as(x)


class _Gemma3nRMSNorm(nn.Module):  # also Gemma 4: the scale is optional (with_scale)
    def _norm(self, hidden_states: torch.Tensor):
        mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        # Use torch.pow() (over torch.sqrt() or torch.rsqrt()) to address compiler differences between Torch and JAX
        return hidden_states * torch.pow(mean_squared, -0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed_output = self._norm(hidden_states.float())
        if self.with_scale:
            normed_output = normed_output * self.weight.float()
        return normed_output.type_as(hidden_states)


class _WeightlessRMSNorm(nn.Module):  # Llama 4's, Falcon-Mamba's, NanoChat...
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    def forward(self, x):
        return self._norm(x.float()).type_as(x)


class _UnweightedRMSNorm(nn.Module):  # Inkling 2's
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(
            hidden_states.square().mean(-1, keepdim=True) + self.variance_epsilon
        )
        return hidden_states.to(input_dtype)


class RMSNormSpelling(NamedTuple):
    """How a transformers RMSNorm computes ``y`` from the float32 ``x̂ = x / rms(x)``."""

    name: str
    eps: str  # the attribute holding epsilon
    scaled: bool  # multiplies by its weight (Gemma 3n / 4: only ``with_scale``)
    offset: float = 0.0  # Gemma scales by (1 + weight)
    round_first: bool = False  # LLaMA rounds x̂ to x's dtype, then scales; the rest scale in float32


LLAMA_SPELLING = RMSNormSpelling("llama", "variance_epsilon", True, round_first=True)
_FLOAT32_SCALE = RMSNormSpelling("float32_scale", "variance_epsilon", True)
_UNSCALED = RMSNormSpelling("unscaled", "variance_epsilon", False)
_RMS_NORMS = (  # (reference, methods compared, spelling)
    (_LlamaRMSNorm, ("forward",), LLAMA_SPELLING),
    (_Llama4RMSNorm, ("forward", "_norm"), LLAMA_SPELLING),
    (_GemmaRMSNorm, ("forward", "_norm"), RMSNormSpelling("gemma", "eps", True, offset=1.0)),
    (_Olmo2RMSNorm, ("forward",), _FLOAT32_SCALE),
    (_HeliumRMSNorm, ("forward",), _FLOAT32_SCALE),
    (_MoshiRMSNorm, ("forward", "_norm"), RMSNormSpelling("float32_scale", "eps", True)),
    (_Gemma3nRMSNorm, ("forward", "_norm"), _FLOAT32_SCALE),
    (_WeightlessRMSNorm, ("forward", "_norm"), _UNSCALED),
    (_UnweightedRMSNorm, ("forward",), _UNSCALED),
)


def _same_code(cls: type, reference: type, *names: str) -> bool:
    for name in names:
        fn = getattr(cls, name, None)
        if not hasattr(fn, "__code__") or _code_key(fn) != _code_key(getattr(reference, name)):
            return False
    return True


def rms_norm_spelling(module: nn.Module) -> RMSNormSpelling | None:
    """The spelling of a transformers RMSNorm whose code is one of the references above (with
    its epsilon, and a 1-D ``weight`` where it scales), else None."""
    if "forward" in vars(module):
        return None
    cls = type(module)
    for reference, names, spelling in _RMS_NORMS:
        if not _same_code(cls, reference, *names):
            continue
        if reference is _Gemma3nRMSNorm and not getattr(module, "with_scale", True):
            spelling = _UNSCALED
        weight = getattr(module, "weight", None)
        has_weight = isinstance(weight, torch.Tensor) and weight.dim() == 1
        if not isinstance(getattr(module, spelling.eps, None), (int, float)) or (spelling.scaled and not has_weight):
            return None
        return spelling
    return None


def lean_hf_forward(
    module: nn.Module, path: str, state: Any,
    act_kind: Callable[[nn.Module], str | None], skipped: Callable[[str], bool],
) -> tuple[str, Callable[..., torch.Tensor]] | None:
    """``(kind, forward)`` replacing ``module.forward``, or None if ``module`` is not one of ours
    (or one whose forward was already replaced on the instance, by an adapter say)."""
    if "forward" not in vars(module) and _is_experts(module):
        return _experts_lean_forward(module, path, state, act_kind, skipped)
    layout = None if "forward" in vars(module) else _layout(module)
    if layout is None:
        return None
    act, linears, _ = layout(module)
    parts = [f"{path}.{name}" if path else name for name, _ in module.named_children()]
    kind = fusable_kind(linears, act, parts, state, act_kind, skipped)
    if kind is None:
        return None
    # partials, not closures: a deepcopy of the model rebinds them to the copy's modules
    return f"gated_mlp:{kind}", partial(_fused_forward, module, state, kind, layout)


def _gated_runs_own(module: nn.Module, state: Any, kind: str, layout: Callable) -> bool:
    act, linears, dropout = layout(module)
    return (state.disabled
            # a layer wrapped, replaced (peft after s2a) or trained since compress_activations
            or any(type(fc) is not nn.Linear or fc.weight.requires_grad for fc in linears)
            or (dropout is not None and (not isinstance(dropout, nn.Dropout) or (dropout.training and dropout.p > 0)))
            or has_foreign_hooks(*(m for m in (*linears, act, dropout) if isinstance(m, nn.Module))))


@fused_forward(_gated_runs_own)
def _fused_forward(module: nn.Module, state: Any, kind: str, layout: Callable, *args, **kwargs) -> torch.Tensor:
    # the input, by position or by its own name (x, hidden_states); anything else runs natively
    x = (args[0] if args else next(iter(kwargs.values()))) if len(args) + len(kwargs) == 1 else None
    if not isinstance(x, torch.Tensor) or _gated_runs_own(module, state, kind, layout):
        return type(module).forward(module, *args, **kwargs)
    _, linears, _ = layout(module)
    wg, bg, wu, bu = _gate_and_up(linears)
    down = linears[-1]
    if not frozen_gated_mlp_applies(x, wg, wu, down.weight, kind) or not _needs_grad(x, bg, bu, down.bias):
        return type(module).forward(module, *args, **kwargs)
    return frozen_gated_mlp(x, wg, bg, wu, bu, down.weight, down.bias, kind)


# ------------------------------------------------------------------------ MoE experts
# names in a custom `_apply_gate` that would make running it again in backward give another result
_NOT_RECOMPUTABLE = frozenset({"dropout", "training", "rand", "randn", "rand_like", "randn_like",
                               "bernoulli", "multinomial", "normal_", "uniform_", "exponential_"})


@cache
def _experts_args(cls: type) -> tuple[str, ...] | None:
    try:
        names = tuple(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return names if len(names) == 3 else None


def _is_experts(module: nn.Module) -> bool:
    """An experts module of transformers' ``@use_experts_implementation`` (Mixtral, Qwen-MoE,
    DeepSeek, OLMoE, GPT-OSS... 72 of the 73 classes of 5.25) computing ``down(gate(gate_up(x)))`` per
    expert, as transformers' grouped path does: ``gate`` its ``_apply_gate`` (or its
    activation, without ``has_gate``), no norm after each expert."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    cls = type(module)
    apply_gate = getattr(cls, "_apply_gate", None)
    if (apply_gate is None or not hasattr(cls.forward, "__wrapped__")
            or getattr(module, "has_post_expert_norm", True) or getattr(module, "_is_expert_parallel", True)):
        return False
    if apply_gate is not _default_apply_gate and (
            not hasattr(apply_gate, "__code__") or _NOT_RECOMPUTABLE & set(apply_gate.__code__.co_names)):
        return False
    gated = bool(getattr(module, "has_gate", False))
    first, has_bias = ("gate_up_proj" if gated else "up_proj"), bool(getattr(module, "has_bias", False))
    names = (first, "down_proj") + ((f"{first}_bias", "down_proj_bias") if has_bias else ())
    if not all(isinstance(getattr(module, n, None), torch.Tensor) for n in names):
        return False
    # quantized experts (transformers' FP8Experts) dequantize with scales in their own forward
    if any("scale" in n for n, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))):
        return False
    if not gated and not callable(getattr(module, "act_fn", None)):
        return False
    return _experts_args(cls) is not None


def _expert_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(first projection, its bias, down projection, its bias): ``gate_up_proj``, or
    ``up_proj`` for experts without a gate; biases where ``has_bias``."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    if module.has_bias:
        return getattr(module, first), getattr(module, f"{first}_bias"), module.down_proj, module.down_proj_bias
    return getattr(module, first), None, module.down_proj, None


def _experts_lean_forward(module, path, state, act_kind, skipped):
    first, _, down, _ = _expert_tensors(module)
    if first.requires_grad or down.requires_grad:
        return None  # trained experts keep what they need: their activation is compressed alone
    if skipped(f"{path}.act_fn" if path else "act_fn"):
        return None
    act = getattr(module, "act_fn", None)
    kind = act_kind(act) if isinstance(act, nn.Module) else None
    # a custom gate (clamps, GPT-OSS's (up + 1) * glu) is filed under the gate kind
    kind = kind if kind is not None and (_default_gate(module) or not module.has_gate) else "gate"
    if not state.spec.enabled(kind):
        return None
    return f"moe_experts:{kind}", partial(_experts_forward, module, state, kind)


def _default_gate(module: nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate

    return module.has_gate and type(module)._apply_gate is _default_apply_gate


class _NativeActivation:
    """``module`` as its own ``_apply_gate`` sees it, but with ``act_fn`` running PyTorch's
    forward: s2a's compressed one would store codes of a gate recomputed in backward."""

    def __init__(self, module: nn.Module):
        act = getattr(module, "act_fn", None)
        self.__dict__["_module"] = module
        if act is not None:
            self.__dict__["act_fn"] = partial(type(act).forward, act) if isinstance(act, nn.Module) else act

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_module"], name)


def _gate_of(module: nn.Module, kind: str) -> str | Callable[[torch.Tensor], torch.Tensor]:
    if _default_gate(module) and kind in SMOOTH_FUNCTIONS:
        return kind
    view = _NativeActivation(module)
    if module.has_gate:
        return partial(type(module)._apply_gate, view)
    return view.act_fn


def _experts_run_own(module: nn.Module, state: Any, *_: object) -> bool:
    first, _, down, _ = _expert_tensors(module)
    act = getattr(module, "act_fn", None)
    acts = [act] if isinstance(act, nn.Module) else []
    return (state.disabled
            or first.requires_grad or down.requires_grad  # trained since
            # a trainable activation (PReLU, xIELU) needs its own backward
            or any(p.requires_grad for a in acts for p in a.parameters())
            or getattr(module, "_is_expert_parallel", True)  # transformers' own sentinel routing
            or has_foreign_hooks(module, *acts))


@fused_forward(_experts_run_own)
def _experts_forward(module: nn.Module, state: Any, kind: str, *args, **kwargs) -> torch.Tensor:
    names = _experts_args(type(module))
    given = dict(zip(names, args, strict=False)) | kwargs
    native = partial(type(module).forward, module, *args, **kwargs)
    if set(given) != set(names) or len(args) + len(kwargs) != 3 or _experts_run_own(module, state):
        return native()
    x, index, weights = (given[n] for n in names)
    first, first_bias, down, down_bias = _expert_tensors(module)
    transposed = bool(getattr(module, "is_transposed", False))
    gate = _gate_of(module, kind)
    if (
        not all(isinstance(t, torch.Tensor) for t in (x, index, weights))
        or not frozen_moe_experts_applies(x, index, weights, first, down, gate, transposed)
        or not _needs_grad(x, weights, first_bias, down_bias)
    ):
        return native()
    return frozen_moe_experts(x, index, weights, first, first_bias, down, down_bias, gate, transposed)
