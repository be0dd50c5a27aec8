"""The low-rank prompt and bias modules on their own."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tuner_zoo import build, call, eager_kernels, example_of, one_thread, output

import s2a
from s2a.tuners import LowRankPrompt, add_bias

pytestmark = pytest.mark.usefixtures(eager_kernels.__name__, one_thread.__name__)


def saved_storages(fn, *args, **kwargs):
    storages = []

    def pack(t):
        storages.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, storages


@pytest.mark.parametrize(("layout", "shape", "grid"), [
    ("tokens", (3, 10, 16), (10,)),
    ("nchw", (3, 16, 4, 5), (4, 5)),
    ("nhwc", (3, 4, 5, 16), (4, 5)),
])
def test_prompt_is_zero_at_init_and_stores_no_input(layout, shape, grid):
    p = LowRankPrompt(layout, grid, 16, rank=4)
    x = torch.randn(shape, requires_grad=True)
    assert torch.equal(p(x), x)
    with torch.no_grad():
        p.A.normal_()
    y, storages = saved_storages(p, x)
    params = {p.A.untyped_storage().data_ptr(), p.B.untyped_storage().data_ptr()}
    assert set(storages) <= params  # only A and B (parameters), never the block input
    assert x.untyped_storage().data_ptr() not in storages
    # X' = X + A·B with positions laid out as the layout says
    delta = p.A @ p.B  # (positions, C)
    if layout == "tokens":
        expect = x + delta
    elif layout == "nchw":
        expect = x + delta.t().reshape(16, *grid)
    else:
        expect = x + delta.reshape(*grid, 16)
    torch.testing.assert_close(y, expect)
    # gradients: dA = sum_batch dY · B^T, dB = A^T · dY
    g = torch.randn_like(y)
    y.backward(g)
    gt = g if layout == "tokens" else (g.flatten(2).transpose(1, 2) if layout == "nchw" else g.flatten(1, 2))
    torch.testing.assert_close(p.A.grad, (gt @ p.B.t()).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.B.grad, (p.A.t() @ gt).sum(0), rtol=1e-4, atol=1e-4)


def test_prompt_slices_for_shorter_sequences_and_refuses_longer():
    p = LowRankPrompt("tokens", (8,), 4, rank=2)
    with torch.no_grad():
        p.A.normal_()
    x = torch.zeros(1, 5, 4)
    torch.testing.assert_close(p(x)[0], (p.A @ p.B)[:5])
    with pytest.raises(ValueError, match="covers 8 positions"):
        p(torch.zeros(1, 9, 4))
    img = LowRankPrompt("nchw", (4, 4), 4, rank=2)
    with pytest.raises(ValueError, match="example_input"):
        img(torch.zeros(1, 4, 8, 8))


def test_image_token_prompt_refuses_other_sizes():
    """A ViT's tokens are the dry run's patches: another image size must not slice the prompt."""
    import timm

    import s2a

    p = LowRankPrompt("tokens", (17,), 4, rank=2, fixed_length=True)
    with pytest.raises(ValueError, match=r"built for 17 .*image size of the dry run"):
        p(torch.zeros(1, 5, 4))
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=torch.randn(1, 3, 64, 64))
    model(torch.randn(2, 3, 64, 64))
    for size in ((32, 32), (48, 32), (80, 64)):  # the model-level check names the image sizes
        with pytest.raises(ValueError, match=r"built for \(64, 64\)"):
            model(torch.randn(2, 3, *size))


def test_prompt_follows_position_ids():
    p = LowRankPrompt("tokens", (8,), 4, rank=2, position_ids_kwarg="position_ids")
    with torch.no_grad():
        p.A.normal_()
    full = (p.A @ p.B)
    out = p(torch.zeros(2, 1, 4), torch.tensor([[6]]))  # one decoding step at position 6
    torch.testing.assert_close(out, full[6].expand(2, 1, 4))


def test_prompt_keeps_block_input_dtype():
    p = LowRankPrompt("tokens", (4,), 8, rank=2)
    assert p(torch.zeros(1, 4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_text_prompt_covers_max_positions_any_length():
    model, _ = build("bert_cls")
    base = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(act_bits=None))  # default dry run: 8 tokens
    prompts = model._s2a_tuner.prompts
    assert all(p.positions == model.config.max_position_embeddings for p in prompts.values())
    for length in (3, 17, 64):
        ids = torch.randint(1, 100, (2, length))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base(ids).logits)
        with torch.no_grad():
            next(iter(prompts.values())).A.add_(0.1)
            assert not torch.equal(model(ids).logits, base(ids).logits)
            next(iter(prompts.values())).A.zero_()


def test_text_prompt_positions_caps_the_rows(tmp_path):
    """A long-context decoder need not train a row per position it could ever see."""
    model, _ = build("llama_lm")
    base = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(act_bits=None, prompt_positions=16))
    prompts = model._s2a_tuner.prompts
    assert {p.A.shape for p in prompts.values()} == {(16, 4)}
    ids = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
        with pytest.raises(ValueError, match="prompt_positions"):
            model(torch.randint(1, 100, (2, 17)))
    # generation past the cap: the cached step reaches position 16
    with torch.no_grad():
        out = model(ids, use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"
        with pytest.raises(ValueError, match="covers 16 positions, got position 16"):
            model(ids[:, :1], **{key: out[key]}, use_cache=True, position_ids=torch.full((2, 1), 16))
    # saved and loaded with its config: the same rows
    with torch.no_grad():
        for p in prompts.values():
            p.A.normal_()
    s2a.save_tuned(model, tmp_path)
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path)
    assert {p.A.shape for p in fresh._s2a_tuner.prompts.values()} == {(16, 4)}
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family, positions, match", [
    ("vit", 8, "only text models"),
    ("resnet", 8, "only text models"),
    ("bert_cls", 65, "exceeds the model's maximum length"),
    ("llama_lm", 8, "the dry run's input holds 12 tokens"),
])
def test_prompt_positions_refused_where_it_means_nothing(family, positions, match):
    model, batch = build(family)
    example = {"input_ids": torch.randint(1, 100, (1, 12))} if family == "llama_lm" else example_of(batch)
    with pytest.raises(ValueError, match=match):
        s2a.apply(model, s2a.S2AConfig(act_bits=None, prompt_positions=positions), example_input=example)


def _with_trained_prompts(family: str):
    """``family``'s model prepared by s2a.apply, its prompts moved off zero as by training."""
    model, _ = build(family)
    s2a.apply(model, s2a.S2AConfig(act_bits=None))
    with torch.no_grad():
        for p in model._s2a_tuner.prompts.values():
            p.A.normal_()
    return model


