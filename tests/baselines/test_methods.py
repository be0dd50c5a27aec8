"""Every method on tiny real-architecture models: what trains, the output at initialisation, and
what one optimizer step changes."""

from __future__ import annotations

import pytest
import torch
from util import HEADS, call, output, prepared, step, trainable

from s2a.baselines import METHOD_SPECS
from s2a.train.config import METHODS, TrainConfig, TrainError, default_lr


def _head(name: str, family: str) -> bool:
    return any(f".{h}." in f".{name}" for h in HEADS[family])


# method -> predicate on a trainable parameter name (beyond the head unless said otherwise)
DECLARED = {
    "full": lambda n, f: True,
    "full-ckpt": lambda n, f: True,
    "mesa8": lambda n, f: True,
    "fewbit2": lambda n, f: True,
    "linear": lambda n, f: _head(n, f),
    "bitfit": lambda n, f: n.endswith(".bias") or _head(n, f),
    "bitfit-ckpt": lambda n, f: n.endswith(".bias") or _head(n, f),
    "vpt": lambda n, f: n == "vpt_prompts.prompts" or _head(n, f),
    "adaptformer": lambda n, f: ".adaptformer." in n or _head(n, f),
    "lst": lambda n, f: n.startswith("lst_side."),
    "lora": lambda n, f: ".lora_" in n or ".modules_to_save." in n,
    "lora-ckpt": lambda n, f: ".lora_" in n or ".modules_to_save." in n,
    "s2a-lora": lambda n, f: ".lora_" in n or ".modules_to_save." in n,
    "ia3": lambda n, f: ".ia3_l." in n or ".modules_to_save." in n,
    "prompt-tuning": lambda n, f: "prompt_encoder" in n or ".modules_to_save." in n,
}
# zero-initialised methods and storage configurations: the output at initialisation is the backbone's
SAME_OUTPUT = {"full", "full-ckpt", "mesa8", "fewbit2", "linear", "bitfit", "bitfit-ckpt", "adaptformer", "lora",
               "lora-ckpt", "ia3", "s2a-lora"}
CASES = [("vit", m) for m in DECLARED if m != "prompt-tuning"] + [
    ("bert_cls", m) for m in ("bitfit", "vpt", "adaptformer", "lst", "lora", "ia3", "prompt-tuning")
] + [("efficientnet", m) for m in ("bitfit", "lora", "ia3", "lst")] + [
    ("swin", m) for m in ("adaptformer", "lora")
] + [("distilbert_cls", m) for m in ("vpt", "adaptformer")]


def test_registry_matches_the_cli_methods():
    assert tuple(METHOD_SPECS) == METHODS
    for m in METHODS:
        assert METHOD_SPECS[m].description
        assert default_lr(m, "text") > 0 and default_lr(m, "image") > 0


@pytest.mark.parametrize(("family", "method"), CASES)
def test_declared_parameters_train_and_change(family, method):
    ref, res, batch = prepared(family, method, act_bits=4 if method == "s2a-lora" else None)
    model = res.model
    names = trainable(model)
    assert names, method
    declared = DECLARED[method]
    assert all(declared(n, family) for n in names), sorted(n for n in names if not declared(n, family))[:5]
    if method not in ("lst", "full", "full-ckpt", "mesa8", "fewbit2"):
        assert any(_head(n, family) for n in names), "the classifier head must train"
    model.eval()
    with torch.no_grad():
        out = output(call(model, batch))
    if method in SAME_OUTPUT:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 if method in ("mesa8", "fewbit2") else 1e-6)
    else:
        assert out.shape == ref.shape and not torch.allclose(out, ref)
    changed = step(model, batch)
    assert changed == names, (sorted(changed - names)[:5], sorted(names - changed)[:5])


def test_vpt_respects_padding():
    """A padded sentence gives the logits of the same sentence alone: the prompt columns join
    the attention mask and the padded keys stay masked."""
    _, res, batch = prepared("bert_cls", "vpt")
    model = res.model.eval()
    with torch.no_grad():
        both = call(model, batch).logits
        n = int(batch["attention_mask"][1].sum())
        alone = call(model, {k: v[1:, :n] for k, v in batch.items()}).logits
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)


def test_lst_backbone_keeps_nothing_for_backward():
    _, res, batch = prepared("vit", "lst")
    model = res.model.train()
    out = call(model, batch)
    out.float().pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("lst_side."))
    assert all(p.grad is not None for p in model.lst_side.parameters())


