"""The lean BERT forward (protege.lean) against transformers' own, on tiny random models built here."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from protege.lean import classifier_logits, encoder_states, lean_reason


def _config(**kw) -> BertConfig:
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=40, num_labels=3, layer_norm_eps=1e-7)
    return BertConfig(**{**base, **kw})


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded rows of different lengths, and one unpadded
    mask[2, 3:] = 0
    mask[3, 10:] = 0
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_lean_logits_equal_transformers_on_padded_batches(act):
    torch.manual_seed(0)
    model = BertForSequenceClassification(_config(hidden_act=act)).eval()
    assert lean_reason(model) is None
    enc = _batch()
    with torch.inference_mode():
        ours, theirs = classifier_logits(model)(**enc), model(**enc).logits
        assert ours.shape == (4, 3)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # without a mask or token types, as a one-text request is often sent
        one = {"input_ids": enc["input_ids"][:1]}
        torch.testing.assert_close(classifier_logits(model)(**one), model(**one).logits, atol=1e-5, rtol=1e-5)
        # a padded row reads as the same text alone
        alone = {k: v[2:3, :3] for k, v in enc.items()}
        torch.testing.assert_close(classifier_logits(model)(**alone)[0], ours[2], atol=1e-5, rtol=1e-5)


def test_lean_encoder_states_equal_transformers():
    torch.manual_seed(1)
    model = BertModel(_config(), add_pooling_layer=False).eval()
    enc = _batch(1)
    with torch.inference_mode():
        ours = encoder_states(model)(**enc)
        theirs = model(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()  # padded positions are never read (transformers leaves them differently)
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)


def test_what_the_lean_path_does_not_cover_runs_as_transformers_runs_it():
    torch.manual_seed(2)
    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=120, dim=32, n_layers=1, n_heads=4, hidden_dim=48, num_labels=3)).eval()
    decoder = BertForSequenceClassification(_config(is_decoder=True)).eval()
    odd_act = BertForSequenceClassification(_config(hidden_act="silu")).eval()
    assert "not a BERT" in lean_reason(distil)
    assert lean_reason(decoder) == "a BERT decoder" and "hidden_act" in lean_reason(odd_act)
    enc = {k: v for k, v in _batch().items() if k != "token_type_ids"}  # DistilBERT takes none
    with torch.inference_mode():
        for model in (distil, decoder, odd_act):
            assert torch.equal(classifier_logits(model)(**enc), model(**enc).logits)


def test_a_model_in_training_mode_gets_transformers_forward_and_the_lean_one_back_in_eval():
    torch.manual_seed(3)
    model = BertForSequenceClassification(_config(hidden_dropout_prob=0.5)).train()
    assert lean_reason(model) == "a model in training mode (dropout)"
    enc = _batch()
    torch.manual_seed(4)
    a = classifier_logits(model)(**enc)
    torch.manual_seed(4)
    assert torch.equal(a, model(**enc).logits)  # dropout: transformers' own draw
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(classifier_logits(model)(**enc), model(**enc).logits, atol=1e-5, rtol=1e-5)
    assert classifier_logits(model) is classifier_logits(model)  # made once per model and mode
