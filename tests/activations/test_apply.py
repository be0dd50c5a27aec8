"""compress_activations / restore on real timm and transformers models."""

import copy
import importlib
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import s2a
from helpers import cosine, minilm_path, rotten_tomatoes_sentences, saved_bytes, train_biases_only
from s2a.activations import OP_KINDS


def step(model, *args, **kwargs):
    """Forward + backward; returns (output, saved bytes, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters()]
    out, nbytes = saved_bytes(model, *args, exclude=params, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    torch.manual_seed(1)
    logits.backward(torch.randn_like(logits))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), nbytes, grads


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize(
    ("name", "kwargs", "min_ratio", "min_cos"),
    [
        ("vit_tiny_patch16_224", {}, 4.0, 0.99),
        ("deit_tiny_distilled_patch16_224", {}, 4.0, 0.99),
        ("resnet18", {}, 3.0, 0.99),
        ("convnext_atto", {}, 3.0, 0.99),
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "embed_dim": 48, "num_heads": (2, 2, 2, 2), "drop_path_rate": 0.0}, 3.0, 0.99),
        # 49 SiLU and 49 train-mode BatchNorms in series at batch 2: per-operator errors
        # compound with depth (per operator the cosine is > 0.999).
        ("efficientnet_b0", {}, 3.0, 0.98),
    ],
)
def test_timm_models(name, kwargs, min_ratio, min_cos):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    train_biases_only(model)
    x = torch.randn(2, 3, 224, 224)
    ref_out, ref_bytes, ref_grads = step(model, x)
    s2a.compress_activations(model, bits=4)
    out, nbytes, grads = step(model, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert ref_bytes / nbytes >= min_ratio, (ref_bytes, nbytes)
    assert grads.keys() == ref_grads.keys()
    assert cosine(flat(grads), flat(ref_grads)) > min_cos
    s2a.restore(model)
    out2, bytes2, _ = step(model, x)
    assert bytes2 == ref_bytes and torch.equal(out2, ref_out)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_pretrained_minilm_on_real_sentences():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    model.train()  # dropout on: the compressed dropout regenerates the same masks by seed
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # identical masks are not expected across implementations
    train_biases_only(model)
    batch = tok(rotten_tomatoes_sentences(16), padding=True, truncation=True, max_length=64, return_tensors="pt")
    ref_out, ref_bytes, ref_grads = step(model, **batch)
    s2a.compress_activations(model, bits=4)
    assert model.config._attn_implementation == "sdpa"
    out, nbytes, grads = step(model, **batch)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert cosine(flat(grads), flat(ref_grads)) >= 0.98
    total = flat(ref_grads).norm()
    for name, ref in ref_grads.items():  # every trainable tensor, not just the total ...
        if ref.norm() > 1e-4 * total:  # ... except those whose exact gradient is 0 (key biases)
            assert cosine(grads[name], ref) > 0.9, name
        else:
            assert grads[name].norm() < 1e-3 * total, name
    assert ref_bytes / nbytes > 3
    s2a.restore(model)
    assert model.config._attn_implementation == "eager"


def test_llama_style_decoder():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n or "lm_head" in n)
    ids = torch.randint(0, 128, (2, 32))
    ref_out, ref_bytes, ref_grads = step(model, input_ids=ids)
    s2a.compress_activations(model)
    summary = s2a.compression_summary(model)
    assert any(v.startswith("rms_norm") for v in summary.values())
    assert any(v.startswith("silu") for v in summary.values())
    out, nbytes, grads = step(model, input_ids=ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert cosine(flat(grads), flat(ref_grads)) > 0.99
    assert nbytes < ref_bytes



def test_train_eval_keeps_the_compression_of_a_model_on_hub_kernels(tmp_path, monkeypatch):
    """from_pretrained turns transformers' hub kernels on (the kernels package is installed with
    transformers); each train() / eval() then kernelized again, deleting the instance forwards
    s2a patched on LLaMA's RMSNorm: it kept its full input from then on."""
    pytest.importorskip("kernels")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert model.use_kernels  # (transformers' default: what users get)
    model.train()
    ids = torch.randint(0, 128, (2, 32))
    s2a.compress_activations(model)
    _, nbytes, _ = step(model, input_ids=ids)
    norm = model.model.layers[0].input_layernorm
    model.eval()
    model.train()
    assert "forward" in vars(norm)  # still s2a's
    assert step(model, input_ids=ids)[1] == nbytes
    s2a.restore(model)
    assert model.use_kernels and "forward" not in vars(norm)
    # a compression that fails half-way leaves the model as it was, kernels included
    model.eval()
    apply_module = importlib.import_module("s2a.activations.apply")
    real, seen = apply_module._module_op, []

    def interrupted(module, spec):  # Ctrl-C once a few modules are patched
        seen.append(module)
        if len(seen) > 20:
            raise KeyboardInterrupt
        return real(module, spec)

    monkeypatch.setattr(apply_module, "_module_op", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s2a.compress_activations(model)
    monkeypatch.undo()
    assert model.use_kernels and "forward" not in vars(norm) and not hasattr(model, "_s2a_compression")
    s2a.compress_activations(model)  # not refused as compressed already (in eval mode)
    model.train()
    s2a.restore(model)
    assert model.kernels_mode.name == "TRAINING"  # the mode of now, not of when it was compressed


_HF_RMS_NORMS = {  # class -> the spelling s2a must see in its code
    "gemma.GemmaRMSNorm": "gemma", "qwen3_5.Qwen3_5RMSNorm": "gemma", "smollm3.SmolLM3RMSNorm": "llama",
    "llama4.Llama4TextRMSNorm": "llama", "olmo2.Olmo2RMSNorm": "float32_scale",
    "gpt_oss.GptOssRMSNorm": "float32_scale", "helium.HeliumRMSNorm": "float32_scale",
    "moshi.MoshiRMSNorm": "float32_scale", "gemma3n.Gemma3nRMSNorm": "float32_scale",
    "gemma4.Gemma4RMSNorm": "float32_scale", "llama4.Llama4TextWeightlessRMSNorm": "unscaled",
    "falcon_mamba.FalconMambaWeightlessRMSNorm": "unscaled", "inkling2.Inkling2UnweightedRMSNorm": "unscaled",
    "qwen3_next.Qwen3NextRMSNormGated": None,  # norm(x) * silu(gate): another operator, left native
}


def _hf_class(dotted: str) -> type:
    import importlib

    family, name = dotted.split(".")
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


def _hf_norm(dotted: str, width: int, **kwargs) -> nn.Module:
    cls = _hf_class(dotted)
    return cls(**kwargs) if "Weightless" in dotted and "Falcon" not in dotted else cls(width, **kwargs)


def test_transformers_rms_norm_spellings():
    from s2a.activations._hf import rms_norm_spelling

    found = {name: getattr(rms_norm_spelling(_hf_norm(name, 8)), "name", None) for name in _HF_RMS_NORMS}
    assert found == _HF_RMS_NORMS
    assert rms_norm_spelling(_hf_norm("gemma3n.Gemma3nRMSNorm", 8, with_scale=False)).name == "unscaled"
    norm = _hf_norm("olmo2.Olmo2RMSNorm", 8)
    norm.forward = norm.forward  # replaced on the instance (an adapter's): not ours to read
    assert rms_norm_spelling(norm) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,norm_trains", [
    *((n, t) for n in ("gemma.GemmaRMSNorm", "llama4.Llama4TextRMSNorm", "olmo2.Olmo2RMSNorm",
                       "helium.HeliumRMSNorm", "gemma4.Gemma4RMSNorm") for t in (False, True)),
    ("llama4.Llama4TextWeightlessRMSNorm", False),
])
def test_transformers_rms_norms_compressed(name, norm_trains, dtype):
    # LLaMA's spelling rounds x̂ to the input dtype before the scale, the others scale in
    # float32 first (Gemma by 1 + weight): the compressed forward keeps each one's rounding.
    torch.manual_seed(0)
    norm = _hf_norm(name, 64)
    weights = list(norm.parameters())
    for w in weights:
        w.data.normal_(0, 0.3)
        w.requires_grad_(norm_trains)
    ref = copy.deepcopy(norm)
    s2a.compress_activations(norm, bits=8, strict=True)  # no pow / mul / rsqrt left native
    assert s2a.compression_summary(norm) == {"": "rms_norm@8"}
    x = torch.randn(4, 10, 64, dtype=dtype, requires_grad=True)
    y, y0 = norm(x), ref(x)
    assert y.dtype == y0.dtype  # LLaMA's float32 weight promotes a bf16 x̂, the others return x's dtype
    # a trained LLaMA scale multiplies before x̂'s rounding to bf16, not after
    if "Llama4Text" in name and norm_trains:
        torch.testing.assert_close(y, y0, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)
    else:
        assert torch.equal(y, y0)  # the forward is exact
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *weights] if norm_trains else [x], g)
    grads0 = torch.autograd.grad(y0, [x, *ref.parameters()] if norm_trains else [x], g)
    for a, b in zip(grads, grads0, strict=True):
        assert cosine(a.float(), b.float()) > 0.9999
    s2a.restore(norm)
    assert "forward" not in vars(norm)


