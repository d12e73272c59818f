"""Bytes per row of the store, before (the JSON rows of schema 0004) and after (0005_compact), and replay rate.

    .venv/bin/python benchmarks/store_size.py            # writes its table into BENCHMARKS.md
    .venv/bin/python benchmarks/store_size.py --quick    # fewer rows, prints only

Synthetic rows through the real code: requests rendered by ``protege.labeling.labeler.requests_for`` for a
77-label task (each label with a description), signals made here. "before" is a store with migrations 0001-0004
only (the SQL of tests/fixtures/make_stores.py) and rows as 0004 wrote them (request and signal JSON);
"migrated" is that file opened by the current Store (0005_compact rewrites the rows; the file keeps its pages
until VACUUM), "after" is a fresh store written through ``Store.put`` in batches of 32. Bytes per row are the
file's used pages (page_count - freelist_count) x page size after a WAL checkpoint, divided by the rows.
Replay: ``Store.get_signals`` over every key, in chunks of 1,000 (rows/s, best of 3).

Cases:

- classification, embedding: ``probs`` = softmax of float64 logits (an ``embed:`` teacher), float64 (the store keeps
  them as float32: the largest relative error is reported);
- classification, calibrated LM: ``probs`` and ``raw_probs`` (float64, kept as float32) and ``covered_mass``;
- generation, API: 128 tokens a row, top-20 alternatives per token as strings (Zipf over 8,000 token strings),
  log-probabilities float64 (as an API returns them); bytes per token;
- generation, local: the same with token ids, ``top_ids`` and float32 ``top_logprobs`` (an ``hf:`` teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from protege.labeling.data import Example
from protege.labeling.labeler import requests_for
from protege.recipe import Recipe
from protege.signals import LabelDistribution, TeacherSignal, TokenLogprobs
from protege.store import CallRecord, Store, call_key

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_stores", REPO / "tests" / "fixtures" / "make_stores.py")
assert _spec is not None and _spec.loader is not None
make_stores = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_stores)

IDENTITY = {"model": "openai:bench", "method": "logprobs"}
WORDS = ("card charged twice refund order parcel late password reset account locked transfer pending fee "
         "exchange rate top up cash withdrawal atm pin blocked contactless limit verify identity").split()


def _texts(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 30)))).capitalize() + "." for _ in range(n)]


def _recipe(kind: str) -> Recipe:
    if kind == "generation":
        return Recipe.model_validate(dict(task={"kind": "generation", "instruction": "Answer the question."},
                                          teacher={"model": "openai:bench", "top_logprobs": 20},
                                          student={"model": "gpt2"}))
    labels = {f"intent_{i:02d}": f"questions about {WORDS[i % len(WORDS)]} and {WORDS[(3 * i) % len(WORDS)]}"
              for i in range(77)}
    return Recipe.model_validate(dict(task={"instruction": "Classify the banking customer's message by intent.",
                                            "labels": labels}, teacher={"model": "openai:bench"}))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _classification(n: int, case: str, rng: np.random.Generator) -> list[CallRecord]:
    recipe = _recipe("classification")
    requests = requests_for(recipe, [Example(str(i), t, None, f"bench:{i}") for i, t in enumerate(_texts(n, rng))])
    out = []
    for r in requests:
        p = _softmax(rng.normal(0, 2.0, 77))
        if case == "embedding":
            dist = LabelDistribution(r.labels, tuple(p.tolist()), "embedding")
        else:
            raw = _softmax(rng.normal(0, 2.0, 77))
            dist = LabelDistribution(r.labels, tuple(p.tolist()), "label_logprobs", covered_mass=float(rng.uniform()),
                                     calibrated=True, raw_probs=tuple(raw.tolist()))
        sig = TeacherSignal(distribution=dist, text=dist.top, usage={"input_tokens": 900, "output_tokens": 3})
        req = r.to_json()
        out.append(CallRecord(call_key(IDENTITY, req), "openai:bench", req, sig, input_tokens=900, output_tokens=3,
                              cost_usd=1.4e-4, seconds=0.3))
    return out


def _generation(n: int, case: str, rng: np.random.Generator, tokens: int = 128, k: int = 20) -> list[CallRecord]:
    recipe = _recipe("generation")
    requests = requests_for(recipe, [Example(str(i), t, None, f"bench:{i}") for i, t in enumerate(_texts(n, rng))])
    vocab = [f"{w}{i}" if i % 7 else f" {w}{i}" for i, w in enumerate(np.resize(WORDS, 8000))]  # distinct
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    out = []
    for r in requests:
        steps_ids = [rng.choice(len(vocab), k, replace=False, p=zipf) for _ in range(tokens)]
        lps = [np.sort(np.log(_softmax(rng.normal(0, 3.0, 4 * k)))[:k])[::-1] for _ in range(tokens)]
        if case == "local":
            lps = [lp.astype(np.float32).astype(np.float64) for lp in lps]  # a torch float32 log_softmax
        chosen = [ids[0] for ids in steps_ids]
        toks = tuple(vocab[i] for i in chosen)
        tl = TokenLogprobs(
            tokens=toks,
            top=tuple({vocab[i]: float(v) for i, v in zip(ids, lp)} for ids, lp in zip(steps_ids, lps)),
            tail_mass=tuple(max(0.0, 1.0 - float(np.exp(lp).sum())) for lp in lps),
            tokenizer="openai:bench" if case == "api" else "hf:bench-tokenizer",
            temperature=1.0,
            ids=tuple(int(i) for i in chosen) if case == "local" else None,
            top_ids=tuple(tuple(int(i) for i in ids) for ids in steps_ids) if case == "local" else None,
            top_logprobs=tuple(tuple(float(v) for v in lp) for lp in lps) if case == "local" else None,
        )
        text = "".join(toks)
        sig = TeacherSignal(text=text, answer=text.strip(), token_logprobs=tl,
                            usage={"input_tokens": 40, "output_tokens": tokens})
        req = r.to_json()
        out.append(CallRecord(call_key(IDENTITY, req), "openai:bench", req, sig, input_tokens=40,
                              output_tokens=tokens, cost_usd=1e-4, seconds=1.0))
    return out


def _old_store(path: Path, records: list[CallRecord]) -> None:
    """A store as schema 0004 wrote it: migrations 0001-0004 and JSON rows (Store._put at HEAD before 0005)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for name, sql in make_stores.MIGRATIONS:
        db.execute("BEGIN IMMEDIATE")
        for stmt in filter(str.strip, sql.split(";")):
            db.execute(stmt)
        db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
        db.execute("COMMIT")
    for i in range(0, len(records), 32):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO calls (key, teacher, request, status, signal, error, raw, input_tokens, output_tokens,"
            " cost_usd, uncertain_usd, attempts, seconds, created_at) VALUES (?, ?, ?, 'ok', ?, NULL, NULL, ?, ?, ?,"
            " 0, 1, ?, ?)",
            [(r.key, r.teacher, json.dumps(r.request, ensure_ascii=False),
              json.dumps(r.signal.to_json(), ensure_ascii=False), r.input_tokens, r.output_tokens, r.cost_usd,
              r.seconds, time.time()) for r in records[i : i + 32]],
        )
        db.execute("COMMIT")
    db.close()


