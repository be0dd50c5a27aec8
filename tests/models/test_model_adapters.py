"""describe_backbone: blocks, layouts, dims, prefix tokens and heads per model family;
the generic fallback; unsupported models; registering an adapter."""

import pytest
import timm
import torch
import transformers as T
from torch import nn

from s2a.models import (
    BlockSpec,
    HeadSpec,
    ModelAdapter,
    UnsupportedModelError,
    describe_backbone,
    find_adapter,
    register_adapter,
    unregister_adapter,
)

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)
HFVIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8)
IMG = torch.zeros(1, 3, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one intra-op thread beats two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def describe(model, x=None):
    return describe_backbone(model.eval(), x)


@pytest.mark.parametrize(
    ("build", "x", "family", "n", "layout", "in_shape", "out_shape", "prefix", "clf", "pooling"),
    [
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3), None,
         "timm-vit", 2, "tokens", (5, 192), (5, 192), 1, ("head",), "cls"),
        (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=3), None,
         "timm-vit", 2, "tokens", (6, 192), (6, 192), 2, ("head", "head_dist"), "cls"),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, reg_tokens=4, class_token=False,
                                   global_pool="avg", num_classes=3), None,
         "timm-vit", 2, "tokens", (8, 192), (8, 192), 4, ("head",), "mean"),
        (lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=48,
                                   num_heads=(2, 2, 2, 2), img_size=64, window_size=4, num_classes=3), None,
         "timm-swin", 4, "nhwc", (16, 16, 48), (2, 2, 384), 0, ("head.fc",), "mean"),
        (lambda: timm.create_model("resnet18", num_classes=3), IMG,
         "timm-resnet", 8, "nchw", (64, 8, 8), (512, 1, 1), 0, ("fc",), "mean"),
        (lambda: timm.create_model("convnext_atto", num_classes=3), IMG,
         "timm-convnext", 12, "nchw", (40, 8, 8), (320, 1, 1), 0, ("head.fc",), "mean"),
        (lambda: timm.create_model("efficientnet_b0", num_classes=3), IMG,
         "timm-efficientnet", 16, "nchw", (32, 16, 16), (320, 1, 1), 0, ("classifier",), "mean"),
        (lambda: T.BertForSequenceClassification(T.BertConfig(**TEXT)), None,
         "hf-bert", 2, "tokens", (8, 32), (8, 32), 0, ("classifier",), "cls"),
        (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**TEXT)), None,
         "hf-bert", 2, "tokens", (8, 32), (8, 32), 0, ("classifier.out_proj",), "cls"),
        (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)), None,
         "hf-distilbert", 2, "tokens", (8, 32), (8, 32), 0, ("classifier",), "cls"),
        (lambda: T.ViTForImageClassification(T.ViTConfig(**HFVIT, num_labels=3)), None,
         "hf-vit", 2, "tokens", (17, 32), (17, 32), 1, ("classifier",), "cls"),
        (lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**TEXT, pad_token_id=0)), None,
         "hf-llama", 2, "tokens", (8, 32), (8, 32), 0, ("score",), "last"),
        # decoders with LLaMA's layer layout, found by it
        (lambda: T.GemmaForSequenceClassification(T.GemmaConfig(**TEXT, head_dim=16, num_key_value_heads=1, pad_token_id=0)), None,
         "hf-llama", 2, "tokens", (8, 32), (8, 32), 0, ("score",), "last"),
        (lambda: T.MixtralForSequenceClassification(T.MixtralConfig(
            **TEXT, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)), None,
         "hf-llama", 2, "tokens", (8, 32), (8, 32), 0, ("score",), "last"),
    ],
)
def test_families(build, x, family, n, layout, in_shape, out_shape, prefix, clf, pooling):
    torch.manual_seed(0)
    model = build()
    info = describe(model, x)
    assert (info.family, len(info.blocks), info.num_prefix_tokens, info.pooling) == (family, n, prefix, pooling)
    assert set(info.layouts) == {layout}
    assert info.blocks[0].in_shape == in_shape and info.blocks[-1].out_shape == out_shape
    assert info.classifier_names == clf and info.task == "classification" and info.head_trainable
    assert all(b.module is model.get_submodule(b.name) for b in info.blocks)
    assert info.block_modules(model) == [b.module for b in info.blocks]
    assert info.dims == [b.out_dim for b in info.blocks]
    assert info.blocks[0].in_dim == (in_shape[0] if layout == "nchw" else in_shape[-1])
    assert [b.stage for b in info.blocks] == sorted(b.stage for b in info.blocks)
    clf_module = info.classifier_modules(model)[0]
    assert (info.feature_dim, info.num_classes) == (clf_module.in_features, clf_module.out_features)


