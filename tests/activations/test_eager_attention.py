"""Eager attention that s2a cannot switch to SDPA: softmax -> [cast] -> [dropout] -> [view] ->
matmul(probs, V). The compressed softmax's codes must replace the probabilities the matmul
keeps for V's gradient, never come on top of them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2a
from helpers import cosine

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=3)
B, S = 2, 9


def _model(name: str, attn_drop: float = 0.0):
    import transformers as T

    cfgs = {
        "mpnet": lambda: T.MPNetConfig(**TINY, pad_token_id=1),
        "debertav2": lambda: T.DebertaV2Config(**TINY),
        "bloom": lambda: T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2,
                                       pad_token_id=0, num_labels=3),
        "gemma2": lambda: T.Gemma2Config(**TINY, num_key_value_heads=1, head_dim=16, pad_token_id=0),
    }
    cfg = cfgs[name]()
    for k, v in list(vars(cfg).items()):  # no dropout but the attention's (compared runs draw alike)
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop")):
            setattr(cfg, k, attn_drop if "att" in k else 0.0)
    cls = {"mpnet": "MPNet", "debertav2": "DebertaV2", "bloom": "Bloom", "gemma2": "Gemma2"}[name]
    torch.manual_seed(0)
    model = getattr(T, f"{cls}ForSequenceClassification")(cfg).train()
    for n, p in model.named_parameters():  # BitFit (Gemma2 has no biases: its norms' weights)
        p.requires_grad_(n.endswith("bias") or (name == "gemma2" and "norm" in n))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(**batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["mpnet", "debertav2", "bloom", "gemma2"])
def test_compressed_softmax_keeps_less_than_native_on_eager_attention(name):
    # BitFit with ops=["softmax"] kept 612 bytes MORE than native on MPNet, DeBERTa-v2 and
    # Bloom (38,172 -> 38,784 bytes): matmul(probs, V) kept the float32 probabilities anyway
    # and the 4-bit codes came on top.
    batch = _batch()
    native = _model(name)
    assert native.config._attn_implementation == "eager"
    reference = _grads(native, batch)
    before = s2a.measure(native, batch).saved_bytes
    model = s2a.compress_activations(_model(name), ops=["softmax"])
    assert model.config._attn_implementation == "eager"  # no SDPA path for these
    after = s2a.measure(model, batch).saved_bytes
    probs = 2 * B * 2 * S * S * 4  # float32 probabilities of 2 layers
    assert after <= before - 0.7 * probs, (before, after)
    assert cosine(_grads(model, batch), reference) > 0.9999


@pytest.mark.parametrize("name", ["mpnet", "debertav2", "bloom", "gemma2"])
def test_default_compression_of_eager_attention_models(name):
    # q @ k^T (Bloom: its ALiBi baddbmm) and V at 8 bits, Bloom's own GELU as gelu_tanh
    batch = _batch()
    native = _model(name)
    reference = _grads(native, batch)
    before = s2a.measure(native, batch)
    model = s2a.compress_activations(_model(name))
    after = s2a.measure(model, batch)
    assert "matmul" not in after.by_kind and after.saved_bytes < 0.5 * before.saved_bytes
    assert cosine(_grads(model, batch), reference) > 0.99  # every kind at 4 bits, random weights
    products_only = s2a.compress_activations(_model(name), ops={"matmul": 8})
    assert cosine(_grads(products_only, batch), reference) > 0.9999
    # the summary lists the attention as compressed call by call (it listed none of Gemma 2's
    # and MPNet's as on SDPA at 8 bits)
    assert s2a.compression_summary(model)[""] == "attention:eager@4"
    assert s2a.compression_summary(s2a.compress_activations(_model(name), ops={"attention": 8}))[""] == (
        "attention:eager@native")  # its softmax left out
    if name == "bloom":
        assert s2a.compression_summary(model)["transformer.h.0.mlp.gelu_impl"] == "gelu_tanh@4"


@pytest.mark.parametrize("ops", [None, ["softmax"]])
def test_eager_attention_dropout_is_replayed_on_the_codes(ops):
    # MPNet with attention dropout 0.1 in training: the dropped probabilities reach the
    # matmul (through s2a's dropout, or torch.native_dropout where dropout is left out of
    # ops), and neither the probabilities nor the dropped ones are kept.
    batch = _batch()
    native = _model("mpnet", attn_drop=0.1)
    before = s2a.measure(native, batch).saved_bytes
    model = s2a.compress_activations(_model("mpnet", attn_drop=0.1), ops=ops)
    report = s2a.measure(model, batch)
    probs = 2 * B * 2 * S * S * 4
    assert report.saved_bytes <= before - 1.5 * probs, (before, report.saved_bytes)


class _EagerAttention(nn.Module):
    """softmax -> cast -> dropout -> view -> bmm, returning the dropped probabilities too."""

    def __init__(self, c=16, p=0.5, consumer="bmm"):
        super().__init__()
        self.score, self.v = nn.Linear(c, 7), nn.Linear(c, 5)
        self.p, self.consumer = p, consumer

    def forward(self, x):  # x: (B, 7, c)
        probs = F.softmax(self.score(x), dim=-1, dtype=torch.float32).to(x.dtype)
        dropped = F.dropout(probs, p=self.p, training=self.training)
        v = self.v(x)
        if self.consumer == "einsum":
            return torch.einsum("bij,bjd->bid", dropped, v), dropped
        return torch.bmm(dropped.view(-1, 7, 7), v), dropped


@pytest.mark.parametrize("dropout_mode", ["regenerate", "bitmask", None])
def test_softmax_matmul_gradient_reads_the_forward_probabilities(dropout_mode):
    # dV = P^T dY with P rebuilt from the softmax's codes through the same cast, dropout mask
    # and view as in forward; dP = dY V^T exact.
    torch.manual_seed(0)
    module = _EagerAttention()
    ops = ["softmax"] if dropout_mode is None else ["softmax", "dropout"]
    s2a.compress_activations(module, ops=ops, dropout_mode=dropout_mode or "regenerate")
    x = torch.randn(3, 7, 16)
    out, dropped = module(x)
    assert out.grad_fn.name() == "_ProbsMatmulBackward"
    assert not hasattr(dropped, "_s2a_probs")  # returned weights do not hold the codes
    g = torch.randn_like(out)
    out.backward(g, inputs=[module.v.bias, module.score.bias])
    exact_dv = torch.einsum("bij,bid->jd", dropped.detach(), g).sum(0)
    assert cosine(module.v.bias.grad, exact_dv) > 0.995
    # dP is exact (the softmax backward then reads 4-bit probabilities): the score bias
    # gradient matches a native run with the same mask
    reference = _EagerAttention()
    reference.load_state_dict(module.state_dict())
    scores = reference.score(x)
    probs = F.softmax(scores, dim=-1)
    keep = (dropped.detach() != 0).float() * 2.0  # p = 0.5
    ref_out = torch.bmm(probs * keep, reference.v(x))
    ref_out.backward(g)
    assert cosine(module.score.bias.grad, reference.score.bias.grad) > 0.995


def test_strict_mode_reports_probabilities_kept_at_full_precision():
    # routed into the matmul, the probabilities are kept as codes: nothing to report; an
    # einsum keeps them at full precision and is named
    x = torch.randn(3, 7, 16)
    model = s2a.compress_activations(_EagerAttention(p=0.0), strict=True)
    model(x)[0].sum().backward()
    model = s2a.compress_activations(_EagerAttention(p=0.0, consumer="einsum"), strict=True)
    with pytest.raises(s2a.UncoveredOperatorsError, match=r"\['<root>: einsum'\]"):
        model(x)


def test_probabilities_modified_in_place_run_natively():
    class InPlaceAttention(_EagerAttention):
        def forward(self, x):
            probs = F.softmax(self.score(x), dim=-1)
            probs.mul_(2.0)  # no longer what the codes hold
            return torch.bmm(probs, self.v(x))

    torch.manual_seed(0)
    model = s2a.compress_activations(InPlaceAttention())
    out = model(torch.randn(3, 7, 16))
    # not from the softmax's codes: a product of two activations, each kept at 8 bits
    assert out.grad_fn.name() == "_ActivationMatmulBackward"


def _bert(impl="eager"):
    import transformers as T

    cfg = T.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return T.BertForSequenceClassification(cfg)


def test_output_attentions_runs_the_original_attention():
    # s2a switches an eager BERT to SDPA, which returns no weights: output_attentions=True
    # gave () silently. Such a forward now runs eager attention and switches back after.
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    reference = _bert().eval()
    expected = reference(**batch, output_attentions=True).attentions
    assert len(expected) == 2
    model = s2a.compress_activations(_bert().eval())
    assert model.config._attn_implementation == "sdpa"
    got = model(**batch, output_attentions=True).attentions
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert model.config._attn_implementation == "sdpa"
    assert model(**batch).attentions is None or model(**batch).attentions == ()
    # asked of a submodel, and while training (with a backward)
    assert len(model.bert(**batch, output_attentions=True).attentions) == 2
    assert model.config._attn_implementation == "sdpa"
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    out = model(**batch, labels=torch.tensor([0, 2]), output_attentions=True)
    assert len(out.attentions) == 2
    out.loss.backward()
    assert model.config._attn_implementation == "sdpa"
    s2a.restore(model)
    assert model.config._attn_implementation == "eager"
    assert len(model(**batch, output_attentions=True).attentions) == 2


def test_summary_lists_attention_on_sdpa_before_or_by_s2a():
    # A model already on SDPA (transformers' default) had no attention entry at all.
    for impl in ("eager", "sdpa"):
        summary = s2a.compression_summary(s2a.compress_activations(_bert(impl)))
        assert [k for k, v in summary.items() if v.startswith("attention@")] == [""], impl
