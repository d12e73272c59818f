"""The store: migrations, WAL, one row per key, failed calls not cached, cost ledger; and the signal types."""

from __future__ import annotations

import math
import sqlite3

import pytest

from protege.errors import ProtegeError, TeacherError
from protege.signals import LabelDistribution, TeacherSignal, TokenLogprobs
from protege.store import CallRecord, Store, call_key

LABELS = ("billing", "shipping", "other")
IDENTITY = {"model": "tiny", "weights": "abc123", "method": "label_logprobs", "calibrate": True}


def _request(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "labels": list(LABELS)}


def _signal(probs=(0.7, 0.2, 0.1)) -> TeacherSignal:
    return TeacherSignal(
        distribution=LabelDistribution(
            LABELS, probs, "label_logprobs", covered_mass=0.9, calibrated=True, raw_probs=(0.5, 0.3, 0.2)
        ),
        usage={"input_tokens": 12},
    )


def _record(text: str, signal: TeacherSignal | None, **kw) -> CallRecord:
    req = _request(text)
    return CallRecord(key=call_key(IDENTITY, req), teacher="tiny", request=req, signal=signal, **kw)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "sub" / "protege.db") as s:
        yield s


def test_new_store_migrates_and_uses_wal(store):
    assert store.migrations == ["0001_calls", "0002_compute", "0003_api_calls", "0004_served"]
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert store.path.is_file()
    assert store.teacher_totals()["calls"] == 0


def test_reopen_keeps_rows_and_does_not_rerun_migrations(tmp_path):
    path = tmp_path / "protege.db"
    with Store(path) as s:
        assert s.put([_record("a", _signal())]) == 1
        applied = s.db.execute("SELECT name, applied_at FROM migrations ORDER BY name").fetchall()
    with Store(path) as s:
        assert s.db.execute("SELECT name, applied_at FROM migrations ORDER BY name").fetchall() == applied
        assert s.migrations == ["0001_calls", "0002_compute", "0003_api_calls", "0004_served"]
        rec = _record("a", None)
        assert list(s.get_signals([rec.key])) == [rec.key]


def test_directory_path_is_rejected(tmp_path):
    with pytest.raises(ProtegeError, match="is a directory"):
        Store(tmp_path)


def test_put_same_key_twice_records_one_row_and_round_trips(store):
    rec = _record("hello", _signal())
    assert store.put([rec]) == 1
    assert store.put([_record("hello", _signal((0.1, 0.1, 0.8)))]) == 0  # an ok answer is never replaced
    assert store.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1

    got = store.get_signals([rec.key, "missing-key"])
    assert set(got) == {rec.key}
    sig = got[rec.key]
    assert sig.to_json() == rec.signal.to_json()
    assert sig == rec.signal
    dist = sig.distribution
    assert dist.probs == (0.7, 0.2, 0.1) and dist.labels == LABELS
    assert dist.method == "label_logprobs" and dist.covered_mass == 0.9 and dist.calibrated is True
    assert dist.raw_probs == (0.5, 0.3, 0.2)
    assert sig.usage == {"input_tokens": 12}
    # the request is stored as JSON
    assert store.db.execute("SELECT request FROM calls").fetchone()[0] == (
        '{"messages": [{"role": "user", "content": "hello"}], "labels": ["billing", "shipping", "other"]}'
    )


def test_duplicates_within_one_batch_count_once(store):
    rec = _record("x", _signal())
    assert store.put([rec, rec, _record("y", _signal())]) == 2
    assert store.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 2


def test_signal_with_token_logprobs_round_trips(store):
    sig = TeacherSignal(
        text="billing",
        rationale="mentions a charge",
        token_logprobs=TokenLogprobs(("bill", "ing"), ({"bill": -0.1, "ship": -2.5}, {"ing": -0.01}), (0.02, 0.0), "tok-v1", 1.0),
        logits=[[0.5, -1.0, 2.0]],
    )
    rec = _record("tl", sig)
    store.put([rec])
    assert store.get_signals([rec.key])[rec.key].to_json() == sig.to_json()