def test_llama_layout_is_not_claimed_by_encoders_or_composite_models():
    # a bidirectional encoder with LLaMA-named projections, a vision-language model (its text
    # layers beside a vision tower) and a decoder whose layers get 3-D multimodal positions
    eurobert = T.AutoModel.from_config(T.EuroBertConfig(**TEXT, pad_token_id=0))
    llava = T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=T.LlamaConfig(**TEXT)))
    assert find_adapter(eurobert).name == find_adapter(llava).name == "generic"
    qwen_vl_text = T.AutoModel.from_config(T.Qwen2VLTextConfig(
        **TEXT, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    assert find_adapter(qwen_vl_text).name == "hf-llama"
    # its rotary positions are (3, batch, tokens): prompt rows go by index, not by position
    assert describe(qwen_vl_text, {"input_ids": torch.randint(1, 100, (2, 8))}).position_ids_kwarg is None
    assert describe(T.LlamaModel(T.LlamaConfig(**TEXT))).position_ids_kwarg == "position_ids"


def test_hierarchical_stages_and_grids():
    model = timm.create_model("resnet50", num_classes=3)
    info = describe(model, torch.zeros(1, 3, 64, 64))
    assert [sum(b.stage == s for b in info.blocks) for s in range(4)] == [3, 4, 6, 3]
    assert info.blocks[0].in_grid == (16, 16) and info.blocks[0].in_positions == 256
    assert info.blocks[3].in_dim == 256 and info.blocks[3].out_dim == 512 and info.blocks[3].out_grid == (8, 8)


def test_bare_backbones_and_language_models():
    for model, max_pos in [(T.BertModel(T.BertConfig(**TEXT)), 64), (T.ViTModel(T.ViTConfig(**HFVIT)), None),
                           (T.LlamaModel(T.LlamaConfig(**TEXT)), 64)]:
        info = describe(model)
        assert info.task == "features" and info.head_names == () and not info.head_trainable
        assert info.max_positions == max_pos
    lm = describe(T.LlamaForCausalLM(T.LlamaConfig(**TEXT)))
    assert lm.task == "lm" and lm.head_names == ("lm_head",) and not lm.head_trainable
    assert lm.position_ids_kwarg == "position_ids"


def test_pooled_features():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    info = describe(vit)
    with torch.no_grad():
        expect = vit.forward_head(vit.forward_features(x), pre_logits=True)
        torch.testing.assert_close(info.pooled_features(vit, x), expect)
    bert = T.BertModel(T.BertConfig(**TEXT)).eval()
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(describe(bert).pooled_features(bert, ids), bert(ids).last_hidden_state[:, 0])
    llama = T.LlamaForSequenceClassification(T.LlamaConfig(**TEXT, pad_token_id=0)).eval()
    with torch.no_grad():
        assert describe(llama).pooled_features(llama, ids).shape == (2, 32)
        # right padding: the feature is the last real token's, the one the model classifies from
        padded, mask = ids.clone(), torch.ones_like(ids)
        padded[1, 4:] = mask[1, 4:] = 0
        feature = describe(llama).pooled_features(llama, input_ids=padded, attention_mask=mask)
        torch.testing.assert_close(llama.score(feature), llama(input_ids=padded, attention_mask=mask).logits)


def test_pool_leaves_padding_out():
    hidden = torch.arange(24.0).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    info = describe(T.LlamaModel(T.LlamaConfig(**TEXT)).eval())
    assert info.pooling == "last"
    torch.testing.assert_close(info.pool(hidden, mask=mask), torch.stack([hidden[0, 3], hidden[1, 1]]))
    torch.testing.assert_close(info.pool(hidden), hidden[:, -1])
    for pooling, expect in (("mean", torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])),
                            ("max", torch.stack([hidden[0, 3], hidden[1, 1]])), ("cls", hidden[:, 0])):
        info.pooling = pooling
        torch.testing.assert_close(info.pool(hidden, mask=mask), expect)
    info.pooling = "mean"
    with pytest.raises(ValueError, match="does not match"):
        info.pool(hidden, mask=mask[:, :3])