def test_functional_calls_are_routed():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 64)

        def forward(self, x):
            h = F.gelu(self.lin(x))
            return torch.softmax(F.layer_norm(h, (64,)), dim=-1)

    model = Functional()
    model.lin.weight.requires_grad_(False)
    x = torch.randn(16, 32)
    ref_out, ref_bytes, _ = step(model, x)
    s2a.compress_activations(model)
    out, nbytes, _ = step(model, x)
    torch.testing.assert_close(out, ref_out)
    assert nbytes < ref_bytes / 3
    # Outside the model's forward nothing is intercepted.
    y = F.gelu(torch.randn(4, requires_grad=True))
    assert y.grad_fn.name() == "GeluBackward0"


class _CallsInPlace(nn.Module):
    """Calls ``fn`` for its effect on x only, as code using inplace=True may."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        x = x * 1.0  # a non-leaf, which may be modified in place
        self.fn(x)
        return x


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "hardtanh", "hardsigmoid", "silu", "dropout"])
def test_functional_inplace_is_honoured(name):
    fn = {
        "relu": lambda t: F.relu(t, inplace=True),
        "leaky_relu": lambda t: F.leaky_relu(t, 0.2, inplace=True),
        "hardtanh": lambda t: F.hardtanh(t, -0.5, 0.5, inplace=True),
        "hardsigmoid": lambda t: F.hardsigmoid(t, inplace=True),
        "silu": lambda t: F.silu(t, inplace=True),
        "dropout": lambda t: F.dropout(t, 0.5, True, inplace=True),
    }[name]
    model = _CallsInPlace(fn)
    x = torch.randn(64, 64, requires_grad=True)
    g = torch.randn(64, 64)
    torch.manual_seed(0)
    ref = model(x)
    (ref_gx,) = torch.autograd.grad(ref, x, g)
    s2a.compress_activations(model)
    out = model(x)
    (gx,) = torch.autograd.grad(out, x, g)
    if name == "dropout":  # s2a draws its own mask: compare through it
        assert 0.4 < (out == 0).float().mean() < 0.6
        torch.testing.assert_close(gx, torch.where(out != 0, 2 * g, 0.0))
    else:
        torch.testing.assert_close(out, ref)
        assert cosine(gx, ref_gx) > 0.99


def test_functional_out_argument_runs_natively():
    class Out(nn.Module):
        def forward(self, x):
            o = torch.zeros_like(x)
            torch.tanh(x, out=o)
            torch.sigmoid(x, out=x.new_empty(x.shape))
            return o

    model = s2a.compress_activations(Out())
    x = torch.randn(5)
    assert torch.equal(model(x), torch.tanh(x))
    with pytest.raises(RuntimeError, match="out="):  # as natively: out= has no autograd
        model(x.requires_grad_())


def test_ops_subset_per_op_bits_and_skip():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    s2a.compress_activations(model, ops={"gelu": 2, "layer_norm": 8}, skip=["blocks.1*"])
    summary = s2a.compression_summary(model)
    assert set(summary.values()) == {"gelu@2", "layer_norm@8"}
    assert not any(k.startswith("blocks.1.") for k in summary)
    assert "blocks.10.mlp.act" not in summary and "blocks.2.mlp.act" in summary
    s2a.restore(model)
    assert s2a.compression_summary(model) == {}


def test_strict_mode_lists_uncovered_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.GELU())
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\['1: ELU'\]"):  # (GroupNorm is compressed)
        s2a.compress_activations(model, strict=True)
    assert "forward" not in model[4].__dict__  # a failed strict call leaves the model untouched
    s2a.compress_activations(model, strict=True, skip=["1", "3"])
    assert s2a.compression_summary(model) == {"4": "gelu@4"}


def test_strict_mode_catches_functional_calls():
    class Custom(nn.Module):
        def forward(self, x):
            return F.elu(x)

    model = s2a.compress_activations(Custom(), strict=True)
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\['<root>: elu'\]; add those modules to skip"):
        model(torch.randn(3, requires_grad=True))

    # A skipped module's functional calls are accepted, as its module classes are.
    model = nn.Sequential(nn.Linear(3, 3), Custom(), nn.GELU())
    s2a.compress_activations(model, strict=True, skip=["1"])
    model(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert s2a.compression_summary(model) == {"2": "gelu@4"}


class _SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean(-2, keepdim=True)))  # activation x activation


class _KeepsActivations(nn.Module):
    """Native tensor ops that save a full-precision activation for backward."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = self.fc(x)
        star = self.scale * F.relu(h) ** 2 + self.bias  # timm's StarReLU: pow keeps relu(h)
        attn = h @ h.transpose(-2, -1)  # q @ k^T
        n = F.normalize(h, dim=-1)  # keeps h and its norm
        pooled = h.amax(1, keepdim=True)  # hiera's unit max-pool
        ratio = h / h.norm(dim=-1, keepdim=True)  # norm keeps h, div its norm
        return star.sum() + attn.sum() + n.sum() + pooled.sum() + ratio.sum()


