"""The openai: teacher and the labeling engine, through the real openai SDK.

Most tests run in-process against tests/openai_fake.py: OpenAI's documented formats behind an
``httpx2.MockTransport``, with answers, usage and faults known exactly, so they assert exact distributions,
costs and call counts. Three run against a real OpenAI-compatible server on loopback (llama.cpp's, serving
SmolLM2-135M-Instruct), where the server is the point: logprob labels, sampled labels, and faults a proxy
injects on real sockets.

Every row must end labeled or recorded as failed with its reason; the calls that reached the server must equal
rows plus retries; spend must never pass the cap; the key must appear nowhere but the Authorization header.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import stored_calls, write_jsonl
from openai_fake import FakeOpenAI, expected_probs, prompt_tokens
from servers import FaultProxy, llama_server  # noqa: F401  (fixture)

from protege.cli import cli
from protege.errors import BudgetReached, PermanentError
from protege.labeling.engine import run_api
from protege.labeling.labeler import label
from protege.labeling.prompts import render_request
from protege.recipe import load_recipe
from protege.store import Store, call_key
from protege.teachers import make_teacher
from protege.teachers.base import Price, Request, worst_case_tokens

KEY = "sk-test-PROTEGE-SECRET-4242"
FAKE_URL = "https://api.fake-openai.test/v1"  # never resolved: the fake's transport answers in-process


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


def sentiment(text: str, labels) -> str:
    """What the fake teacher answers for a review: the gold label."""
    return "positive" if any(w in text for w in _GOOD) else "negative"


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


def signal_rows(out: Path) -> list[dict]:
    return rows(out / "signals/train.jsonl") + rows(out / "signals/eval.jsonl")


def gold(text: str) -> str:
    (row,) = [r for r in reviews(64, seed=5) if r["text"] == text]
    return row["label"]


def call_of(db: Path, body: dict) -> dict:
    """The store's row for the request a recorded HTTP body carried."""
    requests = {k: call["request"] for k, call in stored_calls(db).items()}
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        found = [dict(r) for r in c.execute("SELECT * FROM calls")
                 if requests[r["key"]]["messages"] == body["messages"]]  # fmt: skip
    (row,) = found
    return row


@pytest.fixture
def fake(openai_fake) -> FakeOpenAI:
    openai_fake.choose = sentiment
    return openai_fake


@pytest.fixture
def proxy(llama_server):  # noqa: F811
    with FaultProxy(llama_server.base_url) as p:
        yield p


# -- answers (in-process) ----------------------------------------------------------------------------------
def test_logprob_labels_are_the_distribution_at_the_answer_token_and_a_rerun_calls_nothing(tmp_path, fake):
    recipe = write_recipe(tmp_path, FAKE_URL, rows=12)
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    ok = signal_rows(out)
    assert len(ok) == 12 and rows(out / "signals/failed.jsonl") == []
    for r in ok:
        assert r["method"] == "label_logprobs" and r["teacher_label"] == gold(r["text"])
        # as the store keeps them: float32, relative error at most 2**-24 (src/protege/_compact.py)
        assert r["teacher_probs"] == pytest.approx(expected_probs(gold(r["text"]), LABELS), rel=2**-24, abs=1e-30)
        assert r["label_mass"] == pytest.approx(0.9)  # the filler words' 0.1 is reported, not spread

    # what was sent: greedy, seeded, the answer's token cap under the name llama.cpp reads, 20 alternatives
    assert fake.received == 12 and len({json.dumps(b["messages"]) for b in fake.bodies}) == 12
    for b in fake.bodies:
        assert {k: b[k] for k in ("model", "temperature", "seed", "max_tokens", "logprobs", "top_logprobs")} == {
            "model": "smol", "temperature": 0.0, "seed": 0, "max_tokens": 3, "logprobs": True, "top_logprobs": 20
        }  # fmt: skip
        assert "n" not in b and "max_completion_tokens" not in b

    with Store(out / "protege.db") as store:
        signals = store.get_signals([r["call_key"] for r in ok])
        totals = store.teacher_totals("openai:smol")
    assert totals["calls"] == 12 and totals["failed"] == 0 and totals["attempts"] == 12
    assert totals["input_tokens"] == sum(prompt_tokens(b) for b in fake.bodies) and totals["output_tokens"] == 12
    assert totals["cost_usd"] == 0  # a local server costs nothing per token
    for s in signals.values():
        tl = s.token_logprobs
        assert tl.tokenizer == "llamacpp:smol" and tl.temperature == 1.0
        assert tl.tokens == (s.text,) and s.text in LABELS and len(tl.top[0]) == 20
        # both labels (0.9) and 18 of the fillers (0.1 * (1 - 0.5**18)) are shown; the tail is what is left
        assert tl.tail_mass[0] == pytest.approx(0.1 * 0.5**18, abs=1e-12)
        assert s.usage == {"input_tokens": prompt_tokens(fake.bodies[0]), "output_tokens": 1}

    # a rerun is answered from the store: zero calls
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 0 and "0 teacher calls, 12 from the store" in res.output and fake.received == 12

    # the dry run sees nothing left to call
    res = CliRunner().invoke(cli, ["label", str(recipe), "--dry-run"])
    assert res.exit_code == 0 and "12 already answered in the store, 0 to call" in res.output


