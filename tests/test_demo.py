"""`protege demo` with the real packaged models (SmolLM2-135M-Instruct teaches all-MiniLM-L6-v2).

Minutes on CPU: this is the end-to-end check of the README's first command."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from protege.cli import cli

pytestmark = pytest.mark.slow


def test_demo_runs_offline_and_rerun_makes_zero_calls(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--output-dir", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "label: 300 teacher calls, 0 answers from the store" in res.output

    report = json.loads((out / "report.json").read_text())
    t, kd, hard = (report["models"][k] for k in ("teacher", "student", "student-hard"))
    assert report["eval_examples"] == 60 and report["eval_with_gold"] == 60
    assert t["parameters"] > 5 * kd["parameters"]  # 134.5M vs 22.7M
    assert t["signal_method"] == ["label_logprobs"]
    for m in (t, kd, hard):
        assert 0.0 <= m["accuracy"] <= 1.0 and m["latency_ms_p50"] > 0 and m["usd_per_1k"] > 0
    assert "How good is the teacher?" in (out / "report.md").read_text()

    res = CliRunner().invoke(cli, ["demo", "--output-dir", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "label: 0 teacher calls, 300 answers from the store" in res.output
    with sqlite3.connect(out / "protege.db") as c:
        assert c.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 300