class _KeepsNoActivation(nn.Module):
    """What autograd keeps here is a frozen weight, a constant, a trainable parameter or
    nothing at all: strict mode must stay silent."""

    def __init__(self, c=8):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.frozen = nn.Parameter(torch.randn(c), requires_grad=False)
        self.gamma = nn.Parameter(torch.ones(c))  # a trainable LayerScale: keeps x, for gamma
        self.A = nn.Parameter(torch.randn(4, 2))
        self.B = nn.Parameter(torch.randn(2, c))
        self.register_buffer("cos", torch.randn(4, c))
        self.w = nn.Parameter(torch.randn(c, c), requires_grad=False)

    def forward(self, x):
        h = self.fc(x)
        h = h * 0.5 + h * self.frozen + h * self.cos + (h / self.cos.abs().add(1)) * self.gamma
        h = h + self.A @ self.B  # the low-rank prompt keeps A and B only
        h = h @ self.w + torch.tanh(h).reshape(-1, 4, 8).permute(0, 2, 1).permute(0, 2, 1)[0]
        h = torch.cat([h, h], -1)[:, :8]
        h += 1  # in place, on a view of cat's output: the graph before it is not its doing
        return torch.where(h > 0, h, torch.zeros_like(h)).sum(0) * torch.arange(8.0)


