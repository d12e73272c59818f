"""`protege serve --capture`: served inputs and answers kept, redacted, in the run's store. The tiny classifier
student served on loopback and called with the official OpenAI SDK; the store read back with sqlite3 directly."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import httpx2
import pytest
from conftest import served, sql
from test_metrics import teacher_recipe
from test_serve import KEY, TEXTS, running, student_dir  # noqa: F401  (fixture)
from test_serve_lm import lm_student  # noqa: F401  (fixture)

pytest.importorskip("fastapi")

from protege.errors import ProtegeError
from protege.serve import Classifier, create_app
from protege.serve.capture import Redactor, luhn_valid
from protege.signals import TeacherSignal, TokenLogprobs
from protege.store import CallRecord, CapturedRecord, Store
from protege.students.card import card_version

CUSTOM = r"ACCT-\d{5}"
# (sent, as stored): emails with plus tags, phones in several countries' formats, cards that pass the Luhn check
# and order numbers of the same shape that fail it, an ISO date, and the user's pattern
PII = [
    ("Reset the password for jane.doe+billing@example.co.uk please",
     "Reset the password for <EMAIL> please"),
    ("Call me at +1 (415) 555-0132 or +44 20 7946 0958 about my refund",
     "Call me at <PHONE> or <PHONE> about my refund"),
    ("My card 4111 1111 1111 1111 was charged twice, order 4111 1111 1111 1112",
     "My card <CARD> was charged twice, order 4111 1111 1111 1112"),
    ("Charge on 5500-0000-0000-0004 for order 12345678901234 placed 2024-01-15",
     "Charge on <CARD> for order 12345678901234 placed 2024-01-15"),
    ("Account ACCT-48213 is locked, mail ops@corp.example or ring 020 7946 0958",
     "Account <REDACTED> is locked, mail <EMAIL> or ring <PHONE>"),
]
RAW = [b"jane.doe", b"example.co.uk", b"555-0132", b"7946 0958", b"4111 1111 1111 1111", b"5500-0000-0000-0004",
       b"ACCT-48213", b"ops@corp"]


def captured(db: Path) -> list[dict]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM captured ORDER BY id")]


def db_bytes(db: Path) -> bytes:
    """Every byte the store left on disk: the database and its WAL and shared-memory files, if any."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


# --------------------------------------------------------------------------------------------------------------
# the redactor


def test_luhn_check_by_hand():
    assert luhn_valid("4111111111111111") and luhn_valid("5500000000000004") and luhn_valid("378282246310005")
    assert luhn_valid("79927398713")  # the textbook example: 7+9+9+4+7+6+9+7+7+2+3 with doubling = 70
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


@pytest.mark.parametrize("text, expected", [
    ("a+b.c+tag@sub.example.com wrote", "<EMAIL> wrote"),
    ("first.last+news@example.io, x@y.org", "<EMAIL>, <EMAIL>"),
    ("card 4111111111111111 ok", "card <CARD> ok"),
    ("card 3782-822463-10005 ok", "card <CARD> ok"),  # Amex, 15 digits
    ("order 4111111111111112 ok", "order 4111111111111112 ok"),  # fails Luhn: an order number, kept whole
    ("order 4111 1111 1111 1112 ok", "order 4111 1111 1111 1112 ok"),  # not cut into a phone number either
    ("ring +1 (415) 555-0132", "ring <PHONE>"),
    ("ring +44 20 7946 0958.", "ring <PHONE>."),
    ("ring +49 30 901820", "ring <PHONE>"),
    ("ring +33 6 12 34 56 78", "ring <PHONE>"),
    ("ring +81-3-1234-5678", "ring <PHONE>"),
    ("ring 0044 20 7946 0958", "ring <PHONE>"),
    ("ring (415) 555-0132 or 415.555.0132", "ring <PHONE> or <PHONE>"),
    ("ring 01 23 45 67 89", "ring <PHONE>"),
    ("order #123456789, ref 5551234567", "order #123456789, ref 5551234567"),  # bare digits: not a phone
    ("on 2024-01-15 10:30 it cost 1,299.99", "on 2024-01-15 10:30 it cost 1,299.99"),
])
def test_redactor_defaults(text, expected):
    assert Redactor()(text) == expected