@pytest.mark.parametrize("provider, calls_per_row", [("llamacpp", 3), ("vllm", 1)])
def test_samples_are_counted_answers_in_one_call_or_one_call_each(tmp_path, fake, provider, calls_per_row):
    """The fake samples the gold label, the gold label, the other label: 2/3 and 1/3 for every row, whether the
    provider honours n (vLLM: one call) or not (llama.cpp: n calls)."""
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, provider=provider, label_method="samples", n_samples=3)
    label(load_recipe(recipe), quiet=True)
    ok = signal_rows(tmp_path / "out")
    assert len(ok) == 4 and fake.received == 4 * calls_per_row
    for r in ok:
        g = gold(r["text"])
        assert r["method"] == "samples" and r["teacher_label"] == g and r["label_mass"] == 1.0
        assert r["teacher_probs"] == pytest.approx([2 / 3 if x == g else 1 / 3 for x in LABELS])
    for b in fake.bodies:
        assert b["temperature"] == 1.0 and "logprobs" not in b
        assert b.get("n") == (3 if calls_per_row == 1 else None)


def test_a_sample_naming_no_label_is_left_out_and_counted_in_the_covered_mass(tmp_path, fake):
    # the fourth sample of every text names no label: 2 of 3 parsed answers are the gold label, mass 3/4
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, provider="vllm", label_method="samples", n_samples=4)
    label(load_recipe(recipe), quiet=True)
    for r in signal_rows(tmp_path / "out"):
        g = gold(r["text"])
        assert r["label_mass"] == 0.75
        assert r["teacher_probs"] == pytest.approx([2 / 3 if x == g else 1 / 3 for x in LABELS])
    assert fake.received == 4


def test_hard_labels_with_a_rationale_and_unparseable_answers_are_recorded_with_what_was_said(tmp_path, fake):
    unsure = {r["text"] for r in reviews(8, seed=5)[::4]}  # two of eight texts get an answer naming no label
    fake.choose = lambda text, labels: None if text in unsure else sentiment(text, labels)
    recipe = write_recipe(
        tmp_path, FAKE_URL, rows=8, rationale=True, label_method="hard_label", max_tokens=40,
        max_failed_fraction=0.5, parse_retries=1,
    )
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    ok, failed = signal_rows(r.output_dir), rows(r.output_dir / "signals/failed.jsonl")
    assert len(ok) == 6 and {f["text"] for f in failed} == unsure
    for row in ok:
        g = gold(row["text"])
        assert row["method"] == "hard_label" and row["teacher_probs"] == [float(x == g) for x in LABELS]
    with Store(r.store_path) as store:
        for s in store.get_signals([row["call_key"] for row in ok]).values():
            assert s.rationale == f"The text reads as {s.text}." and s.text in LABELS
    for row in failed:
        assert row["reason"] == "unparseable after 2 tries: the reply has no final line 'Answer: <label>'"
        assert row["raw"] == "I am not sure."
    # each unparseable text was asked twice, every other once; all of it recorded
    assert stats.attempts == fake.received == 6 + 2 * 2 and stats.parse_retries == 2
    assert sorted(n for (n,) in db_rows(r.store_path, "SELECT attempts FROM calls")) == [1] * 6 + [2] * 2
    assert all("logprobs" not in b and b["temperature"] == 0.0 for b in fake.bodies)