def test_strict_mode_catches_native_ops_that_keep_activations():
    # x * gate of a squeeze-excite, q @ k^T, x ** 2, F.normalize, amax, x / x.norm(): no
    # name list has them, but each saves a full-precision activation (s2a.measure counted
    # 1.58 MB of efficientnet_b0's 2.86 MB in SE products that strict mode did not report).
    model = nn.Sequential(nn.Linear(8, 8), _SqueezeExcite(8), nn.GELU(), _KeepsActivations())
    s2a.compress_activations(model, strict=True)
    x = torch.randn(4, 3, 8)
    with pytest.raises(s2a.UncoveredOperatorsError) as err:
        model(x)
    calls = str(err.value).split("): ")[1].split("; add")[0]
    # (amax is compressed: pooling.py; q @ k^T is too inside a module named like attention,
    # test_products.py, but this one is not)
    assert calls == str(sorted(["1: mul", "3: pow", "3: matmul", "3: normalize", "3: norm", "3: div"]))
    s2a.restore(model)
    s2a.compress_activations(model, strict=True, skip=["1", "3"])
    model(x).sum().backward()
    # without grad nothing is kept, nothing is reported
    s2a.restore(model)
    s2a.compress_activations(model, strict=True)
    with torch.no_grad():
        model(x)


def test_strict_mode_ignores_ops_that_keep_weights_or_constants():
    # (the squeeze-excite before it is skipped: what it keeps is not the next module's doing)
    model = nn.Sequential(nn.Linear(8, 8), _SqueezeExcite(8), _KeepsNoActivation(), nn.GELU())
    s2a.compress_activations(model, strict=True, skip=["1"])
    x = torch.randn(4, 8)
    model(x).sum().backward()
    assert model[2].gamma.grad is not None and model[2].A.grad is not None
    # the same ops on an activation that needs no gradient save nothing worth reporting
    model[0].requires_grad_(False)
    model(x).sum().backward()


def test_strict_mode_timm_squeeze_excite_and_star_relu():
    # metaformer's StarReLU (s * relu(x) ** 2 + b) keeps a full-precision activation natively;
    # left out of ops, the error names the module that ran the op. efficientnet's
    # SqueezeExcite (x * gate) is compressed (kind "gate") and not named.
    from timm.layers import SqueezeExcite
    from timm.models.metaformer import StarReLU

    model = nn.Sequential(nn.Conv2d(3, 8, 3), SqueezeExcite(8), nn.Conv2d(8, 8, 1), StarReLU())
    train_biases_only(model)
    s2a.compress_activations(model, strict=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # compressed: kind star_relu
    s2a.restore(model)
    s2a.compress_activations(model, strict=True, ops=[k for k in s2a.activations.OP_KINDS if k != "star_relu"])
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\['3: pow'\]"):
        model(torch.randn(2, 3, 8, 8))


def test_strict_mode_sees_through_non_reentrant_checkpointing_without_recomputing():
    # Reading what a checkpointed block saved would run the checkpoint's unpack hook, which
    # recomputes the block in the middle of the forward: strict mode leaves such blocks to
    # its list of names, and a reentrant checkpoint (recomputed with grad) is checked.
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.fc, self.se, self.reentrant = nn.Linear(8, 8), _SqueezeExcite(8), reentrant

        def forward(self, x):
            return checkpoint(self.se, self.fc(x), use_reentrant=self.reentrant)

    calls = []
    model = s2a.compress_activations(Net(False), strict=True)
    model.se.register_forward_pre_hook(lambda *_: calls.append(1))
    y = model(torch.randn(2, 3, 8))
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2  # recomputed once, in backward
    model = s2a.compress_activations(Net(True), strict=True)
    y = model(torch.randn(2, 3, 8))
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\['se: mul'\]"):
        y.sum().backward()


def test_strict_mode_accepts_subclasses_that_run_a_covered_forward():
    # timm's LayerNorm2dNoBias only changes LayerNorm2d's __init__: its F.layer_norm is
    # compressed, so strict mode must not list it (it did, by class name).
    from timm.layers import LayerNorm2d
    from timm.models.metaformer import LayerNorm2dNoBias

    x = torch.randn(2, 3, 8, 8)
    measured = []
    for norm in (LayerNorm2d(8), LayerNorm2dNoBias(8)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 4, 1))
        train_biases_only(model)
        s2a.compress_activations(model, strict=True)
        assert s2a.compression_summary(model)["1"] == "layer_norm@4"
        measured.append(step(model, x)[1])
    assert measured[0] == measured[1]


