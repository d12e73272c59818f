"""training.hidden_weight: a classifier student's token states pulled toward its 'hf:' encoder teacher's. The term
by hand, the teacher's states per token in the texts' order, training that lowers it and saves a student without
the map it trained with, and the settings it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from protege.demo_data import LABELS, make_examples
from protege.errors import ProtegeError, RecipeError
from protege.lean import encode
from protege.recipe import build_recipe
from protege.students.classifier import count_parameters, load_student
from protege.training.classifier import TrainRow, train_student
from protege.training.hidden import hidden_loss, pad_states, teacher_states

NAMES = list(LABELS)


def test_the_term_is_one_minus_cosine_averaged_over_each_texts_tokens_for_rows_with_states():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 2), torch.randn(3, 4, 5)
    proj = torch.nn.Linear(2, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    has = torch.tensor([1.0, 1.0, 0.0])
    want = 0.0
    with torch.no_grad():
        for b in range(2):  # row 2 has no teacher states
            n = int(mask[b].sum())
            want += sum(1 - F.cosine_similarity(proj(student[b, t]), teacher[b, t], dim=0) for t in range(n)) / n
    got = hidden_loss(student, teacher, mask, has, proj)
    assert got.requires_grad and got.item() == pytest.approx(float(want), rel=1e-5)
    # a student whose mapped states point along the teacher's has no loss
    assert hidden_loss(teacher, teacher, mask, has, torch.nn.Identity()).item() == pytest.approx(0.0, abs=1e-5)


def test_padded_states_are_zero_past_each_text_and_for_rows_without_them():
    a, b = torch.ones(2, 3, dtype=torch.float16), torch.full((4, 3), 2.0, dtype=torch.float16)
    out, has = pad_states([a, None, b], length=3, width=3)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 3) and has.tolist() == [1.0, 0.0, 1.0]
    assert out[0, :2].eq(1).all() and out[0, 2].eq(0).all() and out[1].eq(0).all() and out[2].eq(2).all()


def _teacher_recipe(teacher: Path, student_tok: Path, out: Path, **training):
    train = {"epochs": 8, "batch_size": 16, "learning_rate": 1e-2, "warmup_fraction": 0.0, "seed": 0,
             "select_fraction": 0.2, "alpha": 1.0, "temperature": 2.0}
    return build_recipe({
        "task": {"labels": NAMES}, "teacher": {"model": f"hf:{teacher}"},
        "student": {"model": str(student_tok), "init": "scratch", "hidden_size": 16, "num_heads": 2,
                    "max_length": 32, "pooling": "mean"},
        "training": train | training, "output_dir": str(out),
    })


def test_the_teachers_states_are_its_last_layer_per_token_in_the_texts_order(tiny_tokenizer, tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification

    recipe = _teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, Path("unused"), hidden_weight=1.0)
    texts = [ex["text"] for ex in make_examples(10, seed=3)]
    texts[2] = "refund"  # a short one among long ones: the run order (shortest first) is not the texts' order
    states, width = teacher_states(recipe.teacher, tiny_tokenizer, texts, max_length=32, batch_size=4)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).base_model.eval()
    assert width == 32 and len(states) == len(texts)
    for text, got in zip(texts, states):
        enc = encode(tiny_tokenizer, [text], 32)
        with torch.no_grad():
            want = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
        assert got.dtype == torch.float16 and got.shape == want.shape  # unpadded: one row per token
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3)  # float16's rounding


def test_an_embedding_teachers_states_are_its_encoders_before_pooling():
    """The packaged all-MiniLM-L6-v2 as an 'embed:' teacher, read by a student with its tokenizer: the states
    are the encoder's, and their mean over a text's tokens is the teacher's embedding before normalising."""
    from protege.teachers.embed import EmbeddingTeacher
    from protege.sources import resolve_source

    minilm = resolve_source("all-minilm-l6-v2").name_or_path
    recipe = build_recipe({"task": {"labels": NAMES}, "teacher": {"model": "embed:all-minilm-l6-v2"},
                           "student": {"model": minilm, "init": "scratch"}, "training": {"hidden_weight": 1.0}})
    teacher = EmbeddingTeacher("all-minilm-l6-v2", recipe.teacher)
    _, tok = teacher.model_and_tokenizer()
    texts = ["my card was charged twice for one order", "where is my parcel?"]
    states, width = teacher_states(recipe.teacher, tok, texts, max_length=64)
    embedded, lengths = teacher.embed(texts)
    assert width == 384 and [len(s) for s in states] == lengths
    for s, e in zip(states, embedded):
        torch.testing.assert_close(F.normalize(s.float().mean(0), dim=0), e, rtol=0, atol=2e-3)


