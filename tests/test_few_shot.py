"""Few-shot requests: worked examples (given in task.examples, or drawn by teacher.few_shot from gold-labelled
training rows) come before the text as answered turns; they are part of the cache key, never evaluation rows,
and never trained on."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import n_calls, write_jsonl

from protege.demo_data import LABELS, make_examples
from protege.errors import DataError
from protege.labeling.data import Example, draw_shots, load_splits
from protege.labeling.labeler import label, recipe_shots, requests_for
from protege.labeling.prompts import render_request
from protege.recipe import FewShotExample, TaskConfig, load_recipe
from protege.store import call_key
from protege.teachers import make_teacher


def _task() -> TaskConfig:
    return TaskConfig(labels=[{"name": k, "description": v} for k, v in LABELS.items()])


def test_examples_come_first_as_answered_turns_and_the_text_last():
    task = _task()
    shots = [FewShotExample(text="I was charged twice", label="Billing"), FewShotExample(text="where is it", label="shipping")]
    plain, shot = render_request(task, "my app crashes"), render_request(task, "my app crashes", examples=shots)
    assert [m["role"] for m in shot.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert plain.messages[0]["content"].endswith(shot.messages[-1]["content"])  # the text's own turn, as before
    assert "Labels:" in shot.messages[0]["content"] and "Labels:" not in shot.messages[-1]["content"]  # said once
    assert "I was charged twice" in shot.messages[0]["content"]
    assert shot.messages[1]["content"] == "billing"  # the label as the task names it, whatever the example's case
    assert shot.examples == (("I was charged twice", "billing"), ("where is it", "shipping"))
    assert shot.label_descriptions == tuple(LABELS.values())
    assert shot.to_json() != plain.to_json()  # a different prompt is a different cache key
    assert "examples" not in shot.to_json()  # the examples are in the messages, not repeated
    assert len(plain.messages) == 1


def test_draw_shots_takes_k_gold_rows_per_label_from_training_rows_only_and_the_same_every_time():
    rows = [Example(f"r{i}", f"text {i}", list(LABELS)[i % 5] if i % 7 else None, "x") for i in range(60)]
    shots, rest = draw_shots(rows, tuple(LABELS), 2, seed=3)
    assert len(shots) == 10 and all(s.gold is not None for s in shots)
    assert {lab: sum(s.gold == lab for s in shots) for lab in LABELS} == dict.fromkeys(LABELS, 2)
    assert {s.id for s in shots}.isdisjoint({r.id for r in rest}) and len(shots) + len(rest) == len(rows)
    assert [s.gold for s in shots[:5]] == list(LABELS)  # interleaved, not one label's run
    assert draw_shots(rows, tuple(LABELS), 2, seed=3) == (shots, rest)
    assert draw_shots(rows, tuple(LABELS), 2, seed=4)[0] != shots
    with pytest.raises(DataError, match="no training row has a gold label"):
        draw_shots([Example("a", "t", None, "x")], tuple(LABELS), 1, seed=0)


def _recipe(tmp_path, tiny_lm_dir, **teacher):
    short = [r for r in make_examples(400, seed=3) if len(r["text"].split()) <= 12]  # five shots fit the tiny LM
    write_jsonl(tmp_path / "data.jsonl", short[:40])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": f"hf:{tiny_lm_dir}", "batch_size": 8, **teacher},
        "output_dir": "out",
    }))
    return load_recipe(path)


def test_drawn_examples_are_shown_with_every_text_left_out_of_training_and_never_held_out(tmp_path, tiny_lm_dir):
    recipe = _recipe(tmp_path, tiny_lm_dir, few_shot=1)
    stats = label(recipe, quiet=True)
    out = recipe.output_dir / "signals"
    shots = [json.loads(x) for x in (out / "shots.jsonl").read_text().splitlines()]
    assert len(shots) == len(LABELS) and {s["label"] for s in shots} == set(LABELS)
    train_sig = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    eval_sig = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    shot_texts = {s["text"] for s in shots}
    assert shot_texts.isdisjoint({r["text"] for r in train_sig})  # shown to the teacher, not trained on
    train, held = load_splits(recipe.data, recipe.task.label_names, recipe.training.seed)
    assert shot_texts <= {e.text for e in train} and shot_texts.isdisjoint({e.text for e in held})
    assert len(train_sig) == len(train) - len(shots) and len(eval_sig) == len(held)

    # every stored request carries the examples as turns; the cascade and evaluation rebuild the same keys
    teacher = make_teacher(recipe.teacher)
    assert recipe_shots(recipe) == [FewShotExample(**s) for s in shots]
    ex = [Example(r["id"], r["text"], r["gold"], "eval") for r in eval_sig]
    assert [call_key(teacher.identity, r.to_json()) for r in requests_for(recipe, ex)] == [r["call_key"] for r in eval_sig]
    assert all(len(r.messages) == 2 * len(shots) + 1 for r in requests_for(recipe, ex))

    calls = n_calls(recipe.store_path)
    assert calls == stats.called == len(train_sig) + len(eval_sig)
    again = label(recipe, quiet=True)
    assert again.called == 0 and n_calls(recipe.store_path) == calls  # the examples are part of the cached key

    plain = _recipe(tmp_path, tiny_lm_dir)  # same store, no examples: new keys, every text asked again
    assert label(plain, quiet=True).called == len(train) + len(held)


def test_given_examples_need_a_label_of_the_task(tmp_path, tiny_lm_dir):
    from protege.errors import RecipeError

    with pytest.raises(RecipeError, match="is not one of task.labels"):
        load_recipe(None, {"task.labels": ["a", "b"], "task.examples": [{"text": "x", "label": "c"}]})


def test_generation_examples_are_answered_turns_too():
    from protege.labeling.prompts import render_generation

    task = TaskConfig(kind="generation", instruction="Translate to French.")
    req = render_generation(task, "cat", None, 0, [FewShotExample(text="dog", label="chien")])
    assert [m["content"] for m in req.messages] == ["Translate to French.\n\ndog", "chien", "Translate to French.\n\ncat"]
    assert render_generation(task, "cat", None, 0).messages == req.messages[-1:]