def test_generic_timm_token_models_pool_as_timm_does():
    # BEiT is no VisionTransformer: the generic adapter reads its class token and pooling
    torch.manual_seed(0)
    for pool in ("token", "avg"):
        beit = timm.create_model("beit_base_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2,
                                 num_classes=3, global_pool=pool).eval()
        info = describe(beit)
        assert info.family == "generic" and info.num_prefix_tokens == 1
        assert info.pooling == ("cls" if pool == "token" else "mean")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            hidden = beit.forward_features(x)
            # BEiT's average pooling normalises after pooling: compare the pooled tokens
            expect = hidden[:, 0] if pool == "token" else hidden[:, 1:].mean(1)
            torch.testing.assert_close(info.pool(hidden), expect)


def test_dry_run_leaves_model_untouched():
    model = timm.create_model("resnet18", num_classes=3)
    model.train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    describe_backbone(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and not model.layer1.training and model.layer2.training


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class TokenNet(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x).relu()


def test_generic_fallback():
    info = describe(TokenNet(), torch.zeros(1, 7, 4))
    assert info.family == "generic" and info.block_names == ["layers.0", "layers.1", "layers.2"]
    assert info.layouts == ["tokens"] * 3 and info.blocks[0].in_shape == (7, 16)
    assert info.classifier_names == ("head",)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), ConvBlock(8), ConvBlock(8), nn.Flatten())
    info = describe(conv)  # a Conv2d first: default input zeros(1, 3, 224, 224)
    assert info.block_names == ["1", "2"] and info.layouts == ["nchw", "nchw"]
    assert info.blocks[0].in_shape == (8, 222, 222) and info.task == "features"


def test_unsupported_model_lists_its_module_classes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match=r"Module classes found: \['Flatten', 'Linear', 'ReLU', 'Sequential'\]"):
        find_adapter(model)
    with pytest.raises(UnsupportedModelError, match="register_adapter"):
        describe_backbone(model, torch.zeros(1, 4))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))  # blocks found, but (B, D)
    with pytest.raises(UnsupportedModelError, match="rank 2"):
        describe_backbone(mlp, torch.zeros(1, 4))


def test_generic_needs_an_input_when_it_cannot_guess():
    with pytest.raises(ValueError, match="example_input"):
        describe_backbone(TokenNet())


def test_registered_adapter_takes_precedence():
    class TokenNetAdapter(ModelAdapter):
        name = "tokennet"

        def matches(self, model):
            return isinstance(model, TokenNet)

        def blocks(self, model):
            return [BlockSpec(f"layers.{i}", "tokens", prefix_tokens=1) for i in range(len(model.layers))]

        def head(self, model):
            return HeadSpec(names=("head",), classifiers=("head",))

        def pooling(self, model):
            return "cls"

        def example_input(self, model):
            return torch.zeros(1, 5, 4)

    register_adapter(TokenNetAdapter)
    try:
        info = describe_backbone(TokenNet())
        assert info.family == "tokennet" and info.pooling == "cls"
        assert info.blocks[0].prefix_tokens == 1 and info.blocks[0].in_shape == (5, 16)
    finally:
        unregister_adapter(TokenNetAdapter)
    assert find_adapter(TokenNet()).name == "generic"
    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter(object())


def test_default_input_follows_model_device_and_dtype():
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3)
    assert describe_backbone(vit).blocks[0].in_shape == (5, 192)
    llama = T.LlamaModel(T.LlamaConfig(**TEXT)).to(torch.bfloat16)
    assert describe_backbone(llama).blocks[0].in_shape == (8, 32)
    half = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3).to(torch.bfloat16)
    assert describe_backbone(half).blocks[0].in_shape == (5, 192)


# ---------------------------------------------------------------- timm models left to the generic adapter
def levit(**kw):
    """LeViT: get_classifier() is the tuple (head, head_dist), two NormLinear (BatchNorm1d +
    Linear) whose outputs the model averages at inference."""
    from timm.models.levit import LevitDistilled

    return LevitDistilled(img_size=32, embed_dim=(16, 24), key_dim=8, depth=(1, 1), num_heads=(2, 2), **kw)


def repvit(**kw):
    """RepViT: get_classifier() is one container holding both heads (head.head, head.head_dist)."""
    from timm.models.repvit import RepVit

    return RepVit(img_size=32, embed_dim=(16, 24), depth=(1, 1), **kw)


