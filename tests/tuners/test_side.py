"""Lite side branch: channel pooling, LiteSideNetwork and attach_side on timm / transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2a
from s2a.tuners.side import LiteSideNetwork, _rungs, attach_side, channel_pool

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NUM_CLASSES = 5
SIDE = "s2a_side"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a shared CPU: one intra-op thread is much faster than contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- helpers
def vit_tiny():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=NUM_CLASSES)
    info = SimpleNamespace(
        blocks=[(f"blocks.{i}", b) for i, b in enumerate(model.blocks)],
        layouts=["tokens"] * len(model.blocks),
        dims=[model.embed_dim] * len(model.blocks),
        pooled=None,
        num_classes=NUM_CLASSES,
    )
    return model, info, torch.randn(2, 3, 64, 64)


def resnet18():
    model = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    store = {}
    model.global_pool.register_forward_hook(lambda _m, _a, out: store.__setitem__("pooled", out))
    info = SimpleNamespace(
        blocks=[(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)],
        layouts=["nchw"] * 4,
        dims=[64, 128, 256, 512],
        pooled=lambda _output: store.pop("pooled", None),
        num_classes=NUM_CLASSES,
    )
    return model, info, torch.randn(2, 3, 64, 64)


def bert_tiny(head: bool = False):
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        vocab_size=100, max_position_embeddings=32, num_labels=NUM_CLASSES,
    )
    model = (transformers.BertForSequenceClassification if head else transformers.BertModel)(cfg)
    encoder = model.bert.encoder if head else model.encoder
    info = SimpleNamespace(
        blocks=[(f"encoder.layer.{i}", b) for i, b in enumerate(encoder.layer)],
        layouts=["tokens"] * cfg.num_hidden_layers,
        dims=[cfg.hidden_size] * cfg.num_hidden_layers,
        pooled=None,
        num_classes=NUM_CLASSES,
    )
    input_ids = torch.randint(1, 100, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 6:] = 0  # second sentence padded
    input_ids[1, 6:] = 0
    return model, info, {"input_ids": input_ids, "attention_mask": attention_mask}


def config(modules=("side",), k=8, depth=2, fuse=False):
    return SimpleNamespace(
        side_reduction=k, side_depth=depth, fuse_side=fuse, modules=modules, num_classes=NUM_CLASSES
    )


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_heads(model):
    """Side heads are zero-initialised: give them values so that every side parameter gets a
    non-zero gradient and logits depend on the inputs."""
    with torch.no_grad():
        for name, p in getattr(model, SIDE).named_parameters():
            if "head" in name or "fuse" in name:
                p.normal_(0, 0.5)


def backbone_bytes(report):
    return {
        path: n for path, n in report.by_module.items()
        if not (path == SIDE or path.startswith(SIDE + ".") or path == "<loss>") and n
    }


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- channel_pool
def _hand_pool(x: torch.Tensor, k: int, cdim: int) -> torch.Tensor:
    x = x.movedim(cdim, -1)
    d = x.shape[-1]
    groups = [x[..., j : min(j + k, d)].sum(-1) / (min(j + k, d) - j) for j in range(0, d, k)]
    return torch.stack(groups, dim=-1).movedim(-1, cdim)


@pytest.mark.parametrize(
    ("layout", "shape", "cdim"),
    [("tokens", (2, 5, 12), 2), ("nhwc", (2, 3, 4, 12), 3), ("nchw", (2, 12, 3, 4), 1)],
)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 12])
def test_channel_pool_matches_hand_computation(layout, shape, cdim, k):
    x = torch.randn(shape, dtype=torch.float64)
    out = channel_pool(x, k, layout)
    expected_shape = list(shape)
    expected_shape[cdim] //= k
    assert list(out.shape) == expected_shape
    torch.testing.assert_close(out, _hand_pool(x, k, cdim), rtol=1e-12, atol=1e-12)
    # explicit element: output channel 1 = mean of input channels k .. 2k-1
    if expected_shape[cdim] > 1:
        torch.testing.assert_close(
            out.select(cdim, 1), x.narrow(cdim, k, k).mean(cdim), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize(("layout", "shape", "cdim"), [("tokens", (2, 5, 10), 2), ("nchw", (2, 10, 3, 3), 1)])
def test_channel_pool_partial_remainder(layout, shape, cdim):
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="not divisible by reduction k=4"):
        channel_pool(x, 4, layout)
    out = channel_pool(x, 4, layout, remainder="partial")
    assert out.shape[cdim] == 3  # groups 0-3, 4-7, 8-9
    torch.testing.assert_close(out, _hand_pool(x, 4, cdim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.select(cdim, 2), x.narrow(cdim, 8, 2).mean(cdim))


def test_channel_pool_saves_nothing_for_backward():
    from helpers import saved_bytes

    x = torch.randn(2, 7, 64, requires_grad=True)
    out, nbytes = saved_bytes(channel_pool, x, 8, "tokens")
    assert nbytes == 0
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 8))


@pytest.mark.parametrize("k", [0, -2, 2.0, True, None])
def test_channel_pool_invalid_reduction(k):
    with pytest.raises(ValueError, match="reduction"):
        channel_pool(torch.randn(2, 3, 8), k, "tokens")


def test_channel_pool_invalid_layout_and_rank():
    with pytest.raises(ValueError, match="layout must be one of"):
        channel_pool(torch.randn(2, 3, 8), 2, "nlc")
    with pytest.raises(ValueError, match="4-D"):
        channel_pool(torch.randn(2, 8, 3), 2, "nchw")


# ---------------------------------------------------------------------------- LiteSideNetwork
@pytest.mark.parametrize(
    ("num_blocks", "depth", "expected"),
    [
        (12, 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]),
        (12, 12, list(range(12))),
        (4, 1, [0, 0, 0, 0]),
        (5, 2, [0, 0, 1, 1, 1]),
        (4, 6, [0, 2, 3, 5]),
        (1, 3, [0]),
    ],
)
def test_rungs_spread_blocks_evenly(num_blocks, depth, expected):
    assert _rungs(num_blocks, depth) == expected


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_invalid_reduction_names_the_field(k):
    with pytest.raises(ValueError, match="reduction"):
        LiteSideNetwork([(192, "tokens")] * 3, reduction=k, depth=2, num_classes=3)


def test_reduction_not_dividing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"k=7 does not divide .*blocks \[0, 1, 2\].*\[1, 2, 3, 4, 6, 8"):
        LiteSideNetwork([(192, "tokens")] * 3, reduction=7, depth=2, num_classes=3)
    with pytest.raises(ValueError, match=r"blocks \[1\]"):  # one stage of a CNN
        LiteSideNetwork([(64, "nchw"), (24, "nchw")], reduction=16, depth=2, num_classes=3)
    net = LiteSideNetwork([(64, "nchw"), (24, "nchw")], 16, 2, 3, remainder="partial")
    assert net.pooled_dims == [4, 2]


def test_other_invalid_arguments():
    specs = [(64, "tokens")] * 2
    with pytest.raises(ValueError, match="depth"):
        LiteSideNetwork(specs, 8, 0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        LiteSideNetwork(specs, 8, 1, 0)
    with pytest.raises(ValueError, match="layout"):
        LiteSideNetwork([(64, "nlc")], 8, 1, 3)
    with pytest.raises(ValueError, match="backbone_dim"):
        LiteSideNetwork(specs, 8, 1, 3, fuse=True)
    net = LiteSideNetwork(specs, 8, 1, 3)
    with pytest.raises(ValueError, match="expects 2 hidden states"):
        net([torch.randn(2, 4, 64)])
    with pytest.raises(ValueError, match="expected 64 channels"):
        net([torch.randn(2, 4, 64), torch.randn(2, 4, 32)])


def test_hierarchical_widths_get_projections_only_where_needed():
    net = LiteSideNetwork(
        [(96, "nhwc"), (96, "nhwc"), (192, "nhwc"), (384, "nhwc"), (768, "nhwc")], 8, 3, 4
    )
    assert net.width == 96
    assert [type(p).__name__ for p in net.proj] == ["Linear", "Linear", "Linear", "Linear", "Identity"]
    hiddens = [torch.randn(2, 8, 8, 96), torch.randn(2, 8, 8, 96), torch.randn(2, 4, 4, 192),
               torch.randn(2, 2, 2, 384), torch.randn(2, 1, 1, 768)]
    assert net(hiddens).shape == (2, 4)
    # token-layout stages whose token count changes (Swin-like, given as tokens)
    net = LiteSideNetwork([(32, "tokens"), (64, "tokens")], 8, 2, 4)
    assert net([torch.randn(2, 16, 32), torch.randn(2, 4, 64)]).shape == (2, 4)


def test_feature_grid_tokens():
    net = LiteSideNetwork([(16, "nchw"), (32, "nchw")], 4, 2, 3, feature_grid=2)
    x = torch.randn(2, 16, 8, 8)
    p = net.pool_hidden(0, x)
    assert p.shape == (2, 4, 4)
    # token (0, 1) = top-right quadrant, channel group 0
    torch.testing.assert_close(p[:, 1, 0], x[:, 0:4, 0:4, 4:8].mean(dim=(1, 2, 3)))
    assert net([x, torch.randn(2, 32, 3, 3)]).shape == (2, 3)  # 3x3 -> 2x2: adaptive pooling


def test_zero_init_heads_and_gates():
    net = LiteSideNetwork([(64, "tokens")] * 4, 8, 2, 3, backbone_dim=64, fuse=True)
    assert torch.equal(net.gate_logits, torch.zeros(4))
    out = net([torch.randn(2, 5, 64) for _ in range(4)], torch.randn(2, 64))
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_masked_mean_ignores_padding(mixer):
    net = LiteSideNetwork([(64, "tokens")] * 3, 8, 2, 4, mixer=mixer)
    with torch.no_grad():
        net.head.weight.normal_()
    hiddens = [torch.randn(2, 7, 64) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    changed = [h.clone() for h in hiddens]
    for h in changed:
        h[0, 4:] = torch.randn(3, 64) * 10
    ref = net(hiddens, token_mask=mask)
    torch.testing.assert_close(net(changed, token_mask=mask), ref, rtol=0, atol=1e-6)
    # row 1 has no padding: identical; and without the mask the padded tokens do count
    assert not torch.allclose(net(changed), net(hiddens))
    # the masked result equals running the unpadded sequence alone
    alone = net([h[:1, :4] for h in hiddens])
    torch.testing.assert_close(ref[:1], alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- attach_side
@pytest.mark.parametrize("make", [vit_tiny, resnet18, bert_tiny], ids=["vit", "resnet", "bert"])
def test_side_only_keeps_no_backbone_activations(make):
    model, info, batch = make()
    full = s2a.measure(model, batch)
    assert sum(backbone_bytes(full).values()) > 0  # full fine-tuning stores plenty
    handle = attach_side(model, info, config())
    report = s2a.measure(model, batch)
    assert backbone_bytes(report) == {}, backbone_bytes(report)
    side = report.saved_bytes - report.by_module.get("<loss>", 0)
    assert 0 < side < full.saved_bytes / 10, (side, full.saved_bytes)
    handle.remove()


@pytest.mark.parametrize("make", [vit_tiny, resnet18, bert_tiny], ids=["vit", "resnet", "bert"])
def test_side_only_gradients_reach_only_the_side(make):
    model, info, batch = make()
    attach_side(model, info, config())  # the backbone is not even frozen: no_grad protects it
    randomize_heads(model)
    out = logits_of(call(model, batch))
    assert out.shape == (2, NUM_CLASSES)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    side_params = {f"{SIDE}.{n}" for n, _ in getattr(model, SIDE).named_parameters()}
    for name, p in model.named_parameters():
        if name in side_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("make", [vit_tiny, resnet18, bert_tiny], ids=["vit", "resnet", "bert"])
def test_side_parameters_are_few(make):
    model, info, _ = make()
    backbone = n_params(model)
    attach_side(model, info, config(depth=4))
    side = n_params(getattr(model, SIDE))
    assert side < 0.03 * backbone, (side, backbone)
    print(f"{make.__name__}: side {side} params = {100 * side / backbone:.3f}% of {backbone}")


def test_vit_base_side_parameter_count():
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224")
    specs = [(768, "tokens")] * 12
    net = LiteSideNetwork(specs, reduction=8, depth=4, num_classes=1000)
    # gates 12 + 4 blocks x (LN 192 + 96*192+192 + 192*96+96) + LN 192 + head 96*1000+1000
    assert n_params(net) == 12 + 4 * (192 + 96 * 192 + 192 + 192 * 96 + 96) + 192 + 96_000 + 1000
    assert n_params(net) / n_params(vit_b) < 0.003
    fused = LiteSideNetwork(specs, 8, 4, 1000, backbone_dim=768, fuse=True)
    assert n_params(fused) - n_params(net) == 768 * 1000 + 1000 + 1


def test_resnet_fuse_with_pooled_output():
    model, info, x = resnet18()
    handle = attach_side(model, info, config(fuse=True))
    net = getattr(model, SIDE)
    assert net.fuse and net.backbone_dim == 512
    randomize_heads(model)
    out = model(x)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert net.backbone_head.weight.grad.abs().sum() > 0
    assert net.fuse_logit.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(SIDE))
    report = s2a.measure(model, x)
    assert backbone_bytes(report) == {}
    handle.remove()


def test_fuse_pooled_sources():
    """Without info.pooled: the classifier's input, else the last block's pooled output."""
    model, info, x = resnet18()
    ref = model.forward_head(model.forward_features(x), pre_logits=True).detach()
    seen = {}
    for source, extra in [
        ("classifier", {"classifier_names": ("fc",)}),
        ("last block", {"pool": lambda h, layout: h.mean(dim=(2, 3))}),
    ]:
        desc = SimpleNamespace(**{**vars(info), "pooled": None, **extra})
        handle = attach_side(model, desc, config(fuse=True))
        net = getattr(model, SIDE)
        assert net.backbone_dim == 512
        net.backbone_head.register_forward_pre_hook(lambda _m, a, s=source: seen.__setitem__(s, a[0]))
        model(x)
        handle.remove()
    torch.testing.assert_close(seen["classifier"], ref)
    torch.testing.assert_close(seen["last block"], ref)


def test_bert_padding_does_not_change_logits():
    model, info, batch = bert_tiny()
    model.eval()
    attach_side(model, info, config())
    randomize_heads(model)
    out = model(**batch)
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (2, NUM_CLASSES)
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].clone()
    other["input_ids"][1, 6:] = torch.randint(1, 100, (4,))
    torch.testing.assert_close(model(**other).logits, out.logits, rtol=0, atol=1e-5)
    # positional attention_mask is found too
    torch.testing.assert_close(
        model(batch["input_ids"], batch["attention_mask"]).logits, out.logits, rtol=0, atol=0
    )
    # without the mask, the padded tokens count
    assert not torch.allclose(model(input_ids=other["input_ids"]).logits, out.logits, atol=1e-4)


def test_bert_classifier_labels_give_side_loss():
    model, info, batch = bert_tiny(head=True)
    attach_side(model, info, config())
    randomize_heads(model)
    labels = torch.tensor([1, 3])
    out = model(**batch, labels=labels)
    assert out.loss.requires_grad
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert out.to_tuple()[1] is out.logits
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(SIDE))


@pytest.mark.parametrize("make", [vit_tiny, bert_tiny], ids=["vit", "bert"])
def test_combined_mode_runs_backbone_with_grad_and_starts_at_backbone_output(make):
    model, info, batch = make()
    model.eval()
    head = make is vit_tiny  # the bert base model has no head: side logits replace
    before = logits_of(call(model, batch)) if head else None
    attach_side(model, info, config(modules=("bias", "side")))
    out = logits_of(call(model, batch))
    if head:
        assert torch.equal(out, before)  # zero-initialised side heads
    randomize_heads(model)
    out = logits_of(call(model, batch))
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    blk = info.blocks[0][1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
    report = s2a.measure(model, batch)
    assert sum(backbone_bytes(report).values()) > 0


@pytest.mark.parametrize("make", [vit_tiny, resnet18, bert_tiny], ids=["vit", "resnet", "bert"])
def test_remove_restores_everything(make):
    model, info, batch = make()
    model.eval()
    keys = list(model.state_dict())
    hooks = [len(b._forward_hooks) for _, b in info.blocks]
    with torch.no_grad():
        before = call(model, batch)
    handle = attach_side(model, info, config())
    assert "forward" in model.__dict__
    assert any(k.startswith(SIDE + ".") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="already has a side network"):
        attach_side(model, info, config())
    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in model.__dict__
    assert not hasattr(model, SIDE)
    assert list(model.state_dict()) == keys
    assert [len(b._forward_hooks) for _, b in info.blocks] == hooks
    with torch.no_grad():
        after = call(model, batch)
    assert type(after) is type(before)
    if isinstance(before, torch.Tensor):
        assert torch.equal(after, before)
    else:
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(after[key], before[key]), key


def test_remove_restores_a_previous_instance_forward():
    model, info, x = vit_tiny()
    marker = []

    def previous(*args, **kwargs):
        marker.append(1)
        return type(model).forward(model, *args, **kwargs)

    model.forward = previous
    handle = attach_side(model, info, config())
    model(x)
    assert marker == [1]  # the wrapper calls the previous forward
    handle.remove()
    assert model.__dict__["forward"] is previous


def test_remove_refuses_when_forward_was_rewrapped():
    model, info, _ = vit_tiny()
    handle = attach_side(model, info, config())
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    with pytest.raises(RuntimeError, match="replaced after attach_side"):
        handle.remove()


def test_attach_side_config_errors():
    model, info, _ = vit_tiny()
    with pytest.raises(ValueError, match=r"'side' is not in config\.modules"):
        attach_side(model, info, config(modules=("bias",)))
    with pytest.raises(ValueError, match="reduction"):
        attach_side(model, info, config(k=0))
    with pytest.raises(ValueError, match="does not divide"):
        attach_side(model, info, config(k=5))
    with pytest.raises(ValueError, match="depth"):
        attach_side(model, info, config(depth=0))
    assert "forward" not in model.__dict__ and not hasattr(model, SIDE)


def test_hooks_capture_only_inside_the_wrapped_forward():
    model, info, x = vit_tiny()
    handle = attach_side(model, info, config())
    model.forward_features(x)  # blocks run outside the wrapped forward
    assert handle.captured == {}
    model(x)
    assert handle.captured == {}  # freed after each call


def test_side_params_are_in_state_dict_and_trainable():
    model, info, _ = vit_tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    attach_side(model, info, config())
    net = getattr(model, SIDE)
    assert isinstance(net, nn.Module)
    assert all(p.requires_grad for p in net.parameters())
    sd = model.state_dict()
    assert {f"{SIDE}.{k}" for k in net.state_dict()} <= set(sd)


def test_fused_pooled_view_does_not_keep_the_token_tensor():
    """ViT pools by taking the class token, a view into (B, N, D): the side branch keeps a
    compact copy, so the fused head saves (B, D) bytes, not the whole token tensor."""
    model, info, x = vit_tiny()
    desc = SimpleNamespace(**{**vars(info), "pooled": None, "classifier_names": ("head",)})
    attach_side(model, desc, config(fuse=True))
    report = s2a.measure(model, x)
    assert backbone_bytes(report) == {}
    assert report.by_module[f"{SIDE}.backbone_head"] == 2 * model.embed_dim * 4


@pytest.mark.parametrize("modules", [("side",), ("bias", "side")])
def test_deepcopy_and_pickle_give_models_of_their_own(modules, tmp_path):
    """An EMA / teacher copy of a side model must run, and train, its own side network."""
    import copy

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=NUM_CLASSES)
    s2a.apply(model, s2a.S2AConfig(modules=modules, side_reduction=4, act_bits=None))
    randomize_heads(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        for p in getattr(model, SIDE).parameters():
            p.add_(0.5)
        assert not torch.allclose(model(x), before)
        torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), before, rtol=0, atol=0)
    twin(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(twin, SIDE).parameters())


def test_transformers_tuple_outputs_and_positional_labels():
    """return_dict=False and labels passed by position give what the keyword / dict call gives."""
    import inspect

    model, info, batch = bert_tiny(head=True)
    model.eval()
    attach_side(model, info, config(modules=("bias", "side")))
    randomize_heads(model)
    assert "labels" in inspect.signature(model.forward).parameters  # what HF Trainer reads
    labels = torch.tensor([1, 3])
    ref = model(**batch, labels=labels)
    plain = model(**batch, return_dict=False)
    torch.testing.assert_close(plain[0], ref.logits, rtol=0, atol=0)
    with_loss = model(**batch, labels=labels, return_dict=False)
    torch.testing.assert_close(with_loss[0], ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(with_loss[1], ref.logits, rtol=0, atol=0)
    positional = model(batch["input_ids"], batch["attention_mask"], None, None, None, labels)
    torch.testing.assert_close(positional.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(positional.loss, F.cross_entropy(ref.logits, labels))


def test_side_refuses_a_bare_sequential_model():
    """``model.s2a_side`` on an nn.Sequential would be run by its forward as one more layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), *[nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()) for _ in range(2)])
    with pytest.raises(ValueError, match="side network cannot be attached to a bare Sequential"):
        s2a.apply(model, s2a.S2AConfig(modules=("side",), num_classes=3), example_input=torch.zeros(1, 3, 4, 4))
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, SIDE)


