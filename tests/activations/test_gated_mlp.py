"""The frozen gated MLP (``down(act(gate(x)) * up(x))``: input kept, hidden layers recomputed)
and the lean forwards that run transformers' LLaMA-style MLPs and timm's SwiGLU / GluMlp on it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLU
from torch import nn

import s2a
from helpers import count_calls, logits_and_grads
from s2a.activations import gated_mlp as GM
from s2a.activations.codebooks import SMOOTH_FUNCTIONS
from s2a.memory import measure


def _weights(d=24, h=64, o=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    wg = torch.randn(h, d, generator=g, dtype=dtype) / d**0.5
    wu = torch.randn(h, d, generator=g, dtype=dtype) / d**0.5
    wd = torch.randn(o, h, generator=g, dtype=dtype) / h**0.5
    bg, bu, bd = ((torch.randn(n, generator=g, dtype=dtype) * 0.5).requires_grad_() for n in (h, h, o))
    return wg, bg, wu, bu, wd, bd


def _near(a, b, rel=5e-3):
    """Within ``rel`` of ``b`` in norm (a float32 MLP input is kept in bfloat16: its rounding,
    at most 2**-9 per element, reaches the gradients); zero gradients must stay zero."""
    assert (a.float() - b.float()).norm() <= rel * b.float().norm(), (a, b)


def _native(x, wg, bg, wu, bu, wd, bd, name="silu"):
    return F.linear(SMOOTH_FUNCTIONS[name](F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


class _Block(nn.Module):
    def __init__(self, weights, fused):
        super().__init__()
        self.fused = fused
        self.params = nn.ParameterList([nn.Parameter(w, requires_grad=w.requires_grad) for w in weights])

    def forward(self, x):
        return (GM.frozen_gated_mlp if self.fused else _native)(x, *self.params)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_one_chunk_is_bit_identical_to_the_native_block(name):
    w = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    g = torch.randn(3, 17, 20)
    y = GM.frozen_gated_mlp(x, *w, activation=name, store_dtype=None)  # x kept exactly
    y0 = _native(x, *w, name=name)
    assert torch.equal(y, y0)
    inputs = (x, w[1], w[3], w[5])
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y0, inputs, g), strict=True):
        assert torch.equal(a, b)


def test_chunks_of_rows_give_the_native_gradients(monkeypatch):
    monkeypatch.setattr(GM, "CHUNK_ELEMS", 64 * 7)  # 7-row chunks, the last one ragged
    w = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    g = torch.randn(3, 17, 20)
    y = GM.frozen_gated_mlp(x, *w, store_dtype=None)
    y0 = _native(x, *w)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    inputs = (x, w[1], w[3], w[5])
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y0, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_float32_input_is_kept_in_bfloat16():
    w = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    g = torch.randn(3, 17, 20)
    y = GM.frozen_gated_mlp(x, *w)
    y0 = _native(x, *w)
    assert torch.equal(y, y0)  # the forward is exact
    inputs = (x, w[1], w[3], w[5])
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y0, inputs, g), strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99999
        _near(a, b)
    with pytest.raises(ValueError, match="store_dtype"):
        GM.frozen_gated_mlp(x, *w, store_dtype=torch.float32)


def test_only_the_input_is_saved():
    w = _weights()
    x = torch.randn(3, 17, 24, requires_grad=True)
    fused, native = (measure(_Block(w, f), x) for f in (True, False))
    assert fused.by_kind["gated_mlp (s2a)"] == 3 * 17 * 24 * 2  # x in bfloat16, nothing else
    assert fused.by_module["<root>"] == 3 * 17 * 24 * 2
    # natively: act(gate), up (the product's factors) and gate (SiLU's input), 64 wide each
    assert native.by_module["<root>"] >= 3 * 3 * 17 * 64 * 4


def test_autocast_keeps_the_compute_dtype_copy_and_matches_native():
    w = _weights()
    x = torch.randn(2, 9, 24, requires_grad=True)
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        y = GM.frozen_gated_mlp(x, *w)
    assert y.dtype == torch.bfloat16
    # x in the compute dtype: half of the fp32 x
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = _native(x, *w)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    g = torch.randn_like(y)
    inputs = (x, w[1], w[3], w[5])
    fused, native = torch.autograd.grad(y, inputs, g), torch.autograd.grad(y0, inputs, g)
    assert torch.equal(fused[0], native[0])
    for a, b in zip(fused[1:], native[1:], strict=True):
        # bias gradients: summed over rows in fp32 here, in bf16 natively
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_half_precision_weights_and_no_biases():
    wg, _, wu, _, wd, _ = _weights(dtype=torch.bfloat16)
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    y = GM.frozen_gated_mlp(x, wg, None, wu, None, wd, None)
    y0 = _native(x, wg, None, wu, None, wd, None)
    assert torch.equal(y, y0)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y0, x, g)[0])


def test_only_biases_or_only_the_input_need_grad():
    wg, bg, wu, bu, wd, bd = _weights()
    x = torch.randn(5, 24)
    y = GM.frozen_gated_mlp(x, wg, bg, wu, bu.detach(), wd, None, store_dtype=None)
    gbg = torch.autograd.grad(y.sum(), bg)[0]
    ref = torch.autograd.grad(_native(x, wg, bg, wu, bu.detach(), wd, None).sum(), bg)[0]
    torch.testing.assert_close(gbg, ref)
    xg = x.clone().requires_grad_()
    y = GM.frozen_gated_mlp(xg, wg, None, wu, None, wd, bd.detach(), store_dtype=None)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), xg)[0],
                               torch.autograd.grad(_native(xg, wg, None, wu, None, wd, bd.detach()).sum(), xg)[0])


def test_output_can_be_modified_in_place_and_an_input_modified_after_is_caught():
    w = _weights()
    x = torch.randn(3, 24, requires_grad=True)
    h = x * 1  # a non-leaf input
    y = GM.frozen_gated_mlp(h, *w, store_dtype=None)  # x itself kept
    y += 1  # as F.linear's output: not a view made inside the Function
    torch.autograd.grad(y.sum(), x, retain_graph=True)
    h.mul_(2)  # the saved input changed: backward must refuse, not recompute from new values
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x)
    # kept as a bfloat16 copy: the caller may change its own tensor afterwards
    h = x * 1
    y = GM.frozen_gated_mlp(h, *w)
    (before,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    h.mul_(2)
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], before)


def test_no_double_backward():
    w = _weights()
    x = torch.randn(3, 24, requires_grad=True)
    y = GM.frozen_gated_mlp(x, *w)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(y, x, torch.ones_like(y, requires_grad=True), create_graph=True)


def test_bad_input():
    wg, bg, wu, bu, wd, bd = _weights()
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="must be frozen"):
        GM.frozen_gated_mlp(x, wg.clone().requires_grad_(), bg, wu, bu, wd, bd)
    with pytest.raises(ValueError, match="do not chain"):
        GM.frozen_gated_mlp(torch.randn(4, 23), wg, bg, wu, bu, wd, bd)
    with pytest.raises(ValueError, match="do not chain"):
        GM.frozen_gated_mlp(x, wg, bg, wu[:-1], bu, wd, bd)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        GM.frozen_gated_mlp(x, wg, bg, wu, bu, wd, bd, "relu")


def test_nan_stays_in_its_row(monkeypatch):
    w = _weights()
    x = torch.randn(4, 24)
    x[1, 3] = float("nan")
    x.requires_grad_()
    y = GM.frozen_gated_mlp(x, *w)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.isfinite(gx[[0, 2, 3]]).all()


# --- transformers: LLaMA-style MLPs ---------------------------------------------------


def _hf_model(arch: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    if arch == "gemma":
        common["head_dim"] = 8
    config = getattr(transformers, f"{arch.capitalize()}Config")(**common)
    model = getattr(transformers, f"{arch.capitalize()}ForSequenceClassification")(config)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("score"))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3"])
def test_hf_gated_mlps_run_fused_with_native_gradients(arch):
    model = _hf_model(arch)
    ids = torch.randint(1, 64, (3, 11))
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None), example_input={"input_ids": ids})
    reference = copy.deepcopy(model)
    act = "gelu_tanh" if arch == "gemma" else "silu"
    # only the MLP's activation kind: everything else stays native, so the gradients must be
    # the native ones but for the bfloat16 copies of the MLPs' inputs
    s2a.compress_activations(model, ops={act: 4})
    summary = s2a.compression_summary(model)
    assert summary["model.layers.0.mlp"] == f"gated_mlp:{act}@input"
    out, grads = logits_and_grads(model, ids)
    out0, grads0 = logits_and_grads(reference, ids)
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-6)
    up_bias = "mlp.gate_up_proj.bias" if arch == "phi3" else "mlp.up_proj.bias"
    assert grads.keys() == grads0.keys() and any(up_bias in n for n in grads)
    for n in grads:  # the MLP inputs were kept in bfloat16
        _near(grads[n], grads0[n])
    report = measure(model, {"input_ids": ids}, lambda o, b: o.logits.sum())
    # each layer's MLP keeps its input alone: 3 x 11 tokens x 32 channels, in bfloat16
    assert report.by_kind["gated_mlp (s2a)"] == 2 * 3 * 11 * 32 * 2
    assert "mul" not in report.by_kind or report.by_kind["mul"] < 3 * 11 * 88 * 4
    s2a.restore(model)
    assert all("forward" not in vars(m) for m in model.modules())


# (module, MLP class, config class, config kwargs, activation kind, name of the packed or up layer)
_SPELLINGS = [
    ("modernbert", "ModernBertMLP", "ModernBertConfig", dict(hidden_activation="gelu", mlp_bias=True), "gelu", "Wi"),
    ("granitemoehybrid", "GraniteMoeHybridMLP", "GraniteMoeHybridConfig",
     dict(shared_intermediate_size=40, mamba_n_heads=4), "silu", "input_linear"),
    ("lfm2", "Lfm2MLP", "Lfm2Config", dict(block_auto_adjust_ff_dim=False), "silu", "w3"),
    ("gte", "GteMLP", "GteConfig", dict(hidden_act="gelu", hidden_dropout_prob=0.0), "gelu", "up_proj"),
    ("t5gemma", "T5GemmaMLP", "T5GemmaModuleConfig", dict(hidden_activation="gelu_pytorch_tanh", dropout_rate=0.0),
     "gelu_tanh",
     "up_proj"),
]


@pytest.mark.parametrize("module,cls,config_cls,kwargs,kind,up", _SPELLINGS, ids=[s[1] for s in _SPELLINGS])
def test_hf_gated_mlp_spellings_run_fused(module, cls, config_cls, kwargs, kind, up):
    import importlib

    import transformers

    torch.manual_seed(0)
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    config = getattr(transformers, config_cls, None) or getattr(
        importlib.import_module(f"transformers.models.{module}.configuration_{module}"), config_cls)
    mlp = getattr(mod, cls)(config(hidden_size=16, intermediate_size=40, **kwargs))
    block = nn.Sequential(nn.Linear(16, 16), mlp)
    for n, p in block.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("0."))
    getattr(mlp, up).bias = nn.Parameter(torch.randn(getattr(mlp, up).out_features) * 0.1)  # a bias that trains
    reference = copy.deepcopy(block)
    x = torch.randn(3, 5, 16)
    s2a.compress_activations(block, ops={kind: 4}, strict=True)
    assert s2a.compression_summary(block)["1"] == f"gated_mlp:{kind}@input"
    out, out0 = block(x), reference(x)
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [p for p in block.parameters() if p.requires_grad], g)
    grads0 = torch.autograd.grad(out0, [p for p in reference.parameters() if p.requires_grad], g)
    for a, b in zip(grads, grads0, strict=True):
        _near(a, b)
    # the first Linear's output alone, in bfloat16: not the product's two factors
    assert measure(block, x).by_kind["gated_mlp (s2a)"] == 3 * 5 * 16 * 2
    dropout = next((m for m in mlp.modules() if isinstance(m, nn.Dropout)), None)
    if dropout is not None:  # a dropout on the product, in training: the block's own forward
        s2a.restore(block)
        s2a.compress_activations(block, ops={kind: 4})  # not strict: the product is kept then
        dropout.p = 0.5
        assert s2a.compression_summary(block)["1"] == f"gated_mlp:{kind}@unfused"
        assert "gated_mlp (s2a)" not in measure(block, x).by_kind
    s2a.restore(block)


def test_hf_default_compression_is_strict_clean_and_saves_far_less():
    model = _hf_model("llama")
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None))
    unfused = copy.deepcopy(model)
    s2a.compress_activations(model, strict=True)  # no `mul` reported: the product is covered
    s2a.compress_activations(unfused)
    for module, kind, *_ in unfused._s2a_compression.patched:
        if kind.startswith("gated_mlp"):
            module.__dict__.pop("forward")
    ids = torch.randint(1, 64, (4, 16))
    fused, plain = (measure(m, {"input_ids": ids}, lambda o, b: o.logits.sum()) for m in (model, unfused))
    # natively the product keeps act(gate) and up, 88 wide each, per layer
    assert plain.by_kind["mul"] >= 2 * 2 * 4 * 16 * 88 * 4
    assert fused.saved_bytes <= plain.saved_bytes - 2 * 2 * 4 * 16 * 88 * 4 + 2 * 4 * 16 * 32 * 2


def test_hf_mlp_falls_back_where_fusing_would_change_something(monkeypatch):
    from s2a.activations import _hf

    calls = count_calls(monkeypatch, _hf, "frozen_gated_mlp")
    model = _hf_model("llama")
    s2a.apply(model, s2a.S2AConfig(modules=("bias",)))
    ids = torch.randint(1, 64, (2, 7))
    mlp = model.model.layers[0].mlp

    def fused_runs(fn) -> int:
        calls.clear()
        fn()
        return len(calls)

    assert fused_runs(lambda: logits_and_grads(model, ids)) == 2
    h = mlp.up_proj.register_forward_hook(lambda *a: None)  # a user's hook must still fire
    assert fused_runs(lambda: logits_and_grads(model, ids)) == 1
    h.remove()
    mlp.down_proj.weight.requires_grad_(True)  # its gradient needs the product
    assert fused_runs(lambda: logits_and_grads(model, ids)) == 1
    mlp.down_proj.weight.requires_grad_(False)
    with torch.no_grad():
        assert fused_runs(lambda: model(input_ids=ids)) == 0
    s2a.restore(model)


def test_hf_mlp_only_for_the_known_forward():
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ClampedMLP(LlamaMLP):  # a variant that computes something else
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)).clamp(max=5) * self.up_proj(x))

    class SwappedMLP(LlamaMLP):  # same names, the gate on the other factor
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
            return down_proj

    model = _hf_model("llama")
    config = model.config
    layers = model.model.layers
    layers[0].mlp, layers[1].mlp = ClampedMLP(config), SwappedMLP(config)
    lora = _hf_model("llama")
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(lora, LoraConfig(target_modules=["up_proj"], r=2))
    for m in (model, lora):
        s2a.compress_activations(m)
        assert not any(k.startswith("gated_mlp") for k in s2a.compression_summary(m).values())
        s2a.restore(m)


# --- timm: SwiGLU and GluMlp ------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: SwiGLU(16, 40),
    lambda: GluMlp(16, 80, act_layer=nn.SiLU, gate_last=True),
    lambda: GluMlp(16, 80, act_layer=nn.GELU, gate_last=False),
])
def test_timm_gated_mlps_run_fused_with_native_gradients(make):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), make())
    for n, p in block.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    reference = copy.deepcopy(block)
    x = torch.randn(3, 5, 16)
    kind = "gelu" if isinstance(block[1].act, nn.GELU) else "silu"
    s2a.compress_activations(block, ops={kind: 4}, strict=True)
    assert s2a.compression_summary(block)["1"] == f"gated_mlp:{kind}@input"
    out, out0 = block(x), reference(x)
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    out0.pow(2).sum().backward()
    for p, p0 in zip(block.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            _near(p.grad, p0.grad)
    # the Linear's output alone, in bfloat16 (and the loss's input, `pow`)
    assert measure(block, x).by_kind == {"gated_mlp (s2a)": 3 * 5 * 16 * 2, "pow": 3 * 5 * 16 * 4}


def test_timm_gated_mlp_with_a_norm_inside_runs_unfused():
    torch.manual_seed(0)
    block = SwiGLU(16, 40, norm_layer=nn.LayerNorm)
    for n, p in block.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    s2a.compress_activations(block)
    assert "" not in s2a.compression_summary(block)
    s2a.restore(block)


def test_hf_mlp_wrapped_after_compression_runs_its_own_forward():
    # peft applied after s2a (the usual LLaMA LoRA recipe): the wrapped projections must run,
    # with their adapters, not the frozen base weights inside the fused block
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _hf_model("llama")
    ids = torch.randint(1, 64, (2, 9))
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["up_proj"], r=2, init_lora_weights=False))
    s2a.compress_activations(model, ops={"silu": 4})
    assert s2a.compression_summary(model)["model.layers.0.mlp"] == "gated_mlp:silu@input"
    wrapped = get_peft_model(model, LoraConfig(target_modules=["up_proj"], r=2, init_lora_weights=False))
    wrapped.load_state_dict(reference.state_dict())
    assert s2a.compression_summary(wrapped)["base_model.model.model.layers.0.mlp"] == "gated_mlp:silu@unfused"
    out, out0 = wrapped(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_hf_mlp_called_by_keyword():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    mlp = Phi3MLP(Phi3Config(hidden_size=16, intermediate_size=40))
    reference = copy.deepcopy(mlp)
    for m in (mlp, reference):
        m.gate_up_proj.weight.requires_grad_(False)
        m.down_proj.weight.requires_grad_(False)
    s2a.compress_activations(mlp)
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.testing.assert_close(mlp(hidden_states=x), reference(hidden_states=x))
    torch.testing.assert_close(mlp(x), reference(x))


def test_summary_says_unfused_for_a_linear_subclass_or_parametrization():
    # bitsandbytes / torchao linears subclass nn.Linear; a parametrized weight changes the class
    from torch.nn.utils import parametrize

    class Scaled(nn.Module):
        def forward(self, w):
            return w * 2

    class MyLinear(nn.Linear):
        pass

    for change in ("subclass", "parametrize"):
        model = _hf_model("llama")
        s2a.compress_activations(model, ops={"silu": 4})
        mlp = model.model.layers[0].mlp
        if change == "subclass":
            mlp.up_proj.__class__ = MyLinear
        else:
            parametrize.register_parametrization(mlp.up_proj, "weight", Scaled())
        summary = s2a.compression_summary(model)
        assert summary["model.layers.0.mlp"] == "gated_mlp:silu@unfused", change
        assert summary["model.layers.1.mlp"] == "gated_mlp:silu@input"