@pytest.mark.parametrize(
    ("family", "method", "words"),
    [
        ("efficientnet", "vpt", ["vpt", "timm-efficientnet", "lora", "s2a"]),
        ("efficientnet", "adaptformer", ["adaptformer", "timm-efficientnet", "bitfit"]),
        ("vit", "prompt-tuning", ["prompt-tuning", "timm-vit", "adaptformer"]),
        ("swin", "vpt", ["vpt", "timm-swin", "adaptformer"]),
        ("resnet", "lora", ["lora", "timm-resnet", "bitfit"]),
    ],
)
def test_unsupported_combinations_name_method_family_and_alternatives(family, method, words):
    from tuner_zoo import build

    from s2a.train.methods import apply_method

    model, batch = build(family)
    with pytest.raises(TrainError) as err:
        apply_method(model, method, head_names=("head", "head.fc", "fc", "classifier"), example_input=batch)
    msg = str(err.value)
    assert "Methods that apply" in msg or method == "prompt-tuning"
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("method", ["mesa8", "fewbit2", "full-ckpt", "bitfit-ckpt", "lora-ckpt"])
def test_fixed_storage_methods_refuse_act_bits(method, tmp_path):
    with pytest.raises(TrainError, match=f"--method {method} takes no --act-bits"):
        TrainConfig(model="m", data="d", out=str(tmp_path), method=method, act_bits=4)
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), method=method)
    assert cfg.resolved("text").compression_bits is None


def test_s2a_lora_compresses_by_default(tmp_path):
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), method="s2a-lora")
    assert cfg.resolved("text").compression_bits == 4
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), method="s2a-lora", act_bits=0)
    assert cfg.resolved("text").compression_bits is None


def _running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


@pytest.mark.parametrize(("method", "kept"), [("linear", True), ("bitfit", True), ("lora", True), ("ia3", True),
                                              ("lst", True), ("s2a", True), ("full", False), ("mesa8", False)])
def test_frozen_backbones_keep_their_batchnorm_statistics(method, kept):
    # every method with a frozen backbone normalises with the pretrained statistics, as s2a
    # does, so that a comparison measures the tuned modules and not the BatchNorm mode
    _, res, batch = prepared("efficientnet", method)
    before = _running_stats(res.model)
    assert before
    step(res.model, batch)
    after = _running_stats(res.model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) == kept
    assert METHOD_SPECS[method].norm_stats == ("trained" if not kept else "method" if method == "s2a" else "frozen")


@pytest.mark.parametrize("method", ["full-ckpt", "lora-ckpt"])
def test_checkpointing_a_decoder_turns_its_kv_cache_off(method):
    # a recomputed block of a decoder with use_cache=True appended its keys to the cache a
    # second time and the backward failed on a padded batch
    from tuner_zoo import build

    from s2a.train.methods import apply_method

    model, batch = build("llama_cls")
    assert model.config.use_cache
    res = apply_method(model, method, head_names=("score",), example_input=batch)
    assert not model.config.use_cache
    assert any("use_cache" in n for n in res.notes)
    assert step(res.model, batch)


def test_lst_model_deep_copies_and_pickles():
    # the forward was a closure over the original's side network: a deep copy (EMA, teacher)
    # silently ran the original's, and pickling failed
    import copy
    import pickle

    _, res, batch = prepared("vit", "lst")
    model = res.model.eval()
    with torch.no_grad():
        for p in model.lst_side.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        ref = call(model, batch).clone()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            for p in model.lst_side.parameters():
                p.add_(1.0)
            out = call(twin, batch)
            for p in model.lst_side.parameters():
                p.sub_(1.0)
        torch.testing.assert_close(out, ref)


def test_prompt_tuning_on_a_decoder_reads_the_last_real_token():
    # peft passes inputs_embeds, so transformers classified a right-padded row from a pad
    from tuner_zoo import build

    from s2a.train.methods import apply_method

    model, _ = build("llama_cls")
    with torch.no_grad():
        model.score.weight.normal_()
    ids = torch.tensor([[5, 17, 33, 8, 41]])
    padded = torch.tensor([[5, 17, 33, 8, 41, 0, 0, 0]])
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = apply_method(model, "prompt-tuning", head_names=("score",), example_input=alone)
    m = res.model.eval()
    with torch.no_grad():
        a = m(**alone).logits
        b = m(input_ids=padded, attention_mask=(padded != 0).long()).logits
        both = m(input_ids=torch.cat([torch.nn.functional.pad(ids, (0, 3)), padded]),
                 attention_mask=torch.tensor([[1] * 5 + [0] * 3] * 2)).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both, torch.cat([a, a]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_adaptformer_reads_the_residual_stream(family):
    # upstream AdaptFormer feeds the adapter the block's residual stream x, not norm2(x)
    _, res, batch = prepared(family, "adaptformer")
    model = res.model.eval()
    block = dict(model.named_modules())["blocks.0" if family == "vit" else "layers.0.blocks.0"]
    seen = {}
    block.norm2.register_forward_pre_hook(lambda m, a: seen.setdefault("stream", a[0].detach().clone()))
    block.mlp.adaptformer.down.register_forward_pre_hook(lambda m, a: seen.setdefault("adapter", a[0].detach().clone()))
    with torch.no_grad():
        call(model, batch)
    torch.testing.assert_close(seen["adapter"], seen["stream"])
    assert block.mlp.adaptformer.drop.p == 0.1


def test_adaptformer_on_a_bf16_model():
    # the adapters were created in fp32 beside a bf16 MLP: the first forward failed
    from tuner_zoo import build

    from s2a.train.methods import apply_method

    model, batch = build("vit")
    model, batch = model.to(torch.bfloat16), batch.to(torch.bfloat16)
    res = apply_method(model, "adaptformer", head_names=HEADS["vit"], example_input=batch)
    assert {p.dtype for n, p in res.model.named_parameters() if ".adaptformer." in n} == {torch.bfloat16}
    assert output(call(res.model, batch)).dtype == torch.bfloat16
    assert step(res.model, batch)


def _side_inputs(model: torch.nn.Module, batch, autocast: bool) -> tuple[list[torch.dtype], torch.Tensor]:
    side = model.lst_side
    seen: list[torch.dtype] = []
    handle = side.register_forward_pre_hook(lambda m, a: seen.extend(h.dtype for h in a[0]))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = call(model, batch)
    finally:
        handle.remove()
    return seen, out


def test_lst_keeps_block_outputs_at_the_autocast_width():
    # every captured block output became an fp32 copy: under bf16 autocast, twice the memory
    # of what the down-projections compute with (and store for backward)
    _, res, batch = prepared("vit", "lst")
    model = res.model.train()
    with torch.no_grad():
        model.lst_side.head.weight.normal_()
    dtypes, ref = _side_inputs(model, batch, autocast=False)
    assert dtypes == [torch.float32] * 2
    dtypes, out = _side_inputs(model, batch, autocast=True)
    assert dtypes == [torch.bfloat16] * 2
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.lst_side.parameters())