def test_fused_decoder_reads_each_row_at_its_last_real_token():
    # LLaMA's classifier reads every token; the side branch's fused feature must be the
    # token the model classifies from (a right-padded row's last real one), not a pad
    from tuner_zoo import build

    from s2a.models import describe_backbone

    model, batch = build("llama_cls")
    attach_side(model, describe_backbone(model), config(fuse=True))
    randomize_heads(model)
    padded = model(**batch).logits
    real = int(batch["attention_mask"][1].sum())
    alone = model(input_ids=batch["input_ids"][1:, :real], attention_mask=batch["attention_mask"][1:, :real]).logits
    torch.testing.assert_close(padded[1:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", ["TokenClassification", "QuestionAnswering", "MultipleChoice"])
@pytest.mark.parametrize("modules", [("side",), ("bias", "side")])
def test_apply_refuses_a_head_that_predicts_per_token(head, modules):
    # The side network makes one (B, C) prediction per sequence: it dropped token logits,
    # QA's start / end logits, and crashed on token labels with a batch-size mismatch.
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=4 if head == "TokenClassification" else 2)
    model = getattr(transformers, f"BertFor{head}")(cfg)
    ids = torch.randint(1, 100, (2, 3, 9) if head == "MultipleChoice" else (2, 9))
    with pytest.raises(ValueError, match=r"one prediction per input .*BertFor\w+'s head .*makes another kind"):
        s2a.apply(model, s2a.S2AConfig(modules=modules, act_bits=None), example_input={"input_ids": ids})
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, SIDE)