def _used_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count",
                                                                                 "page_size"))
    return (pages - free) * size


def _column_bytes(path: Path) -> int:
    """The rows' own bytes: key, teacher, request and signal (the ledger's numbers are a few bytes each)."""
    with sqlite3.connect(path) as db:
        q = "SELECT SUM(length(key) + length(teacher) + length(request) + length(signal)) FROM calls"
        return db.execute(q).fetchone()[0]


def _replay(path: Path, keys: list[str]) -> tuple[float, dict]:
    best, got = math.inf, {}
    for _ in range(3):
        with Store(path) as s:  # a fresh Store each time: its string cache starts empty, as a rerun's does
            t0 = time.perf_counter()
            got = {}
            for i in range(0, len(keys), 1000):
                got.update(s.get_signals(keys[i : i + 1000]))
            best = min(best, time.perf_counter() - t0)
    return len(keys) / best, got


def _fidelity(records: list[CallRecord], got: dict) -> tuple[float, float, float, bool]:
    """(max abs error of a top log-probability, of its probability, max relative error of a label probability,
    every other field exact: label probabilities exactly their float32 rounding, tail masses within float32)."""
    err_lp = err_p = err_label = 0.0
    exact = True
    for r in records:
        a, b = r.signal, got[r.key]
        if a.token_logprobs is None:
            da, db = a.distribution, b.distribution
            for x, y in zip(da.probs + (da.raw_probs or ()), db.probs + (db.raw_probs or ())):
                exact &= y == float(np.float32(x))
                err_label = max(err_label, abs(x - y) / x if x else float(y != 0))
            exact &= dataclasses.replace(a, distribution=dataclasses.replace(
                da, probs=db.probs, raw_probs=db.raw_probs)) == b
            continue
        for da, db in zip(a.token_logprobs.top, b.token_logprobs.top):
            exact &= list(da) == list(db)
            for x, y in zip(da.values(), db.values()):
                err_lp = max(err_lp, abs(x - y))
                err_p = max(err_p, abs(math.exp(x) - math.exp(y)))
        ta, tb = a.token_logprobs, b.token_logprobs
        exact &= (ta.tokens, ta.tokenizer, ta.temperature, ta.ids, ta.top_ids) == (
            tb.tokens, tb.tokenizer, tb.temperature, tb.ids, tb.top_ids)
        exact &= bool(np.allclose(ta.tail_mass, tb.tail_mass, rtol=2**-24, atol=0))  # float32
        exact &= (a.text, a.answer, a.usage) == (b.text, b.answer, b.usage)
    return err_lp, err_p, err_label, exact


