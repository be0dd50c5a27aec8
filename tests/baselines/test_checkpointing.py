"""Activation checkpointing changes where activations live, not the gradients."""

from __future__ import annotations

import pytest
import timm
import torch
from tuner_zoo import text
from util import HEADS, build

from s2a.memory import measure
from s2a.train.methods import apply_method


def _vit_with_dropout():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5,
                             proj_drop_rate=0.2, attn_drop_rate=0.1)


def _grads(model, batch, seed=3):
    model.train()
    torch.manual_seed(seed)  # the same dropout draws in both runs
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    out = getattr(out, "logits", out)
    out.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("plain", "ckpt"), [("full", "full-ckpt"), ("bitfit", "bitfit-ckpt"), ("lora", "lora-ckpt")])
def test_checkpointing_gives_the_same_gradients_with_dropout(plain, ckpt):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = apply_method(_vit_with_dropout(), plain, head_names=("head",), example_input=x).model
    b = apply_method(_vit_with_dropout(), ckpt, head_names=("head",), example_input=x).model
    ga, gb = _grads(a, x), _grads(b, x)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_on_text_keeps_less_and_evaluates_directly():
    model, batch = build("bert_cls")
    plain, _ = build("bert_cls")
    ckpt = apply_method(model, "full-ckpt", head_names=HEADS["bert_cls"], example_input=batch).model
    plain = apply_method(plain, "full", head_names=HEADS["bert_cls"]).model
    batch = text(batch=4, length=16)
    saved = [measure(m.train(), batch).saved_bytes for m in (plain, ckpt)]
    assert saved[1] < 0.6 * saved[0], saved
    ga, gb = _grads(plain, batch), _grads(ckpt, batch)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(**batch).logits, plain.eval()(**batch).logits)


def test_checkpointing_updates_batchnorm_statistics_once_per_step():
    # the recomputation runs the block in train mode again; its BatchNorm statistics must stay
    # those of the step's one forward, as without checkpointing
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    models = []
    for method in ("full", "full-ckpt"):
        torch.manual_seed(0)
        m = timm.create_model("resnet18", num_classes=5)
        models.append(apply_method(m, method, head_names=("fc",), example_input=x).model)
    for m in models:
        _grads(m, x)
    (a, b) = (dict(m.named_buffers()) for m in models)
    assert a.keys() == b.keys() and any(k.endswith("num_batches_tracked") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)