def test_block_unfrozen_after_side_only_apply_trains():
    # With "side" alone the backbone ran under no_grad whatever the user unfroze afterwards:
    # the block was counted trainable and saved, but never got a gradient.
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 32, 32)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), side_reduction=4, act_bits=None), example_input=x[:1])
    randomize_heads(model)
    for p in model.blocks[1].parameters():
        p.requires_grad_(True)
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[1].parameters())
    assert all(p.grad is None for p in model.blocks[0].parameters())
    for p in model.blocks[1].parameters():
        p.requires_grad_(False)
    assert backbone_bytes(s2a.measure(model, x)) == {}  # frozen again: no_grad again
    # built on the meta device: to_empty puts new Parameters in the modules, read at each call
    with torch.device("meta"):
        meta = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=NUM_CLASSES)
    s2a.apply(meta, s2a.S2AConfig(modules=("side",), side_reduction=4, act_bits=None), example_input=x[:1].to("meta"))
    meta.to_empty(device="cpu")
    meta.load_state_dict(model.state_dict())
    for p in meta.blocks[1].parameters():
        p.requires_grad_(True)
    meta(x).square().sum().backward()
    assert meta.blocks[1].mlp.fc1.weight.grad is not None and meta.blocks[0].mlp.fc1.weight.grad is None


