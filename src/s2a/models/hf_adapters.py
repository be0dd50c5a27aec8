"""Adapters for transformers: BERT-family encoders (BERT, RoBERTa, DistilBERT, MiniLM,
which is a BertModel), ViTModel / ViTForImageClassification, and Llama-style decoders
(LlamaModel / LlamaForCausalLM / LlamaForSequenceClassification and every decoder-only
relative with LLaMA's layer layout: Mistral, Qwen, Gemma, OLMo, Mixtral, Granite...)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .registry import (
    BlockSpec,
    HeadSpec,
    ModelAdapter,
    default_image_input,
    register_adapter,
    text_input,
)


def _is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _layers(model: nn.Module, layer_classes: tuple[str, ...]) -> list[str]:
    """Paths of the children of the ModuleList holding the model's layers."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and type(m[0]).__name__ in layer_classes:
            return [f"{name}.{i}" for i in range(len(m))]
    return []


def _last_linear(module: nn.Module, prefix: str) -> str | None:
    if isinstance(module, nn.Linear):
        return prefix
    last = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            last = f"{prefix}.{n}"
    return last


def _llama_like_layers(model: nn.Module) -> list[str]:
    """Paths of a text decoder's layers when they have LLaMA's layout: ``layers`` of the model
    or of its base model, each with a causal ``self_attn`` holding separate ``q_proj`` /
    ``k_proj`` / ``v_proj`` / ``o_proj`` linears (which LoRA and IA3 target), whatever the
    feed-forward (gated MLP, mixture of experts). Composite models (a vision or audio tower
    beside the text model, multimodal rotary positions) and bidirectional encoders are not."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "sub_configs", None):
        return []
    try:  # a text model (not a time-series or audio one with the same layers)
        if "input_ids" not in inspect.signature(model.forward).parameters:
            return []
    except (TypeError, ValueError):
        return []
    prefix = getattr(model, "base_model_prefix", "")
    for path in ("layers", f"{prefix}.layers" if prefix else None):
        try:
            layers = model.get_submodule(path) if path else None
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 1:
            attn = getattr(layers[0], "self_attn", None)
            if (attn is not None and getattr(attn, "is_causal", False) is True
                    and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))):
                return [f"{path}.{i}" for i in range(len(layers))]
    return []


class HFAdapter(ModelAdapter):
    model_types: tuple[str, ...] = ()
    layer_classes: tuple[str, ...] = ()
    # top-level children of *For... models that form the head, in forward order
    head_children: tuple[str, ...] = ("pre_classifier", "sequence_summary", "classifier", "score", "qa_outputs")
    lm_children: tuple[str, ...] = ("lm_head",)

    def matches(self, model: nn.Module) -> bool:
        return _is_transformers(model) and getattr(model.config, "model_type", None) in self.model_types

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(n, "tokens", 0, self.num_prefix_tokens(model))
                for n in _layers(model, self.layer_classes)]

    def head(self, model: nn.Module) -> HeadSpec | None:
        children = dict(model.named_children())
        names = tuple(n for n in self.head_children if n in children)
        if names:
            last = _last_linear(children[names[-1]], names[-1])
            return HeadSpec(names=names, classifiers=(last,) if last else ())
        lm = tuple(n for n in self.lm_children if n in children)
        if lm:
            return HeadSpec(names=lm, classifiers=lm, trainable=False, task="lm")
        return None

    def max_positions(self, model: nn.Module) -> int | None:
        return getattr(model.config, "max_position_embeddings", None)

    def example_input(self, model: nn.Module) -> Any:
        return text_input(model)

    def pooling(self, model: nn.Module) -> str:
        from .sentence_pooling import SentencePooler

        # a sentence-transformers encoder classifies from the pooling it was trained with
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        pooler = getattr(base, "pooler", None)
        return pooler.mode if isinstance(pooler, SentencePooler) else "cls"


@register_adapter
class HFBertAdapter(HFAdapter):
    """BERT, RoBERTa (and MiniLM / other BertModel checkpoints)."""

    name = "hf-bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    layer_classes = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer")


@register_adapter
class HFDistilBertAdapter(HFAdapter):
    name = "hf-distilbert"
    model_types = ("distilbert",)
    layer_classes = ("TransformerBlock",)


@register_adapter
class HFViTAdapter(HFAdapter):
    name = "hf-vit"
    model_types = ("vit",)
    layer_classes = ("ViTLayer",)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def max_positions(self, model: nn.Module) -> int | None:
        return None

    def example_input(self, model: nn.Module) -> Any:
        return {"pixel_values": default_image_input(model)}


@register_adapter
class HFLlamaAdapter(HFAdapter):
    """Llama-style decoders: SwiGLU MLP (or experts), RMSNorm, rotary positions, causal attention.
    Besides the model types named, any decoder-only model whose layers have LLaMA's attention
    projections (:func:`_llama_like_layers`)."""

    name = "hf-llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layer_classes = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")

    def matches(self, model: nn.Module) -> bool:
        return super().matches(model) or (_is_transformers(model) and bool(_llama_like_layers(model)))

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        return [BlockSpec(n, "tokens", 0, self.num_prefix_tokens(model))
                for n in _layers(model, self.layer_classes) or _llama_like_layers(model)]

    def pooling(self, model: nn.Module) -> str:
        return "last"

    def position_ids_kwarg(self, model: nn.Module) -> str | None:
        return "position_ids"


def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a transformers text model's learned absolute position embeddings
    cover (BERT, RoBERTa, DistilBERT...; RoBERTa's start after its padding index), None for
    models without them (rotary decoders such as Llama take any length)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = getattr(base if isinstance(base, nn.Module) else model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    limit = table.num_embeddings
    if table.padding_idx is not None:
        limit -= table.padding_idx + 1
    return limit
