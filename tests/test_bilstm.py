"""student.architecture bilstm: Tang et al.'s BiLSTM student (protege.students.bilstm), on tiny models built here:
the reversal within each text, answers that do not depend on the batch, what each direction has read, the
student protege builds (its size, its projected words), training, saving and loading (plain transformers too),
the ONNX export, and the settings it refuses."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import demo_rows, padded_batch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification

from protege.demo_data import LABELS
from protege.errors import ProtegeError
from protege.evaluation.classifier import student_probs
from protege.recipe import StudentConfig, build_recipe
from protege.students.bilstm import BiLstmConfig, BiLstmForSequenceClassification, register, reverse_within
from protege.students.classifier import build_student, load_student
from protege.training.classifier import train_student

NAMES = list(LABELS)


def _model(seed: int = 0, vocab: int = 120) -> BiLstmForSequenceClassification:
    torch.manual_seed(seed)
    return BiLstmForSequenceClassification(BiLstmConfig(vocab_size=vocab, hidden_size=8, head_size=6,
                                                        num_labels=3)).eval()


def _batch() -> dict[str, torch.Tensor]:
    return padded_batch()


def test_reverse_within_reverses_each_text_and_leaves_its_padding():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # rows [0..4], [5..9]
    out = reverse_within(x, torch.tensor([5, 3]))
    assert out[0, :, 0].tolist() == [4, 3, 2, 1, 0]
    assert out[1, :, 0].tolist() == [7, 6, 5, 8, 9]  # the text (5, 6, 7) reversed, the padding (8, 9) in place
    torch.testing.assert_close(reverse_within(out, torch.tensor([5, 3])), x)


def test_a_texts_answer_does_not_depend_on_its_batch_or_its_padding():
    model, enc = _model(), _batch()
    with torch.inference_mode():
        together = model(**enc).logits  # (3, C)
        for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):
            alone = model(input_ids=enc["input_ids"][i : i + 1, :n]).logits
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_each_direction_reads_the_text_from_its_own_end():
    """Changing the last word changes the backward LSTM's state at the first word but not the forward LSTM's
    states before the change (what max and mean pooling then read)."""
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8]])
    other = torch.tensor([[5, 6, 7, 9]])
    with torch.inference_mode():
        x, y = model.embeddings(ids), model.embeddings(other)
        ahead_x, _ = model.forward_lstm(x)
        ahead_y, _ = model.forward_lstm(y)
        back_x, _ = model.backward_lstm(reverse_within(x, torch.tensor([4])))
        back_y, _ = model.backward_lstm(reverse_within(y, torch.tensor([4])))
    torch.testing.assert_close(ahead_x[:, :3], ahead_y[:, :3])
    assert not torch.allclose(reverse_within(back_x, torch.tensor([4]))[:, 0],
                              reverse_within(back_y, torch.tensor([4]))[:, 0])
    assert model(input_ids=ids).logits.shape == (1, 3)


def test_a_row_of_padding_alone_and_a_float_mask_give_finite_logits():
    model, enc = _model(), _batch()
    enc["attention_mask"][2] = 0  # an empty text batched with others (a tokenizer without special tokens)
    with torch.inference_mode():
        logits = model(**enc).logits
        assert torch.isfinite(logits).all() and logits.abs().max() < 100
        torch.testing.assert_close(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"].float()).logits,
                                   logits)


def test_a_bilstm_student_pads_on_the_right_whatever_its_tokenizer_did(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    _, built, _ = build_student(_recipe(tmp_path / "tok").student, tuple(NAMES), seed=0)
    assert built.padding_side == "right"
    enc = built(["one", "one two three"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0].tolist()[0] == 1 and enc["attention_mask"][0].tolist()[-1] == 0


def test_saved_bilstm_student_loads_in_a_process_without_protege(tmp_path):
    """transformers alone, with trust_remote_code, loads the class from the bilstm.py saved beside the weights."""
    import subprocess
    import sys

    register()
    model, enc = _model(2), _batch()
    model.save_pretrained(tmp_path)
    torch.save(enc, tmp_path / "enc.pt")
    with torch.inference_mode():
        torch.save(model(**enc).logits, tmp_path / "want.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()\n"
        "assert not any(k.startswith('protege') for k in sys.modules), 'protege was imported'\n"
        "assert type(m).__name__ == 'BiLstmForSequenceClassification'\n"
        f"enc = torch.load({str(tmp_path / 'enc.pt')!r})\n"
        f"torch.testing.assert_close(m(**enc).logits.detach(), torch.load({str(tmp_path / 'want.pt')!r}))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_saved_bilstm_student_loads_as_itself_with_plain_transformers(tmp_path):
    register()
    model, enc = _model(2), _batch()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "protege-bilstm" and config["hidden_size"] == 8 and config["head_size"] == 6
    assert config["auto_map"]["AutoModelForSequenceClassification"].endswith("BiLstmForSequenceClassification")
    assert (tmp_path / "bilstm.py").is_file()  # the class travels with the student
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BiLstmForSequenceClassification)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**enc).logits, model(**enc).logits)


def _recipe(tok_dir, **student):
    return build_recipe({
        "task": {"labels": NAMES},
        "student": {"model": str(tok_dir), "init": "scratch", "architecture": "bilstm", "hidden_size": 16,
                    "max_length": 32, **student},
        "training": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "seed": 0, "select_fraction": 0.2},
    })


def test_protege_builds_the_bilstm_of_the_recipe_with_its_size(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    model, _, _ = build_student(_recipe(tmp_path / "tok", intermediate_size=12, dropout=0.2).student,
                                tuple(NAMES), seed=0)
    assert isinstance(model, BiLstmForSequenceClassification)
    v, h, c = len(tiny_tokenizer), 16, len(NAMES)
    lstm = 4 * h * (h + h) + 2 * 4 * h  # the input and recurrent maps of four gates, two biases each
    assert sum(p.numel() for p in model.parameters()) == v * h + 2 * lstm + (4 * h * 12 + 12) + (12 * c + c)
    assert model.dropout.p == 0.2 and model.config.head_size == 12
    assert model.config.id2label == dict(enumerate(NAMES))
    plain, _, _ = build_student(_recipe(tmp_path / "tok").student, tuple(NAMES), seed=0)
    assert plain.config.head_size == 16  # intermediate_size defaults to hidden_size
    # the words start at the student's scale, the padding row at 0
    assert float(plain.embeddings.weight.detach().std()) == pytest.approx(16**-0.5, rel=0.15)
    assert not plain.embeddings.weight[tiny_tokenizer.pad_token_id].any()


def test_projected_words_are_those_a_bert_student_of_the_same_width_gets(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    source = tmp_path / "base"
    BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tiny_tokenizer.pad_token_id)).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    bilstm, _, _ = build_student(_recipe(source, embeddings="projected").student, tuple(NAMES), seed=0)
    bert_recipe = build_recipe({"task": {"labels": NAMES}, "student": {
        "model": str(source), "init": "scratch", "hidden_size": 16, "num_heads": 2, "max_length": 32,
        "embeddings": "projected"}})
    bert, _, _ = build_student(bert_recipe.student, tuple(NAMES), seed=0)
    torch.testing.assert_close(bilstm.embeddings.weight, bert.get_input_embeddings().weight)


def test_a_bilstm_student_trains_saves_and_loads_as_one(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    recipe = _recipe(tmp_path / "tok")
    rows = demo_rows(60)
    summary = train_student(recipe, rows, tmp_path / "student", alpha=1.0, quiet=True)
    first, kept = summary["selection"]["history"][0], summary["selection"]["history"][-1]
    assert kept["kl"] < first["kl"]  # it learns the teacher: the slice's KL falls over three epochs
    model, _, card = load_student(tmp_path / "student")
    assert isinstance(model, BiLstmForSequenceClassification) and card.labels == tuple(NAMES)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert "trust_remote_code=True" in (tmp_path / "student" / "README.md").read_text()
    assert "bilstm.py" in (tmp_path / "student" / "README.md").read_text()
    texts = [r.text for r in rows[:5]]
    probs, labels = student_probs(tmp_path / "student", texts)
    assert labels == tuple(NAMES) and probs.shape == (5, len(NAMES))
    assert abs(probs.sum(1) - 1).max() < 1e-5
    # served over HTTP on loopback, it answers with the same probabilities, batched as the server batches
    import httpx2
    from test_serve import running

    with running(tmp_path / "student") as srv:
        out = httpx2.post(f"{srv.url}/v1/classify", json={"input": texts}, timeout=20).json()
    for d, p in zip(out["data"], probs):
        assert d["label"] == NAMES[int(p.argmax())]
        assert [d["probs"][x] for x in NAMES] == pytest.approx(list(p), abs=1e-4)
    # its saved recipe (every setting written back, defaults included) loads again
    from protege.recipe import load_recipe

    recipe.save(tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml").student.architecture == "bilstm"


def test_a_bilstm_student_exports_to_onnx_with_parity(tmp_path, tiny_tokenizer):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from protege.export import export_student
    from protege.students.card import StudentCard
    from protege.students.classifier import save_student

    torch.manual_seed(0)
    model = BiLstmForSequenceClassification(BiLstmConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, head_size=16, num_labels=len(NAMES),
        id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)},
        pad_token_id=tiny_tokenizer.pad_token_id))
    card = StudentCard.for_classifier(build_recipe({"task": {"labels": NAMES}}), tuple(NAMES), {})
    save_student(model, tiny_tokenizer, tmp_path / "student", card)
    report = export_student(tmp_path / "student", "onnx", tmp_path / "onnx", runs=3)
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    # padded sample texts of different lengths agree with PyTorch: the reversal within each text is in the graph
    assert report.parity["passed"] and report.parity["argmax_agreement"] == 1.0, report.parity


def test_settings_a_bilstm_would_ignore_are_refused():
    assert StudentConfig(init="scratch", architecture="bilstm", num_layers=1).architecture == "bilstm"
    with pytest.raises(ValidationError, match="architecture bilstm builds a new student.*student.init scratch"):
        StudentConfig(init="pretrained", architecture="bilstm")
    bilstm = {"init": "scratch", "architecture": "bilstm"}
    for bert_only in ({"num_heads": 4}, {"pooling": "mean"}, {"num_layers": 3}, {"ngram_buckets": 60000}):
        with pytest.raises(ProtegeError, match=f"student.{next(iter(bert_only))} shapes a BERT student"):
            build_recipe({"task": {"labels": NAMES}, "student": bilstm | bert_only,
                          "training": {"select_fraction": 0.1}})
    # a saved recipe writes the defaults back: those are no reason to refuse
    dumped = build_recipe({"task": {"labels": NAMES}, "student": bilstm | {"num_layers": 1}}).model_dump(mode="json")
    assert build_recipe(dumped).student.architecture == "bilstm"
    with pytest.raises(ProtegeError, match="training.hidden_weight matches a BERT student's token states"):
        build_recipe({"task": {"labels": NAMES}, "teacher": {"model": "hf:some/encoder"},
                      "student": {"init": "scratch", "architecture": "bilstm"}, "training": {"hidden_weight": 1.0}})
    with pytest.raises(ProtegeError, match="student.architecture"):
        build_recipe({"task": {"kind": "generation"}, "student": {"model": "gpt2", "architecture": "bilstm"}})


def test_the_lean_path_gives_the_models_logits_one_text_at_a_time_and_batched():
    from protege.lean import classifier_logits

    model, enc = _model(4), _batch()
    fast = classifier_logits(model)
    with torch.inference_mode():
        for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):  # unpadded: the fused bidirectional call
            one = {"input_ids": enc["input_ids"][i : i + 1, :n], "attention_mask": enc["attention_mask"][i : i + 1, :n]}
            torch.testing.assert_close(fast(**one), model(**one).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(**enc), model(**enc).logits)  # padded: the model's own forward
        full = {"input_ids": enc["input_ids"][:, :2], "attention_mask": torch.ones(3, 2, dtype=torch.long)}
        torch.testing.assert_close(fast(**full), model(**full).logits, rtol=1e-5, atol=1e-6)
