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
