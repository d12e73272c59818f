"""The cascade against a real teacher: a student trained from llama.cpp's server (SmolLM2-135M on loopback, priced
by the recipe) is served with a threshold; texts go to the student or the teacher by the student's own top
probability, the teacher's answers are labeling's (same store, same keys: no new call for a labeled text), its
failures are OpenAI-format 502/503s, and the served ledger adds up to what the calls table and `protege cost`
say."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest
import yaml
from click.testing import CliRunner
from conftest import asks, n_calls, served, sql, stored_calls, write_jsonl
from servers import FaultProxy, free_port, llama_server  # noqa: F401  (fixture)
from test_serve import running as serving

from protege.cli import cli
from protege.errors import ProtegeError
from protege.labeling.data import Example
from protege.labeling.labeler import label, label_examples
from protege.pipeline import train
from protege.recipe import load_recipe
from protege.serve import Classifier, create_app
from protege.store import Store
from protege.teachers import make_teacher

LABELS = ["positive", "negative"]
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens: the local server is free, the ledger needs money
USD_PER_HOUR = 36.0  # the student's compute price (eval.compute_usd_per_hour in its recipe)
# money spent on calls, as the ledger counts it: charged, plus attempts that may have been billed (timeouts)
SPENT = "SELECT SUM(cost_usd + uncertain_usd) FROM calls"
NEW = ["The museum was wonderful. #n1", "The bus ride was dreadful. #n2", "The pizza was superb. #n3",
       "The lecture was boring. #n4"]


def reviews(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["wonderful", "excellent", "lovely", "great"], ["awful", "terrible", "boring", "dull"]
    things = ["film", "meal", "hotel", "book", "concert", "service"]
    return [{"id": f"r{i:02d}", "text": f"The {things[i % 6]} was {rng.choice(good if i % 2 == 0 else bad)}. #{i}",
             "label": LABELS[i % 2]} for i in range(n)]


def word_tokenizer(path: Path, texts: list[str]) -> Path:
    """A word-level tokenizer over ``texts`` saved in ``path``: the student is built from scratch on it, and
    knowing the review words it grows confident on some texts and not on others."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, llama_server) -> Path:  # noqa: F811
    """A run labeled by the llama.cpp teacher and a tiny student trained on it, as `protege run` leaves it."""
    base = tmp_path_factory.mktemp("cascade")
    data = reviews(16, seed=7)
    write_jsonl(base / "data.jsonl", data)
    vocab = word_tokenizer(base / "tokenizer", [r["text"] for r in data] + NEW)
    recipe = {
        "task": {"instruction": "Is the review positive or negative?", "labels": LABELS},
        "data": {"path": "data.jsonl", "eval_fraction": 0.25},
        "teacher": {"model": "openai:smol", "provider": "llamacpp", "base_url": llama_server.base_url,
                    "max_tokens": 3, "concurrency": 4, "timeout_s": 30, "price_input": PRICE_IN,
                    "price_output": PRICE_OUT},
        "student": {"model": str(vocab), "init": "scratch", "hidden_size": 16, "num_heads": 2, "max_length": 32},
        "training": {"epochs": 20, "batch_size": 4, "learning_rate": 0.01, "hard_label_baseline": False},
        "eval": {"compute_usd_per_hour": USD_PER_HOUR},
        "output_dir": "out",
    }
    (base / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    r = load_recipe(base / "recipe.yaml")
    stats = label(r, quiet=True)
    assert stats.called == 16 and stats.failed == 0
    train(r, quiet=True)
    return base / "out"


@pytest.fixture
def run(made, tmp_path) -> Path:
    """A fresh copy of the run, store included, so each test's ledger starts empty."""
    return Path(shutil.copytree(made, tmp_path / "out"))


def held_out(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "signals" / "eval.jsonl").read_text().splitlines()]


def confidences(student_dir: Path, texts: list[str]) -> list[float]:
    """The student's own top probability per text, computed as the server computes it (one batch)."""
    logps, _ = Classifier(student_dir).predict(texts)
    return [math.exp(max(lp)) for lp in logps]


def classify(srv, texts) -> httpx2.Response:
    with httpx2.Client(base_url=srv.url, timeout=60) as http:
        return http.post("/v1/classify", json={"input": texts})


# --------------------------------------------------------------------------------------------------------------
# routing