def measure(kind: str, case: str, n: int, work: Path) -> dict:
    rng = np.random.default_rng(0)
    records = _classification(n, case, rng) if kind == "classification" else _generation(n, case, rng)
    keys = [r.key for r in records]
    units = n if kind == "classification" else sum(len(r.signal.token_logprobs.tokens) for r in records)
    old, new = work / f"{kind}-{case}-old.db", work / f"{kind}-{case}-new.db"
    _old_store(old, records)
    before, before_columns = _used_bytes(old), _column_bytes(old)
    old_rate, _ = _replay_legacy(old, keys)
    t0 = time.perf_counter()
    with Store(old) as s:
        migrated_rows = s.teacher_totals()["calls"]
    migrate_s = time.perf_counter() - t0
    migrated = _used_bytes(old)
    with sqlite3.connect(old) as db:
        db.execute("VACUUM")
    vacuumed = _used_bytes(old)
    with Store(new) as s:
        t0 = time.perf_counter()
        for i in range(0, n, 32):
            s.put(records[i : i + 32])
        put_s = time.perf_counter() - t0
    after, after_columns = _used_bytes(new), _column_bytes(new)
    rate, got = _replay(new, keys)
    _, got_migrated = _replay(old, keys)
    err_lp, err_p, err_label, exact = _fidelity(records, got)
    assert migrated_rows == n and {k: s.to_json() for k, s in got.items()} == {
        k: s.to_json() for k, s in got_migrated.items()}, "a migrated store reads back what a fresh one does"
    return dict(kind=kind, case=case, rows=n, units=units, before=before / units, migrated=migrated / units,
                vacuumed=vacuumed / units, after=after / units,
                before_columns=before_columns / units, after_columns=after_columns / units, replay_old=old_rate, replay_new=rate,
                put_rows_s=n / put_s, migrate_s=migrate_s, err_lp=err_lp, err_p=err_p, err_label=err_label, exact=exact)


def _replay_legacy(path: Path, keys: list[str]) -> tuple[float, dict]:
    """get_signals as schema 0004's Store did it: JSON rows, TeacherSignal.from_json."""
    best, got = math.inf, {}
    with sqlite3.connect(path) as db:
        for _ in range(3):
            t0 = time.perf_counter()
            got = {}
            for i in range(0, len(keys), 1000):
                chunk = keys[i : i + 1000]
                for j in range(0, len(chunk), 500):
                    part = chunk[j : j + 500]
                    q = f"SELECT key, signal FROM calls WHERE status = 'ok' AND key IN ({','.join('?' * len(part))})"
                    got.update({k: TeacherSignal.from_json(json.loads(s)) for k, s in db.execute(q, part)})
            best = min(best, time.perf_counter() - t0)
    return len(keys) / best, got


