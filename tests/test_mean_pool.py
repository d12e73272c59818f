"""student.pooling mean: a BERT classifier whose head reads the mean of its tokens' last states
(protege.students.mean_pool), on tiny random models built here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import demo_rows, padded_batch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification

from protege.demo_data import LABELS
from protege.evaluation.classifier import student_probs
from protege.lean import classifier_logits, lean_reason
from protege.recipe import StudentConfig, build_recipe
from protege.students.classifier import build_student, load_student
from protege.students.mean_pool import (
    MeanPoolBertConfig,
    MeanPoolBertForSequenceClassification,
    mean_of_tokens,
    register,
)
from protege.training.classifier import train_student


def _model(seed: int = 0) -> MeanPoolBertForSequenceClassification:
    torch.manual_seed(seed)
    config = MeanPoolBertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=40, num_labels=3)
    return MeanPoolBertForSequenceClassification(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    return padded_batch()


def test_mean_of_tokens_leaves_padding_out():
    states = torch.arange(12.0).view(1, 4, 3)  # tokens [0 1 2], [3 4 5], [6 7 8], [9 10 11]
    got = mean_of_tokens(states, torch.tensor([[1, 1, 0, 0]]))
    torch.testing.assert_close(got, torch.tensor([[1.5, 2.5, 3.5]]))
    torch.testing.assert_close(mean_of_tokens(states, None), torch.tensor([[4.5, 5.5, 6.5]]))


def test_mean_pool_head_reads_the_tokens_mean_and_ignores_padding():
    model, enc = _model(), _batch()
    with torch.inference_mode():
        logits = model(**enc).logits
        states = model.bert(**enc).last_hidden_state  # (B, T, H)
        m = enc["attention_mask"].unsqueeze(-1).float()
        by_hand = model.classifier(torch.tanh(model.bert.pooler.dense((states * m).sum(1) / m.sum(1))))
        torch.testing.assert_close(logits, by_hand, atol=1e-5, rtol=1e-5)
        # a padded row gives what the text gives alone
        alone = {k: v[2:3, :2] for k, v in enc.items()}
        torch.testing.assert_close(model(**alone).logits[0], logits[2], atol=1e-5, rtol=1e-5)
        # and it is not the [CLS] classifier of the same weights
        cls = model.classifier(torch.tanh(model.bert.pooler.dense(states[:, 0])))
        assert not torch.allclose(cls, logits, atol=1e-4)


def test_lean_path_covers_mean_pool_and_matches_transformers():
    model, enc = _model(1), _batch()
    assert lean_reason(model) is None
    with torch.inference_mode():
        torch.testing.assert_close(classifier_logits(model)(**enc), model(**enc).logits, atol=1e-5, rtol=1e-5)
        # one text without a mask, and an unpadded batch with one: the lean path's plain mean
        one = {"input_ids": enc["input_ids"][:1]}
        torch.testing.assert_close(classifier_logits(model)(**one), model(**one).logits, atol=1e-5, rtol=1e-5)
        full = {"input_ids": enc["input_ids"], "attention_mask": torch.ones_like(enc["input_ids"])}
        torch.testing.assert_close(classifier_logits(model)(**full), model(**full).logits, atol=1e-5, rtol=1e-5)


def test_saved_mean_pool_student_loads_as_itself(tmp_path):
    register()
    model, enc = _model(2), _batch()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "protege-bert" and config["pooling"] == "mean"
    # the file travels with the student: plain transformers loads it with trust_remote_code
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith("MeanPoolBertForSequenceClassification")
    assert (tmp_path / "mean_pool.py").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MeanPoolBertForSequenceClassification)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits)


def test_pooling_mean_needs_a_scratch_student():
    assert StudentConfig(init="scratch", pooling="mean").pooling == "mean"
    with pytest.raises(ValidationError, match="student.pooling 'mean'.*student.init scratch"):
        StudentConfig(init="pretrained", pooling="mean")


def test_a_scratch_student_with_pooling_mean_trains_saves_and_loads_as_one(tmp_path, tiny_tokenizer):
    names = list(LABELS)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")  # a scratch student uses only its model's tokenizer
    recipe = build_recipe({
        "task": {"labels": names},
        "student": {"model": str(tmp_path / "tok"), "init": "scratch", "hidden_size": 16, "num_layers": 1,
                    "num_heads": 2, "max_length": 32, "pooling": "mean"},
        "training": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "seed": 0},
    })
    model, _, _ = build_student(recipe.student, tuple(names), seed=0)
    assert isinstance(model, MeanPoolBertForSequenceClassification) and model.config.pooling == "mean"
    rows = demo_rows(40)
    summary = train_student(recipe, rows, tmp_path / "student", alpha=1.0, quiet=True)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    loaded, _, card = load_student(tmp_path / "student")
    assert isinstance(loaded, MeanPoolBertForSequenceClassification)
    assert card.labels == tuple(names)
    # its model card tells a transformers user how to load it
    assert "trust_remote_code=True" in (tmp_path / "student" / "README.md").read_text()
    probs, labels = student_probs(tmp_path / "student", [r.text for r in rows[:5]])
    assert labels == tuple(names) and probs.shape == (5, len(names))
    assert abs(probs.sum(1) - 1).max() < 1e-5


def test_a_mean_pool_student_exports_to_onnx_with_parity(tmp_path, tiny_tokenizer):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from protege.export import export_student
    from protege.students.card import StudentCard
    from protege.students.classifier import save_student

    names = list(LABELS)
    config = MeanPoolBertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=64, num_labels=len(names),
                                id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    config.vocab_size = len(tiny_tokenizer)
    model = MeanPoolBertForSequenceClassification(config)
    card = StudentCard.for_classifier(build_recipe({"task": {"labels": names}}), tuple(names), {})
    save_student(model, tiny_tokenizer, tmp_path / "student", card)
    report = export_student(tmp_path / "student", "onnx", tmp_path / "onnx", runs=3)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    # the exported graph pools as the student does: padded sample texts of different lengths agree
    assert report.parity["passed"] and report.parity["argmax_agreement"] == 1.0, report.parity