def test_failed_call_is_not_cached_and_is_replaced(store):
    failed = _record("f", None, error="timeout", cost_usd=0.01, input_tokens=5)
    assert store.put([failed]) == 1
    assert store.get_signals([failed.key]) == {}
    assert store.db.execute("SELECT status, error FROM calls").fetchone() == ("failed", "timeout")
    # failing again replaces the failed row (cost still adds up)
    assert store.put([_record("f", None, error="timeout again", cost_usd=0.01)]) == 1

    ok = _record("f", _signal(), cost_usd=0.02, input_tokens=7, output_tokens=1)
    assert store.put([ok]) == 1
    row = store.db.execute("SELECT status, error, cost_usd, input_tokens, attempts FROM calls").fetchone()
    status, error, cost, tokens, attempts = row
    assert (status, error, tokens, attempts) == ("ok", None, 5 + 7, 3)  # every attempt was paid for
    assert cost == pytest.approx(0.04)
    assert store.get_signals([ok.key])[ok.key].to_json() == ok.signal.to_json()
    assert store.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1
    # once ok, a later failure does not overwrite it
    assert store.put([_record("f", None, error="late failure", cost_usd=1.0)]) == 0
    assert store.db.execute("SELECT status, cost_usd FROM calls").fetchone() == ("ok", pytest.approx(0.04))


