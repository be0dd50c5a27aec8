"""trainable_parameters, save_tuned / load_tuned (atomic, checked), merge; pretrained MiniLM."""

import copy
import json
import re

import pytest
import torch
from tuner_zoo import build, call, eager_kernels, example_of, one_thread, output

import s2a
from helpers import minilm_path, rotten_tomatoes_sentences

pytestmark = pytest.mark.usefixtures(eager_kernels.__name__, one_thread.__name__)


def applied(family, config=None):
    base, batch = build(family)
    model = copy.deepcopy(base)
    s2a.apply(model, config or s2a.S2AConfig(act_bits=None), example_input=example_of(batch))
    with torch.no_grad():  # move away from the identity initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return base, model, batch


def test_trainable_parameters_counts_and_prints_like_peft():
    base, model, _ = applied("vit")
    tp = s2a.trainable_parameters(model)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", str(tp))
    assert tp.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tp.total == sum(p.numel() for p in model.parameters())
    assert tp.backbone == sum(p.numel() for p in base.parameters())
    assert sum(tp.by_kind.values()) == sum(tp.by_module.values()) == tp.trainable
    rank, dim, tokens = 4, 192, 5  # 32x32 image, patch 16, 1 class token
    assert tp.by_kind["prompt"] == len(model.blocks) * (tokens * rank + rank * dim)
    assert tp.by_kind["head"] == 192 * 5 + 5
    assert f"{tp.trainable:,d}" in str(tp) and "by module kind: bias=" in tp.table()
    # A head that num_classes replaces is not part of the backbone the tuned modules sit on.
    _, replaced, _ = applied("vit", s2a.S2AConfig(act_bits=None, num_classes=3))
    head = sum(p.numel() for p in base.head.parameters())
    assert s2a.trainable_parameters(replaced).backbone == tp.backbone - head
    assert tp.to_dict()["percent"] == pytest.approx(100 * tp.trainable / tp.total)
    plain = s2a.trainable_parameters(base)  # works on any model
    assert plain.trainable == plain.total and plain.by_kind == {"other": plain.total}


