"""A student's card (protege.json) is the one source of what running it needs: training writes it, one reader
refuses a missing, malformed, old or incomplete one, serving and the cascade read nothing else (not the recipe
saved beside it), and evaluation and serving decode through one loop, so the confidence the threshold sweep
sees for a prompt is the confidence the server routes by."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import served  # noqa: E402
from lm_fixtures import QUESTIONS, make_llama, make_tokenizer, save_model, save_student  # noqa: E402

from protege.errors import ProtegeError  # noqa: E402
from protege.recipe import build_recipe  # noqa: E402
from protege.students.card import CARD, StudentCard  # noqa: E402
from protege.students.chat import ANSWER_PREFIX, ChatFormat, prompt_ids  # noqa: E402

PRICE = 3.5  # eval.compute_usd_per_hour, not the default, so reading it from the card shows
MAX_NEW = 8


def lm_recipe(model_dir: Path, step_by_step: bool = False):
    """A generation recipe whose student is ``model_dir``; ``step_by_step``: distilled with rationales."""
    return build_recipe({
        "task": {"kind": "generation", "answer_format": "rationale" if step_by_step else "text"},
        "teacher": {"model": f"hf:{model_dir}", "max_tokens": MAX_NEW},
        "student": {"model": str(model_dir), "max_length": 64},
        "training": {"rationale_weight": 0.5 if step_by_step else 0.0, "epochs": 1, "batch_size": 4,
                     "learning_rate": 3e-3, "warmup_fraction": 0.0, "weight_decay": 0.0, "seed": 0},
        "eval": {"compute_usd_per_hour": PRICE},
    })


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def peaked(tok):
    """A tiny random Llama with its output layer scaled up, so its answers' confidences spread out."""
    import torch

    model = make_llama(tok, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# the card and its one reader


@pytest.mark.parametrize("step_by_step", [False, True])
def test_an_lm_card_round_trips_with_its_prefix_stop_tokens_and_teacher(tmp_path, tok, peaked, step_by_step):
    recipe = lm_recipe(tmp_path, step_by_step)
    card = StudentCard.for_lm(recipe, tok, peaked, {"distill": "sequence", "steps": 3, "teacher": "hf:x"})
    card.write(tmp_path)
    assert StudentCard.read(tmp_path) == card
    assert card.chat == ChatFormat(True, ANSWER_PREFIX if step_by_step else None, tok.eos_token_id,
                                   (tok.eos_token_id,))
    assert (card.max_length, card.compute_usd_per_hour) == (64, PRICE)
    assert card.task == recipe.task and card.teacher == recipe.teacher and card.labels is None
    # the training figures stay where readers of protege.json have always found them: at the top level
    data = json.loads((tmp_path / CARD).read_text())
    assert data["distill"] == "sequence" and data["steps"] == 3 and data["teacher"] == "hf:x"
    assert data["chat"]["answer_prefix"] == (ANSWER_PREFIX if step_by_step else None)
    assert card.summary == {"distill": "sequence", "steps": 3, "teacher": "hf:x"}


def test_a_classifier_card_round_trips(tmp_path):
    recipe = build_recipe({"task": {"labels": ["no", "yes"]}, "student": {"max_length": 40}})
    card = StudentCard.for_classifier(recipe, ("no", "yes"), {"labels": ["no", "yes"], "alpha": 0.5})
    card.write(tmp_path)
    back = StudentCard.read(tmp_path)
    assert back == card and back.labels == ("no", "yes") and back.chat is None and back.max_length == 40
    assert back.summary == {"alpha": 0.5}  # the labels are the card's own field, not repeated in the summary


def _complete(tmp_path, tok, peaked) -> dict:
    StudentCard.for_lm(lm_recipe(tmp_path, True), tok, peaked, {"distill": "sequence"}).write(tmp_path)
    return json.loads((tmp_path / CARD).read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: None, "has no protege.json"),
        (lambda d: "{not json", "is not valid JSON"),
        (lambda d: [1, 2], "is not a JSON object"),
        (lambda d: {"kind": "causal_lm", "distill": "sequence"}, "written by an older protege"),
        (lambda d: {**d, "card_version": 99}, "card version 99"),
        (lambda d: {k: v for k, v in d.items() if k != "chat"}, "lacks 'chat'"),
        (lambda d: {**d, "chat": {k: v for k, v in d["chat"].items() if k != "answer_prefix"}},
         "lacks 'chat.answer_prefix'"),
        (lambda d: {**d, "chat": {**d["chat"], "stop_ids": [12345]}}, "chat.stop_ids"),
        (lambda d: {**d, "chat": {**d["chat"], "template": "yes"}}, "chat.template"),
        (lambda d: {**d, "max_length": 0}, "max_length 0"),
        (lambda d: {**d, "kind": "classifier"}, "labels None"),
        (lambda d: {**d, "compute_usd_per_hour": "cheap"}, "compute_usd_per_hour"),
        (lambda d: {**d, "teacher_recipe": {"task": d["teacher_recipe"]["task"]}}, "lacks 'teacher_recipe.teacher'"),
        (lambda d: {**d, "teacher_recipe": {**d["teacher_recipe"], "teacher": {"model": "gpt4"}}}, "teacher_recipe"),
    ],
)
def test_read_refuses_a_missing_malformed_old_or_incomplete_card_naming_the_file_and_the_fix(
    tmp_path, tok, peaked, change, message
):
    new = change(_complete(tmp_path, tok, peaked))
    if new is None:
        (tmp_path / CARD).unlink()
    else:
        (tmp_path / CARD).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ProtegeError) as e:
        StudentCard.read(tmp_path)
    assert message in str(e.value) and str(tmp_path) in str(e.value)
    assert "protege train" in str(e.value)  # the fix


