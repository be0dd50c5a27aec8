"""Small random-init models of every family s2a.apply supports, with matching inputs."""

from __future__ import annotations

import pytest
import torch


def _timm(name, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, **kw)


def _hf(model_cls, config_cls, **kw):
    def build():
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))

    return build


_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64)
_DISTIL = dict(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)
_HFVIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8)
_SWIN = dict(depths=(1, 1, 1, 1), embed_dim=48, num_heads=(2, 2, 2, 2), img_size=64, window_size=4)
_SWIN_IMAGE = 64


@pytest.fixture
def eager_kernels(monkeypatch):
    """Eager activation kernels: the same results as the compiled ones (tested under
    tests/activations) without paying torch.compile's warm-up for these tiny models."""
    monkeypatch.setenv("S2A_COMPILE", "0")


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster than two
    contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def text(batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": mask}


# family -> (builder, batch maker, has a classifier head)
FAMILIES = {
    "vit": (_timm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5), image, True),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=5), image, True),
    "vit_reg": (_timm("vit_tiny_patch16_224", img_size=32, depth=2, reg_tokens=4, num_classes=5), image, True),
    "swin": (_timm("swin_tiny_patch4_window7_224", num_classes=5, **_SWIN), lambda: image(_SWIN_IMAGE), True),
    "resnet": (_timm("resnet18", num_classes=5), image, True),
    "convnext": (_timm("convnext_atto", num_classes=5), image, True),
    "efficientnet": (_timm("efficientnet_b0", num_classes=5), image, True),
    "bert_cls": (_hf("BertForSequenceClassification", "BertConfig", **_TEXT), text, True),
    "bert": (_hf("BertModel", "BertConfig", **_TEXT), text, False),
    "roberta_cls": (_hf("RobertaForSequenceClassification", "RobertaConfig", **_TEXT), text, True),
    "distilbert_cls": (_hf("DistilBertForSequenceClassification", "DistilBertConfig", **_DISTIL), text, True),
    "hf_vit_cls": (_hf("ViTForImageClassification", "ViTConfig", num_labels=3, **_HFVIT), lambda: image(32), True),
    "hf_vit": (_hf("ViTModel", "ViTConfig", **_HFVIT), lambda: image(32), False),
    "llama_cls": (_hf("LlamaForSequenceClassification", "LlamaConfig", pad_token_id=0, **_TEXT), text, True),
    "llama_lm": (_hf("LlamaForCausalLM", "LlamaConfig", **_TEXT), text, False),
    "llama": (_hf("LlamaModel", "LlamaConfig", **_TEXT), text, False),
}


def _levit(num_classes):
    # get_classifier() is the tuple (head, head_dist), two NormLinear averaged at inference
    from timm.models.levit import LevitDistilled

    return LevitDistilled(img_size=32, embed_dim=(16, 24), key_dim=8, depth=(1, 1), num_heads=(2, 2),
                          num_classes=num_classes)


def _repvit(num_classes):
    # get_classifier() is one container holding both heads (head.head, head.head_dist)
    from timm.models.repvit import RepVit

    return RepVit(img_size=32, embed_dim=(16, 24), depth=(1, 1), num_classes=num_classes)


def _resnetv2(num_classes):
    # the classifier is a 1x1 Conv2d on the pooled (B, C, 1, 1) map
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1), channels=(32, 32), stem_chs=32, basic=True, bottle_ratio=1.0,
                    num_classes=num_classes)


def _swinv2(num_classes):
    # NHWC stages; stages 1.. open with a PatchMerging whose layers see 4C channels
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(img_size=32, patch_size=2, embed_dim=24, depths=(1, 1, 1), num_heads=(1, 2, 4),
                             window_size=4, num_classes=num_classes)


# timm models no built-in adapter knows (the generic adapter's), on image(32):
# name -> builder(num_classes)
TIMM_GENERIC = {"levit": _levit, "repvit": _repvit, "resnetv2": _resnetv2, "swinv2": _swinv2}


def build_timm_generic(name: str, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return TIMM_GENERIC[name](num_classes).eval(), image(32)


def build(family: str, seed: int = 0):
    builder, batch, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return builder().eval(), batch()


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def example_of(batch):
    """One sample of a batch (the dry-run input)."""
    if isinstance(batch, dict):
        return {k: v[:1] for k, v in batch.items()}
    return batch[:1]


def output(out) -> torch.Tensor:
    """One tensor that depends on every output of the model."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return torch.cat([o.flatten() for o in out])
    if getattr(out, "logits", None) is not None:
        return out.logits
    parts = [out.last_hidden_state.flatten()]
    if getattr(out, "pooler_output", None) is not None:
        parts.append(out.pooler_output.flatten())
    return torch.cat(parts)