def resnetv2(**kw):
    """ResNetV2: the classifier is a 1x1 Conv2d (head.fc) on the pooled (B, C, 1, 1) map."""
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1), channels=(32, 32), stem_chs=32, basic=True, bottle_ratio=1.0, **kw)


def swinv2(**kw):
    """SwinV2: NHWC stages; stages 1.. open with a PatchMerging whose layers see 4C channels."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformerV2(img_size=32, patch_size=2, embed_dim=24, depths=(1, 1, 1), num_heads=(1, 2, 4),
                             window_size=4, **kw)


def test_generic_head_may_be_a_1x1_conv():
    torch.manual_seed(0)
    model = resnetv2(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    info = describe(model, x[:1])
    assert info.head_names == ("head",) and info.classifier_names == ("head.fc",)
    assert isinstance(model.head.fc, nn.Conv2d) and (info.feature_dim, info.num_classes) == (32, 3)
    with torch.no_grad():  # the conv classifier's (B, C, 1, 1) input, as (B, C)
        expect = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(info.pooled_features(model, x), expect)


@pytest.mark.parametrize(("build", "names", "classifiers"), [
    (levit, ("head", "head_dist"), ("head.linear", "head_dist.linear")),
    (repvit, ("head",), ("head.head.l", "head.head_dist.l")),
])
def test_generic_timm_head_holds_every_averaged_classifier(build, names, classifiers):
    # The generic lookup took the last Linear of a top-level "head" only: LeViT's head_dist
    # and RepViT's head.head stayed at the old class count (and LeViT's head_dist frozen).
    info = describe(build(num_classes=3), IMG)
    assert info.family == "generic"
    assert info.head_names == names and info.classifier_names == classifiers
    assert (info.feature_dim, info.num_classes) == (24, 3)
    # built without classes (get_classifier() is an Identity), the model has no head
    bare = describe(build(num_classes=0), IMG)
    assert bare.head_names == bare.classifier_names == () and bare.task == "features"


def test_swinv2_stages_are_nhwc_although_patch_merging_sees_4c():
    # Stages 1.. hold no layer with C channels; the input was taken for NCHW (C = H) before.
    info = describe(swinv2(num_classes=3), IMG)
    assert info.family == "generic" and info.layouts == ["nhwc"] * 3
    assert [b.in_shape for b in info.blocks] == [(16, 16, 24), (16, 16, 24), (8, 8, 48)]
    assert [b.in_dim for b in info.blocks] == [24, 24, 48] and info.dims == [24, 48, 96]
    assert [b.in_grid for b in info.blocks] == [(16, 16), (16, 16), (8, 8)]


class MergeStage(nn.Module):
    """An NHWC stage: an optional 2x2 patch merging (a Linear on 4C channels), then an MLP
    on the merged width. A merging stage holds no layer with its input's C channels."""

    def __init__(self, c, merge=True):
        super().__init__()
        self.merge = merge
        width = 2 * c if merge else c
        self.reduction = nn.Linear(4 * c, width) if merge else nn.Identity()
        self.mlp = nn.Linear(width, width)

    def forward(self, x):
        if self.merge:
            b, h, w, c = x.shape
            x = self.reduction(x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3))
        return x + self.mlp(x)


def test_layout_follows_the_block_a_tensor_passes_to_unchanged():
    # 12 x 12 x 4 -> 6 x 6 x 8 -> 3 x 3 x 16: only the last stage has a layer on its input's
    # channels; the ones that feed it, shape unchanged, are NHWC too.
    model = nn.Sequential(MergeStage(4), MergeStage(8), MergeStage(16, merge=False))
    info = describe(model, torch.zeros(1, 12, 12, 4))
    assert info.layouts == ["nhwc"] * 3 and [b.in_dim for b in info.blocks] == [4, 8, 16]


def test_an_undecidable_layout_is_refused_not_guessed():
    model = nn.Sequential(MergeStage(4), MergeStage(8))
    with pytest.raises(UnsupportedModelError, match=r"cannot tell whether the input \(1, 12, 12, 4\) of block 0"):
        describe(model, torch.zeros(1, 12, 12, 4))