def test_an_old_student_is_refused_everywhere_not_served_without_its_prefix(tmp_path, tok, peaked):
    """A student written before the card, trained step by step (its saved recipe says rationale_weight 0.5):
    serving, the cascade, the compute price and export refuse it with the fix; none falls back to a default."""
    from protege.export import export_student
    from protege.serve import create_app
    from protege.serve.fallback import saved_compute_price, teacher_recipe
    from protege.serve.lm import LMGenerator

    student = save_model(tmp_path / "student", peaked, tok)
    (student / CARD).write_text(json.dumps({"kind": "causal_lm", "distill": "sequence"}))
    lm_recipe(student, step_by_step=True).save(student / "recipe.yaml")
    for attempt in (lambda: LMGenerator(student), lambda: create_app(student), lambda: saved_compute_price(student),
                    lambda: teacher_recipe(student, None, None), lambda: export_student(student, "gguf")):
        with pytest.raises(ProtegeError, match="older protege.*retrain it with `protege train`"):
            attempt()


# --------------------------------------------------------------------------------------------------------------
# training writes it; serving and the cascade read it (and not recipe.yaml)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok):
    """A student trained step by step by train_lm, and its recipe."""
    from lm_fixtures import make_rows

    from protege.training.lm import train_lm

    base = tmp_path_factory.mktemp("card")
    start = save_model(base / "start", make_llama(tok), tok)
    recipe = lm_recipe(start, step_by_step=True)
    train_lm(recipe, make_rows(8), base / "student", quiet=True)
    return base / "student", recipe


def test_training_writes_the_card_serving_and_the_cascade_read(trained, tok):
    from protege.serve.fallback import saved_compute_price, teacher_recipe
    from protege.serve.lm import LMGenerator

    student, recipe = trained
    card = StudentCard.read(student)
    assert card.kind == "causal_lm" and card.chat.answer_prefix == ANSWER_PREFIX
    assert card.chat.template and card.chat.end_token_id == tok.eos_token_id and card.max_length == 64
    assert card.summary["distill"] == "sequence" and card.summary["steps"] == 2
    # the recipe beside it is for people; mangle it and everything still runs from the card alone
    (student / "recipe.yaml").write_text("training: {rationale_weight: 0}\neval: {compute_usd_per_hour: 99}\n")
    gen = LMGenerator(student)
    messages = [{"role": "user", "content": QUESTIONS[0][0]}]
    assert gen.prompt(messages) == prompt_ids(tok, messages, ANSWER_PREFIX)  # asked as it was trained
    assert tok.decode(gen.prompt(messages)).count("[answer] What is the capital") == 1
    assert saved_compute_price(student) == PRICE
    cascade = teacher_recipe(student, None, None)
    assert cascade.teacher == recipe.teacher and cascade.task == recipe.task


def test_a_classifier_is_served_at_its_cards_max_length_and_labels(tmp_path, tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from protege.demo_data import LABELS
    from protege.serve.workers import Classifier
    from protege.students.classifier import save_student

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    recipe = build_recipe({"task": {"labels": list(LABELS)}, "student": {"max_length": 12}})
    save_student(model, AutoTokenizer.from_pretrained(tiny_classifier_dir), tmp_path,
                 StudentCard.for_classifier(recipe, LABELS, {}))
    clf = Classifier(tmp_path)
    assert clf.max_length == 12 and clf.labels == tuple(LABELS)
    _, read = clf.predict(["word " * 50])
    assert read == [12]  # truncated where the card says
    card = json.loads((tmp_path / CARD).read_text())
    (tmp_path / CARD).write_text(json.dumps({**card, "labels": list(reversed(LABELS))}))
    with pytest.raises(ProtegeError, match="are not those of the model's head"):
        Classifier(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# one decoding loop: the sweep's confidence is the served confidence


@pytest.mark.parametrize("step_by_step", [False, True])
def test_the_sweeps_confidence_is_the_served_confidence_for_the_same_prompt(tmp_path, tok, peaked, step_by_step):
    """What `protege eval` records per held-out answer for the threshold sweep (lm_figures, with the card's chat
    format as evaluate_lm passes it) equals what LMGenerator and the HTTP server (its served ledger) report for
    the same conversation: the same answer, the same confidence, to the last bit."""
    from test_serve import running

    from protege.evaluation.lm import lm_figures
    from protege.serve.lm import GenerationParams, LMGenerator
    from protege.students.lm import load_lm_student

    recipe = lm_recipe(tmp_path / "student", step_by_step)
    student = save_student(tmp_path / "student", peaked, tok, recipe)
    rows = [{"messages": [{"role": "user", "content": q}], "teacher_text": a, "answer": a, "truncated": False}
            for q, a in QUESTIONS]
    model, mtok, card = load_lm_student(student)  # as evaluate_lm loads it
    swept: list[dict] = []
    lm_figures(model, mtok, rows, recipe, chat=card.chat, record=swept)
    assert [a["row"] for a in swept] == rows

    gen = LMGenerator(student)
    served_here = [gen.generate(r["messages"], GenerationParams(MAX_NEW, temperature=0)) for r in rows]
    assert [g.confidence for g in served_here] == [a["confidence"] for a in swept]
    assert [g.text.strip() for g in served_here] == [a["answer"] for a in swept]

    db = tmp_path / "served.db"
    with running(student, store=db) as srv, srv.client() as c:
        for r in rows:
            c.chat.completions.create(model="m", messages=r["messages"], temperature=0, max_tokens=MAX_NEW)
    assert [row["confidence"] for row in served(db)] == [a["confidence"] for a in swept]

    confidences = [a["confidence"] for a in swept]
    assert all(0 < x <= 1 for x in confidences) and len(set(confidences)) == len(rows)  # a spread to sweep
