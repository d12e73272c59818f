"""The compact store (migration 0005_compact, protege._compact): stores the previous schema wrote are migrated
and a rerun makes zero calls; a 77-label row is under 1 KB; a top-20 generation signal is under 100 bytes a
token and round-trips within float16; the shared parts stay right across rollbacks and concurrent writers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from protege.errors import ProtegeError
from protege.labeling.data import Example
from protege.labeling.labeler import label, requests_for
from protege.recipe import Recipe, load_recipe
from protege.signals import LabelDistribution, TeacherSignal, TokenLogprobs
from protege.store import CallRecord, Store, call_key

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_stores", FIXTURES / "make_stores.py")
assert _spec is not None and _spec.loader is not None
make_stores = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_stores)

IDENTITY = {"model": "openai:tiny", "method": "logprobs"}
COLUMNS = ("key", "teacher", "request", "status", "signal", "error", "raw", "input_tokens", "output_tokens", "cost_usd",
           "uncertain_usd", "attempts", "seconds", "created_at")


def _write_0004_store(path: Path, rows: list[dict]) -> None:
    """A store as schema 0004 left it: migrations 0001-0004 (their shipped SQL) and rows as that Store.put wrote
    them: the request and the signal as JSON text."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for i, (name, sql) in enumerate(make_stores.MIGRATIONS):
            for stmt in filter(str.strip, sql.split(";")):
                db.execute(stmt)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (name, 1.0 + i))
        db.executemany(
            f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [tuple(r[c] for c in COLUMNS) for r in rows],
        )