def test_save_is_atomic_and_small(tmp_path):
    _, model, _ = applied("bert_cls")
    out = s2a.save_tuned(model, tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["s2a_config.json", "tuned.safetensors"]
    meta = json.loads((out / "s2a_config.json").read_text())
    assert meta["config"] == model.s2a_config.to_dict()
    assert meta["backbone"]["class"] == "BertForSequenceClassification"
    from safetensors.torch import load_file

    saved = load_file(out / "tuned.safetensors")
    assert set(saved) == set(model._s2a_tuner.tuned_keys)
    assert sum(t.numel() for t in saved.values()) == s2a.trainable_parameters(model).trainable
    # overwrite in place: still exactly two files, no temporaries left behind
    s2a.save_tuned(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["s2a_config.json", "tuned.safetensors"]


def test_failed_write_leaves_previous_files(tmp_path, monkeypatch):
    _, model, _ = applied("bert_cls")
    s2a.save_tuned(model, tmp_path)
    before = (tmp_path / "tuned.safetensors").read_bytes()
    import s2a.tuners.utils as U

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(U.os, "replace", boom)
    with torch.no_grad():
        model.classifier.bias.add_(1)
    with pytest.raises(OSError, match="disk full"):
        s2a.save_tuned(model, tmp_path)
    assert (tmp_path / "tuned.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2a_config.json", "tuned.safetensors"]


def test_corrupt_or_missing_files_refused(tmp_path):
    base, model, _ = applied("bert_cls")
    s2a.save_tuned(model, tmp_path)
    blob = (tmp_path / "tuned.safetensors").read_bytes()
    (tmp_path / "tuned.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path)
    # without the checksum the safetensors parser itself catches the damage
    meta = json.loads((tmp_path / "s2a_config.json").read_text())
    del meta["tensors"]["sha256"]
    (tmp_path / "s2a_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path)
    (tmp_path / "s2a_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path)
    (tmp_path / "s2a_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"s2a_config\.json"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path)


def test_load_onto_applied_model_checks_config(tmp_path):
    base, model, batch = applied("bert_cls")
    s2a.save_tuned(model, tmp_path)
    same = copy.deepcopy(base)
    s2a.apply(same, s2a.S2AConfig(act_bits=None))
    s2a.load_tuned(same, tmp_path)
    with torch.no_grad():
        assert torch.equal(output(call(same, batch)), output(call(model, batch)))
    other = copy.deepcopy(base)
    s2a.apply(other, s2a.S2AConfig(act_bits=None, prompt_rank=2))
    with pytest.raises(ValueError, match="prepared with"):
        s2a.load_tuned(other, tmp_path)
    with pytest.raises(ValueError, match=r"needs a model prepared by s2a\.apply"):
        s2a.save_tuned(copy.deepcopy(base), tmp_path / "x")
    # storage bits change no tuned tensor: tensors trained at 4 bits load onto a native model
    native = copy.deepcopy(base)
    s2a.apply(native, s2a.S2AConfig(act_bits=4))
    s2a.load_tuned(native, tmp_path)
    with pytest.raises(ValueError, match=r"another config than the saved tensors: prompt_rank=2 \(saved 4\)$"):
        s2a.load_tuned(other, tmp_path)
    # a prompt rank without the prompt module shapes nothing: the configs agree
    biases = copy.deepcopy(base)
    s2a.apply(biases, s2a.S2AConfig(modules=("bias",), act_bits=None, prompt_rank=8))
    s2a.save_tuned(biases, tmp_path / "bias")
    plain = copy.deepcopy(base)
    s2a.apply(plain, s2a.S2AConfig(modules=("bias",), act_bits=None))
    s2a.load_tuned(plain, tmp_path / "bias")


def test_load_reuses_the_saved_input_size(tmp_path):
    """An image model prepared at 32x32: the prompt grid is 32x32's, and load_tuned
    rebuilds that dry-run input without being told."""
    base, model, batch = applied("resnet")
    s2a.save_tuned(model, tmp_path)
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(batch), model(batch))
    with pytest.raises(ValueError, match=r"other feature-map grids.* pass example_input= of the size used at save time"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path, example_input=torch.zeros(1, 3, 64, 64))


def test_a_prompt_grid_of_the_same_size_but_other_shape_is_refused(tmp_path):
    # 32x64 and 64x32 inputs give prompts of the same shapes: the grids tell them apart
    base, _ = build("resnet")
    model = copy.deepcopy(base)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=torch.zeros(2, 3, 32, 64))
    s2a.save_tuned(model, tmp_path)
    assert all(g[0] * 2 == g[1] for g in json.loads((tmp_path / "s2a_config.json").read_text())["prompt_grids"].values())
    with pytest.raises(ValueError, match="trained on other feature-map grids"):
        s2a.load_tuned(copy.deepcopy(base), tmp_path, example_input=torch.zeros(2, 3, 64, 32))
    s2a.load_tuned(copy.deepcopy(base), tmp_path)  # the saved input size


def test_tuned_tensors_load_onto_a_half_precision_copy_with_tiny_weights(tmp_path):
    # timm's cls_token starts at std 1e-6: subnormal in fp16, rounded by a few percent
    base, model, _ = applied("vit")
    assert base.cls_token.abs().max() < 1e-4
    s2a.save_tuned(model, tmp_path)
    s2a.load_tuned(copy.deepcopy(base).half(), tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.cls_token.normal_(0, 1e-6)  # another draw of it is still told apart
    with pytest.raises(ValueError, match="cls_token"):
        s2a.load_tuned(other, tmp_path)


def test_other_batchnorm_statistics_are_another_backbone(tmp_path):
    # frozen BatchNorms normalise with their running statistics: the biases are trained on them
    base, model, batch = applied("resnet")
    s2a.save_tuned(model, tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.bn1.running_var.mul_(3.0)
    with pytest.raises(ValueError, match=r"bn1\.running_var"):
        s2a.load_tuned(other, tmp_path)
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(batch), model(batch))


def test_a_dynamic_size_vit_refuses_another_grid_of_as_many_patches():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3, dynamic_img_size=True)
    s2a.apply(vit, s2a.S2AConfig(act_bits=None), example_input=(torch.zeros(1, 3, 32, 64),))  # as args
    vit(torch.zeros(1, 3, 32, 64))
    with pytest.raises(ValueError, match=r"image of size \(64, 32\), but the low-rank prompts were built for \(32, 64\)"):
        vit(torch.zeros(1, 3, 64, 32))
    with pytest.raises(ValueError, match="patch grid"):  # the features alone too
        vit.forward_features(torch.zeros(1, 3, 64, 32))
    # with dynamic padding an image of the same patch grid is the same prompt rows
    padded = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=3, dynamic_img_size=True,
                               dynamic_img_pad=True)
    s2a.apply(padded, s2a.S2AConfig(act_bits=None), example_input=torch.zeros(1, 3, 64, 64))
    assert padded(torch.zeros(1, 3, 60, 60)).shape == (1, 3)


@pytest.mark.parametrize("family", ["ViT", "Dinov2", "CLIP", "Siglip"])
def test_a_transformers_vit_refuses_another_grid_of_as_many_patches(family):
    # they take other sizes by interpolate_pos_encoding (DINOv2 always): the 64x32 image was
    # accepted on prompts of the 32x64 one, its rows on the wrong patches
    import transformers

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=64,
                 patch_size=16)
    if family in ("CLIP", "Siglip"):  # a text and a vision tower; the classifier reads the vision one
        cfg = getattr(transformers, f"{family}Config")(vision_config=shape, text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64), num_labels=3)
    else:
        cfg = getattr(transformers, f"{family}Config")(**shape, num_labels=3)
    model = getattr(transformers, f"{family}ForImageClassification")(cfg)
    kw = {"interpolate_pos_encoding": True} if family != "Dinov2" else {}
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input={"pixel_values": torch.zeros(1, 3, 32, 64), **kw})
    assert model(pixel_values=torch.zeros(1, 3, 32, 64), **kw).logits.shape == (1, 3)
    with pytest.raises(ValueError, match=r"image of size \(64, 32\).*patch grid \(2, 4\)"):
        model(pixel_values=torch.zeros(1, 3, 64, 32), **kw)