def test_redactor_user_patterns_and_a_bad_one():
    r = Redactor([CUSTOM, r"(?i)ticket [a-z]{3}\d"])
    assert r("ACCT-12345 and Ticket abc1, ACCT-1234") == "<REDACTED> and <REDACTED>, ACCT-1234"
    with pytest.raises(ProtegeError, match=r"--redact '\(' is not a valid regular expression"):
        Redactor(["("])


# --------------------------------------------------------------------------------------------------------------
# served traffic


def test_capture_keeps_redacted_inputs_and_answers_and_never_the_key(student_dir, tmp_path):  # noqa: F811
    db = tmp_path / "protege.db"
    version = card_version(student_dir)
    before = time.time()
    with running(student_dir, store=db, api_key=KEY, capture=True, redact=[CUSTOM]) as srv:
        with srv.client(api_key=KEY) as client:
            chats = []
            for text, _ in PII[:3]:
                raw = client.chat.completions.with_raw_response.create(
                    model="x", messages=[{"role": "user", "content": text}], logprobs=True, top_logprobs=2)
                chats.append((raw.headers["x-protege-model"], raw.parse()))
        with httpx2.Client(base_url=srv.url, timeout=20, headers={"authorization": f"Bearer {KEY}"}) as http:
            r = http.post("/v1/classify", json={"input": [t for t, _ in PII[3:]]})
        assert r.status_code == 200
    rows = captured(db)

    assert [row["input"] for row in rows] == [stored for _, stored in PII]
    assert [row["endpoint"] for row in rows] == ["chat.completions"] * 3 + ["classify"] * 2
    assert {row["input_kind"] for row in rows} == {"text"}
    assert {(row["student"], row["version"]) for row in rows} == {(student_dir.name, version)}
    for row, (by, chat) in zip(rows[:3], chats):
        content = chat.choices[0].logprobs.content[0]
        assert row["answer"] == chat.choices[0].message.content == content.token
        assert row["answered_by"] == by == "student"
        assert row["confidence"] == pytest.approx(math.exp(content.logprob), rel=1e-6)
    for row, item in zip(rows[3:], r.json()["data"]):
        assert (row["answer"], row["answered_by"]) == (item["label"], item["answered_by"])
        assert row["confidence"] == pytest.approx(item["confidence"], rel=1e-6)
    for row in rows:
        assert before <= row["received_at"] <= row["answered_at"] <= time.time()
    assert len(served(db)) == len(rows)  # the ledger has one row per captured one

    on_disk = db_bytes(db)
    for raw in RAW:
        assert raw not in on_disk, raw
    assert KEY.encode() not in on_disk and b"bearer" not in on_disk.lower()

    with Store(db) as store:  # read back for `protege improve`
        assert [c.input for c in store.captured()] == [stored for _, stored in PII]
        assert [c.id for c in store.captured(since=rows[2]["answered_at"])] == [
            row["id"] for row in rows if row["answered_at"] > rows[2]["answered_at"]]
        assert len(store.captured(since_version=version)) == 5
        assert store.captured(since_version="another") == []