def _text_batch(eos: int | None = None) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    if eos is not None:
        ids[:, -1] = eos
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_transformers_head_is_the_layer_with_num_labels_outputs(tmp_path):
    # ModernBERT has a pre-classifier block named ``head`` before ``classifier``; BART names
    # its head ``classification_head``: both were missed (a crash, or a frozen classifier)
    import transformers

    import s2a

    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    modern = transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(**small))
    batch = _text_batch()
    s2a.apply(modern, s2a.S2AConfig(num_classes=3), example_input=batch)
    assert modern.classifier.out_features == 3 and modern.head.dense.out_features == 32
    assert modern.classifier.weight.requires_grad and not modern.head.dense.weight.requires_grad
    assert modern(**batch).logits.shape == (2, 3)
    # a longer batch than the dry run's 9 tokens: the prompt covers max_position_embeddings
    # (s2a train on a ModernBERT directory stopped at its second batch)
    longer = torch.randint(5, 100, (2, 40))
    assert s2a.models.describe_backbone(modern).max_positions == 64
    modern(input_ids=longer).logits.sum().backward()
    # no more than PROMPT_ROWS rows for a model of a million positions; ALiBi's Bloom (no
    # max_position_embeddings) gets that many too
    from s2a.models.generic import PROMPT_ROWS

    neox = transformers.GPTNeoXModel(transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=1_000_000))
    bloom = transformers.BloomForSequenceClassification(transformers.BloomConfig(
        vocab_size=100, hidden_size=32, n_layer=2, n_head=2, pad_token_id=0, num_labels=2))
    for model in (neox, bloom):
        info = s2a.models.describe_backbone(model, example_input=batch)
        if info.family == "generic":
            assert info.max_positions == PROMPT_ROWS == 8192, type(model).__name__
    s2a.apply(bloom, example_input=batch)
    bloom(input_ids=longer).logits.sum().backward()

    bart_cfg = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, eos_token_id=2, bos_token_id=0, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    bart = transformers.BartForSequenceClassification(bart_cfg)
    batch = _text_batch(eos=2)
    s2a.apply(bart, s2a.S2AConfig(num_classes=3), example_input=batch)
    assert bart.classification_head.out_proj.out_features == 3
    assert bart.classification_head.out_proj.weight.requires_grad
    s2a.save_tuned(bart, tmp_path)
    torch.manual_seed(0)
    fresh = transformers.BartForSequenceClassification(bart_cfg)
    # the stand-in input of zeros has no <eos>: the error says to pass a real batch
    with pytest.raises(ValueError, match="Pass example_input="):
        s2a.load_tuned(fresh, tmp_path)
    torch.manual_seed(0)
    fresh = transformers.BartForSequenceClassification(bart_cfg)
    s2a.load_tuned(fresh, tmp_path, example_input=batch)
    bart.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, bart(**batch).logits)


def test_generic_opens_attribute_stages_to_their_blocks():
    # timm's RegNet registers its stages (s1..s4) and their blocks (b1..) as attributes: no
    # ModuleList / Sequential. The stages are the trunk, opened to their blocks, in order.
    m = timm.create_model("regnety_002", pretrained=False, num_classes=3)
    info = describe_backbone(m, torch.zeros(1, 3, 64, 64))
    assert info.family == "generic" and info.block_names[:3] == ["s1.b1", "s2.b1", "s3.b1"]
    assert len(info.block_names) == 13 and info.layouts == ["nchw"] * 13
    # attribute groups that are not most of the model are not taken for its trunk
    with pytest.raises(UnsupportedModelError, match="cannot find the blocks of InceptionV3"):
        find_adapter(timm.create_model("inception_v3", pretrained=False, num_classes=3))

    # nor torch's own layers registered as attributes (the PyTorch tutorial's conv1, fc1..fc3)
    class TutorialNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    with pytest.raises(UnsupportedModelError, match="cannot find the blocks of TutorialNet"):
        find_adapter(TutorialNet())