def test_strict_mode_checks_other_norm_classes_by_what_they_keep():
    # A leaf module named like an operator but defined outside PyTorch was listed by its
    # class name. MobileBERT's NoNorm (x * w + b, w frozen) keeps nothing and transformers'
    # ConvNextLayerNorm calls the compressed F.layer_norm: no longer listed. What such
    # modules run is checked when they run (timm's GroupNorm1 and GlobalResponseNorm are
    # compressed since: test_functional.py, test_grn.py), and torch's own nn.ELU still is
    # named when compressing.
    from timm.layers import GroupNorm1
    from timm.layers.grn import GlobalResponseNorm
    from torch.utils.checkpoint import checkpoint
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    from transformers.models.mobilebert.modeling_mobilebert import NoNorm

    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ConvNextLayerNorm(8, data_format="channels_first"),
                          nn.Conv2d(8, 4, 1))
    train_biases_only(model)
    s2a.compress_activations(model, strict=True)
    model(x).sum().backward()
    seq = nn.Sequential(nn.Linear(8, 8), NoNorm(8), nn.Linear(8, 8), ConvNextLayerNorm(8), nn.GELU())
    train_biases_only(seq)
    s2a.compress_activations(seq, strict=True)
    seq(torch.randn(2, 5, 8)).sum().backward()

    model = nn.Sequential(nn.Conv2d(3, 8, 3), GroupNorm1(8), nn.Conv2d(8, 4, 1))
    train_biases_only(model)
    s2a.compress_activations(model, strict=True)
    model(x).sum().backward()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GlobalResponseNorm(8, channels_last=False), nn.Conv2d(8, 4, 1))
    train_biases_only(model)
    s2a.compress_activations(model, strict=True)
    model(x).sum().backward()
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\[.1: ELU.\]"):
        s2a.compress_activations(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ELU()), strict=True)

    # inside a non-reentrant checkpoint what ran cannot be read back: named by class
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), NoNorm(8)

        def forward(self, h):
            return checkpoint(self.norm, self.fc(h), use_reentrant=False)

    model = s2a.compress_activations(Checkpointed(), strict=True)
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"norm: NoNorm \(unchecked"):
        model(torch.randn(2, 8))


def test_strict_mode_reports_pooling_that_keeps_its_input():
    # Max pooling asked for its indices, adaptive and fractional max pooling keep the whole
    # input plus int64 indices: strict mode must name them.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1, return_indices=True))
    with pytest.raises(s2a.UncoveredOperatorsError, match="1: MaxPool2d"):
        s2a.compress_activations(model, strict=True)

    class Pools(nn.Module):
        def forward(self, x):
            y, _ = F.max_pool2d(x, 2, return_indices=True)
            z, _ = F.max_pool1d_with_indices(x.flatten(2), 2)
            return (F.avg_pool2d(F.max_pool2d(x, 2), 2).sum() + y.sum() + z.sum()
                    + F.adaptive_max_pool2d(x, 1).sum())

    model = s2a.compress_activations(Pools(), strict=True)
    with pytest.raises(s2a.UncoveredOperatorsError,
                       match=r"\['<root>: adaptive_max_pool', '<root>: max_pool\(return_indices=True\)'\]"):
        model(torch.randn(1, 2, 8, 8, requires_grad=True))

    # a module switched to return_indices after compression returns them, natively
    model = s2a.compress_activations(nn.Sequential(nn.MaxPool2d(2)))
    model[0].return_indices = True
    y, idx = model(torch.randn(1, 2, 4, 4, requires_grad=True))
    assert idx.dtype == torch.int64 and y.grad_fn.name() == "MaxPool2DWithIndicesBackward0"