def test_llama_prompt_consistent_with_kv_cache():
    model = _with_trained_prompts("llama_lm")
    ids = torch.randint(1, 100, (1, 6))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        first = model(ids[:, :5], use_cache=True)
        cache = first.get("cache", first.get("past_key_values"))
        key = "cache" if "cache" in first else "past_key_values"
        step = model(ids[:, 5:], **{key: cache}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["vit", "swin", "resnet", "bert_cls"])
def test_block_inputs_are_never_saved(family):
    """The prompt is an add: what a block receives before the prompt is never kept for
    backward. (Without compression the previous block's last ReLU keeps its output, which
    is this block's input: that is the ReLU's storage, removed by the 1-bit ReLU.)"""
    model, batch = build(family)
    s2a.apply(model, s2a.S2AConfig(modules=("prompt",)), example_input=example_of(batch))
    inputs = []
    for block in model._s2a_tuner.info.block_modules(model):
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]),
            prepend=True, with_kwargs=True)
    out, storages = saved_storages(lambda: output(call(model, batch)))
    assert len(inputs) == len(model._s2a_tuner.prompts)
    assert not {x.untyped_storage().data_ptr() for x in inputs} & set(storages)
    out.sum().backward()
    assert all(p.A.grad is not None for p in model._s2a_tuner.prompts.values())


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.ln = nn.LayerNorm(4, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        x = self.gn(self.bn(self.conv(x)))
        x = self.rms(self.ln(x.mean((2, 3))))
        return self.fc(x)


def test_bias_added_where_missing_registered_and_zero():
    net = TinyNet().eval()
    x = torch.randn(2, 3, 6, 6)
    ref = net(x)
    names, hooks = add_bias(net)
    assert sorted(names) == ["bn.bias", "conv.bias", "fc.bias", "gn.bias", "ln.bias", "rms.bias"]
    assert len(hooks) == 1  # RMSNorm: the forward has no bias term, a hook adds it
    assert all(isinstance(net.get_parameter(n), nn.Parameter) for n in names)
    assert set(names) <= set(net.state_dict())
    assert torch.equal(net(x), ref)
    # each bias really acts on the output
    for n in names:
        with torch.no_grad():
            net.get_parameter(n).fill_(0.5)
        assert not torch.equal(net(x), ref), n
        with torch.no_grad():
            net.get_parameter(n).zero_()


class _RMSNormWithBiasSlot(nn.Module):
    """xLSTM's RMSNorm: ``bias = None``, added by its own forward once set."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = None

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return x + self.bias if self.bias is not None else x


def test_a_norm_that_adds_its_own_bias_gets_it_once():
    net = nn.Sequential(nn.Linear(8, 8), _RMSNormWithBiasSlot(8))
    names, hooks = add_bias(net)
    assert "1.bias" in names and not hooks
    with torch.no_grad():
        net[1].bias.fill_(1.0)
    torch.testing.assert_close(net[1](torch.zeros(1, 8)), torch.ones(1, 8))  # not 2


def test_bias_without_adding_missing():
    net = TinyNet()
    names, _ = add_bias(net, add_missing=False)
    assert names == ["gn.bias"]
    assert net.conv.bias is None


def test_apply_add_missing_bias_switch():
    base, batch = build("llama_cls")
    with_missing = copy.deepcopy(base)
    s2a.apply(with_missing, s2a.S2AConfig(modules=("bias",), act_bits=None))
    without = copy.deepcopy(base)
    s2a.apply(without, s2a.S2AConfig(modules=("bias",), act_bits=None, add_missing_bias=False))
    tp = s2a.trainable_parameters(without)
    assert "bias" not in tp.by_kind  # Llama has no bias anywhere
    n = s2a.trainable_parameters(with_missing).by_kind["bias"]
    assert n > 0
    assert "model.layers.0.input_layernorm.bias" in dict(with_missing.named_parameters())
    with torch.no_grad():
        assert torch.equal(output(call(with_missing, batch)), output(call(base, batch)))


# ---------------------------------------------------------------------------- container blocks
class SeqNet(nn.Module):
    """Blocks that are nn.Sequential (as the stages of timm's MobileNetV3 / GhostNet /
    MobileViT): the generic adapter picks ``blocks.0`` .. ``blocks.2``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                                      for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseBlock(nn.ModuleDict):
    """A ModuleDict whose forward iterates its items, each fed the list of all earlier
    features (timm's DenseNet blocks)."""

    def __init__(self, channels: int):
        super().__init__({f"layer{i}": nn.Conv2d(channels * (i + 1), channels, 1) for i in range(2)})

    def forward(self, x):
        features = [x]
        for _, layer in self.items():
            features.append(layer(torch.cat(features, 1)))
        return features[-1]


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), DenseBlock(4), DenseBlock(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def randomize_prompts(model):
    with torch.no_grad():
        for p in model._s2a_tuner.prompts.values():
            p.A.normal_()


def test_container_block_gets_its_prompt_once(tmp_path):
    """A prompt registered as a child of an nn.Sequential block was also run by the block's
    forward as its last layer: added twice (here silently, the shapes match)."""
    torch.manual_seed(0)
    model, x = SeqNet(), torch.randn(2, 3, 8, 8)
    base = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None), example_input=x[:1])
    prompts = model._s2a_tuner.prompts
    assert all(len(block) == 2 for block in model.blocks)  # no extra layer in the containers
    # the prompts live in the nearest non-container ancestor, under the block's path
    assert {k for k in model.state_dict() if ".A" in k or ".B" in k} == {
        f"s2a_prompts.blocks.{i}.{ab}" for i in range(3) for ab in "AB"}
    assert {n for n, k in model._s2a_tuner.kinds.items() if k == "prompt"} == {
        f"s2a_prompts.blocks.{i}.{ab}" for i in range(3) for ab in "AB"}
    randomize_prompts(model)
    with torch.no_grad():
        h = model.stem(x)
        for i, block in enumerate(model.blocks):
            h = block[1](block[0](h + prompts[f"blocks.{i}"].delta(h)))  # X' = X + A·B, once
        want = model.head(h.mean((2, 3)))
        got = model(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, base(x))

    s2a.save_tuned(model, tmp_path)
    fresh = copy.deepcopy(base)
    s2a.load_tuned(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), got)
        s2a.merge(fresh)
        assert torch.equal(fresh(x), got)
    assert "s2a_prompts.blocks.0.prompt" in fresh.state_dict()