# -- faults, retries and money (in-process) -----------------------------------------------------------------
TRANSIENT = ["429", "500", "503", "connect", "timeout", "cut", "malformed", "not-a-completion", "html"]
MAYBE_BILLED = {"connect", "timeout", "cut", "malformed", "not-a-completion", "html"}  # sent, answer unknown


def test_every_transient_fault_is_retried_counted_and_priced(tmp_path, fake):
    """One fault per row (then an answer): every row is labeled with exactly one retry; the calls the fake saw
    are the recorded attempts; each row costs exactly what its usage says, and a fault after which the call
    may have been billed keeps that row's worst case counted as uncertain."""
    fake.plan([x for kind in TRANSIENT for x in (kind, None)])
    price = Price(input=2.0, cached_input=2.0, output=8.0)
    recipe = write_recipe(tmp_path, FAKE_URL, rows=len(TRANSIENT), concurrency=1, price_input=2.0, price_output=8.0)
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    assert stats.failed == 0 and stats.called == len(TRANSIENT) and stats.parse_retries == 0
    assert stats.attempts == 2 * len(TRANSIENT) == fake.received
    assert dict(fake.by_kind) == {k: 1 for k in TRANSIENT}
    # the faults after the model's work (timeout, cut, bad bodies) were answered and would be billed
    assert fake.answered == len(TRANSIENT) + len(MAYBE_BILLED - {"connect"})
    for i, kind in enumerate(TRANSIENT):
        body = fake.bodies[2 * i]
        assert fake.bodies[2 * i + 1] == body and fake.log[2 * i] == kind  # the retry sent the same request
        row = call_of(r.store_path, body)
        assert row["attempts"] == 2 and row["status"] == "ok"
        assert row["cost_usd"] == pytest.approx(price.cost(prompt_tokens(body), 1), rel=1e-12)
        req = Request(messages=tuple(body["messages"]), labels=tuple(LABELS), text="")
        worst = price.cost(worst_case_tokens(req), 3)
        assert row["uncertain_usd"] == pytest.approx(worst if kind in MAYBE_BILLED else 0.0, rel=1e-12), kind


def test_a_row_that_keeps_failing_is_recorded_with_its_reason(tmp_path, fake):
    fake.plan(["500", "500", "500"])
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, concurrency=1, max_retries=2, max_failed_fraction=0.5)
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    assert stats.failed == 1 and stats.called == 4 and fake.received == 3 + 3
    (failed,) = rows(r.output_dir / "signals/failed.jsonl")
    assert failed["reason"].startswith("gave up after 3 attempts: HTTP 500: The server had an error")
    assert call_of(r.store_path, fake.bodies[0])["attempts"] == 3
    # a rerun retries only the failed row
    stats = label(r, quiet=True)
    assert stats.called == 1 and stats.failed == 0 and stats.cached == 3 and fake.received == 7
    assert fake.bodies[6] == fake.bodies[0]
    assert rows(r.output_dir / "signals/failed.jsonl") == []


def test_a_permanent_error_stops_the_run_at_once(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEST_KEY", KEY)
    fake.plan(["401"])
    recipe = write_recipe(tmp_path, FAKE_URL, rows=8, concurrency=1, api_key_env="PROTEGE_TEST_KEY")
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 2
    assert "HTTP 401" in res.output and "check the key in $PROTEGE_TEST_KEY" in res.output
    assert KEY not in res.output and "sk-***" in res.output  # the body's masked key is masked further
    assert fake.received == 1  # nothing else was sent
    assert not (tmp_path / "out/signals/train.jsonl").exists()


@pytest.mark.parametrize(
    "kind, fix",
    [
        ("400", "check teacher.max_tokens, teacher.top_logprobs and teacher.label_method"),
        ("403", "the key has no access to 'smol'"),
        ("404", "model 'smol' (or the endpoint) was not found at https://api.fake-openai.test/v1"),
    ],
)
def test_permanent_errors_name_the_fix_and_are_exposed_for_library_users(tmp_path, fake, kind, fix):
    fake.plan([kind])
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, concurrency=1)
    with pytest.raises(PermanentError, match=f"HTTP {kind}") as info:
        label(load_recipe(recipe), quiet=True)
    assert fix in str(info.value) and fake.received == 1


def test_a_provider_that_returns_no_logprobs_is_a_permanent_error_naming_the_other_methods(tmp_path, fake):
    fake.logprobs = False
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, concurrency=1)
    with pytest.raises(PermanentError, match="returned no logprobs.*'samples'.*'hard_label'"):
        label(load_recipe(recipe), quiet=True)
    assert fake.received == 1