class _Pools(nn.Module):
    """Every pooling kind s2a compresses, as modules and as functional calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.max2 = nn.MaxPool2d(3, 2, 1)
        self.avg2 = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.max1 = nn.MaxPool1d(2, ceil_mode=True)
        self.avg1 = nn.AvgPool1d(3, 2)
        self.max3 = nn.MaxPool3d(2)
        self.avg3 = nn.AvgPool3d(2, divisor_override=3)
        self.ada = nn.AdaptiveAvgPool2d((3, 2))
        self.ada1 = nn.AdaptiveAvgPool1d(4)
        self.ada3 = nn.AdaptiveAvgPool3d(2)
        self.head = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.avg2(self.max2(self.conv(x)))  # (N, 8, 8, 8)
        flat = h.flatten(2)
        vol = h.view(h.shape[0], 2, 4, 8, 8)
        outs = [self.ada(h), self.head(h), self.max1(flat), self.avg1(flat), self.ada1(flat),
                self.max3(vol), self.avg3(vol), self.ada3(vol),
                F.max_pool2d(h, 2, dilation=2), torch.max_pool2d(h, [3, 3], [2, 2], [1, 1]),
                F.avg_pool2d(h, 2), F.adaptive_avg_pool2d(h, (None, 3)), F.max_pool1d(flat, 4),
                F.avg_pool3d(vol, 2), F.adaptive_avg_pool1d(flat, 5), F.max_pool3d(vol, 2, 1)]
        return torch.cat([o.flatten(1) for o in outs], 1)


def test_pooling_is_compressed_exactly():
    model = _Pools()
    model.conv.weight.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    ref_out, ref_bytes, ref_grads = step(model, x)
    # (pooling alone: the compressed conv would sum its bias gradient in another order)
    s2a.compress_activations(model, ops=["max_pool", "avg_pool"], strict=True)
    out, nbytes, grads = step(model, x)
    # window positions instead of inputs + indices: the same output, the same gradients
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() == {"conv.bias"}
    assert torch.equal(grads["conv.bias"], ref_grads["conv.bias"])
    assert nbytes < ref_bytes / 5, (nbytes, ref_bytes)
    summary = s2a.compression_summary(model)
    assert summary == {"max2": "max_pool@8", "avg2": "avg_pool@none",
                       "max1": "max_pool@8", "avg1": "avg_pool@none", "max3": "max_pool@8",
                       "avg3": "avg_pool@none", "ada": "avg_pool@none", "ada1": "avg_pool@none",
                       "ada3": "avg_pool@none", "head": "avg_pool@none"}
    s2a.restore(model)
    s2a.compress_activations(model, ops=["gelu"], strict=True)  # pooling left out: native again
    assert step(model, x)[1] == ref_bytes


def test_timm_same_padding_pools_are_routed_and_pass_strict_mode():
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    model = nn.Sequential(nn.Conv2d(3, 4, 3), MaxPool2dSame(3, 2), AvgPool2dSame(3, 2))
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 15, 15)
    ref_out, ref_bytes, ref_grads = step(model, x)
    s2a.compress_activations(model, ops=["max_pool", "avg_pool"], strict=True)
    out, nbytes, grads = step(model, x)  # their F.max_pool2d / F.avg_pool2d calls are routed
    assert torch.equal(out, ref_out) and torch.equal(grads["0.bias"], ref_grads["0.bias"])
    # the frozen conv's native input and a uint8 per max-pool output (2, 4, 7, 7)
    assert nbytes == x.numel() * 4 + 2 * 4 * 7 * 7 < ref_bytes / 3


def test_resnet18_max_pool_keeps_a_byte_per_output():
    # The stem max-pool kept its fp32 input + int64 indices: 786,432 of resnet18's 1,032,016
    # saved bytes (biases + head trainable, 4-bit storage, batch 2, 64 px).
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("fc."))
    x = torch.randn(2, 3, 64, 64)
    pooled = 2 * 64 * 16 * 16  # the stem max-pool's output: (2, 64, 16, 16)
    s2a.compress_activations(model, bits=4, ops=[k for k in OP_KINDS if "pool" not in k])
    before = s2a.measure(model, x)
    native = before.by_kind["max_pool"]
    assert native == pooled * 4 * 4 + pooled * 8  # its fp32 input and int64 indices
    _, _, ref_grads = step(model, x)
    s2a.restore(model)
    s2a.compress_activations(model, bits=4, strict=True)  # nothing is left uncovered
    after = s2a.measure(model, x)
    assert after.by_kind["max_pool (s2a)"] == pooled  # a uint8 window position each
    assert "max_pool" not in after.by_kind
    assert before.saved_bytes - after.saved_bytes == native - pooled
    summary = s2a.compression_summary(model)
    assert summary["maxpool"] == "max_pool@8" and summary["global_pool.pool"] == "avg_pool@none"
    # the pooling is exact: the gradients are those of the same model with native pooling
    _, _, grads = step(model, x)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 5}, ValueError, "choose one of"),
        ({"ops": ["gelu", "swiglu"]}, ValueError, r"unknown operator kind\(s\) \['swiglu'\]"),
        ({"ops": {"layer_norm": 1}}, ValueError, "bits for layer_norm"),
        # 1 bit suits pointwise kinds only: all row-wise kinds named, in OP_KINDS order
        ({"bits": 1}, ValueError,
         r"bits=1 does not suit \['softmax', 'attention', 'layer_norm', 'rms_norm', 'batch_norm', 'group_norm', 'gate', 'grn'\]"),
        ({"bits": 1, "ops": ["gelu", "layer_norm"]}, ValueError, r"does not suit \['layer_norm'\]"),
        ({"ops": "gelu"}, TypeError, "not the string"),
        ({"dropout_mode": "x"}, ValueError, "dropout_mode"),
        ({"attention_mode": "flash"}, ValueError, "attention_mode"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        s2a.compress_activations(nn.GELU(), **kwargs)


def test_one_bit_for_pointwise_kinds():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    s2a.compress_activations(model, bits=1, ops={"relu": 1, "layer_norm": 2})
    assert s2a.compression_summary(model) == {"1": "relu@1", "2": "layer_norm@2"}


def test_double_compress_and_non_module():
    model = s2a.compress_activations(nn.Sequential(nn.GELU()))
    with pytest.raises(RuntimeError, match="already compressed"):
        s2a.compress_activations(model)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        s2a.compress_activations(lambda x: x)


def test_autocast_bf16_training_step():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    train_biases_only(model)
    s2a.compress_activations(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 224, 224))
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_autocast_keeps_no_cast_copies_of_frozen_weights():
    """Under bf16 autocast, native frozen Linear / Conv layers keep autocast's bf16 copy of
    their weight until backward (a model's worth of weights at any batch size)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2)
    train_biases_only(model)
    reference = copy.deepcopy(model)
    s2a.compress_activations(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = s2a.measure(model, (x,), lambda o, _b: o.float().square().mean())
        native = s2a.measure(reference, (x,), lambda o, _b: o.float().square().mean())
    frozen_weights = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith("weight")
                         and not n.startswith("head") and p.dim() > 1)
    assert native.by_kind["linear"] + native.by_kind["conv"] > frozen_weights  # the bf16 copies
    head = model.head.weight.numel() * 2 + 2 * model.embed_dim * 2  # trainable head: its copy and input
    assert report.by_kind.get("linear", 0) <= head and "conv (s2a)" not in report.by_kind
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x).float().square().mean().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        if a.grad is not None:
            assert cosine(a.grad, b.grad) > 0.99