def test_moduledict_block_that_iterates_itself_runs():
    """DenseNet-like blocks: the block's forward fed its feature list to the prompt child
    (AttributeError before)."""
    torch.manual_seed(0)
    model, x = DenseNet(), torch.randn(2, 3, 6, 6)
    s2a.apply(model, s2a.S2AConfig(num_classes=4), example_input=x[:1])
    assert model._s2a_tuner.info.block_names == ["features.1", "features.2"]
    assert set(model.features[1]) == {"layer0", "layer1"}
    randomize_prompts(model)
    model(x).sum().backward()
    assert all(p.A.grad is not None for p in model._s2a_tuner.prompts.values())


def test_bare_sequential_model():
    """A bare nn.Sequential model: blocks that are not containers keep their prompt as a
    child; container blocks have no ancestor to hold it, and are refused before any change."""
    def make(block):
        return nn.Sequential(nn.Conv2d(3, 4, 1), block(), block(), nn.Flatten(1), nn.Linear(4 * 16, 2))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).relu()

    x = torch.randn(2, 3, 4, 4)
    model = make(Block)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=x[:1])
    assert "1.s2a_prompt.A" in model.state_dict()
    randomize_prompts(model)
    model(x)

    model = make(lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
    with pytest.raises(ValueError, match=r"'1' .*has no place in the model.* Wrap the model"):
        s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=x[:1])
    assert all(p.requires_grad for p in model.parameters())  # untouched ...
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), act_bits=None), example_input=x[:1])  # ... usable