def test_budget_cap_holds_with_many_calls_in_flight_and_a_higher_cap_continues(tmp_path, fake):
    """A row's worst case is its one-token answer at $0.10 (input is free here), so the reservations are
    exact: a $1 cap buys exactly ten rows, with eight calls in flight at once, and never a cent more."""
    fake.latency = 0.02  # each answer takes a moment, so all eight workers have a call in flight at once
    prices = {"price_input": 0.0, "price_output": 100_000.0, "max_tokens": 1, "concurrency": 8}
    recipe = write_recipe(tmp_path, FAKE_URL, rows=16, budget_usd=1.0, **prices)
    r = load_recipe(recipe)
    with pytest.raises(BudgetReached):
        label(r, quiet=True)
    with Store(r.store_path) as store:
        spent, done = store.spent(), store.teacher_totals()["calls"]
    assert done == 10 and spent == pytest.approx(1.0) and spent <= 1.0
    assert fake.answered == fake.received == done  # nothing was sent that was not recorded
    assert fake.max_in_flight == 8

    # the same cap again: nothing more fits, and the CLI says so with exit code 3
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q", "--teacher.budget_usd", "1.0"])
    assert res.exit_code == 3 and "budget reached" in res.output and "rerun with a higher" in res.output
    with Store(r.store_path) as store:
        assert store.spent() == spent and store.teacher_totals()["calls"] == 10 and fake.received == 10

    r = load_recipe(recipe, {"teacher.budget_usd": 100.0})
    stats = label(r, quiet=True)
    with Store(r.store_path) as store:
        assert store.teacher_totals()["calls"] == 16 and store.spent() == pytest.approx(1.6)
    assert stats.cached == 10 and fake.received == 16  # no answer bought twice
    assert len({json.dumps(b["messages"]) for b in fake.bodies}) == 16


@pytest.mark.parametrize("client_rpm, refused", [(200, False), (None, True)])
def test_client_rate_limit_keeps_the_provider_from_refusing(tmp_path, fake, client_rpm, refused):
    """The provider admits one request per 0.1 s. At 200 requests per minute the client spaces its requests
    0.3 s apart and is never refused; without the limit four workers at once are (the control). The limiter
    paces when requests leave, the provider counts when they arrive, so the gap is three windows wide and the
    SDK client is built beforehand (the first call would otherwise arrive late by the build time and crowd
    the second). One engine run (one split), so one limiter paces every request."""
    fake.limit_rpm(1, window=0.1)
    teacher = {"requests_per_minute": client_rpm} if client_rpm else {}
    r = load_recipe(write_recipe(tmp_path, FAKE_URL, rows=4, concurrency=4, max_retries=10, **teacher))
    t = make_teacher(r.teacher)
    assert t.client is not None
    items = [(call_key(t.identity, q.to_json()), q) for q in (render_request(r.task, x["text"]) for x in reviews(4))]
    with Store(tmp_path / "protege.db") as store:
        done, stats = run_api(t, r.teacher, store, items, r.teacher.model, quiet=True)
    assert stats.failed == 0 and len(done) == 4
    if refused:
        assert fake.rate_limited > 0 and fake.received == 4 + fake.rate_limited == stats.attempts
    else:
        assert fake.rate_limited == 0 and fake.received == 4


def test_provider_rate_limits_are_waited_out(tmp_path, fake):
    fake.retry_after = "0.2"
    fake.plan(["429", None, "429", None, "429"])
    recipe = write_recipe(tmp_path, FAKE_URL, rows=6, concurrency=1)
    stats = label(load_recipe(recipe), quiet=True)
    assert stats.failed == 0 and stats.attempts == 6 + 3 == fake.received
    assert fake.by_kind["429"] == 3
    for i in (0, 2, 4):  # each retry waited the Retry-After the 429 asked for
        assert fake.log[i] == "429" and fake.times[i + 1] - fake.times[i] >= 0.2


