"""Frozen mixture-of-experts feed-forward (input and routing kept, experts recomputed) and the
lean forward that runs transformers' ``@use_experts_implementation`` experts on it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import s2a
from helpers import cosine, count_calls, logits_and_grads, saved_bytes
from s2a.activations import moe_experts as ME
from s2a.activations.codebooks import SMOOTH_FUNCTIONS
from s2a.memory import measure


def _experts(e=4, h=16, i=24, transposed=False, bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=g, dtype=dtype) / h**0.5
    down = torch.randn(e, h, i, generator=g, dtype=dtype) / i**0.5
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    biases = [(torch.randn(e, n, generator=g, dtype=dtype) * 0.3).requires_grad_() if bias else None
              for n in (2 * i, h)]
    return gate_up, biases[0], down, biases[1]


def _glu(act):
    def gate(h):
        g, up = h.chunk(2, dim=-1)
        return SMOOTH_FUNCTIONS[act](g) * up
    return gate


def _loop(x, index, weights, gate_up, bgu, down, bd, act="silu", transposed=False):
    """The definition, token by token and choice by choice."""
    gate = act if callable(act) else _glu(act)
    rows = []
    for t in range(x.shape[0]):
        acc = 0
        for j in range(index.shape[1]):
            e = int(index[t, j])
            wgu, wd = (gate_up[e].t(), down[e].t()) if transposed else (gate_up[e], down[e])
            m = gate(F.linear(x[t], wgu, None if bgu is None else bgu[e]))
            acc = acc + weights[t, j] * F.linear(m, wd, None if bd is None else bd[e])
        rows.append(acc)
    return torch.stack(rows)


def _routing(tokens, experts=4, k=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, dtype=dtype).requires_grad_()
    weights, index = torch.softmax(logits, -1).topk(k, -1)
    return logits, weights, index


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_matches_the_definition_with_every_gradient(transposed, bias, act, monkeypatch):
    monkeypatch.setattr(ME, "CHUNK_ELEMS", 96)  # two rows a chunk: chunks inside each expert
    gate_up, bgu, down, bd = _experts(transposed=transposed, bias=bias)
    x = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    logits, weights, index = _routing(30)
    y = ME.frozen_moe_experts(x, index, weights, gate_up, bgu, down, bd, act, transposed, store_dtype=None)
    y0 = _loop(x, index, weights, gate_up, bgu, down, bd, act, transposed)
    torch.testing.assert_close(y, y0)
    inputs = [x, logits] + ([bgu, bd] if bias else [])
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, g, retain_graph=True)  # the router's graph is shared
    for a, b in zip(grads, torch.autograd.grad(y0, inputs, g), strict=True):
        torch.testing.assert_close(a, b)


def _clamped_interleaved_gate(h):  # GPT-OSS's: interleaved halves, clamps, (up + 1) * glu
    gate, up = h[..., ::2].clamp(max=0.7), h[..., 1::2].clamp(-0.7, 0.7)
    return (up + 1) * gate * torch.sigmoid(gate * 1.702)


@pytest.mark.parametrize("gate,width", [(_clamped_interleaved_gate, 48), (lambda h: F.relu(h) ** 2, 24)])
def test_a_gate_function_of_the_model(gate, width):
    # any deterministic row-wise gate: GPT-OSS's, or an ungated expert's activation alone
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(4, width, 16, generator=g, dtype=torch.float64)
    down = torch.randn(4, 16, 24, generator=g, dtype=torch.float64) / 5
    bgu = torch.randn(4, width, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    logits, weights, index = _routing(30)
    y = ME.frozen_moe_experts(x, index, weights, gate_up, bgu, down, None, gate, store_dtype=None)
    y0 = _loop(x, index, weights, gate_up, bgu, down, None, gate)
    torch.testing.assert_close(y, y0)
    gr = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, logits, bgu], gr, retain_graph=True)
    for a, b in zip(grads, torch.autograd.grad(y0, [x, logits, bgu], gr), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed,bias,gate", [(False, False, "silu"), (True, True, "gelu"),
                                                  (True, True, _clamped_interleaved_gate)])
def test_grouped_matmuls_match_the_loop_over_experts(dtype, transposed, bias, gate, monkeypatch):
    # on the CPU, float32 / half weights run chunks of expert-sorted rows through
    # torch._grouped_mm; other dtypes and devices loop over experts: the same results
    monkeypatch.setattr(ME, "CHUNK_ELEMS", 480)  # chunks that cut through experts
    gate_up, bgu, down, bd = _experts(e=6, transposed=transposed, bias=bias, dtype=dtype)
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    logits, weights, index = _routing(40, experts=6, dtype=torch.float32)
    index = torch.where(index == 5, 6, index)  # expert 5 unused, some choices to a sentinel
    inputs = [x, logits] + ([bgu, bd] if bias else [])
    g = torch.randn(40, 16, dtype=dtype)
    assert ME._grouped(x, gate_up, down, dtype) == hasattr(torch, "_grouped_mm")  # the default here
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(ME, "_grouped", lambda *a, grouped=grouped: grouped)
        y = ME.frozen_moe_experts(x, index, weights, gate_up, bgu, down, bd, gate, transposed, store_dtype=None)
        results.append((y, *torch.autograd.grad(y, inputs, g, retain_graph=True)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_only_input_and_routing_are_saved():
    gate_up, _, down, _ = _experts(dtype=torch.bfloat16)
    x = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    _, weights, index = _routing(40, dtype=torch.float32)
    weights = weights.detach().requires_grad_()
    _, nbytes = saved_bytes(ME.frozen_moe_experts, x, index, weights, gate_up, None, down, None,
                            exclude=(gate_up, down))
    # x as it is (bf16), the expert ids (int64) and routing weights (float32); no hidden layer
    assert nbytes == 40 * 16 * 2 + 40 * 2 * 8 + 40 * 2 * 4


def test_a_float32_input_is_kept_in_bfloat16():
    gate_up, _, down, _ = _experts(dtype=torch.float32)
    x = torch.randn(40, 16, requires_grad=True)
    _, weights, index = _routing(40, dtype=torch.float32)
    weights = weights.detach()
    _, nbytes = saved_bytes(ME.frozen_moe_experts, x, index, weights, gate_up, None, down, None,
                            exclude=(gate_up, down, weights))
    assert nbytes == 40 * 16 * 2 + 40 * 2 * 8
    y = ME.frozen_moe_experts(x, index, weights, gate_up, None, down, None)
    y0 = _loop(x, index, weights, gate_up, None, down, None)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)  # the forward is exact
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx0,) = torch.autograd.grad(y0, x, g)
    assert cosine(gx, gx0) > 0.99999


def test_tokens_routed_nowhere_and_unused_experts():
    gate_up, _, down, _ = _experts(e=6)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 6], [0, 1], [6, 6], [1, 0], [0, 0]])  # 6: an expert-parallel sentinel
    weights = torch.full((5, 2), 0.5, dtype=torch.float64)
    y = ME.frozen_moe_experts(x, index, weights, gate_up, None, down, None, store_dtype=None)
    assert torch.equal(y[2], torch.zeros(16, dtype=torch.float64))  # as transformers' loop: no expert
    y0 = _loop(x[[1, 3, 4]], index[[1, 3, 4]], weights[[1, 3, 4]], gate_up, None, down, None)
    torch.testing.assert_close(y[[1, 3, 4]], y0)
    only_expert_0 = _loop(x[:1], index[:1, :1], weights[:1, :1], gate_up, None, down, None)
    torch.testing.assert_close(y[:1], only_expert_0)  # its sentinel choice adds nothing
    y.sum().backward()
    assert torch.equal(x.grad[2], torch.zeros(16, dtype=torch.float64))


def test_no_double_backward_and_bad_input():
    gate_up, _, down, _ = _experts()
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    _, weights, index = _routing(6)
    y = ME.frozen_moe_experts(x, index, weights, gate_up, None, down, None)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(y, x, torch.ones_like(y, requires_grad=True), create_graph=True)
    with pytest.raises(ValueError, match="must be frozen"):
        ME.frozen_moe_experts(x, index, weights, gate_up.requires_grad_(), None, down, None)
    gate_up.requires_grad_(False)
    with pytest.raises(ValueError, match="shapes do not fit"):
        ME.frozen_moe_experts(x[:, :8], index, weights, gate_up, None, down, None)
    with pytest.raises(ValueError, match="shapes do not fit"):
        ME.frozen_moe_experts(x, index[:, :1], weights, gate_up, None, down, None)
    with pytest.raises(ValueError, match="unknown activation"):
        ME.frozen_moe_experts(x, index, weights, gate_up, None, down, None, "swishy")
    with pytest.raises(ValueError, match="negative expert ids"):
        ME.frozen_moe_experts(x, index - 5, weights, gate_up, None, down, None)
    with pytest.raises(ValueError, match="store_dtype"):
        ME.frozen_moe_experts(x, index, weights, gate_up, None, down, None, store_dtype=torch.int8)


# --- transformers MoE decoders ---------------------------------------------------------


def _moe_model(arch: str, implementation: str = "grouped_mm"):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    if arch == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForSequenceClassification(config)
    elif arch == "gpt_oss":  # expert biases, transposed weights, its own clamped gate
        config = transformers.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2, head_dim=8)
        model = transformers.GptOssForSequenceClassification(config)
        with torch.no_grad():  # transformers leaves them uninitialised for a random model
            for layer in model.model.layers:
                for name in ("gate_up_proj", "down_proj"):
                    getattr(layer.mlp.experts, name).normal_(0, 0.1)
                    getattr(layer.mlp.experts, f"{name}_bias").normal_(0, 0.1)
    else:  # Qwen2-MoE: a shared expert (a gated MLP) beside the routed ones, router weights not renormalised
        config = transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=40, shared_expert_intermediate_size=56)
        model = transformers.Qwen2MoeForSequenceClassification(config)
    model.config._experts_implementation = implementation
    for layer in model.model.layers:
        layer.mlp.experts.config._experts_implementation = implementation
    return model


@pytest.mark.parametrize("arch,implementation", [("mixtral", "grouped_mm"), ("mixtral", "eager"),
                                                 ("qwen2_moe", "grouped_mm"), ("gpt_oss", "grouped_mm"),
                                                 ("gpt_oss", "eager")])
def test_hf_moe_experts_run_fused_with_native_gradients(arch, implementation):
    model = _moe_model(arch, implementation)
    ids = torch.randint(1, 64, (3, 11))
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None), example_input={"input_ids": ids})
    reference = copy.deepcopy(model)
    kind = "gate" if arch == "gpt_oss" else "silu"  # GPT-OSS's own gate is filed under "gate"
    s2a.compress_activations(model, ops={kind: 4})  # only the experts' kind: the rest native
    summary = s2a.compression_summary(model)
    assert summary["model.layers.0.mlp.experts"] == f"moe_experts:{kind}@input"
    out, grads = logits_and_grads(model, ids)
    out0, grads0 = logits_and_grads(reference, ids)
    torch.testing.assert_close(out, out0, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads0.keys() and not any("mlp.gate.weight" in n for n in grads)  # router frozen
    assert ("model.layers.0.mlp.experts.gate_up_proj_bias" in grads) == (arch == "gpt_oss")
    for n in grads:  # the experts' inputs were kept in bfloat16
        assert (grads[n] - grads0[n]).norm() <= 5e-3 * grads0[n].norm(), n
    report = measure(model, {"input_ids": ids}, lambda o, b: o.logits.sum())
    # each layer's experts keep their input (3 x 11 tokens x 32, bf16) and the routing weights
    # (float32); the expert ids are the tensor the router's topk keeps, counted there, and so
    # are GPT-OSS's routing weights (its router keeps them for its own softmax)
    # (Qwen2-MoE's shared expert, run first, saved the input copy that both keep)
    routing = 0 if arch == "gpt_oss" else 3 * 11 * 2 * 4
    kept = report.by_kind["moe_experts (s2a)"] + report.by_kind.get("gated_mlp (s2a)", 0)
    assert kept == 2 * (3 * 11 * 32 * 2 + routing)
    s2a.restore(model)
    assert all("forward" not in vars(m) for m in model.modules())


def _deepseek_v3():
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
        first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_labels=3, pad_token_id=0)
    return transformers.DeepseekV3ForSequenceClassification(config)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_hf_moe_shared_and_routed_experts_keep_one_copy_of_their_input(arch):
    # Qwen2-MoE's shared expert runs first on the view the experts get; DeepSeek-V3's runs
    # after them on the 3-D tensor the experts' 2-D input views
    model = _deepseek_v3() if arch == "deepseek_v3" else _moe_model(arch)
    ids = torch.randint(1, 64, (3, 11))
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None), example_input={"input_ids": ids})
    reference = copy.deepcopy(model)
    s2a.compress_activations(model, ops={"silu": 4})  # the experts and the shared expert: the rest native
    shared = "shared_experts" if arch == "deepseek_v3" else "shared_expert"
    assert s2a.compression_summary(model)[f"model.layers.0.mlp.{shared}"] == "gated_mlp:silu@input"
    report = measure(model, {"input_ids": ids}, lambda o, b: o.logits.sum())
    # per layer one bf16 copy of the 33 x 32 float32 input, and the float32 routing weights
    kept = report.by_kind.get("gated_mlp (s2a)", 0) + report.by_kind["moe_experts (s2a)"]
    assert kept == 2 * (3 * 11 * 32 * 2 + 3 * 11 * 2 * 4)
    _, grads = logits_and_grads(model, ids)
    _, grads0 = logits_and_grads(reference, ids)
    assert grads.keys() == grads0.keys()
    for n in grads:  # the input kept in bfloat16
        assert (grads[n] - grads0[n]).norm() <= 5e-3 * grads0[n].norm(), n


def test_hf_moe_default_compression_saves_far_less_and_the_router_learns():
    model = _moe_model("mixtral")
    ids = torch.randint(1, 64, (4, 16))
    s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), act_bits=None), example_input={"input_ids": ids})
    for layer in model.model.layers:  # a router that trains: its gradient passes the experts
        layer.mlp.gate.weight.requires_grad_(True)
    reference = copy.deepcopy(model)
    plain = measure(reference, {"input_ids": ids}, lambda o, b: o.logits.sum())
    s2a.compress_activations(model)
    fused = measure(model, {"input_ids": ids}, lambda o, b: o.logits.sum())
    assert fused.saved_bytes < 0.3 * plain.saved_bytes
    _, grads = logits_and_grads(model, ids)
    _, grads0 = logits_and_grads(reference, ids)
    assert cosine(grads["model.layers.0.mlp.gate.weight"], grads0["model.layers.0.mlp.gate.weight"]) > 0.99


def test_hf_moe_experts_fall_back_where_fusing_would_change_something(monkeypatch):
    # hooks, trained weights, expert parallelism, no grad, a trainable activation, FP8 weights
    from s2a.activations import _hf

    calls = count_calls(monkeypatch, _hf, "frozen_moe_experts")
    model = _moe_model("mixtral")
    ids = torch.randint(1, 64, (2, 7))
    s2a.apply(model, s2a.S2AConfig(modules=("bias",)), example_input={"input_ids": ids})
    experts = model.model.layers[0].mlp.experts

    def fused_runs(fn, storage: str = "input") -> int:
        # the summary tells before a step whether layer 0's experts will bypass their forward
        assert s2a.compression_summary(model)["model.layers.0.mlp.experts"] == f"moe_experts:silu@{storage}"
        calls.clear()
        fn()
        return len(calls)

    assert fused_runs(lambda: logits_and_grads(model, ids)) == 2
    h = experts.register_forward_hook(lambda *a: None)  # a user's hook must still fire
    assert fused_runs(lambda: logits_and_grads(model, ids), "unfused") == 1
    h.remove()
    experts.down_proj.requires_grad_(True)  # its gradient needs the hidden layers
    assert fused_runs(lambda: logits_and_grads(model, ids), "unfused") == 1
    experts.down_proj.requires_grad_(False)
    experts._is_expert_parallel = True  # sentinel ids and masks of transformers' own
    assert fused_runs(lambda: logits_and_grads(model, ids), "unfused") == 1
    experts._is_expert_parallel = False
    with torch.no_grad():
        assert fused_runs(lambda: model(input_ids=ids)) == 0
    experts.act_fn = torch.nn.PReLU()  # a parameter of its own that trains: its gradient needs it
    assert fused_runs(lambda: logits_and_grads(model, ids), "unfused") == 1 and experts.act_fn.weight.grad is not None
    s2a.restore(model)
    # FP8 weights with their scales: transformers' FP8Experts dequantize in their own forward
    experts.register_buffer("gate_up_proj_scale_inv", torch.ones(4))
    assert not _hf._is_experts(experts)
    gate_up, _, down, _ = _experts(dtype=torch.float32)
    x = torch.randn(6, 16, requires_grad=True)
    _, weights, index = _routing(6, dtype=torch.float32)
    assert not ME.frozen_moe_experts_applies(x, index, weights, gate_up.to(torch.float8_e4m3fn), down)


def test_hf_moe_experts_with_trained_weights_are_left_to_their_own_forward():
    model = _moe_model("mixtral")  # every weight trains: full fine-tuning
    s2a.compress_activations(model)
    assert not any(v.startswith("moe_experts") for v in s2a.compression_summary(model).values())
    ids = torch.randint(1, 64, (2, 7))
    logits_and_grads(model, ids)


def test_hf_moe_experts_recognised_only_where_the_gate_can_run_again():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from s2a.activations._hf import _is_experts

    class DroppedGate(MixtralExperts):  # a random gate: recomputed in backward, it would differ
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return F.dropout(self.act_fn(gate), 0.1, self.training) * up

    class NormedExperts(MixtralExperts):  # a norm after each expert: not computed by the fused op
        def __init__(self, config):
            super().__init__(config)
            self.has_post_expert_norm = True

    config = _moe_model("mixtral").config
    assert _is_experts(MixtralExperts(config))
    assert not _is_experts(DroppedGate(config)) and not _is_experts(NormedExperts(config))
