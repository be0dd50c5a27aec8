"""LoRA, IA3 and prompt tuning through Hugging Face ``peft`` itself (not re-implemented).

``peft.get_peft_model`` wraps the model; the wrapper is what trains (its parameter names gain
peft's ``base_model.model.`` prefix, which the trainer's checkpoints simply record). Target
modules come from the model family found by :func:`s2a.models.describe_backbone`
(:data:`TARGETS`); the classifier head is a peft ``modules_to_save`` module (a trainable copy
beside the frozen original). Transformers sequence classifiers use
``task_type="SEQ_CLS"`` (peft's ``PeftModelForSequenceClassification``); timm models, which
peft treats as custom models, a plain ``PeftModel``.

* ``lora``: ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0)`` on the attention projections
  (query and value for transformers, timm's fused ``qkv``) or, for EfficientNet, on the 1x1
  convolutions of every block. ``B`` starts at zero: output at initialisation = backbone.
  No LoRA dropout: a dropout mask would be stored per adapted layer, unlike the other methods.
* ``ia3``: ``IA3Config`` scaling keys, values and the input of the layers named
  ``output.dense`` (on BERT both the attention output projection and the MLP's second layer,
  as peft's own default for BERT); EfficientNet: the 1x1 convolutions. Scales start at one:
  output unchanged.
* ``prompt-tuning``: ``PromptTuningConfig(num_virtual_tokens=20)`` prepended to the input
  embeddings of transformers text classifiers (initialised by sampling vocabulary embeddings);
  image models and timm models are refused. A decoder classifier (Llama) reads its last real
  token: peft hands it ``inputs_embeds``, from which transformers cannot find that token and
  takes the last position, a pad under right padding, so :class:`_LastTokenAtEnd` moves the
  last real token's state there. With learned absolute positions (BERT, RoBERTa, DistilBERT)
  the tokens and the virtual tokens must fit the position table: a ``--max-length``
  (``MethodContext.max_length``) or example batch that does not is refused up front, and a
  longer batch later raises :class:`PromptTooLongError` naming ``--max-length``.
* ``s2a-lora``: ``lora`` plus :func:`s2a.compress_activations` at ``act_bits`` (default 4):
  S2A's activation storage on top of peft LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from s2a.models.hf_adapters import learned_position_limit

from .registry import MethodContext, MethodNotApplicable, MethodResult, check_act_bits

LORA_RANK = 8
LORA_ALPHA = 16
PROMPT_TOKENS = 20

# family -> (LoRA targets, IA3 targets, IA3 feed-forward targets); names match module-name
# suffixes the peft way
TARGETS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "timm-vit": (["qkv"], ["qkv", "mlp.fc2"], ["mlp.fc2"]),
    "timm-swin": (["qkv"], ["qkv", "mlp.fc2"], ["mlp.fc2"]),
    "timm-efficientnet": (["conv_pw", "conv_pwl"], ["conv_pw", "conv_pwl"], ["conv_pwl"]),
    "hf-bert": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "hf-distilbert": (["q_lin", "v_lin"], ["k_lin", "v_lin", "ffn.lin2"], ["ffn.lin2"]),
    # transformers < 5 names the ViT projections query/key/value, >= 5 q_proj/k_proj/v_proj
    "hf-vit": (["query", "value", "q_proj", "v_proj"], ["key", "value", "k_proj", "v_proj", "mlp.fc2"], ["mlp.fc2"]),
    "hf-llama": (["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
TEXT_FAMILIES = ("hf-bert", "hf-distilbert", "hf-llama")


def _peft():
    try:
        import peft
    except ImportError:
        raise MethodNotApplicable(
            "LoRA, IA3 and prompt tuning use Hugging Face peft; install it with: pip install peft"
        ) from None
    return peft


def supports_targets(info: Any) -> str | None:
    if info.family in TARGETS:
        return None
    return f"no LoRA / IA3 target modules are known for this family (known: {', '.join(TARGETS)})"


def supports_prompt_tuning(info: Any) -> str | None:
    if info.family in TEXT_FAMILIES:
        return None
    return (f"peft prompt tuning prepends virtual tokens to the input embeddings of transformers "
            f"text models ({', '.join(TEXT_FAMILIES)})")


def _is_seq_cls(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and type(model).__name__.endswith(
        "ForSequenceClassification")


def _wrap(model: nn.Module, config: Any) -> nn.Module:
    peft = _peft()
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as exc:
        raise MethodNotApplicable(f"peft cannot wrap {type(model).__name__}: {exc}") from None


def _count(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n:,} trainable parameters"


def apply_lora(model: nn.Module, ctx: MethodContext) -> MethodResult:
    peft = _peft()
    info = ctx.info(model)
    targets = TARGETS[info.family][0]
    cfg = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
        modules_to_save=list(ctx.head_names), task_type="SEQ_CLS" if _is_seq_cls(model) else None,
    )
    wrapped = _wrap(model, cfg)
    return MethodResult(wrapped, [
        f"peft LoRA r={LORA_RANK} alpha={LORA_ALPHA} on {targets}, head {list(ctx.head_names)} "
        f"as modules_to_save ({_count(wrapped)})"
    ])


def apply_ia3(model: nn.Module, ctx: MethodContext) -> MethodResult:
    peft = _peft()
    info = ctx.info(model)
    _, targets, feedforward = TARGETS[info.family]
    names = [n for n, _ in model.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in feedforward):
        # peft would scale k and v only: cheaper than IA3, whose feed-forward scale is part of it
        raise MethodNotApplicable(
            f"IA3 scales the feed-forward input, but {type(model).__name__} has no module named "
            f"{' or '.join(feedforward)} (a mixture-of-experts block keeps its experts' weights in one "
            "fused module); use lora, bitfit or s2a"
        )
    cfg = peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, modules_to_save=list(ctx.head_names),
        task_type="SEQ_CLS" if _is_seq_cls(model) else None,
    )
    wrapped = _wrap(model, cfg)
    return MethodResult(wrapped, [
        f"peft IA3 on {targets} (feed-forward {feedforward}), head {list(ctx.head_names)} "
        f"as modules_to_save ({_count(wrapped)})"
    ])


def apply_prompt_tuning(model: nn.Module, ctx: MethodContext) -> MethodResult:
    peft = _peft()
    if not _is_seq_cls(model):
        raise MethodNotApplicable(
            f"--method prompt-tuning needs a transformers *ForSequenceClassification model, "
            f"got {type(model).__name__}"
        )
    info = ctx.info(model)
    limit = learned_position_limit(model)
    if limit is not None:
        _check_prompt_positions(model, ctx, limit)
    hf = model.config
    heads = getattr(hf, "num_attention_heads", None) or getattr(hf, "n_heads", None)
    cfg = peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=PROMPT_TOKENS,
        # given explicitly: peft reads them from config names that not every family uses
        token_dim=model.get_input_embeddings().embedding_dim, num_layers=len(info.blocks),
        num_attention_heads=heads, num_transformer_submodules=1,
        prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB, modules_to_save=list(ctx.head_names),
    )
    wrapped = _wrap(model, cfg)
    notes = [f"peft prompt tuning: {PROMPT_TOKENS} virtual tokens (sampled from the vocabulary), "
             f"head {list(ctx.head_names)} as modules_to_save ({_count(wrapped)})"]
    if limit is not None:
        # a longer batch (dynamic padding, a call outside the trainer) would otherwise fail deep in
        # the embeddings with a bare shape error
        model.register_forward_pre_hook(_PositionLimit(limit, type(model).__name__), with_kwargs=True)
    if info.family == "hf-llama":
        base = model.get_submodule(model.base_model_prefix)
        hooks = _LastTokenAtEnd()
        base.register_forward_pre_hook(hooks.before, with_kwargs=True)
        base.register_forward_hook(hooks.after, with_kwargs=True)
        notes.append("the classifier reads the last real token's state (peft's inputs_embeds hide it from transformers)")
    return MethodResult(wrapped, notes)


def _too_long(model: str, what: str, tokens: int, limit: int) -> str:
    return (f"--method prompt-tuning: {what} ({tokens} tokens) plus {PROMPT_TOKENS} virtual tokens need "
            f"{tokens + PROMPT_TOKENS} positions, but {model} has {limit} position embeddings: "
            f"use --max-length {limit - PROMPT_TOKENS} or less")


def _check_prompt_positions(model: nn.Module, ctx: MethodContext, limit: int) -> None:
    """Refuse up front when the sequences to come cannot fit beside the virtual tokens."""
    name = type(model).__name__
    if limit <= PROMPT_TOKENS:
        raise MethodNotApplicable(f"--method prompt-tuning: {name} has {limit} position embeddings, "
                                  f"no room beside {PROMPT_TOKENS} virtual tokens")
    if ctx.max_length is not None and ctx.max_length + PROMPT_TOKENS > limit:
        raise MethodNotApplicable(_too_long(name, f"--max-length {ctx.max_length}", ctx.max_length, limit))
    example = ctx.example_input
    ids = example.get("input_ids") if isinstance(example, dict) else None
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] + PROMPT_TOKENS > limit:
        raise MethodNotApplicable(_too_long(name, "the example batch", ids.shape[1], limit))


class PromptTooLongError(ValueError):
    """A batch that does not fit the model's positions beside the virtual tokens."""


