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


# -- encode: the tokenizer's __call__, through its backend ------------------------------------------------------


def _texts() -> list[str]:
    from protege.demo_data import make_examples

    rows = [r["text"] for r in make_examples(40, seed=3)]
    return rows + ["", "a", " ".join(rows[:6]), "héllo wörld 😀 " * 30]  # empty, one word, truncated, unicode


def _same_as_call(tok, texts: list[str], max_length: int) -> None:
    from protege.lean import encode

    for size in (1, 3, 64):
        for i in range(0, len(texts), size):
            batch = texts[i : i + size]
            want = dict(tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            got = encode(tok, batch, max_length)
            assert list(got) == list(want)
            for name, value in want.items():
                assert got[name].dtype == value.dtype
                assert torch.equal(got[name], value), (name, batch)


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_equals_the_tokenizers_call(tiny_tokenizer, side):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = tok.truncation_side = side
    _same_as_call(tok, _texts(), 12)
    # the tokenizer itself is untouched: its own call still pads to the longest text and does not truncate
    assert tok(["a", "a a a"], padding=True)["attention_mask"] == [
        [1, 0, 0] if side == "right" else [0, 0, 1], [1, 1, 1]
    ]
    assert len(tok(" ".join(["a"] * 40))["input_ids"]) == 40


def test_encode_equals_the_call_of_minilms_tokenizer():
    """A WordPiece tokenizer that adds [CLS] and [SEP] (truncation keeps room for them) and token type ids."""
    from transformers import AutoTokenizer

    from protege.sources import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("all-minilm-l6-v2").name_or_path)
    assert tok.is_fast and "token_type_ids" in tok.model_input_names
    for max_length in (8, 64):
        _same_as_call(tok, _texts(), max_length)


def test_encode_of_a_tokenizer_without_a_pad_token_is_its_call_and_its_error(tiny_tokenizer):
    """No pad token: the backend is not set up to pad; encode is the tokenizer's call, which refuses to pad."""
    import copy

    from protege.lean import encode

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    with pytest.raises(ValueError, match="padding token") as want:
        tok(["hello"], padding=True, truncation=True, max_length=8, return_tensors="pt")
    with pytest.raises(ValueError, match="padding token") as got:
        encode(tok, ["hello"], 8)
    assert str(got.value) == str(want.value)
