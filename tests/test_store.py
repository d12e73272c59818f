"""The store: migrations (and stores earlier versions wrote), WAL, one row per key, failed calls not cached,
provider batches, cost ledger; and the signal types."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

import protege.store as store_module
from protege._compact import as_stored
from protege.errors import ProtegeError, TeacherError
from protege.signals import LabelDistribution, TeacherSignal, TokenLogprobs
from protege.store import CallRecord, ServedRecord, Store, call_key

ALL_MIGRATIONS = ["0001_calls", "0002_compute", "0003_api_calls", "0004_served", "0005_compact", "0006_captured",
                  "0007_served_version"]
FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_stores", FIXTURES / "make_stores.py")
assert _spec is not None and _spec.loader is not None
make_stores = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_stores)

LABELS = ("billing", "shipping", "other")
IDENTITY = {"model": "tiny", "weights": "abc123", "method": "label_logprobs", "calibrate": True}


def _request(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "labels": list(LABELS)}


def f32(*xs: float) -> tuple[float, ...]:
    return tuple(float(np.float32(x)) for x in xs)


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
    assert store.migrations == ALL_MIGRATIONS
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
        assert s.migrations == ALL_MIGRATIONS
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
    assert sig == as_stored(rec.signal)
    dist = sig.distribution  # the probabilities in float32 (src/protege/_compact.py), all else exact
    assert dist.probs == f32(0.7, 0.2, 0.1) and dist.labels == LABELS
    assert dist.method == "label_logprobs" and dist.covered_mass == 0.9 and dist.calibrated is True
    assert dist.raw_probs == f32(0.5, 0.3, 0.2)
    assert sig.usage == {"input_tokens": 12}
    # the request is kept (what differs from its template; see test_store_compact.py) and read back as JSON
    assert store.requests([rec.key]) == {rec.key: _request("hello")}


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
    got = store.get_signals([rec.key])[rec.key]
    # top log-probabilities are kept as float16, tail masses as float32 (protege._compact); the rest exactly
    lp = got.token_logprobs
    assert [list(d) for d in lp.top] == [["bill", "ship"], ["ing"]]
    assert [v for d in lp.top for v in d.values()] == pytest.approx([-0.1, -2.5, -0.01], abs=2**-11)
    assert [v for d in lp.top for v in d.values()] != [-0.1, -2.5, -0.01]  # it is rounded: -0.1 is not a float16
    assert got.to_json() | {"token_logprobs": None} == sig.to_json() | {"token_logprobs": None}
    assert (lp.tokens, lp.tokenizer, lp.temperature) == (("bill", "ing"), "tok-v1", 1.0)
    assert lp.tail_mass == pytest.approx((0.02, 0.0), rel=2**-24)  # float32
    store.put([_record("tl2", got)])  # rounding twice changes nothing: what is read back is stored back as it is
    assert store.get_signals([_record("tl2", None).key])[_record("tl2", None).key] == got


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
    assert store.get_signals([ok.key])[ok.key].to_json() == as_stored(ok.signal).to_json()
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
    row_id = store.add_batch("openai", "m", "file-1", [], 1.0)
    assert store.spent() == pytest.approx(1.75)  # a pending batch's reservation counts until it is collected
    store.set_batch_status(row_id, "submitted", "batch-1")
    assert store.spent() == pytest.approx(1.75)
    store.collect_batch(row_id, [])
    assert store.spent() == pytest.approx(0.75)


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


# --------------------------------------------------------------------------------------------------------------
# the named queries other modules ask the store


def test_call_usage_reports_each_recorded_call_once(store):
    ok = _record("a", _signal(), input_tokens=10, output_tokens=2, cost_usd=0.5, uncertain_usd=0.1, seconds=1.5)
    failed = _record("b", None, error="boom", input_tokens=3, cost_usd=0.25, seconds=0.5)
    store.put([ok, failed])
    keys = [ok.key, failed.key, ok.key, "never-called"] + [f"k{i}" for i in range(1200)]  # over SQLite's limit
    usage = store.call_usage(keys)
    assert set(usage) == {ok.key, failed.key}
    assert usage[ok.key] == ("ok", 0.5, 0.1, 10, 2, 1.5)
    assert usage[ok.key].spent_usd == pytest.approx(0.6)
    assert usage[failed.key].status == "failed" and usage[failed.key].spent_usd == 0.25


def test_answered_means_count_only_the_teachers_answers(store):
    assert store.answered_means("tiny") == (0, None, None, None, None)
    store.put([
        _record("a", _signal(), input_tokens=10, output_tokens=2, cost_usd=0.5, seconds=1.0),
        _record("b", _signal(), input_tokens=20, output_tokens=4, cost_usd=0.25, seconds=3.0),
        _record("c", None, error="boom", input_tokens=1000, cost_usd=9.0),
    ])
    other = _request("z")
    store.put([CallRecord(call_key({"model": "other"}, other), "other", other, _signal(), input_tokens=500)])
    m = store.answered_means("tiny")
    assert m.calls == 2
    assert (m.cost_usd, m.input_tokens, m.output_tokens, m.seconds) == pytest.approx((0.375, 15, 3, 2.0))


def test_teacher_totals_can_leave_out_what_serving_asked(store):
    labeled = _record("l", _signal(), cost_usd=1.0)
    served_new, served_cached = _record("n", _signal(), cost_usd=0.5), _record("c", _signal(), cost_usd=0.25)
    store.put([labeled, served_new, served_cached])
    store.record_served([
        ServedRecord("stu", "classify", "teacher", teacher_usd=0.5, call_key=served_new.key, cached=False),
        # an answer the store already held: the call was labeling's, not serving's
        ServedRecord("stu", "classify", "teacher", call_key=served_cached.key, cached=True),
        ServedRecord("stu", "classify", "student"),
    ])
    assert store.teacher_totals()["calls"] == 3
    made = store.teacher_totals(include_served=False)
    assert made["calls"] == 2 and made["cost_usd"] == pytest.approx(1.25)
    assert store.teacher_totals("tiny", include_served=False)["calls"] == 2
    assert store.teacher_totals("nobody", include_served=False)["calls"] == 0


def test_labeling_throughput_sums_the_labeling_runs(store):
    assert store.labeling_throughput() == (0.0, 0)
    store.log_compute("label", 2.0, rows=10, attempts=11)
    store.log_compute("label", 3.0, rows=5)
    store.log_compute("train", 100.0, rows=999)  # not labeling
    assert store.labeling_throughput() == (pytest.approx(5.0), 15)


def test_a_batch_goes_from_submitting_to_collected(store):
    rows = [(_record(t, None).key, _request(t)) for t in ("a", "b")]
    row_id = store.add_batch("openai", "tiny", "file-1", rows, 0.5)
    other = store.add_batch("openai", "someone-else", "file-2", [], 0.25)
    (pending,) = store.pending_batches("tiny")
    assert pending == (row_id, "file-1", None, rows, "submitting")
    assert store.spent() == pytest.approx(0.75)

    store.set_batch_status(row_id, "submitted", "batch-1")
    assert store.pending_batches("tiny")[0][2:] == ("batch-1", rows, "submitted")
    store.set_batch_status(row_id, "submitted")  # without a batch id the known one stays
    assert store.pending_batches("tiny")[0].batch_id == "batch-1"

    answers = [_record("a", _signal(), cost_usd=0.1), _record("b", None, error="refused")]
    assert store.collect_batch(row_id, answers) == 2
    assert store.pending_batches("tiny") == []
    assert set(store.get_signals([k for k, _ in rows])) == {answers[0].key}
    assert store.spent() == pytest.approx(0.1 + 0.25)  # the reservation ended with the answers

    store.set_batch_status(other, "abandoned")
    assert store.pending_batches("someone-else") == [] and store.spent() == pytest.approx(0.1)


def test_collecting_is_all_or_nothing(store):
    """The answers and the batch's 'collected' land in one transaction: no half-collected batch after a crash."""
    with pytest.raises(ProtegeError, match="no batch with row id 99"):
        store.collect_batch(99, [_record("a", _signal())])
    assert store.teacher_totals()["calls"] == 0  # the answers were rolled back with it

    row_id = store.add_batch("openai", "tiny", "file-1", [], 0.5)
    bad = CallRecord(**{**_record("b", _signal()).__dict__, "teacher": None})  # NOT NULL fails mid-transaction
    with pytest.raises(sqlite3.IntegrityError):
        store.collect_batch(row_id, [_record("a", _signal()), bad])
    assert store.teacher_totals()["calls"] == 0
    assert [b.status for b in store.pending_batches("tiny")] == ["submitting"]  # still pending, still reserved
    assert store.spent() == pytest.approx(0.5)