def test_detach_side_refuses_an_applied_model(tmp_path):
    # It left the tuner state pointing at the removed side network: nothing trainable, and
    # save_tuned failed with KeyError 's2a_side.gate_logits'.
    from s2a.tuners.side import detach_side

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=NUM_CLASSES)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), side_reduction=4, act_bits=None),
              example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match=r"prepared by s2a\.apply.*build a fresh model"):
        detach_side(model)
    assert hasattr(model, SIDE) and model(torch.zeros(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    s2a.save_tuned(model, tmp_path)


def _wav2vec2(layerdrop: float):
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_labels=3, layerdrop=layerdrop, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)
    torch.manual_seed(0)
    return transformers.Wav2Vec2ForSequenceClassification(cfg)


def test_side_on_an_audio_model_reads_frames_and_refuses_layerdrop():
    # LayerDrop skips blocks at random in training: the side branch failed 9 steps in 10
    model = _wav2vec2(0.5)
    with pytest.raises(ValueError, match=r"LayerDrop skips blocks in training \(config.layerdrop=0.5\)"):
        s2a.apply(model, s2a.S2AConfig(modules=("side",), act_bits=None), example_input=torch.randn(1, 800))
    model.config.layerdrop = 0.0  # as the message says: the refused model is left as it was
    audio = torch.randn(1, 4000)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), act_bits=None), example_input=audio)
    with torch.no_grad():
        for p in model.s2a_side.parameters():
            p.add_(0.3 * torch.randn_like(p))
        # the attention mask is per audio sample; the blocks see frames (it was dropped, and the
        # side branch averaged the padded frames: 0.035 from the unpadded logits)
        padded = torch.cat([audio, torch.zeros(1, 2000)], 1)
        mask = torch.cat([torch.ones(1, 4000), torch.zeros(1, 2000)], 1).long()
        torch.testing.assert_close(model.eval()(padded, attention_mask=mask).logits, model(audio).logits,
                                   atol=1e-5, rtol=0)