@pytest.mark.parametrize(("problem", "labels"), [
    ("single_label_classification", torch.tensor([0, 1])),
    ("regression", torch.tensor([[0.5, -1.0], [2.0, 0.0]])),
    ("multi_label_classification", torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
])  # fmt: skip
def test_lst_loss_is_the_side_networks(problem, labels):
    # labels= returned the frozen backbone head's loss, which has no gradient
    import torch.nn.functional as F

    _, res, batch = prepared("bert_cls", "lst")
    model = res.model.train()
    if problem != "single_label_classification":
        model.config.problem_type = problem
    with torch.no_grad():
        model.lst_side.head.weight.normal_()
    rule = {"single_label_classification": F.cross_entropy, "regression": F.mse_loss,
            "multi_label_classification": F.binary_cross_entropy_with_logits}[problem]
    out = model(**batch, labels=labels)
    torch.testing.assert_close(out.loss, rule(out.logits, labels))
    assert out.to_tuple()[0] is out.loss and out.loss.requires_grad
    out.loss.backward()
    assert model.lst_side.head.weight.grad is not None
    assert model.config.problem_type == problem
    loss, logits = model(**batch, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, rule(logits, labels))


def _fingerprint(model: torch.nn.Module, batch) -> tuple:
    with torch.no_grad():
        out = output(call(model, batch)).clone()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return (out, [n for n, _ in model.named_modules()], [(n, p.requires_grad) for n, p in model.named_parameters()],
            hooks, [n for n, m in model.named_modules() if "forward" in vars(m)])


def _assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1:] == b[1:]


@pytest.mark.parametrize("method", ["vpt", "adaptformer", "linear", "bitfit"])
def test_a_missing_head_leaves_the_model_untouched(method):
    # the model was frozen and the prompts / adapters hooked in before the head lookup failed
    from tuner_zoo import build

    from s2a.train.methods import apply_method

    model, batch = build("vit")
    before = _fingerprint(model, batch)
    with pytest.raises(TrainError, match="cannot find the classifier head"):
        apply_method(model, method, head_names=("nohead",), example_input=batch)
    _assert_same(_fingerprint(model, batch), before)


@pytest.mark.parametrize("method", ["adaptformer", "vpt", "lst", "lora", "s2a-lora", "full"])
def test_a_failed_compression_undoes_the_method(method, monkeypatch):
    # --act-bits compression ran after the method had changed the model; when it failed, the
    # model stayed half configured (and compressed, where the failure came late)
    from tuner_zoo import build

    import s2a
    from s2a.baselines import MethodContext, MethodNotApplicable, apply_spec

    real = s2a.compress_activations

    def failing(model, **kw):
        real(model, **kw)
        raise TypeError("late failure")

    monkeypatch.setattr(s2a, "compress_activations", failing)
    model, batch = build("vit")
    before = _fingerprint(model, batch)
    with pytest.raises(MethodNotApplicable, match="--act-bits 4: late failure"):
        apply_spec(model, MethodContext(method, HEADS["vit"], act_bits=4, example_input=batch))
    assert not any("_s2a_compression" in vars(m) for m in model.modules())
    _assert_same(_fingerprint(model, batch), before)
    monkeypatch.setattr(s2a, "compress_activations", real)
    res = apply_spec(model, MethodContext(method, HEADS["vit"], act_bits=4, example_input=batch))
    assert step(res.model, batch)  # the model takes the method again
