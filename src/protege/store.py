"""The store: one SQLite database (WAL) that logs every teacher call.

It is at once the cache (a rerun makes zero calls), the resume point after a crash (every finished batch is
committed before the next starts), the provenance of every training example, and the cost ledger. Rows are
keyed by a content hash of everything that determines the answer, so a row is never recorded twice.
The schema is versioned with named migrations, applied in order and recorded in ``migrations``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import content_hash
from .errors import ProtegeError
from .signals import TeacherSignal

__all__ = ["Store", "CallRecord", "ServedRecord", "call_key"]

# (name, SQL). Append only: never edit a migration that has shipped.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_calls",
        """
        CREATE TABLE calls (
            key           TEXT PRIMARY KEY,
            teacher       TEXT NOT NULL,
            request       TEXT NOT NULL,
            status        TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
            signal        TEXT,
            error         TEXT,
            input_tokens  INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd      REAL NOT NULL DEFAULT 0,
            seconds       REAL NOT NULL DEFAULT 0,
            created_at    REAL NOT NULL
        );
        CREATE INDEX calls_teacher ON calls (teacher);
        """,
    ),
    (
        "0002_compute",
        """
        CREATE TABLE compute (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            stage      TEXT NOT NULL,
            seconds    REAL NOT NULL,
            cost_usd   REAL NOT NULL DEFAULT 0,
            detail     TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        );
        """,
    ),
    (
        "0003_api_calls",
        """
        ALTER TABLE calls ADD COLUMN raw TEXT;
        ALTER TABLE calls ADD COLUMN uncertain_usd REAL NOT NULL DEFAULT 0;
        ALTER TABLE calls ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
        CREATE TABLE batches (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            provider      TEXT NOT NULL,
            teacher       TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            batch_id      TEXT,
            keys          TEXT NOT NULL,
            reserved_usd  REAL NOT NULL DEFAULT 0,
            status        TEXT NOT NULL CHECK (status IN ('submitting', 'submitted', 'collected', 'abandoned')),
            detail        TEXT NOT NULL DEFAULT '{}',
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL
        );
        """,
    ),
    (
        # Served traffic: one row per text a served student was asked about (a /v1/classify list gives one row
        # per input). answered_by is 'none' when the cascade sent the text to the teacher and the teacher failed
        # (the request got an error, but what the attempt spent is still spent). cost_usd is everything this
        # answer cost: the student's compute plus teacher_usd, the teacher money (or, for a local teacher, its
        # compute) newly spent on it; an answer the store already held costs the teacher nothing (cached = 1).
        "0004_served",
        """
        CREATE TABLE served (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            student       TEXT NOT NULL,
            endpoint      TEXT NOT NULL,
            answered_by   TEXT NOT NULL CHECK (answered_by IN ('student', 'teacher', 'none')),
            input_tokens  INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd      REAL NOT NULL DEFAULT 0,
            teacher_usd   REAL NOT NULL DEFAULT 0,
            seconds       REAL NOT NULL DEFAULT 0,
            confidence    REAL,
            call_key      TEXT,
            cached        INTEGER,
            error         TEXT,
            created_at    REAL NOT NULL
        );
        CREATE INDEX served_student ON served (student, answered_by);
        """,
    ),
]


def call_key(teacher_identity: dict[str, Any], request: dict[str, Any]) -> str:
    """Content hash of what determines a teacher's answer: its identity (model, weights, parameters,
    signal method) and the rendered request."""
    return content_hash({"teacher": teacher_identity, "request": request})


@dataclass(frozen=True)
class CallRecord:
    key: str
    teacher: str
    request: dict[str, Any]
    signal: TeacherSignal | None
    error: str | None = None
    raw: str | None = None  # a failed call's raw reply, for the user to see why it failed
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    uncertain_usd: float = 0.0  # sent but unanswered: may have been billed (counted against the budget)
    attempts: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class ServedRecord:
    """One served answer (see migration ``0004_served``). ``confidence`` is the student's top probability,
    also when the teacher answered (it is why the teacher was asked); ``call_key`` names the teacher's row in
    ``calls`` when the teacher was asked."""

    student: str
    endpoint: str
    answered_by: str  # 'student', 'teacher', or 'none' (the teacher was asked and failed)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # student compute + teacher_usd
    teacher_usd: float = 0.0
    seconds: float = 0.0  # compute seconds behind this answer: the student's share of its batch + the teacher call's
    confidence: float | None = None
    call_key: str | None = None
    cached: bool | None = None  # teacher answers: True when the store already held it (no new call)
    error: str | None = None


class Store:
    """A SQLite file; safe against kill -9 (WAL, one transaction per batch)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ProtegeError(f"store {str(self.path)!r} is a directory; it must be a SQLite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is all-or-nothing.
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise ProtegeError(f"store {str(self.path)!r} is not a protege SQLite store ({e}); move it away") from None
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
        unknown = done - {name for name, _ in MIGRATIONS}
        if unknown:
            raise ProtegeError(
                f"store {str(self.path)!r} was written by a newer protege (migrations {sorted(unknown)}); upgrade protege"
            )
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, sql.split(";")):
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @property
    def migrations(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM migrations ORDER BY name")]

    def get_signals(self, keys: Sequence[str]) -> dict[str, TeacherSignal]:
        """The successful signals among ``keys``; failed calls are not cached answers."""
        out: dict[str, TeacherSignal] = {}
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i : i + 500]
            q = f"SELECT key, signal FROM calls WHERE status = 'ok' AND key IN ({','.join('?' * len(chunk))})"
            for key, sig in self.db.execute(q, chunk):
                out[key] = TeacherSignal.from_json(json.loads(sig))
        return out

    def put(self, records: Iterable[CallRecord], then: tuple[str, Sequence[Any]] | None = None) -> int:
        """Record a batch of calls in one transaction; returns how many rows were new.

        A key already recorded as ok is left alone (the answer was bought once); a failed one is replaced.
        ``then`` is one more statement (SQL, parameters) committed in the same transaction.
        """
        rows = [
            (
                r.key,
                r.teacher,
                json.dumps(r.request, ensure_ascii=False),
                "ok" if r.signal is not None else "failed",
                None if r.signal is None else json.dumps(r.signal.to_json(), ensure_ascii=False),
                r.error,
                r.raw,
                r.input_tokens,
                r.output_tokens,
                r.cost_usd,
                r.uncertain_usd,
                r.attempts,
                r.seconds,
                time.time(),
            )
            for r in records
        ]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            before = self.db.total_changes
            self.db.executemany(
                """INSERT INTO calls (key, teacher, request, status, signal, error, raw, input_tokens, output_tokens,
                                      cost_usd, uncertain_usd, attempts, seconds, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET
                       status = excluded.status, signal = excluded.signal, error = excluded.error,
                       raw = excluded.raw,
                       input_tokens = calls.input_tokens + excluded.input_tokens,
                       output_tokens = calls.output_tokens + excluded.output_tokens,
                       cost_usd = calls.cost_usd + excluded.cost_usd,
                       uncertain_usd = calls.uncertain_usd + excluded.uncertain_usd,
                       attempts = calls.attempts + excluded.attempts,
                       seconds = excluded.seconds, created_at = excluded.created_at
                   WHERE calls.status = 'failed'""",
                rows,
            )
            changed = self.db.total_changes - before
            if then is not None:
                self.db.execute(*then)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return changed

    def spent(self) -> float:
        """Teacher money this store has recorded (plus what may have been billed for calls that never
        answered, plus what pending batches have reserved): what a budget cap is checked against."""
        calls = self.db.execute("SELECT COALESCE(SUM(cost_usd + uncertain_usd), 0) FROM calls").fetchone()[0]
        pending = self.db.execute(
            "SELECT COALESCE(SUM(reserved_usd), 0) FROM batches WHERE status IN ('submitting', 'submitted')"
        ).fetchone()[0]
        return calls + pending

    def failures(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """(reason, raw reply) of the failed calls among ``keys``."""
        out: dict[str, tuple[str, str | None]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, error, raw FROM calls WHERE status = 'failed' AND key IN ({','.join('?' * len(chunk))})"
            for key, error, raw in self.db.execute(q, chunk):
                out[key] = (error or "", raw)
        return out

    def log_compute(self, stage: str, seconds: float, cost_usd: float = 0.0, **detail: Any) -> None:
        """Add training or evaluation compute to the ledger."""
        self.db.execute(
            "INSERT INTO compute (stage, seconds, cost_usd, detail, created_at) VALUES (?, ?, ?, ?, ?)",
            (stage, seconds, cost_usd, json.dumps(detail, default=str), time.time()),
        )

    def teacher_totals(self, teacher: str | None = None) -> dict[str, float]:
        """Calls, failures, tokens, money and compute seconds spent on the teacher so far."""
        where, args = ("WHERE teacher = ?", (teacher,)) if teacher else ("", ())
        row = self.db.execute(
            f"""SELECT COUNT(*), COALESCE(SUM(status = 'failed'), 0), COALESCE(SUM(input_tokens), 0),
                       COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0), COALESCE(SUM(uncertain_usd), 0),
                       COALESCE(SUM(attempts), 0), COALESCE(SUM(seconds), 0)
                FROM calls {where}""",
            args,
        ).fetchone()
        names = ("calls", "failed", "input_tokens", "output_tokens", "cost_usd", "uncertain_usd", "attempts", "seconds")
        return dict(zip(names, row))

    def compute_totals(self) -> dict[str, dict[str, float]]:
        return {
            stage: {"runs": n, "seconds": s, "cost_usd": c}
            for stage, n, s, c in self.db.execute(
                "SELECT stage, COUNT(*), SUM(seconds), SUM(cost_usd) FROM compute GROUP BY stage ORDER BY stage"
            )
        }

    def record_served(self, records: Sequence[ServedRecord]) -> None:
        """Add served answers to the ledger, all in one transaction (the server batches them)."""
        now = time.time()
        rows = [
            (r.student, r.endpoint, r.answered_by, r.input_tokens, r.output_tokens, r.cost_usd, r.teacher_usd,
             r.seconds, r.confidence, r.call_key, None if r.cached is None else int(r.cached), r.error, now)
            for r in records
        ]
        if not rows:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                """INSERT INTO served (student, endpoint, answered_by, input_tokens, output_tokens, cost_usd,
                                       teacher_usd, seconds, confidence, call_key, cached, error, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                rows,
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def served_totals(self, student: str | None = None) -> dict[str, dict[str, float]]:
        """Served answers so far by who answered ('student', 'teacher', 'none'): requests, tokens, money (all,
        and the teacher's part), compute seconds, and how many teacher answers came from the store."""
        where, args = ("WHERE student = ?", (student,)) if student else ("", ())
        names = ("requests", "input_tokens", "output_tokens", "cost_usd", "teacher_usd", "seconds", "cached")
        return {
            who: dict(zip(names, rest))
            for who, *rest in self.db.execute(
                f"""SELECT answered_by, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd),
                           SUM(teacher_usd), SUM(seconds), COALESCE(SUM(cached), 0)
                    FROM served {where} GROUP BY answered_by ORDER BY answered_by""",
                args,
            )
        }
