"""Selective labeling (teacher.select): the pure choice of texts (protege.labeling.uncertainty) and the loop
(protege.active) with real tiny teachers and students: rounds, caps, budget, the cache, the signal files, the
report's learning curve, and the recipe's refusals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import n_calls, sql, write_jsonl

from protege.active import label
from protege.cli import cli
from protege.demo_data import LABELS, make_examples
from protege.errors import RecipeError
from protege.labeling.labeler import estimate
from protege.labeling.uncertainty import pick, scores
from protege.recipe import build_recipe, load_recipe


# -- scores and pick ---------------------------------------------------------------------------------------------
def test_scores_margin_and_entropy_pinned():
    probs = [[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]]
    np.testing.assert_allclose(scores(probs, "margin"), [1.0, 1 - 0.85, 1.0, 0.7])
    ent = scores(probs, "entropy")
    np.testing.assert_allclose(ent[0], math.log(2) / math.log(3))
    np.testing.assert_allclose(ent[2], 1.0)
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)) / math.log(3)
    np.testing.assert_allclose(ent[3], h)
    assert ent[1] < ent[0] < ent[3] < ent[2]  # entropy counts the third label; the margin does not
    with pytest.raises(ValueError, match="metric"):
        scores(probs, "variance")


def test_pick_takes_the_lowest_margins_most_uncertain_first():
    # every text predicted label 0, so no label spreading: the pick is pure uncertainty
    margins = [0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4]
    probs = [[0.5 + m / 2, 0.5 - m / 2] for m in margins]
    assert pick(probs, 3, "margin") == [3, 1, 7]
    assert pick(probs, 3, "entropy") == [3, 1, 7]  # two labels: entropy orders as the margin does
    assert pick(probs, 0) == [] and sorted(pick(probs, 50)) == list(range(10))


def test_pick_without_features_spreads_the_round_over_predicted_labels():
    # the 8 least sure texts are all predicted 'a' (label 0); label 1's are a little surer, still candidates
    probs = [[0.51 + 0.001 * i, 0.49 - 0.001 * i] for i in range(8)] + [[0.4 - 0.001 * i, 0.6 + 0.001 * i]
                                                                         for i in range(8)]
    chosen = pick(probs, 4, "margin")
    assert chosen == [0, 8, 1, 9]  # alternating labels, each label's least sure first
    top4 = list(np.argsort(-scores(probs))[:4])
    assert top4 == [0, 1, 2, 3]  # uncertainty alone would have taken one label's four


def test_pick_with_features_spreads_the_round_over_clusters():
    # 10 most uncertain texts are near-duplicates (one point in feature space); 6 others sit elsewhere
    probs = [[0.5 + 0.001 * i, 0.5 - 0.001 * i] for i in range(10)] + [[0.55 + 0.01 * i, 0.45 - 0.01 * i]
                                                                         for i in range(6)]
    feats = [[1.0, 0.0]] * 10 + [[0.0, 1.0], [-1.0, 0.0]] * 3  # candidates (4 x 3): the 10, then 10 and 11
    for seed in range(5):
        chosen = pick(probs, 3, "margin", features=feats, seed=seed)
        assert chosen[0] == 0  # the least sure text first
        clusters = {tuple(feats[i]) for i in chosen}
        assert len(clusters) == 3  # one text per cluster, never two near-duplicates
    without = pick(probs, 3, "margin")
    assert without == [0, 1, 2]  # one predicted label, no features: the near-duplicates


def test_pick_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feats = rng.normal(size=(200, 8))
    a = pick(probs, 20, "entropy", feats, seed=1)
    assert a == pick(probs, 20, "entropy", feats, seed=1)
    assert len(set(a)) == 20 and all(isinstance(i, int) for i in a)
    assert a != pick(probs, 20, "entropy", feats, seed=2)  # the draw depends on the seed ...
    s = scores(probs, "entropy")
    candidates = set(np.argsort(-s)[:80].tolist())
    assert set(a) <= candidates and set(pick(probs, 20, "entropy", feats, seed=2)) <= candidates  # ... not the pool
    tied = [[0.5, 0.5]] * 30
    assert pick(tied, 5, seed=0) == pick(tied, 5, seed=0) != pick(tied, 5, seed=3)


# -- the loop --------------------------------------------------------------------------------------------------
def _select(path, **teacher):
    data = yaml.safe_load(path.read_text())
    data["teacher"].update(teacher)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_uncertainty_rounds_stop_at_max_rows_write_the_labelled_rows_and_rerun_free(tiny_recipe, one_thread):
    recipe = _select(tiny_recipe, select="uncertainty", select_seed_rows=10, select_round_rows=8, select_max_rows=30)
    db, sig = recipe.store_path, recipe.output_dir / "signals"
    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q"])  # `protege label` honours teacher.select
    assert res.exit_code == 0, res.output
    sel = json.loads((sig / "selection.json").read_text())
    rounds = sel["rounds"]
    # 10 seed texts, then 8, 8 and the 4 left under the cap of 30 (of 45 training texts)
    assert [len(r["ids"]) for r in rounds] == [10, 8, 8, 4]
    assert [r["rows"] for r in rounds] == [10, 18, 26, 30] == [r["teacher_calls"] for r in rounds]
    assert sel["stopped"] == "max_rows" and sel["pool_rows"] == 45 and sel["eval_rows"] == 15
    ids = [i for r in rounds for i in r["ids"]]
    assert len(set(ids)) == 30  # no text bought twice
    train, evals = _rows(sig / "train.jsonl"), _rows(sig / "eval.jsonl")
    assert [r["id"] for r in train] == ids  # exactly the labelled rows, in the order bought
    assert len(evals) == 15 and all(len(r["teacher_probs"]) == len(LABELS) for r in train + evals)
    assert n_calls(db) == 15 + 30 and res.output.startswith(f"labeled {15 + 30} examples: 45 teacher calls")
    for r in rounds:  # each round trained a student and scored it on the evaluation split against gold
        assert 0 <= r["eval_agreement"] <= 1 and 0 <= r["eval_accuracy"] <= 1 and r["check_agreement"] is None
        assert r["usd"] > 0  # a local teacher's recorded compute, priced at eval.compute_usd_per_hour
    assert [r["usd"] for r in rounds] == sorted(r["usd"] for r in rounds)
    assert [r["new_calls"] for r in rounds] == [10, 8, 8, 4]

    # a rerun repeats the picks from the store: zero teacher calls, the same rows and files
    before = (sig / "train.jsonl").read_bytes()
    stats = label(recipe, quiet=True)
    assert stats.called == 0 and stats.cached == 45 and n_calls(db) == 45
    again = json.loads((sig / "selection.json").read_text())
    assert [r["ids"] for r in again["rounds"]] == [r["ids"] for r in rounds]
    assert [r["new_calls"] for r in again["rounds"]] == [0, 0, 0, 0]
    assert (sig / "train.jsonl").read_bytes() == before

    # a higher cap continues where the rounds stopped: only the new round's texts are bought
    more = _select(tiny_recipe, select_max_rows=38)
    stats = label(more, quiet=True)
    longer = json.loads((sig / "selection.json").read_text())["rounds"]
    assert [r["ids"] for r in longer[:3]] == [r["ids"] for r in rounds[:3]]
    assert [r["rows"] for r in longer] == [10, 18, 26, 34, 38] and len(_rows(sig / "train.jsonl")) == 38
    assert stats.called == n_calls(db) - 45 <= 38 - 26  # the cut round is picked afresh; what it had is cached


def test_student_labels_train_the_rounds_and_the_final_student_at_no_teacher_cost(tiny_recipe, one_thread):
    from protege.evaluation.report import active_lines
    from protege.improve import _training_rows
    from protege.pipeline import classifier_rows, train
    from protege.training.select import selection_split

    recipe = _select(tiny_recipe, select="uncertainty", select_seed_rows=10, select_round_rows=10,
                     select_max_rows=20, select_student_labels=True)
    db, sig = recipe.store_path, recipe.output_dir / "signals"
    assert label(recipe, quiet=True).called == 15 + 20
    assert n_calls(db) == 15 + 20  # the student's labels cost no teacher call
    sel = json.loads((sig / "selection.json").read_text())
    assert sel["student_labels"] is True
    # each round's student also trained on the texts not yet bought (45 training texts: 35, then 25 left)
    assert [r["student_labels"] for r in sel["rounds"]] == [35, 25]
    bought, mine = _rows(sig / "train.jsonl"), _rows(sig / "student_labels.jsonl")
    all_ids = {r["id"] for r in make_examples(60, seed=3)}
    assert len(bought) == 20 and len(mine) == 25
    assert not {r["id"] for r in bought} & {r["id"] for r in mine}
    assert {r["id"] for r in mine} <= all_ids
    for r in mine:
        assert r["labelled_by"] == "student" and r["call_key"] is None and r["method"] == "student"
        assert math.isclose(sum(r["teacher_probs"]), 1.0, rel_tol=1e-5)
        assert r["teacher_label"] == recipe.task.label_names[int(np.argmax(r["teacher_probs"]))]
    assert all("labelled_by" not in r for r in bought)
    assert "(25 such texts after the last round; no teacher calls)" in "\n".join(active_lines({**sel, "plots": []}))

    # the final student trains on both, and the student's rows are never the slice a checkpoint is judged on
    rows = classifier_rows(recipe)
    assert len(rows) == 45 and rows.ids[20:] == [r["id"] for r in mine]
    _, held = selection_split(rows.ids, rows.sources, 0.2, 0)
    assert held and max(held) < 20
    assert train(recipe, quiet=True)["student"]["examples"] == 45
    # `protege improve` starts a candidate from the rows the run's student had: both files
    run_version = SimpleNamespace(versions={"v1": {"made_by": "protege train"}})
    improve_rows = _training_rows(recipe.output_dir, run_version, "v1", recipe)
    assert [r["id"] for r in improve_rows] == rows.ids

    # a rerun buys nothing and labels the same texts the same way
    before = (sig / "student_labels.jsonl").read_bytes()
    assert label(recipe, quiet=True).called == 0
    assert (sig / "student_labels.jsonl").read_bytes() == before
    # off again: the file goes, and the student trains on the teacher's answers alone
    off = _select(tiny_recipe, select_student_labels=False)
    label(off, quiet=True)
    assert not (sig / "student_labels.jsonl").exists() and len(classifier_rows(off)) == 20
    assert len(_training_rows(off.output_dir, run_version, "v1", off)) == 20


def test_random_and_uncertainty_share_the_seed_slice_then_differ(tiny_recipe, one_thread):
    uncertain = _select(tiny_recipe, select="uncertainty", select_seed_rows=10, select_round_rows=10,
                        select_max_rows=20)
    label(uncertain, quiet=True)
    u = json.loads((uncertain.output_dir / "signals/selection.json").read_text())["rounds"]
    rand = load_recipe(tiny_recipe, {"teacher.select": "random", "output_dir": "out-random"})
    label(rand, quiet=True)
    r = json.loads((rand.output_dir / "signals/selection.json").read_text())["rounds"]
    assert u[0]["ids"] == r[0]["ids"]  # the same random seed slice (training.seed)
    assert set(u[1]["ids"]) != set(r[1]["ids"])  # then the student's doubts, not chance
    assert len(u[1]["ids"]) == len(r[1]["ids"]) == 10



def test_random_share_takes_that_many_of_random_s_next_texts_then_the_least_sure(tiny_recipe, one_thread):
    half = _select(tiny_recipe, select="uncertainty", select_seed_rows=10, select_round_rows=10, select_max_rows=20,
                   select_random_share=0.5)
    label(half, quiet=True)
    h = json.loads((half.output_dir / "signals/selection.json").read_text())
    rand = load_recipe(tiny_recipe, {"teacher.select": "random", "teacher.select_random_share": 0.0,
                                     "output_dir": "out-random"})
    label(rand, quiet=True)
    r = json.loads((rand.output_dir / "signals/selection.json").read_text())["rounds"]
    u = h["rounds"]
    assert h["random_share"] == 0.5 and h["diversity"] is True
    assert u[0]["ids"] == r[0]["ids"] and len(u[1]["ids"]) == 10
    assert u[1]["ids"][:5] == r[1]["ids"][:5]  # 0.5 of 10: random's next five texts, in its order ...
    assert not set(u[1]["ids"][5:]) & set(r[1]["ids"][:5])  # ... then five others, the student's picks


class _FakeLoop:
    """What _Loop._pick reads, the student's outputs given: ten texts, each its own index as its text; text i has
    margin 0.1 * i (text 0 the least sure); texts 0-4 are near-duplicates in feature space, 5-9 spread out."""

    def __init__(self, **teacher):
        self.recipe = build_recipe({"teacher": {"select": "uncertainty", "select_max_rows": 10, **teacher}})
        self._model = object()  # a student is loaded: _pick asks it, it does not train one
        self.train = list(range(10))  # _pick hands train[i].text to _predict; ints stand in (see _predict)
        self.asked: list[list[int]] = []

    def _predict(self, texts):
        self.asked.append(list(texts))
        probs = np.array([[0.5 + 0.05 * i, 0.5 - 0.05 * i] for i in texts])  # (N, 2): margin 0.1 * i
        feats = np.array([[1.0, 0.01 * i] if i < 5 else [np.cos(i), np.sin(i)] for i in texts])  # (N, 2)
        return probs, feats


def _pick_with(left, k, **teacher):
    from types import SimpleNamespace

    from protege.active import _Loop

    fake = _FakeLoop(**teacher)
    fake.train = [SimpleNamespace(text=i) for i in range(10)]
    return _Loop._pick(fake, left, k, 1), fake.asked


def test_pick_round_splits_into_random_share_and_least_sure():
    left = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # the seeded random order: the least sure texts come last
    chosen, asked = _pick_with(left, 4, select_random_share=0.5, select_diversity=False)
    assert chosen == [9, 8, 0, 1]  # two the next in the random order, then the two least sure of the rest
    assert asked == [left[2:]]  # the student scores only the texts the random draw left
    chosen, _ = _pick_with(left, 4, select_random_share=0.25, select_diversity=False)
    assert chosen == [9, 0, 1, 2]  # round(0.25 * 4) = 1 random
    chosen, asked = _pick_with(left, 4, select_random_share=1.0)
    assert chosen == [9, 8, 7, 6] and asked == []  # all random: no student asked
    chosen, _ = _pick_with(left, 3, select_diversity=False)
    assert chosen == [0, 1, 2]  # least sure only: three of the five near-duplicates
    chosen, _ = _pick_with(left, 3)
    assert chosen[0] == 0 and len({i for i in chosen if i < 5}) == 1  # spread: one of the near-duplicates


def test_select_settings_are_in_the_fingerprint_and_limits_are_not():
    from protege.active import _fingerprint

    def fp(**teacher):
        return _fingerprint(build_recipe({"teacher": {"select": "uncertainty", "select_max_rows": 100, **teacher}}))

    base = fp()
    assert len({base, fp(select_random_share=0.5), fp(select_random_share=0.25), fp(select_diversity=False),
                fp(select_metric="entropy"), fp(select_round_rows=50)}) == 6  # each one re-picks the rounds
    assert fp(select_max_rows=500) == fp(budget_usd=3.0) == base  # limits alone replay them
    rand = build_recipe({"teacher": {"select": "random", "select_max_rows": 100}})
    assert _fingerprint(rand) == _fingerprint(rand.model_copy(update={"teacher": rand.teacher.model_copy(
        update={"select_random_share": 0.5, "select_diversity": False})}))  # random's picks ignore them


def test_select_target_stops_on_the_held_out_check_slice(tiny_recipe, one_thread):
    data = yaml.safe_load(tiny_recipe.read_text())
    # the student learns the teacher's top labels (alpha 0, no gold), 40 steps on the 10 seed rows, so it agrees
    # with the teacher on some check rows: the tiny teacher's near-flat distributions would teach a few-step KD
    # student no label it predicts (its starting weights decide its top label)
    data["training"] |= {"epochs": 20, "alpha": 0.0, "use_gold": False}
    tiny_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = _select(tiny_recipe, select="random", select_seed_rows=10, select_round_rows=10, select_target=0.01,
                     select_check_rows=12)
    label(recipe, quiet=True)
    sig = recipe.output_dir / "signals"
    sel = json.loads((sig / "selection.json").read_text())
    assert sel["stopped"] == "target" and len(sel["rounds"]) == 1 and sel["check_rows"] == 12
    assert sel["rounds"][0]["check_agreement"] >= 0.01 and sel["rounds"][0]["teacher_calls"] == 10 + 12
    train = _rows(sig / "train.jsonl")
    assert len(train) == 10 + 12  # the check slice is paid for, so the final student learns from it too
    assert not set(sel["rounds"][0]["ids"]) & {r["id"] for r in train[10:]}


def _api_recipe(tmp_path, tiny_classifier_dir, **teacher):
    write_jsonl(tmp_path / "data.jsonl", make_examples(40, seed=4))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "openai:gpt-4o-mini", "concurrency": 1, "max_tokens": 4, **teacher},
        "student": {"model": str(tiny_classifier_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2},
        "training": {"epochs": 1, "batch_size": 8},
        "output_dir": "out",
    }, sort_keys=False))  # fmt: skip
    return path


def test_budget_reached_mid_round_ends_the_loop_with_what_was_bought(tmp_path, tiny_classifier_dir, openai_fake,
                                                                    monkeypatch, one_thread):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-select")
    path = _api_recipe(tmp_path, tiny_classifier_dir, select="uncertainty", select_seed_rows=8, select_round_rows=8,
                       select_max_rows=16)
    first = load_recipe(path)
    dry = estimate(first)  # the dry run counts every text, and says so
    assert dry.to_call == 40 and any("teacher.select: uncertainty labels the 10 evaluation texts" in n and
                                     "select_max_rows 16" in n for n in dry.notes)
    label(first, quiet=True)  # the evaluation split (10 texts) and two rounds of 8
    sig, db = first.output_dir / "signals", first.store_path
    two = json.loads((sig / "selection.json").read_text())["rounds"]
    assert [r["rows"] for r in two] == [8, 16] and openai_fake.answered == 26
    spent = sql(db, "SELECT SUM(cost_usd) FROM calls")[0][0]
    per_call = spent / 26
    assert two[-1]["usd"] == pytest.approx(per_call * 16, rel=0.2)  # the store's dollars for the texts bought

    # no row cap now, and a budget for a few more calls: one call's worst case (what the engine reserves) and
    # about two more, so the third round is cut short and the loop ends there
    est = estimate(first)
    cap = spent + est.worst_usd / est.to_call + 2.5 * per_call
    recipe = load_recipe(path, {"teacher.select_max_rows": None, "teacher.budget_usd": cap})
    stats = label(recipe, quiet=True)  # no BudgetReached: the rounds so far are kept
    sel = json.loads((sig / "selection.json").read_text())
    assert sel["stopped"] == "budget"
    bought = [len(r["ids"]) for r in sel["rounds"]]
    assert [r["ids"] for r in sel["rounds"][:2]] == [r["ids"] for r in two]  # replayed from the store
    assert len(bought) == 3 and 0 < bought[2] < 8  # the third round cut short by the cap
    n = sum(bought)
    assert stats.called == bought[2] and stats.cached == 26
    assert openai_fake.answered == 10 + n == n_calls(db)
    assert sql(db, "SELECT SUM(cost_usd) FROM calls")[0][0] <= cap
    assert [r["id"] for r in _rows(sig / "train.jsonl")] == [i for r in sel["rounds"] for i in r["ids"]]
    assert len(_rows(sig / "eval.jsonl")) == 10

    # a rerun under the same cap buys nothing more and keeps the same rows
    again = label(recipe, quiet=True)
    assert again.called == 0 and openai_fake.answered == 10 + n
    assert [r["ids"] for r in json.loads((sig / "selection.json").read_text())["rounds"]] == \
        [r["ids"] for r in sel["rounds"]]


def test_run_reports_the_learning_curve(tiny_recipe, one_thread):
    from protege.pipeline import run

    recipe = _select(tiny_recipe, select="uncertainty", select_seed_rows=15, select_round_rows=15, select_max_rows=30)
    result = run(recipe, quiet=True)
    assert result["label"].called == 15 + 30
    out = recipe.output_dir
    report = json.loads((out / "report.json").read_text())
    assert [r["rows"] for r in report["active"]["rounds"]] == [15, 30]
    assert "ids" not in report["active"]["rounds"][0]
    assert "plots/learning_curve.png" in report["plots"] and (out / "plots/learning_curve.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "## Selective labeling (teacher.select: uncertainty)" in md and "![learning curve]" in md
    row = next(x for x in md.splitlines() if x.startswith("| 1 | 30 | 30 |"))
    r1 = report["active"]["rounds"][1]
    assert f"{100 * r1['eval_agreement']:.1f}%" in row
    assert run(recipe, quiet=True)["label"].called == 0  # the whole loop again: zero teacher calls


# -- the recipe ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"teacher": {"select": "uncertainty"}}, "none is set, so it would label every text"),
        ({"teacher": {"select_max_rows": 100}}, "which is off .teacher.select: all"),
        ({"teacher": {"select": "random", "select_max_rows": 10, "select_seed_rows": 20}},
         "select_seed_rows 20 is more than teacher.select_max_rows 10"),
        ({"teacher": {"select": "random", "select_max_rows": 10, "select_metric": "entropy"}},
         "select_metric applies to teacher.select: uncertainty"),
        ({"teacher": {"select": "random", "select_max_rows": 10, "select_random_share": 0.5}},
         "select_random_share applies to teacher.select: uncertainty"),
        ({"teacher": {"select": "random", "select_max_rows": 10, "select_diversity": False}},
         "select_diversity applies to teacher.select: uncertainty"),
        ({"teacher": {"select_random_share": 0.5}}, "which is off .teacher.select: all"),
        ({"teacher": {"select_student_labels": True}}, "select_student_labels configures selective labeling"),
        ({"teacher": {"select": "uncertainty", "select_max_rows": 10, "select_random_share": 1.5}},
         "less than or equal to 1"),
        ({"teacher": {"select": "uncertainty", "select_max_rows": 10, "select_check_rows": 50}},
         "select_check_rows is the slice teacher.select_target"),
        ({"teacher": {"select": "uncertainty", "select_max_rows": 10}, "data": {"augment": {"per_text": 2}}},
         "data.augment makes new texts from all of them"),
        ({"task": {"kind": "generation"}, "teacher": {"select": "uncertainty", "select_max_rows": 10}},
         "teacher.select picks the training texts a classifier's teacher labels"),
        ({"teacher": {"model": "openai:gpt-4o-mini", "select": "uncertainty", "budget_usd": 1, "batch_api": True}},
         "teacher.select labels in rounds"),
    ],
)
def test_recipe_refuses_select_settings_that_cannot_work(settings, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(settings)


def test_recipe_accepts_select_with_a_limit():
    r = build_recipe({"teacher": {"select": "uncertainty", "select_max_rows": 100}})
    assert (r.teacher.select, r.teacher.select_metric, r.teacher.select_seed_rows) == ("uncertainty", "margin", 200)
    assert build_recipe(r.model_dump(mode="json")).teacher == r.teacher  # a saved recipe loads again