def _error(r: dict) -> str:
    if r["kind"] == "classification":
        return "exact" if r["err_label"] == 0 else f"{r['err_label']:.1e} (relative)"
    return "exact" if r["err_lp"] == 0 else f"{r['err_lp']:.1e} / {r['err_p']:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows; print only")
    args = ap.parse_args()
    n_cls, n_gen = (200, 20) if args.quick else (2000, 200)
    started, load = datetime.now(timezone.utc), os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, case, n in (("classification", "embedding", n_cls), ("classification", "calibrated", n_cls),
                              ("generation", "api", n_gen), ("generation", "local", n_gen)):
            results.append(measure(kind, case, n, Path(tmp)))
            print(json.dumps(results[-1]))
    rows = [
        f"| {r['kind']}, {r['case']} | {r['rows']:,} | {'row' if r['kind'] == 'classification' else 'token'} "
        f"| {r['before']:,.0f} ({r['before_columns']:,.0f}) | {r['migrated']:,.0f} / {r['vacuumed']:,.0f} "
        f"| {r['after']:,.0f} ({r['after_columns']:,.0f}) "
        f"| {r['before'] / r['after']:.1f}x | {r['replay_old']:,.0f} | {r['replay_new']:,.0f} | {r['put_rows_s']:,.0f} "
        f"| {r['migrate_s']:.2f} s | {_error(r)} | {'yes' if r['exact'] else 'NO'} |"
        for r in results
    ]
    table = "\n".join([
        "| case | rows | bytes per | before (0004 JSON) | migrated / after VACUUM | after (fresh) | smaller "
        "| replay before, rows/s | replay after, rows/s | put, rows/s | migration | rounding: label probability / "
        "top log-prob (lp / p) "
        "| rest exact |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *rows,
    ])
    print(table)
    if args.quick:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    section = f"""## Store size: JSON rows vs 0005_compact (benchmarks/store_size.py)

    .venv/bin/python benchmarks/store_size.py

Machine: {platform.machine()} CPU, 2 cores, 24 GB, no GPU; Python {platform.python_version()}, SQLite
{sqlite3.sqlite_version}; shared with other sessions. Run {started:%Y-%m-%d %H:%M} UTC on commit {commit.strip()}.

Bytes per row (classification, 77 labels with descriptions) or per generated token (generation, top-20
log-probabilities): the database file's used pages after a WAL checkpoint over the rows, so key, index,
ledger columns and page overhead are counted. "migrated" is the 0004 file opened by this version (rows
rewritten in place; SQLite keeps the freed pages until VACUUM). In parentheses: the rows' own bytes (key,
teacher, request, signal columns), without the key's index, the ledger numbers and page slack. Replay:
`Store.get_signals` of every row, best of 3. Every signal read back equals the one written except three kinds of
numbers: label probabilities (`probs`, `raw_probs`), kept as float32, the precision the student's loss reads them in
(the largest relative error seen); top-k token log-probabilities, kept as float16 (the largest error seen:
log-probability in nats / probability); tail masses, kept as float32. "rest exact": all else equal, every label
probability exactly its float32 rounding, tail masses within 2^-24.

{table}

Load average (1 min) {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after: replay and put rates are noisy; compare
within a row. What is left in a classification row: its float32 probabilities (308 bytes raw; before commit
762d6e2 they were float64, 616 bytes, whenever a teacher renormalised in float64), the request's text,
the 64-character key (again in its index) and the ledger numbers; the file adds B-tree page slack. A calibrated
LM teacher's row holds two such distributions (`probs`, `raw_probs`). The generation rows' token strings (and a
local teacher's token ids) are kept once in `strings` / `token_ids`; their share falls as rows are added. The
migration rewrites rows in its one transaction; SQLite reuses the freed pages for new rows (protege does not
VACUUM on its own).
"""
    from _md import write_section

    write_section(REPO / "BENCHMARKS.md", section.splitlines()[0], section)


if __name__ == "__main__":
    main()