@pytest.mark.parametrize("family", ["vit", "swin", "convnext", "distilbert_cls", "llama_cls"])
def test_merge_keeps_output(family, tmp_path):
    _, model, batch = applied(family, s2a.S2AConfig())  # 4-bit compression on
    model.eval()
    with torch.no_grad():
        ref = output(call(model, batch))
    s2a.merge(model)
    assert getattr(model, "_s2a_compression", None) is None
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.merged and not hasattr(p, "A") for p in model._s2a_tuner.prompts.values())
    assert any(k.endswith("s2a_prompt.prompt") for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(output(call(model, batch)), ref)
    with pytest.raises(RuntimeError, match="merged"):
        s2a.save_tuned(model, tmp_path)


def test_side_save_load_round_trip(tmp_path):
    pytest.importorskip("s2a.tuners.side")
    for i, modules in enumerate([("side",), ("bias", "prompt", "side")]):
        base, model, batch = applied("vit", s2a.S2AConfig(modules=modules, act_bits=None, side_depth=2))
        assert "side" in s2a.trainable_parameters(model).by_kind
        s2a.save_tuned(model, tmp_path / str(i))
        fresh = copy.deepcopy(base)
        s2a.load_tuned(fresh, tmp_path / str(i))
        with torch.no_grad():
            assert torch.equal(output(call(fresh, batch)), output(call(model, batch)))


def test_pretrained_minilm_on_real_sentences(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = dict(tok(rotten_tomatoes_sentences(4), padding=True, truncation=True, max_length=48,
                     return_tensors="pt"))
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    fresh = copy.deepcopy(base)
    with torch.no_grad():
        ref = base(**batch).logits
    model = copy.deepcopy(base)
    s2a.apply(model, s2a.S2AConfig())
    assert model._s2a_tuner.info.family == "hf-bert" and len(model._s2a_tuner.info.blocks) == 6
    out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    tp = s2a.trainable_parameters(model)
    assert tp.percent < 1.5, tp
    out = model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
    out.backward()
    declared = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == declared
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    for (n, p), (n0, p0) in zip(model.named_parameters(), base.named_parameters(), strict=False):
        if n == n0 and n not in declared:
            assert torch.equal(p, p0), n
    s2a.save_tuned(model, tmp_path)
    s2a.load_tuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_parameters_unfrozen_after_apply_are_saved_and_trainable_again(tmp_path):
    base, model, batch = applied("vit")
    layer = "blocks.1.mlp.fc2.weight"
    dict(model.named_parameters())[layer].requires_grad_(True)  # "also train this layer"
    with torch.no_grad():
        dict(model.named_parameters())[layer].add_(0.1)
    s2a.save_tuned(model, tmp_path)
    assert json.loads((tmp_path / "s2a_config.json").read_text())["tensors"]["trained_since_apply"] == [layer]
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path, example_input=example_of(batch))
    model.eval(), fresh.eval()
    torch.testing.assert_close(output(call(fresh, batch)), output(call(model, batch)), rtol=0, atol=0)
    assert dict(fresh.named_parameters())[layer].requires_grad
    assert s2a.trainable_parameters(fresh).trainable == s2a.trainable_parameters(model).trainable
    s2a.save_tuned(fresh, tmp_path / "again")  # still saved
    assert json.loads((tmp_path / "again" / "s2a_config.json").read_text())["tensors"]["trained_since_apply"] == []
    assert layer in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "again" / "tuned.safetensors")


def test_apply_refuses_a_peft_wrapped_model():
    import peft

    base, _ = build("bert_cls")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"HF peft has wrapped.*s2a\.compress_activations\(peft_model\)"):
        s2a.apply(wrapped, s2a.S2AConfig(), example_input={"input_ids": torch.randint(1, 100, (2, 8))})
    assert any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" in n)  # left as it was


def test_save_load_merge_name_the_applied_model_inside_a_wrapper(tmp_path):
    """peft wrapped after apply forwards attribute reads to the applied model, whose tuned names
    lack peft's prefix: save_tuned failed with a bare KeyError; DDP said 'needs a model
    prepared by s2a.apply'."""
    import peft

    _, model, _ = applied("bert_cls")
    s2a.save_tuned(model, tmp_path / "t")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    outer = torch.nn.Sequential(model)  # a wrapper that forwards nothing (DDP's .module)
    save, load = (lambda m: s2a.save_tuned(m, tmp_path / "t")), (lambda m: s2a.load_tuned(m, tmp_path / "t"))
    # (load_tuned reads a plain wrapper as a fresh model of another class, and says so)
    for w, inner, calls in ((wrapped, "base_model.model", (save, load, s2a.merge)), (outer, "0", (save, s2a.merge))):
        for fn in calls:
            with pytest.raises(ValueError, match=rf"submodule '{re.escape(inner)}', inside a wrapper"):
                fn(w)
