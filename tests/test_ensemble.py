"""A teacher ensemble: members label through their own cached identities; the combined distribution is a valid
distribution, recorded as method 'ensemble', weighted by gold accuracy on training rows when asked."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import n_calls, write_jsonl

from protege.demo_data import LABELS, make_examples
from protege.errors import ProtegeError
from protege.labeling.ensemble import combine
from protege.labeling.labeler import label
from protege.recipe import load_recipe
from protege.signals import LabelDistribution


def _recipe(tmp_path, members, model="ensemble:mean", gold=True, out="out"):
    rows = make_examples(40, seed=3)
    if not gold:
        rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    write_jsonl(tmp_path / "data.jsonl", rows)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": model, "members": members},
        "output_dir": out,
    }))
    return load_recipe(path)


def _signals(recipe, split):
    return [json.loads(x) for x in (recipe.output_dir / "signals" / f"{split}.jsonl").read_text().splitlines()]


def _members(tiny_lm_dir, tiny_classifier_dir):
    return [{"model": f"hf:{tiny_lm_dir}", "batch_size": 8}, {"model": f"hf:{tiny_classifier_dir}", "batch_size": 8}]


def test_the_mean_ensemble_is_the_mean_of_each_members_own_labels_and_a_rerun_calls_nobody(
    tmp_path, tiny_lm_dir, tiny_classifier_dir
):
    members = _members(tiny_lm_dir, tiny_classifier_dir)
    ens = _recipe(tmp_path, members)
    label(ens, quiet=True)
    alone = [_recipe(tmp_path, [m, m], out=f"alone{i}") for i, m in enumerate(members)]  # each member by itself
    for r in alone:
        r.teacher = r.teacher.members[0]
        label(r, quiet=True)
    for split in ("train", "eval"):
        got, a, b = _signals(ens, split), _signals(alone[0], split), _signals(alone[1], split)
        assert [r["id"] for r in got] == [r["id"] for r in a] == [r["id"] for r in b]
        for g, x, y in zip(got, a, b):
            assert g["method"] == "ensemble"
            assert math.isclose(sum(g["teacher_probs"]), 1.0, abs_tol=1e-9) and min(g["teacher_probs"]) >= 0
            assert g["teacher_probs"] == pytest.approx([(p + q) / 2 for p, q in zip(x["teacher_probs"], y["teacher_probs"])])
    record = json.loads((ens.output_dir / "signals" / "ensemble.json").read_text())
    assert [m["model"] for m in record["members"]] == [m["model"] for m in members]
    assert [m["weight"] for m in record["members"]] == [0.5, 0.5]

    calls = n_calls(ens.store_path)
    assert label(ens, quiet=True).called == 0 and n_calls(ens.store_path) == calls


def test_accuracy_weights_follow_each_members_gold_accuracy_on_training_rows(tmp_path, tiny_lm_dir, tiny_classifier_dir):
    ens = _recipe(tmp_path, _members(tiny_lm_dir, tiny_classifier_dir), model="ensemble:accuracy")
    label(ens, quiet=True)
    record = json.loads((ens.output_dir / "signals" / "ensemble.json").read_text())
    accs = [m["gold_accuracy"] for m in record["members"]]
    assert record["gold_rows"] == 30  # the training rows only: 40 rows, a quarter held out
    assert [m["weight"] for m in record["members"]] == pytest.approx([a / sum(accs) for a in accs])
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)


def test_accuracy_weights_need_gold_labels(tmp_path, tiny_lm_dir, tiny_classifier_dir):
    ens = _recipe(tmp_path, _members(tiny_lm_dir, tiny_classifier_dir), model="ensemble:accuracy", gold=False)
    with pytest.raises(ProtegeError, match="use ensemble:mean"):
        label(ens, quiet=True)


def test_combine_weighs_and_refuses_what_it_cannot_combine():
    a = LabelDistribution(("x", "y"), (0.9, 0.1), method="logits")
    b = LabelDistribution(("x", "y"), (0.3, 0.7), method="embedding", covered_mass=0.5)
    c = combine([a, b], [3.0, 1.0])
    assert c.probs == pytest.approx((0.75, 0.25)) and c.method == "ensemble" and c.covered_mass == pytest.approx(0.875)
    with pytest.raises(ProtegeError, match="weight 0"):
        combine([a, b], [0.0, 0.0])
    with pytest.raises(ProtegeError, match="different label sets"):
        combine([a, LabelDistribution(("y", "x"), (0.5, 0.5), method="logits")], [1.0, 1.0])