class _PositionLimit:
    """Forward pre-hook of the transformers model under peft's prompt tuning: a clear error,
    naming ``--max-length`` and the virtual tokens, for a sequence longer than its positions.
    A class, not a closure: the model still deep-copies and pickles."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.name = limit, name

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("inputs_embeds")  # peft passes the embeddings with the virtual tokens in front
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] > self.limit:
            raise PromptTooLongError(_too_long(self.name, "a batch", x.shape[1] - PROMPT_TOKENS, self.limit))


class _LastTokenAtEnd:
    """Hooks on a decoder's base model: copy each row's last attended state (the prefix of
    virtual tokens extends the mask) to the last position, which the classifier reads when it
    gets ``inputs_embeds``. A class, not closures: the model still deep-copies and pickles."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def before(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def after(self, _module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        mask, self.mask = self.mask, None
        hidden = output[0]
        if mask is None or mask.shape[1] != hidden.shape[1] or bool(mask[:, -1].all()):
            return output
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.bool() * positions).argmax(dim=1)
        hidden = hidden.clone()
        hidden[:, -1] = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        output[next(iter(output.keys()))] = hidden  # a ModelOutput: its first field
        return output


def apply_s2a_lora(model: nn.Module, ctx: MethodContext) -> MethodResult:
    """LoRA, then S2A's storage. A width s2a refuses is refused before peft wraps the model,
    as :class:`MethodNotApplicable` (as ``--act-bits`` of the other methods); a later failure
    leaves the model unwrapped again (:func:`apply_spec` undoes the wrap)."""
    from s2a import compress_activations

    bits = ctx.act_bits
    if bits:
        check_act_bits(bits)
    result = apply_lora(model, ctx)
    if bits:
        try:
            compress_activations(result.model, bits=bits)
        except (ValueError, TypeError) as exc:
            raise MethodNotApplicable(f"--act-bits {bits}: {exc}") from None
        result.notes.append(f"activations stored at {bits} bits (s2a.compress_activations on the peft model)")
    return result