def test_batch_status_changes_are_checked(store):
    row_id = store.add_batch("openai", "tiny", "file-1", [], 0.5)
    with pytest.raises(ProtegeError, match="collect_batch"):
        store.set_batch_status(row_id, "collected")
    with pytest.raises(ProtegeError, match="no batch with row id 7"):
        store.set_batch_status(7, "abandoned")
    assert store.pending_batches("tiny")[0].status == "submitting"


# --------------------------------------------------------------------------------------------------------------
# migrations, and stores earlier versions wrote (tests/fixtures/make_stores.py)


def _tables(path: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """table -> (columns, rows in rowid order), read straight from the file."""
    with closing(sqlite3.connect(path)) as db:
        q = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        names = [r[0] for r in db.execute(q)]
        out = {}
        for name in names:
            order = "tokenizer, id" if name == "token_ids" else "rowid"  # token_ids is WITHOUT ROWID
            cur = db.execute(f"SELECT * FROM {name} ORDER BY {order}")
            out[name] = ([d[0] for d in cur.description], cur.fetchall())
    return out


def _copy_fixture(version: int, tmp_path: Path) -> Path:
    path = tmp_path / f"v{version}" / "protege.db"  # a copy: opening the committed file would write beside it
    path.parent.mkdir()
    shutil.copy(FIXTURES / "stores" / make_stores.fixture_name(version), path)
    return path


def test_the_fixture_stores_are_what_make_stores_writes(tmp_path):
    for version in range(1, 5):
        make_stores.write(tmp_path / "fresh.db", version)
        assert _tables(_copy_fixture(version, tmp_path)) == _tables(tmp_path / "fresh.db"), (
            f"tests/fixtures/stores/{make_stores.fixture_name(version)} is stale; rerun tests/fixtures/make_stores.py"
        )


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_a_store_an_earlier_version_wrote_opens_with_every_row_kept(tmp_path, version):
    path = _copy_fixture(version, tmp_path)
    before = _tables(path)
    assert [name for name, _ in before["migrations"][1]] == ALL_MIGRATIONS[:version]
    # the fixture has rows in every table its version had
    assert {t for t, (_, rows) in before.items() if rows} == set(before)
    calls = [dict(zip(before["calls"][0], row)) for row in before["calls"][1]]
    ok = {c["key"]: c["signal"] for c in calls if c["status"] == "ok"}
    failed = [c["key"] for c in calls if c["status"] == "failed"]
    assert len(ok) == 3 and len(failed) == 1

    with Store(path) as store:
        assert store.migrations == ALL_MIGRATIONS
        # a rerun makes zero calls: every answer is a cached signal, and none can be recorded twice
        signals = store.get_signals([c["key"] for c in calls])
        assert set(signals) == set(ok)
        # migrated into the compact rows: probabilities in float32 (src/protege/_compact.py), all else as written
        assert {k: s.to_json() for k, s in signals.items()} == {
            k: as_stored(TeacherSignal.from_json(json.loads(sig))).to_json() for k, sig in ok.items()
        }
        label = signals[make_stores._key("ok-1")].distribution
        assert label.probs == f32(0.7, 0.2, 0.1) and label.covered_mass == 0.9 and label.raw_probs == f32(0.5, 0.3, 0.2)
        assert signals[make_stores._key("ok-2")].distribution.n_samples == 4
        again = [CallRecord(k, "openai:smol", {}, _signal(), cost_usd=1.0) for k in ok]
        assert store.put(again) == 0
        raw = "<the reply, cut>" if version >= 3 else None
        assert store.failures(failed) == {failed[0]: ("no label in the reply", raw)}
        # the ledger reads the old rows
        totals = store.teacher_totals("openai:smol")
        assert totals["calls"] == 3 and totals["failed"] == 1 and totals["cost_usd"] == pytest.approx(0.0135)
        assert store.spent() == pytest.approx(0.0135 + (0.0025 + 0.003 if version >= 3 else 0.0))
        assert store.compute_totals().get("label", {}).get("runs", 0) == (1 if version >= 2 else 0)
        assert sum(t["requests"] for t in store.served_totals().values()) == (4 if version >= 4 else 0)

        # 0005_compact rewrote each request as the part that differs from a template: it reads back the same
        assert store.requests([c["key"] for c in calls]) == {c["key"]: json.loads(c["request"]) for c in calls}

    after = _tables(path)
    assert set(after) == {"migrations", "calls", "compute", "batches", "served", "strings", "templates",
                          "token_ids", "captured"}
    for table, (columns, rows) in before.items():
        new_columns, new_rows = after[table]
        assert new_columns[: len(columns)] == columns  # migrations only append columns
        n = len(rows)
        kept = [i for i, c in enumerate(columns) if table != "calls" or c not in ("request", "signal")]
        assert [[row[i] for i in kept] for row in new_rows[:n]] == [[row[i] for i in kept] for row in rows], (
            f"{table} rows changed"
        )
    assert [name for name, _ in after["migrations"][1]] == ALL_MIGRATIONS  # the old ones kept their applied_at
    if version < 3:  # the columns 0003_api_calls added have their defaults
        columns, rows = after["calls"]
        added = [columns.index(c) for c in ("raw", "uncertain_usd", "attempts")]
        assert [tuple(row[i] for i in added) for row in rows] == [(None, 0.0, 1)] * 4
    for table, since in (("compute", 2), ("batches", 3), ("served", 4)):
        if version < since:
            assert after[table][1] == [], f"{table} is new at {since}: it starts empty"


def test_a_failing_migration_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "protege.db"
    with Store(path) as s:
        s.put([_record("a", _signal(), cost_usd=0.5)])

    def m0005_broken(db):
        db.execute("CREATE TABLE half_done (x INTEGER)")
        db.execute("UPDATE calls SET cost_usd = 99")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, m0005_broken])
    with pytest.raises(RuntimeError, match="disk on fire"):
        Store(path)
    tables = _tables(path)
    assert "half_done" not in tables
    assert [name for name, _ in tables["migrations"][1]] == ALL_MIGRATIONS
    assert tables["calls"][1][0][tables["calls"][0].index("cost_usd")] == 0.5


def test_a_migration_is_a_function_that_can_transform_data(tmp_path, monkeypatch):
    path = _copy_fixture(4, tmp_path)

    def m0008_label_count(db):
        db.execute("ALTER TABLE calls ADD COLUMN label_count INTEGER")
        parts = store_module._Parts(db)  # how a migration reads the requests 0005_compact wrote
        for key, template, request in db.execute("SELECT key, request_template, request FROM calls").fetchall():
            labels = parts.request(template, request)["labels"]
            db.execute("UPDATE calls SET label_count = ? WHERE key = ?", (len(labels), key))

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, m0008_label_count])
    with Store(path) as s:
        assert s.migrations == [*ALL_MIGRATIONS, "0008_label_count"]
    columns, rows = _tables(path)["calls"]
    assert [row[columns.index("label_count")] for row in rows] == [3, 3, 3, 3]