def test_threshold_zero_sends_nothing_to_the_teacher(run):
    db, texts = run / "protege.db", [r["text"] for r in held_out(run)][:2] + NEW[:2]
    calls = n_calls(db)
    with serving(run / "student", cascade_threshold=0) as srv, srv.client() as c:
        for t in texts:
            raw = c.chat.completions.with_raw_response.create(model="x", messages=[{"role": "user", "content": t}])
            assert raw.headers["x-protege-model"] == "student" and raw.parse().model == "student"
        resp = classify(srv, texts)
    assert resp.status_code == 200 and resp.headers["x-protege-model"] == "student"
    assert [d["answered_by"] for d in resp.json()["data"]] == ["student"] * 4
    assert n_calls(db) == calls  # the teacher was never asked

    rows = served(db)
    assert len(rows) == 8 and {r["answered_by"] for r in rows} == {"student"}
    assert [r["endpoint"] for r in rows] == ["chat.completions"] * 4 + ["classify"] * 4
    assert [r["output_tokens"] for r in rows] == [1] * 4 + [0] * 4
    assert [r["confidence"] for r in rows[4:]] == pytest.approx(confidences(run / "student", texts), abs=1e-6)
    for r in rows:  # a student answer costs its measured compute at the student's price
        assert r["seconds"] > 0 and r["cost_usd"] == pytest.approx(r["seconds"] * USD_PER_HOUR / 3600)
        assert r["teacher_usd"] == 0 and r["call_key"] is None and r["student"] == "student"


def test_threshold_above_one_asks_the_teacher_whose_answers_are_labelings(run):
    db, held = run / "protege.db", held_out(run)
    calls = n_calls(db)
    texts = [r["text"] for r in held]
    with serving(run / "student", cascade_threshold=1.01) as srv, srv.client() as c:
        resp = classify(srv, texts)
        raw = c.chat.completions.with_raw_response.create(
            model="x", messages=[{"role": "user", "content": texts[0]}], logprobs=True, top_logprobs=2)
    assert resp.status_code == 200 and resp.headers["x-protege-model"] == "teacher"
    for d, h in zip(resp.json()["data"], held):  # labeling's signals, from the store
        assert d["answered_by"] == "teacher" and d["label"] == h["teacher_label"]
        assert [d["probs"][lab] for lab in LABELS] == pytest.approx(h["teacher_probs"])
    chat = raw.parse()
    assert raw.headers["x-protege-model"] == "teacher" and chat.model == "openai:smol"
    assert chat.choices[0].message.content == held[0]["teacher_label"]
    top = {t.token: t.logprob for t in chat.choices[0].logprobs.content[0].top_logprobs}
    assert top == pytest.approx({lab: math.log(p) for lab, p in zip(LABELS, held[0]["teacher_probs"])})
    (tin, tout), = sql(db, "SELECT input_tokens, output_tokens FROM calls WHERE key = ?", held[0]["call_key"])
    assert chat.usage.prompt_tokens == tin > 0 and chat.usage.completion_tokens == tout
    assert n_calls(db) == calls  # every answer was in the store: no new call

    rows = served(db)
    assert len(rows) == len(texts) + 1 and {r["answered_by"] for r in rows} == {"teacher"}
    assert [r["call_key"] for r in rows] == [h["call_key"] for h in held] + [held[0]["call_key"]]
    assert all(r["cached"] == 1 and r["teacher_usd"] == 0 for r in rows)

    # a text nobody asked about: one new call, priced; asked again: from the store, free
    with serving(run / "student", cascade_threshold=1.01) as srv:
        first, again = classify(srv, [NEW[0]]).json(), classify(srv, [NEW[0]]).json()
    assert n_calls(db) == calls + 1 and first["data"] == again["data"]
    new, repeat = served(db)[-2:]
    (cost, key_tin, key_tout), = sql(db, "SELECT cost_usd, input_tokens, output_tokens FROM calls WHERE key = ?",
                                     new["call_key"])
    assert cost == pytest.approx((key_tin * PRICE_IN + key_tout * PRICE_OUT) / 1e6) and cost > 0
    assert new["cached"] == 0 and new["teacher_usd"] == pytest.approx(cost)
    assert new["cost_usd"] == pytest.approx(cost + (new["seconds"] - _teacher_seconds(db, new)) * USD_PER_HOUR / 3600)
    assert repeat["cached"] == 1 and repeat["teacher_usd"] == 0 and repeat["call_key"] == new["call_key"]

    # labeling the same text now is a cache hit with the same answer: the server asked exactly as labeling does
    r = load_recipe(run / "student" / "recipe.yaml")
    with Store(db) as store:
        sigs, keys, stats = label_examples(make_teacher(r.teacher), r, [Example("x", NEW[0], None, "t")], store,
                                           quiet=True)
    assert stats.called == 0 and stats.cached == 1 and keys == [new["call_key"]]
    assert sigs[0].distribution.top == first["data"][0]["label"]


def _teacher_seconds(db: Path, row: dict) -> float:
    return sql(db, "SELECT seconds FROM calls WHERE key = ?", row["call_key"])[0][0]