def test_every_kind_is_documented():
    assert {"gelu", "softmax", "attention", "layer_norm", "dropout", "conv"} <= set(OP_KINDS)


def test_summary_says_what_each_operator_keeps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.1), nn.GELU(), nn.Conv2d(4, 4, 1))
    model[0].requires_grad_(False)
    s2a.compress_activations(model, bits=4)
    assert s2a.compression_summary(model) == {
        "0": "conv@none", "1": "relu@1", "2": "dropout@seed", "3": "gelu@4", "4": "conv@native"}
    s2a.restore(model)
    s2a.compress_activations(model, bits=2, dropout_mode="bitmask")
    assert s2a.compression_summary(model)["2"] == "dropout@1"


def test_deepcopy_of_a_compressed_model_runs_on_its_own_tensors():
    # an EMA / teacher copy: every patched forward (timm's fused MLP and lean attention too)
    # must follow the copy's modules, not keep running on the original's
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=3)
    train_biases_only(model)
    s2a.compress_activations(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    plain = copy.deepcopy(twin)
    s2a.restore(plain)
    x = torch.randn(2, 3, 32, 32)
    y = twin(x)
    torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in twin.parameters())
    s2a.restore(twin)  # undoes the copy only
    assert s2a.compression_summary(model) and not s2a.compression_summary(twin)
    torch.save(model, io.BytesIO())  # and the compressed model pickles


@pytest.mark.parametrize("layer", [nn.GELU(), nn.LayerNorm(8), nn.Softmax(-1), nn.MaxPool1d(1)])
def test_double_backward_is_refused_not_silently_wrong(layer):
    # the stored codes give f'(x) only: a gradient penalty through them would drop f''
    model = s2a.compress_activations(nn.Sequential(nn.Linear(8, 8), layer, nn.Linear(8, 8)))
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"s2a: .* differentiated twice.*s2a\.restore\(model\)"):
        torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    # a loss linear in the output: the incoming gradient needs none, the error still comes
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)