def test_task_heads_of_other_names_train_and_refuse_a_class_count():
    """qa_outputs, XLNet's sequence summary + logits_proj: their weights stayed frozen (only
    their biases trained); num_classes on a span or per-choice scorer gave wrong shapes."""
    import s2a

    ids = torch.randint(0, 100, (2, 8))
    qa = T.BertForQuestionAnswering(T.BertConfig(**TEXT))
    assert describe(qa, {"input_ids": ids}).head_names == ("qa_outputs",)
    for cls in (T.BertForQuestionAnswering, T.BertForMultipleChoice):
        x = ids[:, None].expand(2, 3, 8).contiguous() if cls is T.BertForMultipleChoice else ids
        with pytest.raises(ValueError, match=f"num_classes: {cls.__name__} scores .*pass num_classes=None"):
            s2a.apply(cls(T.BertConfig(**TEXT)), s2a.S2AConfig(num_classes=5), example_input={"input_ids": x})
    xlnet = T.XLNetForSequenceClassification(T.XLNetConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2,
                                                           d_inner=64, num_labels=3))
    info = describe(xlnet, {"input_ids": ids})
    assert info.head_names == ("sequence_summary", "logits_proj") and info.classifier_names == ("logits_proj",)
    # a feature model's pooling block is not a classifier to replace (SigLIP's attention pooling)
    siglip = T.SiglipVisionModel(T.SiglipVisionConfig(**HFVIT))
    assert describe(siglip, {"pixel_values": IMG}).head_names == ()


def test_generic_blocks_across_sibling_containers_and_nested_lists():
    """CoaT's serial_blocks1..4 and Twins' blocks.i.j: the fallback prompted one stage (CoaT)
    or refused (Twins: its ModuleLists are never called); VOLO's aux_head kept 1000 outputs."""
    x = torch.zeros(1, 3, 64, 64)
    coat = timm.create_model("coat_lite_tiny", img_size=64, num_classes=5)
    assert [b.name for b in describe(coat, x).blocks] == [f"serial_blocks{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    twins = timm.create_model("twins_svt_small", img_size=64, num_classes=5, depths=(1, 1, 2, 1))
    assert [b.name for b in describe(twins, x).blocks] == ["blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.2.1",
                                                           "blocks.3.0"]
    volo = timm.create_model("volo_d1_224", img_size=64, num_classes=5)
    info = describe(volo, x)
    assert info.head_names == ("head", "aux_head") and info.classifier_names == ("head", "aux_head")


def test_head_rules_leave_trunks_and_user_classes_alone():
    """SelecSLS's ``head`` is trunk (its classifier is ``fc``); a user's own PreTrainedModel
    keeps its ``classifier``; a conv_head as wide as the classes is not an auxiliary head."""
    x = torch.zeros(1, 3, 64, 64)
    assert [b.name for b in describe(timm.create_model("selecsls42b"), x).blocks] == [f"head.{i}" for i in range(4)]
    assert describe(timm.create_model("mobilenetv3_small_100", num_classes=1024), x).head_names == ("classifier",)

    class Custom(T.PreTrainedModel):
        config_class = T.BertConfig

        def __init__(self, cfg):
            super().__init__(cfg)
            self.encoder = T.BertModel(cfg)
            self.classifier = nn.Linear(cfg.hidden_size, 5)  # config.num_labels left at 2

        def forward(self, input_ids):
            return self.classifier(self.encoder(input_ids).last_hidden_state[:, 0])

    info = describe(Custom(T.BertConfig(**TEXT)), {"input_ids": torch.randint(0, 100, (2, 8))})
    assert info.head_names == ("classifier",) and info.head_trainable


@pytest.mark.parametrize("build", [
    lambda: T.GPT2ForSequenceClassification(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                                         pad_token_id=0)),
    lambda: T.BertForSequenceClassification(T.BertConfig(**TEXT)),
])
def test_num_classes_updates_the_label_count_transformers_loss_reads(build):
    # The generic adapter left config.num_labels at 2: GPT-2's loss reshaped 4 x 5 logits
    # into 10 rows of 2 and crashed on 4 labels.
    import s2a

    model = build()
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), num_classes=5, act_bits=None))
    assert model.config.num_labels == model.num_labels == 5
    out = model(input_ids=torch.randint(5, 100, (4, 8)), labels=torch.tensor([0, 1, 4, 3]))
    assert out.logits.shape == (4, 5) and out.loss.isfinite()


