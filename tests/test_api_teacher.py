"""The openai: teacher and the labeling engine against a real OpenAI-compatible server on loopback
(llama.cpp's, serving SmolLM2-135M-Instruct), with a fault-injecting proxy in front of it.

Every row must end labeled or recorded as failed with its reason; the calls that reached the proxy must equal
rows plus retries; spend must never pass the cap; the key must appear nowhere but the Authorization header.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_jsonl
from servers import FaultProxy, llama_server  # noqa: F401  (fixture)

from protege.cli import cli
from protege.errors import BudgetReached, PermanentError
from protege.labeling.labeler import label
from protege.recipe import load_recipe
from protege.store import Store

KEY = "sk-test-PROTEGE-SECRET-4242"


LABELS = ["positive", "negative"]
_GOOD = ["wonderful", "delightful", "excellent", "lovely", "superb", "charming", "great", "brilliant"]
_BAD = ["awful", "terrible", "dreadful", "boring", "horrible", "dull", "disappointing", "bad"]
_THINGS = ["film", "meal", "hotel", "book", "concert", "service", "phone", "game"]


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Short reviews (the 135M teacher puts visible mass on 'positive'/'negative' for these)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = i % 2 == 0
        word = rng.choice(_GOOD if good else _BAD)
        thing = _THINGS[(i // 2) % len(_THINGS)]
        out.append({"id": f"r{i:03d}", "text": f"The {thing} was {word}. #{i}", "label": LABELS[not good]})
    return out


def write_recipe(tmp_path: Path, base_url: str, rows: int, seed: int = 5, **teacher) -> Path:
    write_jsonl(tmp_path / "data.jsonl", reviews(rows, seed=seed))
    recipe = {
        "task": {"instruction": "Is the review positive or negative?", "labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {
            "model": "openai:smol",
            "provider": "llamacpp",
            "base_url": base_url,
            "max_tokens": 3,
            "concurrency": 4,
            "timeout_s": 120,  # a loaded machine slows llama.cpp many times over; a timeout here would be a retry the counts do not expect
            "max_retries": 6,
            **teacher,
        },
        "output_dir": "out",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def db_rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


@pytest.fixture
def proxy(llama_server):  # noqa: F811
    with FaultProxy(llama_server.base_url) as p:
        yield p


def test_logprob_labels_texts_and_token_logprobs_end_to_end(tmp_path, llama_server):  # noqa: F811
    recipe = write_recipe(tmp_path, llama_server.base_url, rows=12)
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    train, held = rows(out / "signals/train.jsonl"), rows(out / "signals/eval.jsonl")
    assert len(train) + len(held) == 12 and rows(out / "signals/failed.jsonl") == []
    for r in train + held:
        assert r["method"] == "label_logprobs" and r["teacher_label"] in LABELS
        assert abs(sum(r["teacher_probs"]) - 1) < 1e-6 and 0 < r["label_mass"] <= 1

    with Store(out / "protege.db") as store:
        signals = store.get_signals([r["call_key"] for r in train])
        totals = store.teacher_totals("openai:smol")
    assert totals["calls"] == 12 and totals["failed"] == 0 and totals["attempts"] == 12
    assert totals["input_tokens"] > 12 * 50 and 0 < totals["output_tokens"] <= 12 * 3
    assert totals["cost_usd"] == 0  # a local server costs nothing per token
    for s in signals.values():
        tl = s.token_logprobs
        assert tl.tokenizer == "llamacpp:smol" and tl.temperature == 1.0
        assert 1 <= len(tl.tokens) <= 3 and len(tl.top) == len(tl.tokens) == len(tl.tail_mass)
        assert all(len(top) == 20 for top in tl.top) and all(0 <= m <= 1 for m in tl.tail_mass)
        assert s.text and s.usage["input_tokens"] > 0

    # a rerun is answered from the store: zero calls
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 0 and "0 teacher calls, 12 from the store" in res.output

    # the dry run sees nothing left to call
    res = CliRunner().invoke(cli, ["label", str(recipe), "--dry-run"])
    assert res.exit_code == 0 and "12 already answered in the store, 0 to call" in res.output


def test_hard_label_samples_and_rationale_record_their_method(tmp_path, llama_server):  # noqa: F811
    recipe = write_recipe(
        tmp_path, llama_server.base_url, rows=4, label_method="samples", n_samples=3, max_tokens=4,
        max_failed_fraction=1.0, parse_retries=0,
    )
    r = load_recipe(recipe)
    label(r, quiet=True)
    ok = rows(r.output_dir / "signals/train.jsonl") + rows(r.output_dir / "signals/eval.jsonl")
    failed = rows(r.output_dir / "signals/failed.jsonl")
    assert len(ok) + len(failed) == 4
    for row in ok:
        assert row["method"] == "samples" and abs(sum(row["teacher_probs"]) - 1) < 1e-6
        # probabilities are counts out of the k <= 3 samples that named a label
        probs = row["teacher_probs"]
        assert any(all(abs(p * k - round(p * k)) < 1e-9 for p in probs) for k in (1, 2, 3))
        assert 0 < row["label_mass"] <= 1
    for row in failed:
        assert row["reason"].startswith("unparseable after 1 tries: none of 3 samples named a label") and row["raw"]

    recipe = write_recipe(
        tmp_path, llama_server.base_url, rows=4, rationale=True, label_method="hard_label", max_tokens=40,
        max_failed_fraction=1.0, parse_retries=1,
    )
    r = load_recipe(recipe, {"output_dir": "out-rationale"})
    label(r, quiet=True)
    ok = rows(r.output_dir / "signals/train.jsonl") + rows(r.output_dir / "signals/eval.jsonl")
    failed = rows(r.output_dir / "signals/failed.jsonl")
    assert len(ok) + len(failed) == 4
    assert all(row["method"] == "hard_label" and max(row["teacher_probs"]) == 1.0 for row in ok)
    for row in failed:  # a 135M model often forgets the 'Answer:' line: recorded, with what it said
        assert "unparseable after 2 tries" in row["reason"] and row["raw"] is not None
    for status, n in db_rows(r.store_path, "SELECT status, attempts FROM calls"):
        assert n == 2 if status == "failed" else n in (1, 2)


def test_faults_are_retried_and_every_call_is_counted(tmp_path, proxy):
    faults = ["429", "500", "503", "slow", "cut", "malformed"]
    proxy.slow_seconds = 40.0
    proxy.plan(faults)
    # one call at a time: the server is serial, so a queued call must not time out on its own; the timeout is
    # far above a normal call (0.5 s idle, over 10 s on a loaded machine) and far below the slow fault
    recipe = write_recipe(tmp_path, proxy.base_url, rows=8, concurrency=1, timeout_s=25.0)
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    assert stats.failed == 0 and stats.called == 8
    # each fault cost exactly one retry (answers naming no label cost a parse retry); the proxy saw every
    # attempt; faults before forwarding never reached the server, the others did (the server did the work,
    # the answer was lost on the way back)
    assert stats.attempts == 8 + len(faults) + stats.parse_retries == proxy.received
    assert proxy.forwarded == proxy.received - 3
    assert dict(proxy.by_kind) == {k: 1 for k in faults}
    (attempts,) = db_rows(r.store_path, "SELECT SUM(attempts) FROM calls")[0]
    assert attempts == stats.attempts


def test_a_row_that_keeps_failing_is_recorded_with_its_reason(tmp_path, proxy):
    proxy.plan(["500", "500", "500"])
    recipe = write_recipe(tmp_path, proxy.base_url, rows=4, concurrency=1, max_retries=2, max_failed_fraction=0.5)
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    assert stats.failed == 1 and stats.called == 4 and proxy.received == 3 + 3
    (failed,) = rows(r.output_dir / "signals/failed.jsonl")
    assert failed["reason"].startswith("gave up after 3 attempts: HTTP 500")
    # a rerun retries only the failed row
    stats = label(r, quiet=True)
    assert stats.called == 1 and stats.failed == 0 and stats.cached == 3
    assert rows(r.output_dir / "signals/failed.jsonl") == []


def test_a_permanent_error_stops_the_run_at_once(tmp_path, proxy, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEST_KEY", KEY)
    proxy.plan(["401"])
    recipe = write_recipe(tmp_path, proxy.base_url, rows=8, concurrency=1, api_key_env="PROTEGE_TEST_KEY")
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 2
    assert "HTTP 401" in res.output and "check the key in $PROTEGE_TEST_KEY" in res.output
    assert KEY not in res.output
    assert proxy.received == 1  # nothing else was sent
    assert not (tmp_path / "out/signals/train.jsonl").exists()


def test_budget_cap_holds_with_many_calls_in_flight_and_a_higher_cap_continues(tmp_path, proxy):
    # $1 per thousand input tokens: each row costs about $0.15-0.25, so a $1 cap stops after a few rows
    prices = {"price_input": 1000.0, "price_output": 1000.0, "concurrency": 8}
    recipe = write_recipe(tmp_path, proxy.base_url, rows=16, budget_usd=1.0, **prices)
    r = load_recipe(recipe)
    with pytest.raises(BudgetReached):
        label(r, quiet=True)
    with Store(r.store_path) as store:
        spent, done = store.spent(), store.teacher_totals()["calls"]
    assert 0 < spent <= 1.0 and 0 < done < 16
    assert proxy.forwarded == done  # nothing was sent that was not recorded

    # the same cap again: it may fit a row or two more (worst cases were reserved, actual costs were lower),
    # and stops again at the cap with exit code 3
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q", "--teacher.budget_usd", "1.0"])
    assert res.exit_code == 3 and "budget reached" in res.output and "rerun with a higher" in res.output
    with Store(r.store_path) as store:
        spent, done = store.spent(), store.teacher_totals()["calls"]
    assert spent <= 1.0 and done < 16 and proxy.forwarded == done

    r = load_recipe(recipe, {"teacher.budget_usd": 100.0})
    stats = label(r, quiet=True)
    with Store(r.store_path) as store:
        assert store.teacher_totals()["calls"] == 16 and store.spent() <= 100.0
    assert stats.cached == done and proxy.forwarded == 16  # no answer bought twice


def test_client_rate_limit_keeps_the_provider_from_refusing(tmp_path, proxy):
    proxy.limit_rpm(120)
    recipe = write_recipe(tmp_path, proxy.base_url, rows=6, concurrency=6, requests_per_minute=110)
    stats = label(load_recipe(recipe), quiet=True)
    assert stats.failed == 0 and proxy.rate_limited == 0 and proxy.received == 6


def test_provider_rate_limits_are_waited_out(tmp_path, proxy):
    proxy.plan(["429", "429", "429"])
    recipe = write_recipe(tmp_path, proxy.base_url, rows=6, concurrency=3)
    stats = label(load_recipe(recipe), quiet=True)
    assert stats.failed == 0 and stats.attempts == 6 + 3 + stats.parse_retries == proxy.received
    assert proxy.by_kind["429"] == 3


def test_the_key_never_reaches_an_artifact_a_log_or_an_error(tmp_path, proxy, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEST_KEY", KEY)
    recipe = write_recipe(tmp_path, proxy.base_url, rows=6, api_key_env="PROTEGE_TEST_KEY", price_input=1.0,
                          price_output=2.0)
    runner = CliRunner()
    outputs = [runner.invoke(cli, ["label", str(recipe), "--dry-run"]).output]
    outputs.append(runner.invoke(cli, ["label", str(recipe)]).output)
    proxy.plan(["401"])
    outputs.append(runner.invoke(cli, ["label", str(recipe), "--output_dir", "out2"]).output)
    assert "is set" in outputs[0] and "HTTP 401" in outputs[2]
    assert proxy.auth_headers and set(proxy.auth_headers) == {f"Bearer {KEY}"}
    for text in outputs:
        assert KEY not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "protege.db" for p in files) and any(p.name == "recipe.yaml" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


def test_a_key_pasted_into_the_recipe_is_refused_without_echoing_it(tmp_path):
    recipe = write_recipe(tmp_path, "http://127.0.0.1:9/v1", rows=4, api_key_env=KEY)
    res = CliRunner().invoke(cli, ["label", str(recipe)])
    assert res.exit_code == 2 and "NAME of an environment variable" in res.output and KEY not in res.output
    data = yaml.safe_load(recipe.read_text())
    data["teacher"].pop("api_key_env")
    data["teacher"]["api_key"] = KEY
    recipe.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(cli, ["label", str(recipe)])
    assert res.exit_code == 2 and "secrets never go in a recipe" in res.output and KEY not in res.output


def test_missing_key_is_a_clear_error_before_any_call(tmp_path, proxy, monkeypatch):
    monkeypatch.delenv("PROTEGE_TEST_KEY", raising=False)
    recipe = write_recipe(tmp_path, proxy.base_url, rows=4, api_key_env="PROTEGE_TEST_KEY")
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 2 and "export PROTEGE_TEST_KEY=" in res.output
    assert proxy.received == 0


def test_permanent_error_type_is_exposed_for_library_users(tmp_path, proxy):
    proxy.plan(["400"])
    recipe = write_recipe(tmp_path, proxy.base_url, rows=4, concurrency=1)
    with pytest.raises(PermanentError):
        label(load_recipe(recipe), quiet=True)


def test_run_end_to_end_with_an_api_teacher_reports_recorded_latency_and_spend(
    tmp_path, llama_server, tiny_classifier_dir  # noqa: F811
):
    recipe = write_recipe(tmp_path, llama_server.base_url, rows=12, price_input=2.0, price_output=8.0)
    data = yaml.safe_load(recipe.read_text())
    data["student"] = {"model": str(tiny_classifier_dir), "init": "scratch", "hidden_size": 16, "num_heads": 2}
    data["training"] = {"epochs": 1, "batch_size": 4}
    data["eval"] = {"latency_samples": 4}
    recipe.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(cli, ["run", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out/report.json").read_text())
    t = report["models"]["teacher"]
    assert t["price_source"] == "recorded API spend" and t["signal_method"] == ["label_logprobs"]
    with Store(tmp_path / "out/protege.db") as store:
        keys = [r["call_key"] for r in rows(tmp_path / "out/signals/eval.jsonl")]
        usage = store.call_usage(keys).values()
        costs, seconds = [u.cost_usd for u in usage], sorted(u.seconds for u in usage)
        label_runs = store.compute_totals()["label"]
        all_spend = store.teacher_totals()["cost_usd"]
    assert t["usd_per_1k"] == pytest.approx(1000 * sum(costs) / len(costs)) and t["usd_per_1k"] > 0
    assert seconds[0] * 1e3 <= t["latency_ms_p50"] <= seconds[-1] * 1e3
    assert label_runs["runs"] == 1 and t["throughput_per_s"] > 0
    assert report["ledger"]["teacher"]["cost_usd"] == pytest.approx(all_spend) and all_spend > 0
    assert "never a new paid call" in (tmp_path / "out/report.md").read_text()