def test_between_thresholds_each_text_goes_by_the_students_confidence_and_the_ledger_adds_up(run):
    db, held = run / "protege.db", held_out(run)
    texts = [r["text"] for r in held] + NEW[1:3]
    conf = confidences(run / "student", texts)
    order = sorted(conf)
    gaps = [(order[i + 1] - order[i], i) for i in range(len(order) - 1)]
    _, i = max(gaps)  # cut at the widest gap so both sides are non-empty and no rounding can flip a text
    threshold = (order[i] + order[i + 1]) / 2
    want = ["student" if c >= threshold else "teacher" for c in conf]
    assert "student" in want and "teacher" in want
    calls_before, spent_before = n_calls(db), sql(db, SPENT)[0][0]

    with serving(run / "student", cascade_threshold=threshold) as srv:
        resp = classify(srv, texts)
    assert resp.status_code == 200 and resp.headers["x-protege-model"] == "mixed"
    data = resp.json()["data"]
    assert [d["answered_by"] for d in data] == want
    for d, c, h in zip(data, conf, held + [None, None]):
        if d["answered_by"] == "student":
            assert d["confidence"] == pytest.approx(c, abs=1e-6)
        elif h is not None:  # a labeled text: labeling's answer
            assert d["label"] == h["teacher_label"]
    new_to_teacher = sum(w == "teacher" for w in want[len(held):])
    assert n_calls(db) == calls_before + new_to_teacher

    # the ledger: one row per text, the student's confidence on each, money equal to what was spent
    rows = served(db)
    assert len(rows) == len(texts) and [r["answered_by"] for r in rows] == want
    assert [r["confidence"] for r in rows] == pytest.approx(conf, abs=1e-6)
    new_spend = sql(db, SPENT)[0][0] - spent_before
    assert sum(r["teacher_usd"] for r in rows) == pytest.approx(new_spend)
    for k, r in enumerate(rows):  # each: the student's compute share at its price, plus the teacher's new spend
        labeled = k < len(held)
        assert r["cached"] == (None if r["answered_by"] == "student" else int(labeled))
        teacher_s = _teacher_seconds(db, r) if r["cached"] == 0 else 0.0
        assert r["cost_usd"] - r["teacher_usd"] == pytest.approx((r["seconds"] - teacher_s) * USD_PER_HOUR / 3600)

    # protege cost reads the same store: serving as recorded, labeling apart from serving's calls
    res = CliRunner().invoke(cli, ["cost", str(run), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    s = d["serving"]
    assert s["requests"] == len(texts) and s["student_answers"]["requests"] == want.count("student")
    assert s["teacher_answers"]["requests"] == want.count("teacher")
    assert s["teacher_answers"]["cached"] == want.count("teacher") - new_to_teacher
    assert s["total_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert s["teacher_usd"] == pytest.approx(new_spend)
    assert d["make"]["teacher_usd"] == pytest.approx(spent_before) and d["make"]["teacher_calls"] == calls_before
    per_teacher = sql(db, "SELECT AVG(cost_usd) FROM calls WHERE status = 'ok'")[0][0]
    v = d["savings"]
    assert v["teacher_usd_per_request"] == pytest.approx(per_teacher)
    assert v["saved_usd"] == pytest.approx(len(texts) * per_teacher - s["total_usd"])
    saving = per_teacher - s["total_usd"] / len(texts)
    assert d["payback_requests"] == (math.ceil(d["make"]["total_usd"] / saving) if saving > 0 else None)


# --------------------------------------------------------------------------------------------------------------
# the teacher failing


def _teacher_recipe(run: Path, base_url: str, **teacher) -> Path:
    data = yaml.safe_load((run / "student" / "recipe.yaml").read_text())
    data["teacher"] |= {"base_url": base_url, "max_retries": 0, "timeout_s": 30, **teacher}
    path = run / "teacher.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(srv, text: str) -> openai.APIStatusError:
    with srv.client() as c, pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": text}])
    return e.value


def test_teacher_failures_are_openai_format_502_and_503(run, llama_server):  # noqa: F811
    db = run / "protege.db"
    with FaultProxy(llama_server.base_url, slow_seconds=4) as proxy:
        teacher = _teacher_recipe(run, proxy.base_url)
        with serving(run / "student", cascade_threshold=1.01, teacher_recipe=teacher, teacher_timeout_s=2) as srv:
            proxy.plan(["401"])
            e = _error(srv, NEW[1])
            assert e.status_code == 502 and e.body["code"] == "teacher_refused" and e.body["type"] == "server_error"
            proxy.plan(["500"])
            e = _error(srv, NEW[1])
            assert e.status_code == 502 and e.body["code"] == "teacher_failed" and "500" in e.body["message"]

            proxy.plan(["slow"])  # answers after 4 s; the request gives up at 2 s
            t0 = time.monotonic()
            e = _error(srv, NEW[2])
            assert e.status_code == 503 and e.body["code"] == "teacher_timeout" and time.monotonic() - t0 < 4
            deadline = time.monotonic() + 60  # the call goes on and lands in the store ...
            while not any(c["signal"] and asks(c, NEW[2]) for c in stored_calls(db).values()):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            with srv.client() as c:  # ... so the next asker gets it at once, without a call
                received = proxy.received
                raw = c.chat.completions.with_raw_response.create(model="x", messages=[{"role": "user",
                                                                                         "content": NEW[2]}])
                assert raw.headers["x-protege-model"] == "teacher" and proxy.received == received
        assert proxy.by_kind == {"401": 1, "500": 1, "slow": 1}

        # a budget already spent: refused before anything is sent
        teacher = _teacher_recipe(run, proxy.base_url, budget_usd=1e-7)
        with serving(run / "student", cascade_threshold=1.01, teacher_recipe=teacher) as srv:
            received = proxy.received
            e = _error(srv, NEW[3])
            assert e.status_code == 503 and e.body["code"] == "teacher_budget_reached" and "budget" in e.message
            assert proxy.received == received
            # a text the store holds is still answered: the cap is on spending, not on the cache
            ok = classify(srv, [held_out(run)[0]["text"]])
            assert ok.status_code == 200 and ok.json()["data"][0]["answered_by"] == "teacher"

    rows = served(db)
    assert [r["answered_by"] for r in rows] == ["none", "none", "none", "teacher", "none", "teacher"]
    assert [r["error"] is not None for r in rows] == [True, True, True, False, True, False]


def test_cascade_refuses_what_cannot_work(run, tmp_path):
    other = yaml.safe_load((run / "student" / "recipe.yaml").read_text())
    other["task"]["labels"] = ["negative", "positive"]  # same labels, another order
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ProtegeError, match="same labels in the same order"):
        create_app(run / "student", cascade_threshold=0.5, teacher_recipe=tmp_path / "other.yaml")
    moved = tmp_path / "lonely" / "student"
    shutil.copytree(run / "student", moved)
    with pytest.raises(ProtegeError, match="pass --store PATH"):
        create_app(moved, cascade_threshold=0.5)
    with pytest.raises(ProtegeError, match="must be 0 or more"):
        create_app(run / "student", cascade_threshold=-0.1)


# --------------------------------------------------------------------------------------------------------------
# the command line


def test_protege_serve_cascade_from_the_command_line_records_on_shutdown(run):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "protege", "serve", str(run / "student"), "--port", str(port), "-q",
         "--cascade-threshold", "2", "--compute-usd-per-hour", "7.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                resp = httpx2.post(f"http://127.0.0.1:{port}/v1/classify", json={"input": held_out(run)[1]["text"]},
                                   timeout=60)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.3)
        assert resp.status_code == 200 and resp.headers["x-protege-model"] == "teacher"
        assert resp.json()["data"][0]["label"] == held_out(run)[1]["teacher_label"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    (row,) = served(run / "protege.db")  # written at shutdown at the latest
    assert row["answered_by"] == "teacher" and row["cached"] == 1
    assert row["cost_usd"] == pytest.approx(row["seconds"] * 7.2 / 3600)


# --------------------------------------------------------------------------------------------------------------
# a local teacher


def test_a_local_teacher_falls_back_through_the_store_and_costs_its_compute(tiny_recipe):
    """The tiny loop's hf: teacher behind the cascade: labeled texts from the store, a new one computed once and
    priced at its compute time (the recipe's eval.compute_usd_per_hour, 0.10 by default)."""
    res = CliRunner().invoke(cli, ["run", str(tiny_recipe), "-q"])
    assert res.exit_code == 0, res.output
    out = tiny_recipe.parent / "out"
    db, held = out / "protege.db", held_out(out)[:3]
    calls = n_calls(db)
    new = "my parcel never arrived and the refund is late"
    with serving(out / "student", cascade_threshold=1.01) as srv:
        labeled = classify(srv, [h["text"] for h in held]).json()["data"]
        fresh = classify(srv, [new]).json()["data"]
    assert [d["label"] for d in labeled] == [h["teacher_label"] for h in held]
    assert [[d["probs"][lab] for lab in d["probs"]] for d in labeled] == [
        pytest.approx(h["teacher_probs"]) for h in held]
    assert fresh[0]["answered_by"] == "teacher" and n_calls(db) == calls + 1
    row = served(db)[-1]
    (seconds, cost), = sql(db, "SELECT seconds, cost_usd FROM calls WHERE key = ?", row["call_key"])
    assert cost == 0 and seconds > 0  # a local model bills nothing per call ...
    assert row["cached"] == 0 and row["teacher_usd"] == pytest.approx(seconds * 0.10 / 3600)  # ... but its time
