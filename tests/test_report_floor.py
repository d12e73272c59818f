"""The classification report's honest floor and its closer looks, on one tiny run through the CLI: the TF-IDF +
logistic-regression floor trained on the teacher's labels, per-label recall and precision, the confusion plot,
the texts where student and teacher disagree most, the headline first line, and what training chose without
gold labels (checkpoint selection, the alpha/tau sweep)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import sql, write_jsonl

from protege.cli import cli
from protege.demo_data import LABELS, make_examples
from protege.evaluation.floor import FLOOR_NAME, fit_floor, floor_probs
from protege.evaluation.report import md_cell
from protege.store import call_key

NAMES = list(LABELS)
SHOTS = [{"text": "I was charged twice", "label": "billing"}, {"text": "Where is my parcel?", "label": "shipping"}]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def _reference_floor(texts: list[str], labels: list[str]):
    """The floor's definition written out with scikit-learn alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                         LogisticRegression(C=10.0, max_iter=2000)).fit(texts, labels)


def _spy_on_local_teachers(monkeypatch, seen: list) -> None:
    """Record every request evaluation sends to a local teacher (the teachers answer as ever)."""
    import protege.evaluation.classifier as evaluation

    real = evaluation.make_teacher

    def make(cfg):
        teacher = real(cfg)
        if teacher.kind == "local":
            answer = teacher.signals
            teacher.signals = lambda requests: (seen.extend((teacher.identity, r) for r in requests), answer(requests))[1]
        return teacher

    monkeypatch.setattr(evaluation, "make_teacher", make)