# ---------------------------------------------------------------------------- biases kept apart
class SplitBiasBlock(nn.Module):
    """BEiT / SwinV2 / EVA attention: ``qkv`` is a Linear without bias that the block runs as
    ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``; nn.MultiheadAttention without
    bias reads ``out_proj.bias`` itself; of two experts a router picked the first."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(d))
        self.relative_position_bias_table = nn.Parameter(torch.randn(3, 2))  # a table, no bias
        self.mha = nn.MultiheadAttention(d, 2, bias=False, batch_first=True)
        self.experts = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))).chunk(3, -1)
        x = x + self.mha(q, k, v, need_weights=False)[0]
        return x + self.experts[0](x) + self.relative_position_bias_table.sum()


class SplitBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(SplitBiasBlock() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_bias_trains_biases_kept_apart_and_adds_none_unused():
    """q_bias / v_bias were left frozen, and a zero qkv.bias that the forward never reads was
    added and trained (it never got a gradient)."""
    torch.manual_seed(0)
    model, x = SplitBiasNet(), torch.randn(2, 4, 8)
    base = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(modules=("bias",), act_bits=None), example_input=x[:1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for i in range(2):
        block = f"blocks.{i}"
        assert {f"{block}.q_bias", f"{block}.v_bias"} <= trainable
        assert model.blocks[i].qkv.bias is None and "bias" in model.blocks[i].qkv._parameters
        assert f"{block}.relative_position_bias_table" not in trainable
        # read by nn.MultiheadAttention itself (out_proj never runs): added, and it learns
        assert f"{block}.mha.out_proj.bias" in trainable
        # the expert the router did not pick here may be picked by another input: kept
        assert f"{block}.experts.1.bias" in trainable
    with torch.no_grad():  # nn.MultiheadAttention with a bias takes another kernel: not bit-exact
        torch.testing.assert_close(model(x), base(x))
    model(x).sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == {"blocks.0.experts.1.bias", "blocks.1.experts.1.bias"}


@pytest.mark.parametrize(("name", "kw", "size"), [
    ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=48, num_heads=2), 32),
    ("swinv2_tiny_window8_256", dict(img_size=64, depths=(1, 1), embed_dim=16, num_heads=(1, 2)), 64),
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=48, num_heads=2), 28),
], ids=["beit", "swinv2", "eva02"])
def test_timm_qv_biases_train(name, kw, size, tmp_path):
    import timm

    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=3, **kw)

    model, x = build(), torch.randn(2, 3, size, size)
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt")), example_input=x[:1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("attn.qkv.bias") for n in trainable)
    assert sum(n.endswith(("attn.q_bias", "attn.v_bias")) for n in trainable) == 4
    model(x).logsumexp(-1).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    s2a.save_tuned(model, tmp_path)
    s2a.load_tuned(build(), tmp_path)  # the same biases are added on a fresh backbone


# ---------------------------------------------------------------------------- generic token models
class TokenBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class GenericTokens(nn.Module):
    """Not a family s2a knows (the generic fallback finds ``blocks``): tokens from the patches
    of an image (as XCiT), or from token ids."""

    def __init__(self, text: bool):
        super().__init__()
        self.embed = nn.Embedding(50, 8) if text else nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList(TokenBlock() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_generic_image_tokens_refuse_another_image_size():
    """A generic model's image tokens at another image size took the prompt rows of other
    patches silently (at 8 px: the first 4 rows of the 12 px run's 3x3 grid)."""
    model = GenericTokens(text=False)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=torch.zeros(1, 3, 12, 12))
    info = model._s2a_tuner.info
    assert info.family == "generic" and info.layouts == ["tokens", "tokens"] and info.fixed_tokens
    model(torch.randn(2, 3, 12, 12))
    for size in (8, 16):
        with pytest.raises(ValueError, match=r"built for 9 .*image size of the dry run"):
            model(torch.randn(2, 3, size, size))