def _used_bytes(path: Path) -> int:
    """Bytes of the pages in use (after a WAL checkpoint): the store's size without its free pages."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count",
                                                                                 "page_size"))
    return (pages - free) * size


def test_a_store_the_previous_schema_wrote_is_migrated_and_a_rerun_makes_zero_calls(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    first = label(recipe, quiet=True)
    assert first.called > 0
    signal_files = {p.name: p.read_bytes() for p in (recipe.output_dir / "signals").glob("*.jsonl")}
    assert {"train.jsonl", "eval.jsonl"} <= set(signal_files)

    # the same answers as 0004 wrote them (every column; request and signal as JSON text), in place of the store
    with Store(recipe.store_path) as store:
        store.db.row_factory = sqlite3.Row
        rows = [dict(r) for r in store.db.execute(f"SELECT {', '.join(COLUMNS)} FROM calls ORDER BY rowid")]
        store.db.row_factory = None
        keys = [r["key"] for r in rows]
        requests, signals = store.requests(keys), store.get_signals(keys)
    assert len(rows) == first.called and len(signals) == len(rows)
    for r in rows:
        r["request"] = json.dumps(requests[r["key"]], ensure_ascii=False)
        r["signal"] = json.dumps(signals[r["key"]].to_json(), ensure_ascii=False)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{recipe.store_path}{suffix}").unlink(missing_ok=True)
    _write_0004_store(recipe.store_path, rows)
    with closing(sqlite3.connect(recipe.store_path)) as db:  # what the old schema holds: the whole JSON
        assert db.execute("SELECT typeof(signal), typeof(request) FROM calls LIMIT 1").fetchone() == ("text", "text")
        old_bytes = db.execute("SELECT SUM(length(request) + length(signal)) FROM calls").fetchone()[0]

    with Store(recipe.store_path) as store:  # migrated on open
        assert store.migrations[4:] == ["0005_compact", "0006_captured", "0007_served_version"]
        got = store.get_signals(keys)
        # every signal reads back equal to the JSON 0004 held (classification: nothing is rounded)
        assert {k: json.loads(json.dumps(s.to_json())) for k, s in got.items()} == {
            r["key"]: json.loads(r["signal"]) for r in rows
        }
        assert got == signals
        assert store.requests(keys) == requests
        new_bytes = store.db.execute("SELECT SUM(length(request) + length(signal)) FROM calls").fetchone()[0]
        kinds = store.db.execute("SELECT DISTINCT typeof(signal) FROM calls").fetchall()
    assert kinds == [("blob",)] and new_bytes < old_bytes / 3
    # the ledger columns are as they were
    with closing(sqlite3.connect(recipe.store_path)) as db:
        ledger = [c for c in COLUMNS if c not in ("request", "signal")]
        assert db.execute(f"SELECT {', '.join(ledger)} FROM calls ORDER BY rowid").fetchall() == [
            tuple(r[c] for c in ledger) for r in rows
        ]

    again = label(recipe, quiet=True)
    assert again.called == 0 and again.cached == first.examples
    assert {p.name: p.read_bytes() for p in (recipe.output_dir / "signals").glob("*.jsonl")} == signal_files


# --------------------------------------------------------------------------------------------------------------
# size


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _77_label_records(n: int) -> list[CallRecord]:
    rng = np.random.default_rng(0)
    words = "card charged twice refund order parcel late password reset account locked transfer fee".split()
    labels = {f"intent_{i:02d}": f"questions about {words[i % 13]} and {words[(3 * i) % 13]}" for i in range(77)}
    recipe = Recipe.model_validate({"task": {"instruction": "Classify the message by intent.", "labels": labels},
                                    "teacher": {"model": "openai:tiny"}})
    texts = [" ".join(rng.choice(words, int(rng.integers(8, 20)))) for _ in range(n)]
    out = []
    for r in requests_for(recipe, [Example(str(i), t, None, f"t:{i}") for i, t in enumerate(texts)]):
        dist = LabelDistribution(r.labels, tuple(_softmax(rng.normal(0, 2, 77)).tolist()), "embedding")  # float64
        req = r.to_json()
        out.append(CallRecord(call_key(IDENTITY, req), "openai:tiny", req,
                              TeacherSignal(distribution=dist, text=dist.top, usage={"input_tokens": 900}),
                              input_tokens=900, output_tokens=2, cost_usd=1e-4, seconds=0.2))
    return out


def _in_float32(dist: LabelDistribution) -> LabelDistribution:
    """The distribution as the store keeps it: its probabilities rounded to float32."""
    return dataclasses.replace(dist, probs=tuple(float(np.float32(p)) for p in dist.probs))


def test_a_77_label_row_is_under_1kb_and_reads_back_in_float32(tmp_path):
    records = _77_label_records(500)
    with Store(tmp_path / "s.db") as store:
        for i in range(0, len(records), 32):
            store.put(records[i : i + 32])
        row_bytes = store.db.execute(
            "SELECT AVG(length(key) + length(teacher) + length(request) + length(signal) + 8 * 8) FROM calls"
        ).fetchone()[0]
        got = store.get_signals([r.key for r in records])
        assert store.requests([records[0].key]) == {records[0].key: records[0].request}
        again = store.get_signals([r.key for r in records])
    assert set(got) == {r.key for r in records}
    worst = 0.0
    for r in records:
        sent, back = r.signal.distribution, got[r.key].distribution
        # every probability is exactly its float32 rounding, and everything else is as written
        assert back == _in_float32(sent)
        assert dataclasses.replace(got[r.key], distribution=sent) == r.signal
        worst = max(worst, max(abs(b - p) / p for p, b in zip(sent.probs, back.probs) if p > 0))
    assert 0 < worst <= 2**-24  # the stated relative error, and the values were float64 (so rounding happened)
    assert again == got  # reading is stable; storing a read-back signal stores the same float32 values
    # the row's own bytes: key, teacher, the request's text, the signal, eight numbers (at most 8 bytes each)
    assert row_bytes < 700
    # the file, with the key's index and page slack (the old JSON rows took ~9 KB): issue 15's goal of 1 KB
    assert _used_bytes(tmp_path / "s.db") / len(records) < 1024


def _generation_records(n: int, tokens: int, local: bool, k: int = 20) -> list[CallRecord]:
    rng = np.random.default_rng(1)
    vocab = [f"tok{i}" if i % 5 else f" w{i}" for i in range(3000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    out = []
    for row in range(n):
        ids = [rng.choice(len(vocab), k, replace=False, p=zipf) for _ in range(tokens)]
        lps = [np.sort(np.log(_softmax(rng.normal(0, 3, 4 * k)))[:k])[::-1] for _ in range(tokens)]
        if local:
            lps = [lp.astype(np.float32).astype(np.float64) for lp in lps]
        toks = tuple(vocab[i[0]] for i in ids)
        tl = TokenLogprobs(
            toks, tuple({vocab[i]: float(v) for i, v in zip(i_, lp)} for i_, lp in zip(ids, lps)),
            tuple(max(0.0, 1.0 - float(np.exp(lp).sum())) for lp in lps), "tok-v1", 1.0,
            ids=tuple(int(i[0]) for i in ids) if local else None,
            top_ids=tuple(tuple(int(x) for x in i) for i in ids) if local else None,
            top_logprobs=tuple(tuple(float(v) for v in lp) for lp in lps) if local else None,
        )
        req = {"messages": [{"role": "user", "content": f"Answer the question.\n\nquestion {row}"}], "labels": [],
               "generate": {"max_tokens": tokens, "top_logprobs": k, "rationale": False}}
        sig = TeacherSignal(text="".join(toks), answer="".join(toks).strip(), token_logprobs=tl,
                            usage={"input_tokens": 12, "output_tokens": tokens})
        out.append(CallRecord(call_key(IDENTITY, req), "openai:tiny", req, sig, output_tokens=tokens))
    return out


@pytest.mark.parametrize("local", [False, True], ids=["api-strings", "local-ids"])
def test_top20_logprobs_round_trip_within_float16_under_100_bytes_a_token(tmp_path, local):
    records = _generation_records(80, 64, local)
    path = tmp_path / "s.db"
    with Store(path):
        pass
    empty = _used_bytes(path)
    with Store(path) as store:
        for i in range(0, len(records), 16):
            store.put(records[i : i + 16])
    per_token = (_used_bytes(path) - empty) / (80 * 64)
    assert per_token < 100

    with Store(path) as store:  # a fresh connection: nothing cached
        got = store.get_signals([r.key for r in records])
    err_lp = err_p = 0.0
    for r in records:
        a, b = r.signal.token_logprobs, got[r.key].token_logprobs
        assert (got[r.key].text, got[r.key].answer, got[r.key].usage) == (r.signal.text, r.signal.answer, r.signal.usage)
        assert (b.tokens, b.tokenizer, b.temperature, b.ids, b.top_ids) == (a.tokens, a.tokenizer, a.temperature,
                                                                            a.ids, a.top_ids)
        assert [list(d) for d in b.top] == [list(d) for d in a.top]
        assert b.tail_mass == pytest.approx(a.tail_mass, rel=2**-24, abs=1e-300)
        for da, db in zip(a.top, b.top):
            for x, y in zip(da.values(), db.values()):
                assert y == float(np.float16(x))  # exactly the float16 rounding, nothing else
                bound = 2.0 ** (math.floor(math.log2(abs(x))) - 11) if x else 0.0  # half a float16 step
                assert abs(x - y) <= bound
                err_lp, err_p = max(err_lp, abs(x - y)), max(err_p, abs(math.exp(x) - math.exp(y)))
        if local:
            assert b.top_logprobs == tuple(tuple(float(np.float16(v)) for v in row) for row in a.top_logprobs)
    assert 0 < err_lp <= 2**-7 and err_p <= 2**-11 / math.e  # the docstring's bounds (|lp| < 32 here)
    # rounding twice changes nothing: what is read back is stored back as it is
    with Store(tmp_path / "again.db") as store:
        again = [CallRecord(r.key, r.teacher, r.request, got[r.key]) for r in records[:5]]
        store.put(again)
        assert store.get_signals([r.key for r in again]) == {r.key: r.signal for r in again}


# --------------------------------------------------------------------------------------------------------------
# the shared parts


def test_a_rolled_back_put_leaves_no_ids_behind(tmp_path):
    records = _generation_records(3, 8, local=True)
    with Store(tmp_path / "s.db") as store:
        with pytest.raises(ProtegeError, match="no batch with row id 7"):
            store.collect_batch(7, records[:2])  # interns strings and token ids, then rolls back
        assert store.db.execute("SELECT COUNT(*) FROM strings").fetchone()[0] == 0
        store.put(records[2:])  # new strings take the ids the rollback freed
        store.put(records[:2])
        assert store.get_signals([r.key for r in records]) == Store(tmp_path / "s.db").get_signals(
            [r.key for r in records]
        )
        assert len(store.get_signals([r.key for r in records])) == 3


def test_two_stores_on_one_file_share_strings_templates_and_token_ids(tmp_path):
    gen = _generation_records(6, 16, local=True)
    cls = _77_label_records(6)
    with Store(tmp_path / "s.db") as a, Store(tmp_path / "s.db") as b:
        for i in range(3):  # interleaved writers: each sees the other's new rows of the shared tables
            a.put([gen[2 * i], cls[2 * i]])
            b.put([gen[2 * i + 1], cls[2 * i + 1]])
        keys = [r.key for r in gen + cls]
        readings = [a.get_signals(keys), b.get_signals(keys)]
        requests = [a.requests(keys), b.requests(keys)]
    for got in readings:
        assert {k: s.to_json() for k, s in got.items()} == {
            k: s.to_json() for k, s in readings[0].items()
        }
        assert {k: got[k].distribution for k in (r.key for r in cls)} == {
            r.key: _in_float32(r.signal.distribution) for r in cls
        }
    assert requests[0] == requests[1] == {r.key: r.request for r in gen + cls}


def test_requests_of_several_tasks_interleaved_keep_few_templates_and_read_back(tmp_path):
    cls = _77_label_records(40)
    gen = _generation_records(40, 2, local=False)
    mixed = [r for pair in zip(cls, gen) for r in pair]
    with Store(tmp_path / "s.db") as store:
        for r in mixed:
            store.put([r])
        assert store.requests([r.key for r in mixed]) == {r.key: r.request for r in mixed}
        templates = store.db.execute("SELECT COUNT(*) FROM templates").fetchone()[0]
        whole = store.db.execute("SELECT COUNT(*) FROM calls WHERE request_template IS NULL").fetchone()[0]
    assert templates <= 4 and whole <= 4  # one template a task; the first request of each is kept whole


def test_the_fixture_stores_migrate_to_compact_rows(tmp_path):
    path = tmp_path / "protege.db"
    shutil.copy(FIXTURES / "stores" / make_stores.fixture_name(4), path)
    with Store(path) as store:
        kinds = dict(store.db.execute("SELECT status, typeof(signal) FROM calls"))
    assert kinds == {"ok": "blob", "failed": "null"}


EDGE_SIGNALS = {
    "empty": TeacherSignal(),
    "text-only": TeacherSignal(text="x", thinking="hmm", truncated=True, usage={"input_tokens": 1}),
    "hard-label": TeacherSignal(distribution=LabelDistribution.one_hot(("a", "b"), "b"), text="b"),
    "samples": TeacherSignal(distribution=LabelDistribution(("a", "b"), (0.25, 0.75), "samples", n_samples=4),
                             text="not the top"),
    "no-tokens": TeacherSignal(token_logprobs=TokenLogprobs((), (), (), "t", 1.0), text=""),
    "empty-top-and-inf": TeacherSignal(
        token_logprobs=TokenLogprobs(("a", "b"), ({}, {"b": -0.5, "c": float("-inf")}), (1.0, 0.5), "t", 0.7,
                                     ids=(5, 6), top_ids=((), (6, 7)), top_logprobs=((), (-0.5, float("-inf")))),
        text="ab"),
    "ids-decoding-alike": TeacherSignal(  # ids 9 and 10 both decode to 'b': the top strings are kept as strings
        token_logprobs=TokenLogprobs(("a",), ({"a": -0.5, "b": -1.0},), (0.25,), "t", 1.0, ids=(5,),
                                     top_ids=((5, 9, 10),), top_logprobs=((-0.5, -1.0, -1.0),)),
        text="a!"),
    "logits": TeacherSignal(logits=[[1.5, -2.25], [0.1]]),
    "too-unlikely-for-float16": TeacherSignal(token_logprobs=TokenLogprobs(("é",), ({"é": -1e5},), (0.0,), "t", 1.0)),
}


@pytest.mark.parametrize("name", sorted(EDGE_SIGNALS))
def test_edge_signals_round_trip(tmp_path, name):
    sig = EDGE_SIGNALS[name]
    rec = CallRecord(call_key(IDENTITY, {"messages": [], "labels": [name]}), "t", {"messages": [], "labels": [name]}, sig)
    with Store(tmp_path / "s.db") as store:
        store.put([rec])
    with Store(tmp_path / "s.db") as store:
        got = store.get_signals([rec.key])[rec.key]
    if name == "too-unlikely-for-float16":  # below float16's range: -inf, a probability of 0 either way
        assert got.token_logprobs.top == ({"é": float("-inf")},)
    else:
        assert got == sig  # these values are exact in float16 and float32


def test_an_answer_the_rounding_ties_with_another_label_reads_back_as_written(tmp_path):
    # 0.5 and 0.5 + 1e-12 are one float32: read back, the top label is the first; the answer written was the second
    dist = LabelDistribution(("a", "b"), (0.5 - 1e-12, 0.5 + 1e-12), "label_logprobs")
    sig = TeacherSignal(distribution=dist, text="b")
    rec = CallRecord(call_key(IDENTITY, {"text": "tie"}), "openai:tiny", {"text": "tie"}, sig)
    with Store(tmp_path / "s.db") as store:
        store.put([rec])
        back = store.get_signals([rec.key])[rec.key]
    assert back.distribution.probs == (0.5, 0.5) and back.distribution.top == "a"
    assert back.text == "b"