def test_capture_records_who_answered_through_the_cascade(student_dir, tmp_path, openai_fake,  # noqa: F811
                                                          monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "protege.db"
    clf = Classifier(student_dir)
    conf = {t: math.exp(max(clf.predict([t])[0][0])) for t in TEXTS}
    ordered = sorted(conf.values())
    gap = max(range(2, len(ordered) - 1), key=lambda i: ordered[i] - ordered[i - 1])
    threshold = (ordered[gap - 1] + ordered[gap]) / 2  # some texts go to the teacher, some do not
    with running(student_dir, store=db, cascade_threshold=threshold, capture=True,
                 teacher_recipe=teacher_recipe(tmp_path / "t.yaml")) as srv, srv.client() as client:
        said = []
        for text in TEXTS:
            raw = client.chat.completions.with_raw_response.create(model="x",
                                                                   messages=[{"role": "user", "content": text}])
            said.append((raw.headers["x-protege-model"], raw.parse().choices[0].message.content))
    rows, ledger = captured(db), served(db)
    assert {by for by, _ in said} == {"student", "teacher"}
    assert [(row["input"], row["answered_by"], row["answer"]) for row in rows] == [
        (Redactor()(text), by, answer) for text, (by, answer) in zip(TEXTS, said)]  # a demo text has an e-mail
    for row, text in zip(rows, TEXTS):  # the student's confidence, which routed the text
        assert row["confidence"] == pytest.approx(conf[text], rel=1e-5)
        assert (row["answered_by"] == "teacher") == (conf[text] < threshold)
    assert [row["call_key"] for row in rows] == [row["call_key"] for row in ledger]
    assert all((row["call_key"] is not None) == (row["answered_by"] == "teacher") for row in rows)


def test_the_cascades_teacher_calls_are_kept_redacted_and_still_answer_a_repeat(student_dir, tmp_path,  # noqa: F811
                                                                               openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "protege.db"
    texts = [sent for sent, _ in PII]
    with running(student_dir, store=db, cascade_threshold=2.0, capture=True, redact=[CUSTOM],  # the teacher answers all
                 teacher_recipe=teacher_recipe(tmp_path / "t.yaml")) as srv, srv.client() as client:
        for _ in range(2):  # the second time every answer comes from the store
            for text in texts:
                raw = client.chat.completions.with_raw_response.create(model="x",
                                                                       messages=[{"role": "user", "content": text}])
                assert raw.headers["x-protege-model"] == "teacher"
    assert openai_fake.received == len(texts)  # what was sent: the texts as the client wrote them, once each
    assert all(any(sent in json.dumps(b["messages"]) for b in openai_fake.bodies) for sent in texts)
    keys = [row["call_key"] for row in served(db)]
    assert len(keys) == 2 * len(texts) and keys[: len(texts)] == keys[len(texts) :]
    with Store(db) as store:
        requests = store.requests(keys[: len(texts)])
        signals = store.get_signals(keys[: len(texts)])
    kept = json.dumps(list(requests.values()), ensure_ascii=False)
    assert all(stored in kept for _, stored in PII) and len(signals) == len(texts)
    for part in RAW:
        assert part.decode() not in kept and part not in db_bytes(db)


def test_a_redacted_call_keeps_its_key_and_numbers_and_drops_what_would_spell_the_text():
    redact = Redactor()
    tokens = TokenLogprobs(tokens=("Mail ", "a@b.example"), top=({"Mail ": -0.1}, {"a@b.example": -0.2}),
                           tail_mass=(0.0, 0.0), tokenizer="t", temperature=1.0)
    reply = TeacherSignal(text="Mail a@b.example", answer="a@b.example", token_logprobs=tokens, logits=[[0.0, 1.0]],
                          usage={"output_tokens": 2})
    call = CallRecord("k", "openai:x", {"messages": [{"role": "user", "content": "I am a@b.example"}], "n": 1},
                      reply, cost_usd=0.5, input_tokens=7)
    kept = redact.call(call)
    assert kept.request == {"messages": [{"role": "user", "content": "I am <EMAIL>"}], "n": 1}
    assert (kept.key, kept.cost_usd, kept.input_tokens) == ("k", 0.5, 7)
    assert kept.signal == TeacherSignal(text="Mail <EMAIL>", answer="<EMAIL>", usage={"output_tokens": 2})
    clean = TeacherSignal(text="Mail me", token_logprobs=tokens, rationale="it has a@b.example")
    assert redact.call(replace(call, signal=clean)).signal == replace(clean, rationale="it has <EMAIL>")
    failed = redact.call(replace(call, signal=None, error="bad reply for a@b.example", raw="a@b.example"))
    assert (failed.signal, failed.error, failed.raw) == (None, "bad reply for <EMAIL>", "<EMAIL>")


def test_capture_keeps_a_language_models_conversation_redacted(lm_student, tmp_path):  # noqa: F811
    db = tmp_path / "protege.db"
    convo = [{"role": "system", "content": "Support desk; escalate to lead@corp.example"},
             {"role": "user", "content": "My number is +44 20 7946 0958, call me"}]
    with running(lm_student, store=db, capture=True) as srv, srv.client() as client:
        whole = client.chat.completions.create(model="x", messages=convo, max_tokens=6, temperature=0)
        stream = client.chat.completions.create(model="x", messages=convo[1:], max_tokens=6, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    rows = captured(db)
    assert [(row["input_kind"], json.loads(row["input"])) for row in rows] == [
        ("messages", [{"role": "system", "content": "Support desk; escalate to <EMAIL>"},
                      {"role": "user", "content": "My number is <PHONE>, call me"}]),
        ("messages", [{"role": "user", "content": "My number is <PHONE>, call me"}]),
    ]
    assert [row["answer"] for row in rows] == [Redactor()(whole.choices[0].message.content), Redactor()(streamed)]
    assert [row["answered_by"] for row in rows] == ["student", "student"]
    assert [row["confidence"] for row in rows] == [row["confidence"] for row in served(db)]
    assert b"lead@corp" not in db_bytes(db) and b"7946" not in db_bytes(db)


def test_retention_deletes_the_oldest_past_the_row_limit(student_dir, tmp_path):  # noqa: F811
    db = tmp_path / "protege.db"
    with running(student_dir, store=db, capture=True, capture_max_rows=3) as srv, srv.client() as client:
        for text in TEXTS[:6]:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": text}])
            time.sleep(0.3)  # past the ledger's write interval: each write trims the table
    rows = captured(db)
    assert [row["input"] for row in rows] == [Redactor()(t) for t in TEXTS[3:6]]
    assert [row["id"] for row in rows] == [4, 5, 6]
    assert len(served(db)) == 6  # the ledger is not trimmed


def test_retention_by_age_and_rows_in_the_same_transaction(tmp_path):
    db = tmp_path / "protege.db"
    now = time.time()

    def row(text: str, days_ago: float) -> CapturedRecord:
        t = now - days_ago * 86400
        return CapturedRecord("s", "v1", "classify", "student", text, "billing", 0.9, None, t, t)

    with Store(db) as store:
        assert store.record_captured([row("old", 10), row("older", 12), row("recent", 1)]) == 0
        assert store.record_captured([row("new", 0)], max_days=5) == 2
        assert [c.input for c in store.captured()] == ["recent", "new"]
        assert store.record_captured([row("newer", 0)], max_rows=1, max_days=5) == 2
        assert [c.input for c in store.captured()] == ["newer"]
        msgs = [{"role": "user", "content": "hi"}]
        store.record_captured([CapturedRecord("s", "v2", "chat.completions", "none", msgs, None, 0.2, None, now, now)])
        assert [(c.version, c.input) for c in store.captured(since_version="v2")] == [("v2", msgs)]
    assert sql(db, "SELECT input_kind FROM captured ORDER BY id") == [("text",), ("messages",)]
    assert b"older" not in db_bytes(db)  # secure_delete: a deleted row's bytes are overwritten


def test_without_capture_nothing_is_captured(student_dir, tmp_path):  # noqa: F811
    db = tmp_path / "protege.db"
    with running(student_dir, store=db) as srv, srv.client() as client:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": PII[0][0]}])
    assert len(served(db)) == 1
    assert sql(db, "SELECT COUNT(*) FROM captured") == [(0,)]
    assert b"jane.doe" not in db_bytes(db)


def test_capture_settings_are_checked(student_dir, tmp_path):  # noqa: F811
    with pytest.raises(ProtegeError, match="add --capture"):
        create_app(student_dir, store=tmp_path / "a.db", redact=[CUSTOM])
    with pytest.raises(ProtegeError, match="--capture-max-rows must be at least 1"):
        create_app(student_dir, store=tmp_path / "a.db", capture=True, capture_max_rows=0)
    with pytest.raises(ProtegeError, match="not a valid regular expression"):
        create_app(student_dir, store=tmp_path / "a.db", capture=True, redact=["[a-"])


def test_the_cli_refuses_capture_settings_without_capture(student_dir, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from protege.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(student_dir), "--store", str(tmp_path / "a.db"),
                                      "--capture-max-rows", "10"])
    assert result.exit_code == 2 and "add --capture" in result.output
    assert not (tmp_path / "a.db").exists()  # refused before anything was written


def test_a_failed_capture_write_is_retried_without_writing_the_ledger_twice(tmp_path, monkeypatch):
    import asyncio

    from protege.serve.ledger import ServedLedger
    from protege.store import ServedRecord

    db = tmp_path / "protege.db"
    ledger = ServedLedger(db, max_rows=10)
    now = time.time()
    ledger.add([ServedRecord("s", "classify", "student")],
               [CapturedRecord("s", "v1", "classify", "student", "hi", "billing", 0.9, None, now, now)])
    real = Store.record_captured

    def broken(self, *a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "record_captured", broken)
    asyncio.run(ledger.flush())
    assert sql(db, "SELECT COUNT(*) FROM served") == [(1,)] and sql(db, "SELECT COUNT(*) FROM captured") == [(0,)]
    monkeypatch.setattr(Store, "record_captured", real)
    asyncio.run(ledger.flush())
    assert sql(db, "SELECT COUNT(*) FROM served") == [(1,)] and sql(db, "SELECT input FROM captured") == [("hi",)]