def test_call_key_is_stable_and_sensitive():
    req = _request("hi")
    base = call_key(IDENTITY, req)
    assert len(base) == 64 and all(c in "0123456789abcdef" for c in base)
    reordered_identity = dict(reversed(list(IDENTITY.items())))
    reordered_req = {"labels": list(LABELS), "messages": [{"content": "hi", "role": "user"}]}
    assert call_key(reordered_identity, reordered_req) == base

    variants = [
        call_key(IDENTITY, _request("hi!")),
        call_key(IDENTITY, {**req, "labels": ["billing", "other", "shipping"]}),
        call_key(IDENTITY, {**req, "messages": [{"role": "system", "content": "hi"}]}),
        call_key({**IDENTITY, "weights": "def456"}, req),
        call_key({**IDENTITY, "calibrate": False}, req),
        call_key({**IDENTITY, "method": "samples"}, req),
        call_key({**IDENTITY, "extra": 1}, req),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_teacher_totals(store):
    store.put([
        _record("a", _signal(), input_tokens=10, output_tokens=1, cost_usd=0.5, seconds=1.0),
        _record("b", _signal(), input_tokens=20, output_tokens=2, cost_usd=0.25, seconds=2.0),
        _record("c", None, error="boom", input_tokens=3, seconds=0.5),
    ])
    other = _request("z")
    store.put([CallRecord(call_key({"model": "other"}, other), "other", other, _signal(), input_tokens=100)])
    t = store.teacher_totals("tiny")
    assert t == {
        "calls": 3, "failed": 1, "input_tokens": 33, "output_tokens": 3,
        "cost_usd": pytest.approx(0.75), "uncertain_usd": 0, "attempts": 3, "seconds": pytest.approx(3.5),
    }
    all_ = store.teacher_totals()
    assert all_["calls"] == 4 and all_["input_tokens"] == 133 and all_["failed"] == 1
    assert store.teacher_totals("nobody") == {
        "calls": 0, "failed": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0, "uncertain_usd": 0,
        "attempts": 0, "seconds": 0,
    }


def test_spent_counts_paid_maybe_billed_and_pending_batches(store):
    assert store.spent() == 0
    store.put([
        _record("a", _signal(), cost_usd=0.5),
        CallRecord(**{**_record("b", None, error="timed out").__dict__, "uncertain_usd": 0.25, "raw": "<cut>"}),
    ])
    assert store.spent() == pytest.approx(0.75)
    assert store.failures([_record("a", None).key, _record("b", None).key]) == {
        _record("b", None).key: ("timed out", "<cut>")
    }
    store.db.execute(
        "INSERT INTO batches (provider, teacher, input_file_id, keys, reserved_usd, status, created_at, updated_at)"
        " VALUES ('openai', 'm', 'file-1', '[]', 1.0, 'submitted', 0, 0)"
    )
    assert store.spent() == pytest.approx(1.75)  # a pending batch's reservation counts until it is collected


def test_compute_ledger(store):
    assert store.compute_totals() == {}
    store.log_compute("train", 10.0, 0.01, epochs=2)
    store.log_compute("train", 5.0, 0.02)
    store.log_compute("eval", 1.5)
    totals = store.compute_totals()
    assert list(totals) == ["eval", "train"]
    assert totals["train"] == {"runs": 2, "seconds": pytest.approx(15.0), "cost_usd": pytest.approx(0.03)}
    assert totals["eval"] == {"runs": 1, "seconds": pytest.approx(1.5), "cost_usd": 0.0}
    assert store.db.execute("SELECT detail FROM compute WHERE stage='train' ORDER BY id").fetchone()[0] == '{"epochs": 2}'


def test_store_from_newer_version_is_rejected(tmp_path):
    path = tmp_path / "protege.db"
    Store(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO migrations VALUES ('0099_future', 0)")
    db.close()
    with pytest.raises(ProtegeError, match="newer") as e:
        Store(path)
    assert "0099_future" in str(e.value)


def test_get_signals_handles_more_keys_than_sqlite_parameters(store):
    recs = [_record(f"t{i}", _signal()) for i in range(3)]
    store.put(recs)
    keys = [f"k{i}" for i in range(1200)] + [r.key for r in recs]
    assert set(store.get_signals(keys)) == {r.key for r in recs}


@pytest.mark.parametrize(
    "probs", [(math.nan, 0.5, 0.5), (-0.1, 0.6, 0.5), (0.5, 0.3, 0.1), (0.5, 0.5, 0.5), (math.inf, 0.0, 0.0)]
)
def test_label_distribution_rejects_invalid(probs):
    with pytest.raises(TeacherError):
        LabelDistribution(LABELS, probs, "logits")


def test_label_distribution_rejects_bad_shape_and_mass():
    with pytest.raises(TeacherError, match="2 probabilities for 3 labels"):
        LabelDistribution(LABELS, (0.5, 0.5), "logits")
    with pytest.raises(TeacherError, match="covered"):
        LabelDistribution(LABELS, (0.5, 0.3, 0.2), "label_logprobs", covered_mass=1.5)
    with pytest.raises(TeacherError, match="covered"):
        LabelDistribution(LABELS, (0.5, 0.3, 0.2), "label_logprobs", covered_mass=math.nan)


def test_label_distribution_one_hot_and_top():
    d = LabelDistribution.one_hot(LABELS, "shipping")
    assert d.method == "hard_label" and d.probs == (0.0, 1.0, 0.0) and d.top == "shipping"
    assert LabelDistribution(LABELS, (0.2, 0.3, 0.5), "logits").top == "other"
    assert LabelDistribution(LABELS, (0.1, 0.45, 0.45), "logits").top == "shipping"  # ties: earlier label
    # within the sum tolerance is accepted
    assert LabelDistribution(LABELS, (0.5, 0.3, 0.20001), "logits").probs[2] == 0.20001


def test_rejected_store_closes_its_connection(tmp_path, monkeypatch):
    path = tmp_path / "protege.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO migrations VALUES ('0099_future', 0)")
    db.close()
    opened: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def tracking_connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", tracking_connect)
    with pytest.raises(ProtegeError, match="newer"):
        Store(path)
    assert len(opened) == 1
    try:
        with pytest.raises(sqlite3.ProgrammingError):  # operating on a closed connection
            opened[0].execute("SELECT 1")
    finally:
        opened[0].close()


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    path = tmp_path / "protege.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ProtegeError, match="not a protege SQLite store"):
        Store(path)