def test_layout_of_a_feature_map_with_as_many_channels_as_columns():
    """A (B, 8, 8, 8) input fits both layouts: a stage opening with a channels-first LayerNorm
    (a subclass of nn.LayerNorm: transformers' ConvNeXt, timm's LayerNorm2d) was read as NHWC,
    so its prompt and side branch took W for the channels."""
    import torchvision
    from timm.models.metaformer import MetaFormer

    convnext = T.ConvNextForImageClassification(T.ConvNextConfig(
        image_size=32, num_stages=3, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_labels=3))
    info = describe(convnext, {"pixel_values": IMG})
    assert info.layouts == ["nchw"] * 3 and [b.in_dim for b in info.blocks] == [8, 8, 16]
    poolformer = MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3)
    info = describe(poolformer, IMG)
    assert info.layouts == ["nchw"] * 4 and info.dims == [8, 16, 32, 64]
    # a plain LayerNorm on the last dimension still says NHWC (torchvision's Swin stage)
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                              window_size=[2, 2], num_classes=3)
    info = describe(swin, IMG)
    assert info.block_names[1] == "features.1" and info.blocks[1].in_shape == (8, 8, 8)
    assert info.layouts[1:] == ["nhwc"] * 2 and info.dims[1:] == [8, 16]


@pytest.mark.parametrize(("build", "names"), [
    (lambda: T.SwiftFormerForImageClassification(T.SwiftFormerConfig(
        image_size=32, depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32], num_labels=3)), ("head", "dist_head")),
    (lambda: T.LevitForImageClassificationWithTeacher(T.LevitConfig(
        image_size=32, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 1, 1], depths=[1, 1, 1], key_dim=[8, 8, 8],
        num_labels=3)), ("classifier", "classifier_distill")),
    (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**HFVIT, num_labels=3)),
     ("cls_classifier", "distillation_classifier")),
])
def test_transformers_distilled_heads_train_and_change_width_together(build, names):
    # Only the head named like HEAD_NAMES was found (none of DeiT's): the distillation head
    # stayed frozen, and num_classes left it at 3 outputs, to be averaged with 5.
    import s2a

    torch.manual_seed(0)
    model = build()
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), num_classes=5, act_bits=None))
    assert model._s2a_tuner.info.head_names == names
    assert all(p.requires_grad for n in names for p in model.get_submodule(n).parameters())
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)


def test_a_lone_auxiliary_head_is_not_taken_for_the_head():
    # BEiT segmentation: the decode head was not found; its training-only auxiliary head, the
    # one *head* child with num_labels outputs, was trained and resized alone
    import transformers

    import s2a

    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, out_indices=[1, 2, 3, 4], use_auxiliary_head=True,
                                  pool_scales=[1, 2], auxiliary_channels=16, num_labels=3)
    model = transformers.BeitForSemanticSegmentation(cfg)
    assert describe(model, {"pixel_values": torch.randn(1, 3, 32, 32)}).head_names == ()
    with pytest.raises(ValueError, match="has no classification head to replace"):
        s2a.apply(model, s2a.S2AConfig(modules=("bias",), num_classes=5, act_bits=None))


def test_torchvision_vit_head_is_found_in_heads():
    import torchvision

    import s2a

    def build():
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=16, mlp_dim=32, num_classes=3)

    info = describe(build(), IMG)
    assert info.family == "generic" and (info.head_names, info.classifier_names) == (("heads",), ("heads.head",))
    model = build()
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), num_classes=5, act_bits=None), example_input=IMG)
    assert model.heads.head.weight.requires_grad and model(IMG).shape == (1, 5)


def test_class_token_joining_after_the_blocks_is_not_pooled_from_them():
    # CaiT's / XCiT's blocks see the patch tokens only; their class token joins the class
    # attention layers after them: "cls" pooling read the first patch.
    for name in ("cait_xxs24_224", "xcit_nano_12_p16_224"):
        model = timm.create_model(name, img_size=32, depth=2, num_classes=0)
        info = describe(model)
        assert info.blocks[-1].out_shape[0] == 4 and (info.pooling, info.num_prefix_tokens) == ("mean", 0), name
    # where the class token is in the blocks, the model's pooling stands (ConViT's joins its last block)
    convit = timm.create_model("convit_tiny", img_size=32, depth=2, local_up_to_layer=1, num_classes=0)
    info = describe(convit)
    assert [b.in_shape[0] for b in info.blocks] == [4, 5] and (info.pooling, info.num_prefix_tokens) == ("cls", 1)


def test_blocks_that_take_a_list_of_branches_are_refused_saying_so():
    # CrossViT's blocks take and return a list (one tensor per branch): the error told the user
    # to pass example_input=, which they had done
    model = timm.create_model("crossvit_tiny_240", num_classes=5)
    with pytest.raises(UnsupportedModelError, match=r"ran with other than one tensor in or out .*CrossViT's"):
        describe_backbone(model, torch.randn(1, 3, 240, 240))