def _labeled_keys(db: Path) -> set[str]:
    return {k for (k,) in sql(db, "SELECT key FROM calls WHERE status = 'ok'")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir) -> Path:
    """label, train, eval of the tiny teacher (shown two worked examples) and a tiny scratch student on 60
    demo texts; the run's folder. ``timed.json`` holds the cache keys of the requests evaluation timed."""
    root = tmp_path_factory.mktemp("floor-run")
    write_jsonl(root / "data.jsonl", make_examples(60, seed=3))
    recipe = {
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS,
                 "examples": SHOTS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": f"hf:{tiny_lm_dir}", "batch_size": 4},
        "student": {"model": str(tiny_classifier_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2},
        "training": {"epochs": 2, "batch_size": 8},
        "eval": {"latency_samples": 4},
        "output_dir": "out",
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    seen: list = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_on_local_teachers(mp, seen)
        res = CliRunner().invoke(cli, ["run", str(root / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    (root / "timed.json").write_text(json.dumps([[call_key(i, r.to_json()), len(r.examples)] for i, r in seen]))
    return root


@pytest.fixture(scope="module")
def student_probs(run) -> np.ndarray:
    """The distilled student's probabilities on the held-out texts, from transformers alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = run / "out"
    model = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    tok = AutoTokenizer.from_pretrained(out / "student")
    texts = [r["text"] for r in _rows(out / "signals/eval.jsonl")]
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")  # student.max_length
        return torch.softmax(model(**enc).logits.float(), -1).numpy()


def _report(run: Path) -> tuple[dict, str]:
    return json.loads((run / "out/report.json").read_text()), (run / "out/report.md").read_text()


# --------------------------------------------------------------------------------------------------------------
# the floor


def test_the_floor_is_a_row_of_the_report_with_its_size_speed_and_price(run):
    report, md = _report(run)
    f = report["models"]["floor"]
    assert f["name"] == FLOOR_NAME and f["price_source"] == "compute"
    assert 0.0 <= f["accuracy"] <= 1.0 and 0.0 <= f["agreement_with_teacher"] <= 1.0 and 0.0 <= f["ece"] <= 1.0
    assert f["size_bytes"] > 1000 and f["parameters"] > 0
    assert f["train_examples"] == len(_rows(run / "out/signals/train.jsonl")) == 45
    assert f["latency_ms_p95"] >= f["latency_ms_p50"] > 0 and f["throughput_per_s"] > 0 and f["usd_per_1k"] > 0
    assert f["quality_kept"] == pytest.approx(f["accuracy"] / report["models"]["teacher"]["accuracy"])
    assert list(report["models"]) == ["teacher", "student", "student-hard", "floor"]
    assert f"| {FLOOR_NAME} | " in md
    # the report says where the floor stands against the distilled student, with both figures
    kd = report["models"]["student"]
    verdict = next(line for line in md.splitlines() if "linear model (TF-IDF + logistic regression" in line)
    assert f"accuracy {100 * f['accuracy']:.1f}% against the distilled student's {100 * kd['accuracy']:.1f}%" in verdict
    se = math.sqrt(kd["accuracy"] * (1 - kd["accuracy"]) / report["eval_with_gold"])
    if f["accuracy"] > kd["accuracy"] + se:
        assert verdict.startswith("**The floor beats the student:**")
    elif f["accuracy"] >= kd["accuracy"] - se:
        assert verdict.startswith("**The floor matches the student:**")
    else:
        assert verdict.startswith("The distilled student beats the floor")


def test_the_floor_is_fitted_on_the_teacher_labels_of_every_training_text(run):
    report, _ = _report(run)
    train, held = _rows(run / "out/signals/train.jsonl"), _rows(run / "out/signals/eval.jsonl")
    ref = _reference_floor([r["text"] for r in train], [r["teacher_label"] for r in train])
    pred = ref.predict([r["text"] for r in held])
    f = report["models"]["floor"]
    assert f["agreement_with_teacher"] == pytest.approx(np.mean([p == r["teacher_label"] for p, r in zip(pred, held)]))
    assert f["accuracy"] == pytest.approx(np.mean([p == r["gold"] for p, r in zip(pred, held)]))

    # other teacher labels, another floor: the evaluation reads them from signals/train.jsonl (gold is unused)
    other = run.parent / "floor-permuted"
    shutil.copytree(run, other)
    shift = {a: NAMES[(i + 1) % len(NAMES)] for i, a in enumerate(NAMES)}
    write_jsonl(other / "out/signals/train.jsonl", [{**r, "teacher_label": shift[r["teacher_label"]]} for r in train])
    res = CliRunner().invoke(cli, ["eval", str(other / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    g = json.loads((other / "out/report.json").read_text())["models"]["floor"]
    ref = _reference_floor([r["text"] for r in train], [shift[r["teacher_label"]] for r in train])
    pred2 = ref.predict([r["text"] for r in held])
    assert g["agreement_with_teacher"] == pytest.approx(np.mean([p == r["teacher_label"] for p, r in zip(pred2, held)]))
    assert g["accuracy"] == pytest.approx(np.mean([p == r["gold"] for p, r in zip(pred2, held)]))
    # relabelling the classes relabels the floor's answers: the objective is symmetric in the classes
    assert [shift[p] for p in pred] == list(pred2)


def test_floor_probabilities_follow_the_task_label_order_and_a_one_label_teacher_gives_a_constant_floor():
    rows = make_examples(80, seed=5)
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    pipe = fit_floor(texts[:60], gold[:60], seed=0)
    probs = floor_probs(pipe, texts[60:], NAMES[::-1])  # (20, 5), columns in the order asked
    assert probs.shape == (20, 5) and np.allclose(probs.sum(1), 1.0)
    ref = _reference_floor(texts[:60], gold[:60])
    assert [NAMES[::-1][j] for j in probs.argmax(1)] == list(ref.predict(texts[60:]))

    const = floor_probs(fit_floor(texts[:10], ["billing"] * 10, seed=0), texts[60:], NAMES)
    assert (const[:, NAMES.index("billing")] == 1.0).all() and const.sum() == 20


# --------------------------------------------------------------------------------------------------------------
# the teacher's figures


def test_a_local_teacher_is_timed_on_the_requests_labeling_sent_it_few_shot_turns_included(run):
    timed = json.loads((run / "timed.json").read_text())
    held = {r["call_key"] for r in _rows(run / "out/signals/eval.jsonl")}
    assert len(timed) >= 4 + 1 + 4  # warm-up, latency samples, then the batch
    assert {k for k, _ in timed} <= held  # every timed request is one labeling asked (and the store cached)
    assert {n for _, n in timed} == {len(SHOTS)}  # each with the task's worked examples


def test_an_ensemble_teacher_sums_its_members_latency_and_price(tmp_path, openai_fake, tiny_lm_dir, tiny_classifier_dir):
    write_jsonl(tmp_path / "data.jsonl", make_examples(40, seed=3))
    api = {"model": "openai:fake", "provider": "llamacpp", "base_url": "https://api.fake-openai.test/v1",
           "max_tokens": 3, "concurrency": 4}
    recipe = {
        "task": {"instruction": "Classify the customer support message by its intent.", "labels": LABELS,
                 "examples": SHOTS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "ensemble:mean",
                    "members": [{"model": f"hf:{tiny_lm_dir}", "batch_size": 4}, api]},
        "student": {"model": str(tiny_classifier_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2},
        "training": {"epochs": 1, "batch_size": 8},
        "eval": {"latency_samples": 4, "cascade_sweep": False},
        "output_dir": "out",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(cli, ["label", str(tmp_path / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    sent = openai_fake.received
    seen: list = []
    with pytest.MonkeyPatch.context() as mp:
        _spy_on_local_teachers(mp, seen)
        res = CliRunner().invoke(cli, ["eval", str(tmp_path / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    assert openai_fake.received == sent  # the API member's figures are what labeling recorded, never a new call

    report, md = _report(tmp_path)
    t = report["models"]["teacher"]
    local, remote = t["members"]
    assert (local["kind"], remote["kind"]) == ("local", "api") and local["parameters"] > 0
    assert t["parameters"] is None  # an API member's size is unknown
    assert t["usd_per_1k"] == pytest.approx(local["usd_per_1k"] + remote["usd_per_1k"])
    assert t["throughput_per_s"] == pytest.approx(1 / (1 / local["throughput_per_s"] + 1 / remote["throughput_per_s"]))
    # per text the members' times add up, and a sum of non-negative times is at least each of them, so each
    # order statistic of the ensemble's times is at least that of either member's
    for q in ("latency_ms_p50", "latency_ms_p95"):
        assert t[q] >= max(local[q], remote[q]) - 1e-9
    # the API member's times are the ones recorded for its held-out calls
    labeled = _labeled_keys(tmp_path / "out/protege.db")
    recorded = sorted(s * 1e3 for (s,) in sql(tmp_path / "out/protege.db",
                                              "SELECT seconds FROM calls WHERE status = 'ok'"))
    assert recorded[0] <= remote["latency_ms_p50"] <= recorded[-1]
    assert seen and all(call_key(i, r.to_json()) in labeled and len(r.examples) == len(SHOTS) for i, r in seen)
    assert "The teacher is an ensemble of 2 members" in md and "its parameters are not counted" in md
    assert md.splitlines()[0].startswith("# protege report: teacher ") and "fewer parameters" not in md.splitlines()[0]


# --------------------------------------------------------------------------------------------------------------
# per label, confusion, disagreements


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _hand_per_label(pred: list[str], gold: list[str]) -> dict:
    out = {}
    for name in NAMES:
        support = sum(g == name for g in gold)
        given = sum(p == name for p in pred)
        hit = sum(p == g == name for p, g in zip(pred, gold))
        out[name] = {"support": support, "recall": hit / support if support else None,
                     "precision": hit / given if given else None}
    return out


def test_per_label_recall_and_precision_equal_a_hand_count(run, student_probs):
    report, md = _report(run)
    held = _rows(run / "out/signals/eval.jsonl")
    gold = [r["gold"] for r in held]
    teacher = [NAMES[int(np.argmax(r["teacher_probs"]))] for r in held]
    student = [NAMES[j] for j in student_probs.argmax(1)]
    for key, pred in (("teacher", teacher), ("student", student)):
        got = report["models"][key]["per_label"]
        want = _hand_per_label(pred, gold)
        assert got.keys() == want.keys()
        for name in NAMES:
            assert got[name]["support"] == want[name]["support"]
            for k in ("recall", "precision"):
                assert got[name][k] == (None if want[name][k] is None else pytest.approx(want[name][k])), (key, name, k)
    assert sum(v["support"] for v in report["models"]["floor"]["per_label"].values()) == 15
    assert "## Per label" in md
    head = f"| gold label | support | teacher | distilled student | hard-label student | {FLOOR_NAME} |"
    lines = md.splitlines()
    table = lines[lines.index(head) + 2 : lines.index(head) + 2 + len(NAMES)]
    for name, line in zip(NAMES, table):
        r = report["models"]["teacher"]["per_label"][name]
        assert line.startswith(f"| {name} | {r['support']} | {_pct(r['recall'])} / {_pct(r['precision'])} |")


def test_the_confusion_plot_sits_beside_the_others(run):
    report, md = _report(run)
    assert "plots/confusion.png" in report["plots"]
    assert (run / "out/plots/confusion.png").stat().st_size > 5000
    assert "![confusion](plots/confusion.png)" in md


def test_the_disagreement_table_lists_the_most_divergent_texts_where_the_top_labels_differ(run, student_probs):
    report, md = _report(run)
    held = _rows(run / "out/signals/eval.jsonl")
    t = np.array([r["teacher_probs"] for r in held])  # (15, 5)
    s = student_probs
    differ = [i for i in range(len(held)) if t[i].argmax() != s[i].argmax()]
    kl = {i: float(sum(p * math.log(p / max(q, 1e-12)) for p, q in zip(t[i], s[i]) if p > 0)) for i in differ}
    d = report["disagreements"]
    assert d["student"] == "student"
    rows = d["rows"]
    assert len(rows) == min(10, len(differ))
    index = {r["id"]: i for i, r in enumerate(held)}
    shown = [index[r["id"]] for r in rows]
    assert set(shown) <= set(differ) and len(set(shown)) == len(shown)
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)
    # the student's float32 probabilities give KLs equal to about 1e-8 here: compare with that slack
    assert all(kl[i] <= rows[-1]["kl"] + 1e-6 for i in set(differ) - set(shown))
    for r, i in zip(rows, shown):
        assert r["kl"] == pytest.approx(kl[i], rel=1e-4, abs=1e-6)
        assert r["teacher"] == NAMES[t[i].argmax()] and r["student"] == NAMES[s[i].argmax()] != r["teacher"]
        assert r["teacher_confidence"] == pytest.approx(t[i].max()) and r["gold"] == held[i]["gold"]
        assert r["student_confidence"] == pytest.approx(float(s[i].max()), rel=1e-4)
    assert (1 - report["models"]["student"]["agreement_with_teacher"]) * len(held) == pytest.approx(len(differ))

    lines = md.splitlines()
    head = lines.index("| text | gold | teacher (confidence) | student (confidence) | KL |")
    table = []
    for line in lines[head + 2 :]:
        if not line.startswith("| "):
            break
        table.append(line)
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        assert line.startswith(f"| {md_cell(r['text'])} | {r['gold']} | {r['teacher']} ({r['teacher_confidence']:.2f}) |")


def test_a_text_becomes_one_safe_table_cell():
    assert md_cell("a | b\n\nc *d* <br> `x`") == "a \\| b c \\*d\\* \\<br\\> \\`x\\`"
    long = md_cell("word " * 60)
    assert len(long) == 120 and long.endswith("…")
    assert md_cell("#1 [link](u) _x_ \\") == "\\#1 \\[link\\](u) \\_x\\_ \\\\"


# --------------------------------------------------------------------------------------------------------------
# the first line


def test_the_first_line_carries_the_headline_numbers_and_the_warnings_stay(run):
    report, md = _report(run)
    t, kd = report["models"]["teacher"], report["models"]["student"]
    assert md.splitlines()[0] == (
        f"# protege report: teacher {100 * t['accuracy']:.1f}% right vs 20.0% by chance; distilled student "
        f"{100 * kd['accuracy']:.1f}%, keeping {100 * kd['quality_kept']:.1f}% of it, at "
        f"{100 * kd['latency_ms_p50'] / t['latency_ms_p50']:.1f}% of the teacher's p50 latency with "
        f"{t['parameters'] / kd['parameters']:.1f}x fewer parameters"
    )
    assert "How good is the teacher?" in md
    if t["accuracy"] < 0.25:  # a random 2-layer teacher: the report must say it is guessing
        assert "no better than guessing" in md and "use a stronger teacher" in md


# --------------------------------------------------------------------------------------------------------------
# what training chose without gold labels


def test_model_selection_and_the_sweep_are_rendered_when_the_student_card_has_them(run):
    _, md = _report(run)
    assert "## Model selection" not in md and "## Sweep" not in md  # the plain run has neither

    other = run.parent / "floor-selected"
    shutil.copytree(run, other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["training"] |= {"select_fraction": 0.2, "eval_every": 2, "sweep_alpha": [0.5, 1.0]}
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = CliRunner().invoke(cli, ["run", str(other / "recipe.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    report, md = _report(other)
    kd = report["models"]["student"]
    sel, sweep = kd["selection"], kd["sweep"]
    assert sel["metric"] == "kl" and [t["alpha"] for t in sweep["trials"]] == [0.5, 1.0]

    stop = f"stopped early after {sel['steps_trained']} steps" if sel["stopped_early"] \
        else f"trained all {sel['steps_trained']} steps"
    assert "## Model selection" in md
    assert (f"- distilled student: kept the checkpoint of step **{sel['best_step']}** of {sel['steps_trained']} "
            f"by KL to the teacher (lower is better) on {sel['rows']} teacher-labelled training texts held out of "
            f"training (no gold label); {stop}.") in md
    assert "## Sweep (distilled student)" in md
    for tr in sweep["trials"]:
        chosen = "yes" if (tr["alpha"], tr["temperature"]) == (sweep["chosen"]["alpha"], sweep["chosen"]["temperature"]) \
            else ""
        assert (f"| {tr['alpha']:g} | {tr['temperature']:g} | {tr['kl']:.4g} | {100 * tr['agreement']:.1f}% | "
                f"{tr['best_step']} | {chosen} |") in md
    assert sum(line.endswith("| yes |") for line in md.splitlines()) == 1
