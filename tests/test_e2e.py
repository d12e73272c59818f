"""The whole loop through the CLI on tiny models: label, train, eval; artifacts; rerun makes zero calls."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from protege.cli import cli


def _calls(db) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


def test_run_end_to_end_then_rerun_makes_zero_calls(tiny_recipe):
    out = tiny_recipe.parent / "out"
    runner = CliRunner()
    res = runner.invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    assert "label: 60 teacher calls, 0 answers from the store" in res.output

    for rel in ["protege.db", "signals/train.jsonl", "signals/eval.jsonl", "student/model.safetensors",
                "student/protege.json", "student-hard/model.safetensors", "report.json", "report.md",
                "recipe.yaml", "plots/reliability.png", "plots/accuracy_vs_cost.png"]:
        assert (out / rel).is_file(), rel
    assert _calls(out / "protege.db") == 60
    train_rows = [json.loads(x) for x in (out / "signals/train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 45 and all(abs(sum(r["teacher_probs"]) - 1) < 1e-6 for r in train_rows)

    report = json.loads((out / "report.json").read_text())
    t, kd, hard = (report["models"][k] for k in ("teacher", "student", "student-hard"))
    assert report["eval_examples"] == 15 and report["eval_with_gold"] == 15
    for m in (t, kd, hard):
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
        assert m["latency_ms_p95"] >= m["latency_ms_p50"] > 0 and m["throughput_per_s"] > 0 and m["usd_per_1k"] > 0
    assert kd["alpha"] == 0.9 and hard["alpha"] == 0.0 and kd["parameters"] == hard["parameters"]
    assert kd["quality_kept"] == pytest.approx(kd["accuracy"] / t["accuracy"]) if t["accuracy"] else True
    assert "How good is the teacher?" in (out / "report.md").read_text()

    # the student loads with transformers alone and knows its label names
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert list(model.config.id2label.values()) == ["billing", "shipping", "technical", "account", "cancellation"]

    mtime = (out / "student/model.safetensors").stat().st_mtime_ns
    res = runner.invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    assert "label: 0 teacher calls, 60 answers from the store" in res.output
    assert "up to date, skipped" in res.output
    assert _calls(out / "protege.db") == 60
    assert (out / "student/model.safetensors").stat().st_mtime_ns == mtime

    # a changed training setting retrains, but still buys nothing from the teacher
    res = runner.invoke(cli, ["run", str(tiny_recipe), "-q", "--training.alpha", "0.5"])
    assert res.exit_code == 0, res.output
    assert "label: 0 teacher calls" in res.output and "train student: " in res.output
    assert json.loads((out / "student/protege.json").read_text())["alpha"] == 0.5


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--training.alpha", "2", "training.alpha"),
        ("--data.path", "missing.jsonl", "does not exist"),
        ("--data.text_column", "body", "no 'body' column"),
        ("--output_dir", "data.jsonl", "is a file"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_recipe, flag, value, message, monkeypatch):
    monkeypatch.chdir(tiny_recipe.parent)  # a path on the command line is relative to where the user is
    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q", flag, value])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not (tiny_recipe.parent / "out").exists()


def test_bad_row_names_file_and_line(tiny_recipe):
    data = tiny_recipe.parent / "data.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"id": "x", "text": "my card was charged twice", "label": "refunds"})
    data.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(cli, ["label", str(tiny_recipe), "-q"])
    assert res.exit_code == 2
    assert f"{data}:5: label 'refunds' is not one of the task's labels" in res.output
    assert not (tiny_recipe.parent / "out").exists()


def test_train_before_label_says_what_to_run(tiny_recipe):
    res = CliRunner().invoke(cli, ["train", str(tiny_recipe), "-q"])
    assert res.exit_code == 2 and "run `protege label` first" in res.output