def test_side_only_backbone_gives_an_input_gradient_when_asked():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=NUM_CLASSES)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), act_bits=None, num_classes=NUM_CLASSES))
    with torch.no_grad():
        for p in model.s2a_side.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()  # saliency: x.grad was None (the backbone ran without a graph)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(SIDE))


def test_side_reads_a_block_that_turns_a_feature_map_into_tokens():
    # EfficientFormer's last stage takes (448, 7, 7)... and returns (49, 448) tokens: its output
    # was read as a feature map of 49 channels (refused, then a crash with side_reduction=1)
    from s2a.train.config import TrainError
    from s2a.train.methods import apply_method

    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 224, 224)
    s2a.apply(model, s2a.S2AConfig(modules=("side",), num_classes=NUM_CLASSES, act_bits=None), example_input=x)
    last = s2a.tuners.get_state(model).info.blocks[-1]
    assert (last.layout, last.out_layout, last.out_dim) == ("nchw", "tokens", 448)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # LST ladders one sequence: 2x2 pooled cells and 49 tokens do not mix (it crashed)
    with pytest.raises(TrainError, match="feature maps and then tokens"):
        apply_method(timm.create_model("efficientformer_l1", num_classes=NUM_CLASSES), "lst",
                     head_names=("head", "head_dist"), example_input=x)
