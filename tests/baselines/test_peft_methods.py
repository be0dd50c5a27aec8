"""LoRA, IA3 and prompt tuning are Hugging Face peft objects, not re-implementations."""

from __future__ import annotations

import pytest
from util import prepared

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(("family", "method", "layer"), [
    ("vit", "lora", "lora.LoraLayer"), ("bert_cls", "lora", "lora.LoraLayer"),
    ("efficientnet", "lora", "lora.LoraLayer"), ("vit", "ia3", "ia3.IA3Layer"),
    ("bert_cls", "ia3", "ia3.IA3Layer"), ("vit", "s2a-lora", "lora.LoraLayer"),
])  # fmt: skip
def test_peft_layers_and_wrapper(family, method, layer):
    from peft.tuners import ia3, lora

    _, res, _ = prepared(family, method, act_bits=4 if method == "s2a-lora" else None)
    model = res.model
    assert isinstance(model, peft.PeftModel)
    mod, cls = layer.split(".")
    layers = [m for m in model.modules() if isinstance(m, getattr({"lora": lora, "ia3": ia3}[mod], cls))]
    assert layers
    if family == "bert_cls":
        assert isinstance(model, peft.PeftModelForSequenceClassification)
    heads = [m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert heads, "the classifier head is a peft modules_to_save module"
    if method == "s2a-lora":
        assert model._s2a_compression.spec.bits == 4
    else:
        assert getattr(model, "_s2a_compression", None) is None


def test_prompt_tuning_is_peft_prompt_learning():
    _, res, batch = prepared("bert_cls", "prompt-tuning")
    model = res.model
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    assert model.peft_config["default"].peft_type == peft.PeftType.PROMPT_TUNING
    assert model.peft_config["default"].num_virtual_tokens == 20
    out = model(**batch)
    assert out.logits.shape == (2, 2)


@pytest.mark.parametrize("bits", [5, 16])
def test_s2a_lora_refuses_bad_act_bits_like_the_other_methods(bits):
    # a raw ValueError from compress_activations, after peft had wrapped the model
    from peft.tuners import lora
    from tuner_zoo import build

    from s2a.baselines import MethodContext, MethodNotApplicable, apply_spec

    for method in ("s2a-lora", "lora"):
        model, batch = build("vit")
        with pytest.raises(MethodNotApplicable, match=f"--act-bits {bits}: bits={bits} is not supported"):
            apply_spec(model, MethodContext(method, ("head",), act_bits=bits, example_input=batch))
        assert not any(isinstance(m, lora.LoraLayer) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())


# family -> positions left beside the 20 virtual tokens (RoBERTa's start after its padding index)
ROOM = {"bert_cls": 44, "distilbert_cls": 44, "roberta_cls": 42}


@pytest.mark.parametrize("family", list(ROOM))
def test_prompt_tuning_refuses_sequences_beyond_the_positions(family):
    # tokens + virtual tokens beyond max_position_embeddings failed with a bare shape error
    import torch
    from tuner_zoo import build

    from s2a.baselines import MethodContext, MethodNotApplicable, apply_spec
    from s2a.baselines.peft_methods import PromptTooLongError

    heads = ("pre_classifier", "classifier") if family == "distilbert_cls" else ("classifier",)
    room = ROOM[family]

    def batch(n: int) -> dict:
        ids = torch.randint(3, 100, (2, n), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    model, example = build(family)
    with pytest.raises(MethodNotApplicable, match=f"--max-length {room + 1} .*use --max-length {room} or less"):
        apply_spec(model, MethodContext("prompt-tuning", heads, example_input=example, max_length=room + 1))
    with pytest.raises(MethodNotApplicable, match=f"use --max-length {room} or less"):
        apply_spec(model, MethodContext("prompt-tuning", heads, example_input=batch(room + 1)))
    assert not isinstance(model, peft.PeftModel) and all(p.requires_grad for p in model.parameters())
    res = apply_spec(model, MethodContext("prompt-tuning", heads, example_input=example, max_length=room))
    assert res.model(**batch(room)).logits.shape == (2, 2)
    with pytest.raises(PromptTooLongError, match=f"20 virtual tokens .*use --max-length {room} or less"):
        res.model(**batch(room + 1))


def test_ia3_refuses_a_model_without_its_feed_forward_module():
    # on a mixture-of-experts decoder peft scaled k and v only, reported as IA3
    transformers = pytest.importorskip("transformers")
    import torch

    from s2a.baselines import MethodContext, MethodNotApplicable, apply_spec

    cfg = transformers.GraniteMoeConfig(vocab_size=100, hidden_size=32, intermediate_size=16, num_local_experts=4,
                                        num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1,
                                        num_hidden_layers=2, pad_token_id=0)
    model = transformers.GraniteMoeForCausalLM(cfg)
    batch = {"input_ids": torch.randint(1, 100, (2, 8)), "use_cache": False}
    with pytest.raises(MethodNotApplicable, match="IA3 scales the feed-forward input, but GraniteMoeForCausalLM "
                                                  "has no module named down_proj"):
        apply_spec(model, MethodContext("ia3", (), example_input=batch))
    assert all(p.requires_grad for p in model.parameters())
    lora = apply_spec(model, MethodContext("lora", (), example_input=batch)).model  # attention targets exist
    assert any(".lora_A." in n for n, p in lora.named_parameters() if p.requires_grad)