def test_generic_text_tokens_keep_any_shorter_length():
    model = GenericTokens(text=True)
    s2a.apply(model, s2a.S2AConfig(act_bits=None), example_input=torch.ones(1, 8, dtype=torch.long))
    assert not model._s2a_tuner.info.fixed_tokens
    randomize_prompts(model)
    short = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        h = model.embed(short)
        for i, block in enumerate(model.blocks):
            h = block.forward(h + model._s2a_tuner.prompts[f"blocks.{i}"].delta(h))  # no hooks
        torch.testing.assert_close(model(short), model.head(h.mean(1)))
    with pytest.raises(ValueError, match="covers 8 positions"):
        model(torch.randint(0, 50, (2, 9)))


_DECODERS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64), "position_ids"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2), None),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=2,
                                                          attention_types=[[["global"], 2]],
                                                          max_position_embeddings=64), None),
}


@pytest.mark.parametrize("family", list(_DECODERS))
def test_generic_decoder_prompt_follows_the_kv_cache(family):
    # Tokens decoded with a KV cache took the first prompt rows instead of theirs: GPT-2's blocks
    # are handed position_ids; Bloom's and GPT-Neo's none, their offset is the cache's length
    import transformers

    cls, config, kw, kwarg = _DECODERS[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(vocab_size=100, **kw))
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt")), example_input={"input_ids": ids})
    assert model._s2a_tuner.info.position_ids_kwarg == kwarg
    with torch.no_grad():
        for p in model._s2a_tuner.prompts.values():
            p.A.normal_()
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :8], use_cache=True)
        key = "cache" if "cache" in first else "past_key_values"
        rest = model(input_ids=ids[:, 8:], **{key: first[key]}, use_cache=True).logits
        torch.testing.assert_close(rest, full[:, 8:], rtol=1e-4, atol=1e-5)
        # one token at a time after that, as generate() does
        cache = model(input_ids=ids[:, :10], use_cache=True)[key]
        for t in (10, 11):
            out = model(input_ids=ids[:, t:t + 1], **{key: cache}, use_cache=True)
            cache = out[key]
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(_DECODERS))
def test_generic_text_model_needs_no_example_input(family):
    """The fallback adapter's default dry-run input was an image: a generic transformers text
    model (GPT-2, Bloom, GPT-Neo) needed example_input=."""
    import transformers

    cls, config, kw, _ = _DECODERS[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(vocab_size=100, **kw)).eval()
    base = copy.deepcopy(model)
    s2a.apply(model, s2a.S2AConfig(act_bits=None))
    assert model._s2a_tuner.info.family == "generic" and model._s2a_tuner.prompts
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_encoder_decoder_text_model_still_asks_for_an_example_input():
    import transformers

    model = transformers.BartForSequenceClassification(transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.raises(ValueError, match="pass example_input="):
        s2a.apply(model, s2a.S2AConfig(act_bits=None))


def test_decoder_prompt_rows_with_left_padding_follow_the_given_position_ids():
    # As generate() does: position_ids counted along the attention mask make a left-padded
    # sentence take its own tokens' rows, so padding changes its logits no more than the model's
    model = _with_trained_prompts("llama_cls").eval()
    ids = torch.randint(1, 100, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids], 1), torch.randint(1, 100, (1, 10))])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        counted = model(input_ids=batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        torch.testing.assert_close(counted[:1], alone, rtol=1e-4, atol=1e-5)