def test_second_derivatives_for_chosen_inputs_are_refused_not_silently_partial():
    # autograd.grad(..., inputs=...) never ran the node that raised: a gradient penalty and a
    # MAML outer step summed the other paths, dropping the second derivative through the op
    model = s2a.compress_activations(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8)))
    w1, w2 = model[0].weight, model[3].weight
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(gx.pow(2).sum(), [w1, w2], allow_unused=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):  # MAML: inner step, outer gradient
        (g1,) = torch.autograd.grad(model(x).pow(2).mean(), [w1], create_graph=True)
        torch.autograd.grad((w1 - 0.1 * g1).sum(), [w1])
    s2a.restore(model)  # the way out the message gives
    (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    assert all(g is not None for g in torch.autograd.grad(gx.pow(2).sum(), [w1, w2]))


def test_softmax_without_dim_keeps_torchs_implicit_dim():
    model = s2a.compress_activations(nn.Sequential(nn.Linear(8, 8), nn.Softmax()))  # no dim: the legacy form
    x = torch.randn(3, 5, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        native = F.softmax(model[0](x), dim=None)
    torch.testing.assert_close(model(x), native)  # dim 0 for a 3-D input, as torch picks


def test_a_forward_replaced_on_the_instance_is_kept():
    norm = nn.LayerNorm(8)
    original = norm.forward
    norm.forward = lambda x: original(x) * 2 + 100  # an offload hook or a user's wrapper
    model = s2a.compress_activations(nn.Sequential(nn.Linear(8, 8), norm))
    assert "1" not in s2a.compression_summary(model)
    assert model(torch.randn(2, 8, requires_grad=True)).min() > 90


def test_strict_mode_names_multihead_attention():
    model = nn.Sequential(nn.Linear(8, 8))
    model.append(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(s2a.UncoveredOperatorsError, match="1: MultiheadAttention"):
        s2a.compress_activations(model, strict=True)


def test_non_reentrant_checkpointing_recomputes_under_compression():
    # checkpointing recomputes each block during backward, outside the model's own forward:
    # its functional calls (timm's F.gelu / SDPA) must save the same codes again
    from s2a.activations.mlp import has_foreign_hooks

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=3)
    train_biases_only(model)
    reference = copy.deepcopy(model)
    s2a.compress_activations(model)
    mlp = model.blocks[0].mlp
    assert not has_foreign_hooks(mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2)  # still fuses
    model.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)
    for m in (reference, model):
        m(x).pow(2).sum().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]) for m in (reference, model)]
    assert cosine(*grads) > 0.99


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing_with_dropout_matches_no_checkpointing(reentrant):
    # pretrained MiniLM in train mode (hidden and attention dropout 0.1): a reentrant checkpoint
    # runs each layer without grad, then recomputes it with grad; both passes must draw
    # s2a's dropout masks, so the output and the gradients equal the uncheckpointed run's
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(minilm_path())
    base.train()
    for name, p in base.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    ids = torch.randint(100, 2000, (2, 16))
    runs = []
    for checkpointing in (False, True):
        model = s2a.compress_activations(copy.deepcopy(base))
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(1)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out.pow(2).mean().backward()
        runs.append((out.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert cosine(runs[0][1], runs[1][1]) > 0.9999


def test_relu6_is_named_relu6_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 8))
    reference = copy.deepcopy(model)
    s2a.compress_activations(model)
    assert s2a.compression_summary(model) == {"1": "relu6@1"}  # not Hardtanh's, whose forward it runs
    x = torch.randn(4, 8) * 10
    out, out0 = model(x), reference(x)
    torch.testing.assert_close(out, out0)
    out.sum().backward()
    out0.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)


def test_a_skip_pattern_matching_nothing_is_refused():
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"skip pattern 'layer9\*' matches no module path of ResNet"):
        s2a.compress_activations(model, skip=["layer1*", "layer9*"])
    with pytest.raises(TypeError, match="list of module path patterns"):
        s2a.compress_activations(model, skip="layer1")
    assert "forward" not in vars(model.act1)  # nothing was patched
    s2a.compress_activations(model, skip=(p for p in ["layer1*"]))  # any iterable, a generator too
    assert not any(k.startswith("layer1") for k in s2a.compression_summary(model))


def test_summary_lists_modules_whose_calls_the_mode_routes():
    model = timm.create_model("mobilenetv2_050", num_classes=3)  # BatchNormAct2d: F.batch_norm inside
    s2a.compress_activations(model)
    summary = s2a.compression_summary(model)
    assert summary["bn1"] == "batch_norm@4" and summary["bn1.act"] == "relu6@1"
    s2a.restore(model)
    s2a.compress_activations(model, ops=["relu6"])
    assert "bn1" not in s2a.compression_summary(model)


def test_summary_lists_attention_switched_to_sdpa():
    """timm's fused_attn flag and transformers' attention implementation are switched, not
    patched: the summary listed neither."""
    from transformers import BertConfig, BertModel

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    s2a.compress_activations(vit)
    summary = s2a.compression_summary(vit)
    assert summary["blocks.0.attn"] == summary["blocks.1.attn"] == "attention@8"
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, attn_implementation="eager"))
    s2a.compress_activations(bert)
    assert "attention@8" in s2a.compression_summary(bert).values()
    s2a.restore(bert)
    assert s2a.compression_summary(bert) == {}
