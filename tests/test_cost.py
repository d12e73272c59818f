"""One cost ledger: the served-traffic table, `protege cost` over a hand-made store, and the cascade's threshold
sweep on hand-made numbers (and in a real evaluation of the tiny loop)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from protege.cli import cli
from protege.cost import lifetime
from protege.errors import ProtegeError
from protege.evaluation.sweep import ALWAYS_TEACHER, cascade_sweep, sweep
from protege.signals import LabelDistribution, TeacherSignal
from protege.store import CallRecord, ServedRecord, Store

# --------------------------------------------------------------------------------------------------------------
# the sweep, by hand
#
# five texts, two labels; the student's top probabilities are 0.95, 0.6, 0.7, 0.55, 0.8
S = np.array([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45], [0.2, 0.8]])  # student predicts 0 0 1 0 1
T = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.7, 0.3]])  # teacher predicts 0 1 1 1 0
GOLD = np.array([0, 1, 1, 1, 1])
GRID = [0.0, 0.6, 0.75, 0.9, ALWAYS_TEACHER]


def test_sweep_accuracy_and_cost_by_hand():
    r = cascade_sweep(S, T, GOLD, np.ones(5, bool), student_usd_per_1k=1.0, teacher_usd_per_1k=10.0,
                      keep_fraction=0.95, thresholds=GRID)
    assert r["metric"] == "accuracy"
    assert r["teacher_accuracy"] == pytest.approx(0.8) and r["student_accuracy"] == pytest.approx(0.6)
    assert r["target_accuracy"] == pytest.approx(0.76)
    got = [(p["threshold"], p["accuracy"], p["teacher_fraction"], p["usd_per_1k"]) for p in r["points"]]
    # t=0.6: only the 0.55 text goes to the teacher (right where the student was wrong): 4/5 for 1 + 0.2*10
    # t=0.75: texts at 0.6, 0.7, 0.55 go: all five right, 1 + 0.6*10
    # t=0.9: all but the 0.95 text go: the teacher's 4/5; 1.01: everything goes, 1 + 10
    want = [(0.0, 0.6, 0.0, 1.0), (0.6, 0.8, 0.2, 3.0), (0.75, 1.0, 0.6, 7.0), (0.9, 0.8, 0.8, 9.0),
            (ALWAYS_TEACHER, 0.8, 1.0, 11.0)]
    assert got == [pytest.approx(w) for w in want]
    assert r["chosen"]["threshold"] == 0.6 and r["chosen"]["usd_per_1k"] == pytest.approx(3.0)

    # a free teacher: every threshold costs the same, and the lowest one that reaches the target wins
    r = cascade_sweep(S, T, GOLD, np.ones(5, bool), 1.0, 0.0, keep_fraction=1.0, thresholds=GRID)
    assert [p["usd_per_1k"] for p in r["points"]] == [1.0] * 5
    assert r["chosen"]["threshold"] == 0.6  # 0.0 gives 0.6 < 0.8; 0.6 gives 0.8 = all of the teacher's


def test_sweep_without_gold_measures_agreement_with_the_teacher():
    r = cascade_sweep(S, T, np.full(5, -1), np.zeros(5, bool), 1.0, 10.0, keep_fraction=0.95, thresholds=GRID)
    assert r["metric"] == "agreement_with_teacher" and r["teacher_accuracy"] == 1.0
    assert [p["accuracy"] for p in r["points"]] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])
    assert r["chosen"]["threshold"] == 0.9 and r["chosen"]["usd_per_1k"] == pytest.approx(9.0)


def test_sweep_default_grid_runs_from_all_student_to_all_teacher():
    r = cascade_sweep(S, T, GOLD, np.ones(5, bool), 1.0, 10.0)
    ts = [p["threshold"] for p in r["points"]]
    assert len(ts) == 102 and ts[0] == 0.0 and ts[-2] == 1.0 and ts[-1] == ALWAYS_TEACHER
    assert r["points"][0]["usd_per_1k"] == 1.0 and r["points"][-1]["teacher_fraction"] == 1.0
    costs = [p["usd_per_1k"] for p in r["points"]]
    assert costs == sorted(costs)  # a higher threshold never sends fewer texts to the teacher
    # the cheapest grid point at or above 0.76 accuracy: any threshold in (0.55, 0.6] gives 0.8 at cost 3
    assert r["chosen"]["threshold"] == 0.56 and r["chosen"]["usd_per_1k"] == pytest.approx(3.0)


def test_generic_sweep_with_graded_scores_and_unscored_rows_by_hand():
    """What an LM student's sweep gets: scores in [0, 1] (e.g. similarity to a reference) and rows without a
    reference, which are routed and paid for but not scored."""
    conf = np.array([0.9, 0.5, 0.3, 0.7])
    s_score = np.array([1.0, 0.25, 0.0, 0.5])
    t_score = np.array([1.0, 1.0, 0.5, 0.0])
    scored = np.array([True, True, True, False])
    r = sweep(conf, s_score, t_score, scored, "similarity", "geometric mean token probability", 2.0, 20.0,
              keep_fraction=0.9, thresholds=[0.0, 0.4, 0.6, 1.01])
    assert r["rows"] == 3 and r["metric"] == "similarity"
    assert r["teacher_accuracy"] == pytest.approx(2.5 / 3) and r["student_accuracy"] == pytest.approx(1.25 / 3)
    got = [(p["accuracy"], p["teacher_fraction"], p["usd_per_1k"]) for p in r["points"]]
    # t=0.4: the 0.3 row goes (0 -> 0.5); t=0.6: the 0.5 row too (0.25 -> 1); the unscored 0.7 row stays
    want = [(1.25 / 3, 0.0, 2.0), (1.75 / 3, 0.25, 7.0), (2.5 / 3, 0.5, 12.0), (2.5 / 3, 1.0, 22.0)]
    assert got == [pytest.approx(w) for w in want]
    assert r["chosen"]["threshold"] == 0.6  # 0.9 of 2.5/3 = 0.75: only 0.6 and above reach it; 0.6 is cheaper


# --------------------------------------------------------------------------------------------------------------
# the served table


def test_served_rows_total_by_who_answered(tmp_path):
    with Store(tmp_path / "s.db") as store:
        assert "0004_served" in store.migrations
        store.record_served([
            ServedRecord("stu", "classify", "student", 10, 0, 0.001, 0.0, 0.5, 0.9),
            ServedRecord("stu", "chat.completions", "student", 12, 1, 0.002, 0.0, 0.7, 0.8),
            ServedRecord("stu", "classify", "teacher", 100, 3, 0.051, 0.05, 1.5, 0.4, "k1", False),
            ServedRecord("stu", "classify", "teacher", 100, 3, 0.001, 0.0, 0.5, 0.3, "k1", True),
            ServedRecord("stu", "classify", "none", 0, 0, 0.001, 0.0, 0.5, 0.2, "k2", False, "teacher failed"),
            ServedRecord("other", "classify", "student", 5, 0, 1.0, 0.0, 9.0, 0.99),
        ])
        totals = store.served_totals("stu")
        assert set(totals) == {"student", "teacher", "none"}
        assert totals["student"] == pytest.approx({"requests": 2, "input_tokens": 22, "output_tokens": 1,
                                                   "cost_usd": 0.003, "teacher_usd": 0.0, "seconds": 1.2, "cached": 0})
        assert totals["teacher"] == pytest.approx({"requests": 2, "input_tokens": 200, "output_tokens": 6,
                                                   "cost_usd": 0.052, "teacher_usd": 0.05, "seconds": 2.0, "cached": 1})
        assert totals["none"]["requests"] == 1
        assert store.served_totals()["student"]["requests"] == 3  # every student together
        row = store.db.execute("SELECT error, call_key, cached FROM served WHERE answered_by = 'none'").fetchone()
        assert row == ("teacher failed", "k2", 0)


def test_served_rows_need_a_known_answerer(tmp_path):
    import sqlite3

    with Store(tmp_path / "s.db") as store, pytest.raises(sqlite3.IntegrityError):
        store.record_served([ServedRecord("stu", "classify", "somebody", 1)])
    with Store(tmp_path / "s.db") as store:
        assert store.served_totals() == {}  # the failed batch left nothing behind


# --------------------------------------------------------------------------------------------------------------
# protege cost over a hand-made run


def _signal() -> TeacherSignal:
    return TeacherSignal(LabelDistribution(("positive", "negative"), (0.7, 0.3), "label_logprobs"))


def make_run(tmp_path, student_row_usd: float = 0.0001, served: bool = True):
    """A run directory as `protege run` leaves it, with a store filled by hand:

    labeling: 3 answered calls at $0.002, one failed call that may have been billed $0.001; compute: label 10 s
    (API teacher: $0), train 36 s, eval 18 s at $3.60/hour ($0.036 + $0.018). Serving: 8 student answers, one
    teacher fallback that made a new call ($0.003) and one the store already held.
    """
    (tmp_path / "data.jsonl").write_text("")
    recipe = {
        "task": {"instruction": "Is the review positive or negative?", "labels": ["positive", "negative"]},
        "data": {"path": "data.jsonl"},
        "teacher": {"model": "openai:gpt-4o-mini"},
        "eval": {"compute_usd_per_hour": 3.6},
        "output_dir": "run",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "protege.json").write_text("{}")
    req = {"messages": [], "labels": ["positive", "negative"]}
    with Store(run / "protege.db") as store:
        store.put([CallRecord(f"k{i}", "openai:gpt-4o-mini", req, _signal(), input_tokens=100, output_tokens=2,
                              cost_usd=0.002) for i in range(3)])
        store.put([CallRecord("k-failed", "openai:gpt-4o-mini", req, None, error="timeout", uncertain_usd=0.001)])
        store.log_compute("label", 10.0, 0.0, rows=4)
        store.log_compute("train:student", 36.0)
        store.log_compute("eval", 18.0)
        if served:
            store.put([CallRecord("k-serve", "openai:gpt-4o-mini", req, _signal(), input_tokens=120,
                                  output_tokens=2, cost_usd=0.003)])
            s = student_row_usd
            store.record_served(
                [ServedRecord("student", "classify", "student", 20, 0, s, 0.0, 0.1, 0.9) for _ in range(8)]
                + [ServedRecord("student", "classify", "teacher", 120, 2, s + 0.003, 0.003, 1.1, 0.5, "k-serve", False),
                   ServedRecord("student", "chat.completions", "teacher", 100, 2, s, 0.0, 0.1, 0.4, "k0", True)]
            )
    return path, run


def test_lifetime_adds_up_by_hand(tmp_path):
    recipe, run = make_run(tmp_path)
    d = lifetime(recipe)
    m, s, v = d["make"], d["serving"], d["savings"]
    # making it: every call but the one serving made; compute at $3.60/hour
    assert m["teacher_calls"] == 4 and m["teacher_usd"] == pytest.approx(0.007)
    assert m["teacher_input_tokens"] == 300 and m["teacher_output_tokens"] == 6
    assert m["compute"]["train:student"]["usd"] == pytest.approx(0.036)
    assert m["compute"]["eval"]["usd"] == pytest.approx(0.018) and m["compute"]["label"]["usd"] == 0.0
    assert m["total_usd"] == pytest.approx(0.061)
    # serving it: 10 requests, $0.004 in all, $0.003 of it the teacher's
    assert s["requests"] == 10 and s["student_answers"]["requests"] == 8
    assert s["teacher_answers"]["requests"] == 2 and s["teacher_answers"]["cached"] == 1
    assert s["teacher_answers"]["input_tokens"] == 220
    assert s["total_usd"] == pytest.approx(0.004) and s["teacher_usd"] == pytest.approx(0.003)
    assert s["student_compute_usd"] == pytest.approx(0.001)
    # against the teacher: its mean answered call cost (3 x 0.002 + 0.003) / 4
    assert v["teacher_usd_per_request"] == pytest.approx(0.00225)
    assert v["served_usd_per_request"] == pytest.approx(0.0004)
    assert v["all_to_teacher_usd"] == pytest.approx(0.0225) and v["saved_usd"] == pytest.approx(0.0185)
    assert v["saving_per_request_usd"] == pytest.approx(0.00185)
    assert d["payback_requests"] == math.ceil(0.061 / 0.00185) == 33
    assert d["payback"] == "after 33 requests (23 to go)"

    # the same run named by its directory, or by its student's directory, gives the same ledger
    (run / "student" / "recipe.yaml").write_text(recipe.read_text().replace("output_dir: run", f"output_dir: {run}"))
    assert lifetime(run) == d
    assert lifetime(run / "student") == d
    # another compute price reprices training and evaluation, not what serving recorded
    d2 = lifetime(recipe, compute_usd_per_hour=0.0)
    assert d2["make"]["total_usd"] == pytest.approx(0.007) and d2["serving"]["total_usd"] == pytest.approx(0.004)


def test_lifetime_says_never_when_serving_costs_more_than_the_teacher(tmp_path):
    recipe, _ = make_run(tmp_path, student_row_usd=0.01)  # a very expensive machine
    d = lifetime(recipe)
    assert d["savings"]["saving_per_request_usd"] < 0 and d["payback_requests"] is None
    assert d["payback"].startswith("never")


def test_lifetime_before_serving_estimates_from_the_report(tmp_path):
    recipe, run = make_run(tmp_path, served=False)
    d = lifetime(recipe)
    assert d["serving"]["requests"] == 0 and d["savings"]["served_usd_per_request"] is None
    assert d["payback"].startswith("unknown")
    (run / "report.json").write_text(json.dumps({"models": {"student": {"usd_per_1k": 0.05}}}))
    d = lifetime(recipe)
    assert d["savings"]["served_usd_per_request"] == pytest.approx(0.00005)
    assert d["savings"]["teacher_usd_per_request"] == pytest.approx(0.002)  # labeling's 3 answered calls
    assert d["payback_requests"] == math.ceil(0.061 / (0.002 - 0.00005))


def test_cost_cli_table_json_and_bad_input(tmp_path):
    recipe, run = make_run(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["cost", str(recipe)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("cost of student (teacher openai:gpt-4o-mini)")
    assert any(x.startswith("  teacher calls (labeling)") and x.endswith("$0.007000") for x in lines)
    assert any(x.startswith("  saved so far") and x.endswith("$0.018500") for x in lines)
    assert "after 33 requests (23 to go)" in res.output

    res = runner.invoke(cli, ["cost", str(recipe), "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == json.loads(json.dumps(lifetime(recipe)))

    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(cli, ["cost", str(empty)])
    assert res.exit_code == 2 and "holds no saved recipe" in res.output
    (run / "protege.db").rename(tmp_path / "moved.db")
    res = runner.invoke(cli, ["cost", str(recipe)])
    assert res.exit_code == 2 and "no store at" in res.output and "protege run" in res.output
    (tmp_path / "moved.db").rename(run / "protege.db")
    res = runner.invoke(cli, ["cost", str(recipe), "--student", "student-hard"])
    assert res.exit_code == 2 and "no trained student 'student-hard'" in res.output
    with pytest.raises(ProtegeError, match="does not exist"):
        lifetime(tmp_path / "nowhere.yaml")


# --------------------------------------------------------------------------------------------------------------
# the sweep in a real evaluation


def test_eval_report_has_the_cascade_section_and_plot(tiny_recipe):
    out = tiny_recipe.parent / "out"
    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q", "--eval.keep_fraction", "0.9"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    c, models = report["cascade"], report["models"]
    assert c["student"] == "student" and c["keep_fraction"] == 0.9 and c["metric"] == "accuracy"
    assert c["teacher_accuracy"] == pytest.approx(models["teacher"]["accuracy"])
    assert c["student_accuracy"] == pytest.approx(models["student"]["accuracy"])
    first, last = c["points"][0], c["points"][-1]
    assert first == {"threshold": 0.0, "accuracy": pytest.approx(models["student"]["accuracy"]),
                     "teacher_fraction": 0.0, "usd_per_1k": pytest.approx(models["student"]["usd_per_1k"])}
    assert last["threshold"] == ALWAYS_TEACHER and last["teacher_fraction"] == 1.0
    assert last["accuracy"] == pytest.approx(models["teacher"]["accuracy"])
    assert last["usd_per_1k"] == pytest.approx(models["student"]["usd_per_1k"] + models["teacher"]["usd_per_1k"])
    ch = c["chosen"]
    assert ch["accuracy"] >= 0.9 * c["teacher_accuracy"] - 1e-12
    assert ch["usd_per_1k"] == min(p["usd_per_1k"] for p in c["points"] if p["accuracy"] >= c["target_accuracy"])
    assert "plots/cascade.png" in report["plots"] and (out / "plots" / "cascade.png").stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "## Cascade" in md and f"threshold **{ch['threshold']:g}**" in md and "![cascade](plots/cascade.png)" in md

    res = CliRunner().invoke(cli, ["eval", str(tiny_recipe), "-q", "--eval.cascade_sweep", "false"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert "cascade" not in report and "plots/cascade.png" not in report["plots"]