def test_a_window_reported_used_up_pauses_the_next_call_until_it_resets(tmp_path, fake):
    """The provider admits two requests per 0.3 s and says so in x-ratelimit-* headers. After a reply saying
    remaining 0 (reset in ~0.3 s) the next call waits for the reset instead of meeting a 429. One engine run,
    so one set of pauses."""
    fake.limit_rpm(2, window=0.3)
    r = load_recipe(write_recipe(tmp_path, FAKE_URL, rows=5, concurrency=1))
    t = make_teacher(r.teacher)
    items = [(call_key(t.identity, q.to_json()), q) for q in (render_request(r.task, x["text"]) for x in reviews(5))]
    with Store(tmp_path / "protege.db") as store:
        done, stats = run_api(t, r.teacher, store, items, r.teacher.model, quiet=True)
    assert stats.failed == 0 and len(done) == 5 and fake.rate_limited == 0 and fake.received == 5
    assert all(later - earlier >= 0.3 for earlier, later in zip(fake.times, fake.times[2:]))


# -- the key (in-process) ----------------------------------------------------------------------------------
def test_the_key_never_reaches_an_artifact_a_log_or_an_error(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEST_KEY", KEY)
    fake.key = KEY  # the fake refuses any other bearer token
    recipe = write_recipe(tmp_path, FAKE_URL, rows=6, api_key_env="PROTEGE_TEST_KEY", price_input=1.0,
                          price_output=2.0, concurrency=1)
    runner = CliRunner()
    outputs = [runner.invoke(cli, ["label", str(recipe), "--dry-run"]).output]
    outputs.append(runner.invoke(cli, ["label", str(recipe)]).output)
    fake.plan(["401"])
    outputs.append(runner.invoke(cli, ["label", str(recipe), "--output_dir", str(tmp_path / "out2")]).output)
    assert "is set" in outputs[0] and "HTTP 401" in outputs[2]
    assert fake.received == 7 and set(fake.auth_headers) == {f"Bearer {KEY}"}
    for req in fake.requests:  # the key travels only in the Authorization header
        others = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
        assert KEY not in str(req.url) + json.dumps(others) and KEY.encode() not in req.content
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


def test_missing_key_is_a_clear_error_before_any_call(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("PROTEGE_TEST_KEY", raising=False)
    recipe = write_recipe(tmp_path, FAKE_URL, rows=4, api_key_env="PROTEGE_TEST_KEY")
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 2 and "export PROTEGE_TEST_KEY=" in res.output
    assert fake.received == 0


# -- the whole run (in-process) ----------------------------------------------------------------------------
def test_run_end_to_end_with_an_api_teacher_reports_recorded_latency_and_spend(tmp_path, fake, tiny_classifier_dir):
    recipe = write_recipe(tmp_path, FAKE_URL, rows=12, price_input=2.0, price_output=8.0)
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
    per_call = Price(2.0, 2.0, 8.0).cost(prompt_tokens(fake.bodies[0]), 1)  # every review has the same length
    assert fake.received == 12  # evaluation read the teacher's answers from the store
    with Store(tmp_path / "out/protege.db") as store:
        keys = [r["call_key"] for r in rows(tmp_path / "out/signals/eval.jsonl")]
        usage = store.call_usage(keys).values()
        costs, seconds = [u.cost_usd for u in usage], sorted(u.seconds for u in usage)
        label_runs = store.compute_totals()["label"]
        all_spend = store.teacher_totals()["cost_usd"]
    assert costs == pytest.approx([per_call] * len(keys), rel=1e-12)
    assert t["usd_per_1k"] == pytest.approx(1000 * per_call)
    assert seconds[0] * 1e3 <= t["latency_ms_p50"] <= seconds[-1] * 1e3
    assert label_runs["runs"] == 1 and t["throughput_per_s"] > 0
    assert all_spend == pytest.approx(12 * per_call, rel=1e-12)
    assert report["ledger"]["teacher"]["cost_usd"] == pytest.approx(all_spend)
    assert "never a new paid call" in (tmp_path / "out/report.md").read_text()


# -- a real server on loopback: where the server is the point --------------------------------------------
def test_a_real_server_gives_logprob_labels_texts_and_token_logprobs(tmp_path, llama_server):  # noqa: F811
    recipe = write_recipe(tmp_path, llama_server.base_url, rows=6)
    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    ok = signal_rows(out)
    assert len(ok) == 6 and rows(out / "signals/failed.jsonl") == []
    for r in ok:
        assert r["method"] == "label_logprobs" and r["teacher_label"] in LABELS
        assert abs(sum(r["teacher_probs"]) - 1) < 1e-6 and 0 < r["label_mass"] <= 1

    with Store(out / "protege.db") as store:
        signals = store.get_signals([r["call_key"] for r in ok])
        totals = store.teacher_totals("openai:smol")
    assert totals["calls"] == 6 and totals["failed"] == 0 and totals["attempts"] == 6
    assert totals["input_tokens"] > 6 * 50 and 0 < totals["output_tokens"] <= 6 * 3
    for s in signals.values():
        tl = s.token_logprobs
        assert tl.tokenizer == "llamacpp:smol" and tl.temperature == 1.0
        assert 1 <= len(tl.tokens) <= 3 and len(tl.top) == len(tl.tokens) == len(tl.tail_mass)
        assert all(len(top) == 20 for top in tl.top) and all(0 <= m <= 1 for m in tl.tail_mass)
        assert all(math.isfinite(v) and v <= 0 for top in tl.top for v in top.values())
        assert s.text and s.usage["input_tokens"] > 0

    res = CliRunner().invoke(cli, ["label", str(recipe), "-q"])  # a rerun is answered from the store
    assert res.exit_code == 0 and "0 teacher calls, 6 from the store" in res.output


def test_a_real_server_gives_sampled_labels(tmp_path, llama_server):  # noqa: F811
    recipe = write_recipe(
        tmp_path, llama_server.base_url, rows=3, label_method="samples", n_samples=3, max_tokens=4,
        max_failed_fraction=1.0, parse_retries=0,
    )
    r = load_recipe(recipe)
    label(r, quiet=True)
    ok, failed = signal_rows(r.output_dir), rows(r.output_dir / "signals/failed.jsonl")
    assert len(ok) + len(failed) == 3
    for row in ok:
        assert row["method"] == "samples" and abs(sum(row["teacher_probs"]) - 1) < 1e-6
        # probabilities are counts out of the k <= 3 samples that named a label
        probs = row["teacher_probs"]
        assert any(all(abs(p * k - round(p * k)) < 1e-6 for p in probs) for k in (1, 2, 3))  # float32
        assert 0 < row["label_mass"] <= 1
    for row in failed:
        assert row["reason"].startswith("unparseable after 1 tries: none of 3 samples named a label") and row["raw"]
    # llama.cpp's server ignores n: one call per sample
    assert sum(n for (n,) in db_rows(r.store_path, "SELECT attempts FROM calls")) == 3 * 3


def test_faults_on_real_sockets_are_retried_and_every_call_is_counted(tmp_path, proxy, monkeypatch):
    """Faults a proxy injects in front of the real server, one per row: status codes, a body cut off mid-way, a
    malformed body. (A read timeout on a real socket is pinned in test_servers.py; the engine's handling of
    one, with the others, in test_every_transient_fault_is_retried_counted_and_priced.) The engine's
    exponential backoff is off, as in the in-process tests: it is not what this test is about, and it made
    most of its time."""
    import protege.labeling.engine as engine

    monkeypatch.setattr(engine, "wait_exponential_jitter", lambda **kw: lambda state: 0.0)
    faults = ["429", "500", "503", "cut", "malformed"]
    proxy.retry_after = "0.1"
    proxy.plan([x for kind in faults for x in (kind, None)])
    # one call at a time: the server is serial, so a queued call must not time out on its own
    recipe = write_recipe(tmp_path, proxy.base_url, rows=6, concurrency=1)
    r = load_recipe(recipe)
    stats = label(r, quiet=True)
    assert stats.failed == 0 and stats.called == 6
    # each fault cost exactly one retry (answers naming no label cost a parse retry); the proxy saw every
    # attempt; faults before forwarding never reached the server, the others did (the server did the work,
    # the answer was lost on the way back)
    assert stats.attempts == 6 + len(faults) + stats.parse_retries == proxy.received
    assert proxy.forwarded == proxy.received - 3
    assert dict(proxy.by_kind) == {k: 1 for k in faults}
    (attempts,) = db_rows(r.store_path, "SELECT SUM(attempts) FROM calls")[0]
    assert attempts == stats.attempts


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:s3cret@api.example.com:8443/v1", "https://api.example.com:8443/v1"),
        ("https://api.example.com/v1?api_key=s3cret", "https://api.example.com/v1"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
    ],
)
def test_a_refusal_names_the_base_url_without_credentials(url, shown):
    from protege.teachers._api import permanent_message, public_url

    msg = permanent_message("openai", "gpt-x", url, 404, "no such model", None)
    assert public_url(url) == shown and shown in msg and "s3cret" not in msg and "user" not in msg