def _rows(n: int, augmented: int = 1) -> list[TrainRow]:
    rows = []
    for i, ex in enumerate(make_examples(n, seed=5)):
        probs = [0.15 / (len(NAMES) - 1)] * len(NAMES)
        probs[NAMES.index(ex["label"])] = 0.85
        rows.append(TrainRow(ex["text"], tuple(probs), NAMES.index(ex["label"]), id=f"r{i}"))
    for row in list(rows):
        for j in range(augmented):
            rows.append(TrainRow("please " * (j + 1) + row.text, row.teacher_probs, row.target,
                                 id=f"{row.id}~aug{j}", augmented_from=row.id))
    return rows


def test_training_lowers_the_term_and_saves_a_student_without_the_map(tmp_path, tiny_tokenizer, tiny_classifier_dir):
    from safetensors.torch import load_file

    rows = _rows(80)
    plain = train_student(_teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, tmp_path / "r"), rows,
                          tmp_path / "plain", alpha=1.0, quiet=True)
    summary = train_student(_teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, tmp_path / "r",
                                            hidden_weight=1.0), rows, tmp_path / "hidden", alpha=1.0, quiet=True)
    # 80 originals less the 16 of the slice have states; their augmented copies train on labels alone
    assert summary["hidden_rows"] == 64 and summary["hidden_weight"] == 1.0 and summary["examples"] == 128
    every = train_student(_teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, tmp_path / "r", hidden_weight=1.0,
                                          hidden_rows="all", max_steps=2), rows, tmp_path / "all", alpha=1.0, quiet=True)
    assert every["hidden_rows"] == every["examples"] == 128  # the augmented copies too
    log = [json.loads(x) for x in (tmp_path / "hidden" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["hidden_loss"] < 1.5 for r in log)
    first, last = (sum(r["hidden_loss"] for r in part) / len(part) for part in (log[:4], log[-4:]))
    assert last < 0.6 * first  # the student's mapped states turn toward the teacher's
    for r in log:  # loss = kd (alpha 1) + hidden_weight x hidden
        assert r["loss"] == pytest.approx(r["kd_loss"] + r["hidden_loss"], rel=1e-5)
    # the map is a training aid: the saved student is the same shape as one trained without it, and loads
    saved, without = (load_file(tmp_path / d / "model.safetensors") for d in ("hidden", "plain"))
    assert set(saved) == set(without) and not any(k.startswith("hidden_proj") for k in saved)
    assert any(not torch.equal(saved[k], without[k]) for k in saved)
    model, _, _ = load_student(tmp_path / "hidden")
    assert count_parameters(model) == summary["parameters"] == plain["parameters"]
    # the hard-label baseline (alpha 0) learns from labels alone: no teacher states, the same weights as without
    hard = train_student(_teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, tmp_path / "r", hidden_weight=1.0),
                         rows, tmp_path / "hard", alpha=0.0, quiet=True)
    hard_plain = train_student(_teacher_recipe(tiny_classifier_dir, tiny_classifier_dir, tmp_path / "r"), rows,
                               tmp_path / "hard-plain", alpha=0.0, quiet=True)
    assert "hidden_rows" not in hard
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("hard", "hard-plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_api_teacher_another_vocabulary_or_a_language_model_is_refused(tmp_path, tiny_tokenizer,
                                                                          tiny_classifier_dir):
    with pytest.raises(RecipeError, match=r"training.hidden_weight .* 'openai:gpt-4o-mini' returns no\s+states"):
        build_recipe({"task": {"labels": NAMES}, "teacher": {"model": "openai:gpt-4o-mini"},
                      "training": {"hidden_weight": 1.0}})
    with pytest.raises(RecipeError, match="training.hidden_weight"):
        build_recipe({"task": {"kind": "generation"}, "student": {"model": "gpt2"}, "training": {"hidden_weight": 1.0}})
    other = tmp_path / "other-tok"
    tiny_tokenizer.save_pretrained(other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzunseen"])
    recipe = _teacher_recipe(tiny_classifier_dir, other, tmp_path / "r", hidden_weight=1.0)
    with pytest.raises(ProtegeError, match="splits text into other word pieces than the student"):
        teacher_states(recipe.teacher, tok, ["a text"], 32)
