"""The store: one SQLite database (WAL) that logs every teacher call.

It is at once the cache (a rerun makes zero calls), the resume point after a crash (every finished batch is
committed before the next starts), the provenance of every training example, and the cost ledger. Rows are
keyed by a content hash of everything that determines the answer, so a row is never recorded twice.

The schema is known here only: other modules ask the store through the named methods below, never in SQL.
It is versioned with named migrations (Python functions, so one can transform data as well as change the
schema), applied in order, each in one transaction, and recorded by name in ``migrations``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ._compact import decode_signal, deflate, encode_signal, inflate, join_request, split_request, template_from
from ._io import content_hash
from .errors import ProtegeError
from .signals import TeacherSignal

__all__ = ["Store", "CallRecord", "ServedRecord", "CapturedRecord", "CallUsage", "CallMeans", "PendingBatch", "call_key"]

# --------------------------------------------------------------------------------------------------------------
# migrations

Migration = Callable[[sqlite3.Connection], None]
# Applied in this order; each is recorded under its name without the leading "m" ("0001_calls"), the names
# users' stores already hold. Append only: never edit a migration that has shipped.
MIGRATIONS: list[Migration] = []


def _migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


def migration_name(fn: Migration) -> str:
    """The name a migration is recorded under in the ``migrations`` table."""
    return fn.__name__.removeprefix("m")


@_migration
def m0001_calls(db: sqlite3.Connection) -> None:
    db.execute(
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
        )
        """
    )
    db.execute("CREATE INDEX calls_teacher ON calls (teacher)")


@_migration
def m0002_compute(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE compute (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            stage      TEXT NOT NULL,
            seconds    REAL NOT NULL,
            cost_usd   REAL NOT NULL DEFAULT 0,
            detail     TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        )
        """
    )


@_migration
def m0003_api_calls(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE calls ADD COLUMN raw TEXT")
    db.execute("ALTER TABLE calls ADD COLUMN uncertain_usd REAL NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE calls ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
    db.execute(
        """
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
        )
        """
    )


@_migration
def m0004_served(db: sqlite3.Connection) -> None:
    # Served traffic: one row per text a served student was asked about (a /v1/classify list gives one row
    # per input). answered_by is 'none' when the cascade sent the text to the teacher and the teacher failed
    # (the request got an error, but what the attempt spent is still spent). cost_usd is everything this
    # answer cost: the student's compute plus teacher_usd, the teacher money (or, for a local teacher, its
    # compute) newly spent on it; an answer the store already held costs the teacher nothing (cached = 1).
    db.execute(
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
        )
        """
    )
    db.execute("CREATE INDEX served_student ON served (student, answered_by)")


@_migration
def m0005_compact(db: sqlite3.Connection) -> None:
    # Shared parts once (issue 15.1): a 77-label row had repeated its instruction and label list in the request
    # and the label names again in the signal (~11 KB a row). ``strings`` holds each label list, token string
    # and tokenizer name once; ``templates`` what many requests share (a rendered instruction, label list and
    # answer format: a prefix and a suffix around the text). A row keeps the part of its request between its
    # template's prefix and suffix (request_template; NULL: the whole request JSON), as TEXT or, when that is
    # smaller, deflated (BLOB), and its signal in the compact form of protege._compact (BLOB). A TEXT signal is
    # the JSON of earlier versions (still read). The cache key is unchanged: it hashes the request, not a row.
    db.execute("CREATE TABLE strings (id INTEGER PRIMARY KEY, s TEXT NOT NULL UNIQUE)")
    db.execute("CREATE TABLE templates (id INTEGER PRIMARY KEY, prefix TEXT NOT NULL, suffix TEXT NOT NULL)")
    # a local teacher's vocabulary as its signals showed it (ids in strings): its top strings are its top ids'
    db.execute(
        "CREATE TABLE token_ids (tokenizer INTEGER NOT NULL, id INTEGER NOT NULL, string INTEGER NOT NULL,"
        " PRIMARY KEY (tokenizer, id)) WITHOUT ROWID"
    )
    db.execute("ALTER TABLE calls ADD COLUMN request_template INTEGER REFERENCES templates (id)")
    parts = _Parts(db)
    last = 0
    while rows := db.execute(  # a thousand rows at a time: a large store is never held in memory at once
        "SELECT rowid, request, signal FROM calls WHERE rowid > ? ORDER BY rowid LIMIT 1000", (last,)
    ).fetchall():
        for rowid, request, signal in rows:
            template, stored = parts.store_request(request)
            if isinstance(signal, str):
                try:
                    signal = parts.encode_signal(TeacherSignal.from_json(json.loads(signal)))
                except (ValueError, KeyError, TypeError, ProtegeError):
                    pass  # a signal this version cannot read as one stays as it was written (read as JSON)
            db.execute(
                "UPDATE calls SET request = ?, request_template = ?, signal = ? WHERE rowid = ?",
                (stored, template, signal, rowid),
            )
        last = rows[-1][0]


@_migration
def m0006_captured(db: sqlite3.Connection) -> None:
    # Captured traffic (``protege serve --capture``): what a served student read and what was answered, redacted
    # before it got here (protege.serve.capture); never a header. input is the text a classifier read, or a
    # language model's conversation as JSON (input_kind 'messages'); answer is NULL when no one answered.
    # version is the served student's card hash. Rows are deleted oldest first by the retention limits.
    db.execute(
        """
        CREATE TABLE captured (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            student     TEXT NOT NULL,
            version     TEXT NOT NULL,
            endpoint    TEXT NOT NULL,
            answered_by TEXT NOT NULL CHECK (answered_by IN ('student', 'teacher', 'none')),
            input_kind  TEXT NOT NULL CHECK (input_kind IN ('text', 'messages')),
            input       TEXT NOT NULL,
            answer      TEXT,
            confidence  REAL,
            call_key    TEXT,
            received_at REAL NOT NULL,
            answered_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX captured_version ON captured (version, id)")
    db.execute("CREATE INDEX captured_answered_at ON captured (answered_at)")


@_migration
def m0007_served_version(db: sqlite3.Connection) -> None:
    # Which student version answered a served row (its card hash, protege.students.card.card_version): a server
    # reloads a promoted student and a canary splits traffic between two, so the student's name alone no longer
    # says which weights answered. NULL for rows served before this column existed.
    db.execute("ALTER TABLE served ADD COLUMN version TEXT")
    db.execute("CREATE INDEX served_version ON served (student, version)")


# --------------------------------------------------------------------------------------------------------------
# records


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
    version: str | None = None  # the card hash of the student version that read the text


@dataclass(frozen=True)
class CapturedRecord:
    """One captured served answer (see migration ``0006_captured``), already redacted. ``input`` is the text a
    classifier read, or a language model's conversation ([{role, content}]); ``answer`` the label or text sent
    back (None: the teacher was asked and failed); ``confidence`` the student's; times are Unix seconds.
    ``id`` is the row's, set when read back."""

    student: str
    version: str
    endpoint: str
    answered_by: str  # 'student', 'teacher' or 'none'
    input: str | list[dict[str, str]]
    answer: str | None
    confidence: float | None
    call_key: str | None
    received_at: float
    answered_at: float
    id: int | None = None


class CallUsage(NamedTuple):
    """What one recorded call took, summed over its attempts (tokens, money); ``seconds`` is the last attempt's."""

    status: str  # 'ok' or 'failed'
    cost_usd: float
    uncertain_usd: float  # sent but unanswered attempts that may have been billed
    input_tokens: int
    output_tokens: int
    seconds: float

    @property
    def spent_usd(self) -> float:
        """Money spent, counting what may have been billed: what a budget sees."""
        return self.cost_usd + self.uncertain_usd


class CallMeans(NamedTuple):
    """Means over one teacher's answered calls; the means are None when there are none (``calls`` 0)."""

    calls: int
    cost_usd: float | None
    input_tokens: float | None
    output_tokens: float | None
    seconds: float | None


class PendingBatch(NamedTuple):
    """A provider batch not yet collected: ``submitting`` (recorded before it was created, so it may not
    exist) or ``submitted``."""

    id: int  # the row id, which the other batch methods take
    input_file_id: str
    batch_id: str | None  # the provider's id; None until it is known
    requests: list[tuple[str, dict[str, Any]]]  # (call key, request JSON) of every row it holds
    status: str


# --------------------------------------------------------------------------------------------------------------
# the shared parts of rows (migration 0005_compact)


class _Parts:
    """The ``strings`` and ``templates`` tables of one connection, cached. Ids are never reused once committed,
    so the caches hold across other processes' writes (a miss catches up); :meth:`forget` drops them after a
    rollback, which may have taken back ids this connection handed out."""

    _SCAN = 64  # the most recent templates a request is tried against
    _UNMATCHED = 8  # and the most recent requests none fitted, to make a template of

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.forget()

    def forget(self) -> None:
        self.ids: dict[str, int] = {}
        self.strings: dict[int, str] = {}
        self.templates: dict[int, tuple[str, str]] = {}
        self.vocab: dict[int, dict[int, int]] = {}  # tokenizer -> token id -> string id, loaded per tokenizer
        self.last_string = 0
        self.unmatched: list[str] = []  # the last requests no template fitted: a template is what two share

    def _catch_up(self) -> None:
        """Read the rows of ``strings`` and ``templates`` added since the last time (by anyone)."""
        for i, s in self.db.execute("SELECT id, s FROM strings WHERE id > ?", (self.last_string,)):
            self.strings[i], self.ids[s] = s, i
            self.last_string = max(self.last_string, i)
        q = "SELECT id, prefix, suffix FROM templates WHERE id > ? ORDER BY id"
        for i, prefix, suffix in self.db.execute(q, (max(self.templates, default=0),)):
            self.templates[i] = (prefix, suffix)

    def intern(self, s: str) -> int:
        if s not in self.ids:
            self._catch_up()
            if s not in self.ids:
                i = self.db.execute("INSERT INTO strings (s) VALUES (?)", (s,)).lastrowid
                assert i is not None
                self.strings[i], self.ids[s] = s, i
                self.last_string = max(self.last_string, i)
        return self.ids[s]

    def lookup(self, i: int) -> str:
        if i not in self.strings:
            self._catch_up()
        return self.strings[i]

    def _vocab(self, tokenizer: int) -> dict[int, int]:
        if tokenizer not in self.vocab:
            q = "SELECT id, string FROM token_ids WHERE tokenizer = ?"
            self.vocab[tokenizer] = dict(self.db.execute(q, (tokenizer,)).fetchall())
        return self.vocab[tokenizer]

    def vocab_put(self, tokenizer: int, token_id: int, s: str) -> bool:
        known = self._vocab(tokenizer)
        ref = self.intern(s)
        if token_id not in known:
            self.db.execute("INSERT OR IGNORE INTO token_ids VALUES (?, ?, ?)", (tokenizer, token_id, ref))
            known[token_id] = self.db.execute(
                "SELECT string FROM token_ids WHERE tokenizer = ? AND id = ?", (tokenizer, token_id)
            ).fetchone()[0]
        return known[token_id] == ref

    def vocab_get(self, tokenizer: int, token_id: int) -> str:
        known = self._vocab(tokenizer)
        if token_id not in known:  # recorded since this connection loaded it
            del self.vocab[tokenizer]
            known = self._vocab(tokenizer)
        return self.lookup(known[token_id])

    def encode_signal(self, signal: TeacherSignal) -> bytes:
        return encode_signal(signal, self.intern, self.vocab_put)

    def decode_signal(self, stored: str | bytes) -> TeacherSignal:
        if isinstance(stored, str):  # written before 0005_compact (a row that migration could not read)
            return TeacherSignal.from_json(json.loads(stored))
        return decode_signal(stored, self.lookup, self.vocab_get)

    def store_request(self, request_json: str) -> tuple[int | None, str | bytes]:
        """(template id or None, what the row keeps): the part between a template's prefix and suffix, or the
        whole JSON; deflated when that is smaller. A request no recent template fits makes a template of what it
        shares with one of the last such requests (the most), when that is enough to be worth one."""
        template, middle = self._template_for(request_json)
        if template is None:
            self._catch_up()  # another writer may have made the template this request fits
            template, middle = self._template_for(request_json)
        if template is None:
            found = (template_from(other, request_json) for other in reversed(self.unmatched))
            shared = max(filter(None, found), key=lambda t: len(t[0]) + len(t[1]), default=None)
            if shared is not None:
                template = self.db.execute("INSERT INTO templates (prefix, suffix) VALUES (?, ?)", shared).lastrowid
                assert template is not None
                self.templates[template] = shared
                middle = split_request(request_json, *shared)
                assert middle is not None
            self.unmatched = [*self.unmatched[-(self._UNMATCHED - 1) :], request_json]
        packed = deflate(middle)
        return template, packed if len(packed) < len(middle.encode()) else middle

    def _template_for(self, request_json: str) -> tuple[int | None, str]:
        for i in sorted(self.templates, reverse=True)[: self._SCAN]:  # templates are few: sorting them is cheap
            if (part := split_request(request_json, *self.templates[i])) is not None:
                return i, part
        return None, request_json

    def request(self, template: int | None, stored: str | bytes) -> dict[str, Any]:
        middle = inflate(stored) if isinstance(stored, bytes) else stored
        if template is None:
            return json.loads(middle)
        if template not in self.templates:
            self._catch_up()
        return json.loads(join_request(self.templates[template][0], middle, self.templates[template][1]))


# --------------------------------------------------------------------------------------------------------------
# the store


class Store:
    """A SQLite file; safe against kill -9 (WAL, one transaction per batch).

    ``scrub``, when given, is applied to every call record before it is written (``protege serve --capture``
    redacts the cascade's teacher calls with it); the key, computed before, is kept, so the cache still works.
    """

    def __init__(self, path: Path | str, scrub: Callable[[CallRecord], CallRecord] | None = None):
        self.path = Path(path)
        self.scrub = scrub
        if self.path.exists() and self.path.is_dir():
            raise ProtegeError(f"store {str(self.path)!r} is a directory; it must be a SQLite file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is all-or-nothing.
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._parts = _Parts(self.db)
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

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The block as one transaction: committed, or on any exception rolled back. BEGIN IMMEDIATE takes the
        write lock at once, so a concurrent writer waits (up to the connection's timeout) instead of failing
        midway."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            self._parts.forget()  # the rollback may have taken back ids the caches hold
            raise

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        done = set(self.migrations)
        unknown = done - {migration_name(m) for m in MIGRATIONS}
        if unknown:
            raise ProtegeError(
                f"store {str(self.path)!r} was written by a newer protege (migrations {sorted(unknown)}); upgrade protege"
            )
        for migrate in MIGRATIONS:
            name = migration_name(migrate)
            if name in done:
                continue
            with self._transaction():
                # checked under the write lock: another process opening the same new store may have applied it
                if self.db.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                    continue
                migrate(self.db)
                self.db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))

    @property
    def migrations(self) -> list[str]:
        """Names of the migrations applied to this store, in order."""
        return [r[0] for r in self.db.execute("SELECT name FROM migrations ORDER BY name")]

    # ----------------------------------------------------------------------------------------------------------
    # teacher calls: the cache

    def get_signals(self, keys: Sequence[str]) -> dict[str, TeacherSignal]:
        """The successful signals among ``keys``; failed calls are not cached answers."""
        return {
            key: self._parts.decode_signal(sig)
            for key, sig in self._rows_by_key("SELECT key, signal FROM calls WHERE status = 'ok' AND key IN", keys)
        }

    def requests(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The request JSON recorded for each key among ``keys`` (answered or failed): what the teacher was
        asked, for provenance."""
        q = "SELECT key, request_template, request FROM calls WHERE key IN"
        return {key: self._parts.request(template, stored) for key, template, stored in self._rows_by_key(q, keys)}

    def failures(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """(reason, raw reply) of the failed calls among ``keys``."""
        q = "SELECT key, error, raw FROM calls WHERE status = 'failed' AND key IN"
        return {key: (error or "", raw) for key, error, raw in self._rows_by_key(q, keys)}

    def call_usage(self, keys: Sequence[str]) -> dict[str, CallUsage]:
        """What each recorded call among ``keys`` took, answered or failed; keys never called are absent."""
        q = "SELECT key, status, cost_usd, uncertain_usd, input_tokens, output_tokens, seconds FROM calls WHERE key IN"
        return {key: CallUsage(*rest) for key, *rest in self._rows_by_key(q, keys)}

    def _rows_by_key(self, select: str, keys: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """The rows of ``select`` (which ends in ``key IN``) for ``keys``, each key once."""
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):  # stay under SQLite's bound-parameter limit
            chunk = uniq[i : i + 500]
            yield from self.db.execute(f"{select} ({','.join('?' * len(chunk))})", chunk)

    def put(self, records: Iterable[CallRecord]) -> int:
        """Record a batch of calls in one transaction; returns how many rows were new.

        A key already recorded as ok is left alone (the answer was bought once); a failed one is replaced,
        its tokens, money and attempts added to the new attempt's.
        """
        with self._transaction():
            return self._put(records)

    def _put(self, records: Iterable[CallRecord]) -> int:
        """:meth:`put`'s insert, inside the caller's transaction."""
        if self.scrub is not None:
            records = map(self.scrub, records)
        rows = [
            (
                r.key,
                r.teacher,
                *self._parts.store_request(json.dumps(r.request, ensure_ascii=False)),
                "ok" if r.signal is not None else "failed",
                None if r.signal is None else self._parts.encode_signal(r.signal),
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
        before = self.db.total_changes
        self.db.executemany(
            """INSERT INTO calls (key, teacher, request_template, request, status, signal, error, raw, input_tokens,
                                  output_tokens, cost_usd, uncertain_usd, attempts, seconds, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
        return self.db.total_changes - before

    # ----------------------------------------------------------------------------------------------------------
    # provider batches (see protege.labeling.batch for the order of events that makes a crash cheap)

    def add_batch(
        self, provider: str, teacher: str, input_file_id: str, requests: Sequence[tuple[str, dict[str, Any]]],
        reserved_usd: float,
    ) -> int:
        """Record a batch as ``submitting`` (before it is created) with its rows (call key, request JSON) and
        its worst-case cost reserved against the budget; returns its row id."""
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO batches (provider, teacher, input_file_id, keys, reserved_usd, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'submitting', ?, ?)",
            (provider, teacher, input_file_id, json.dumps([[k, r] for k, r in requests]), reserved_usd, now, now),
        )
        assert cur.lastrowid is not None  # set by every INSERT
        return cur.lastrowid

    def pending_batches(self, teacher: str) -> list[PendingBatch]:
        """The teacher's batches not yet collected nor abandoned, oldest first."""
        return [
            PendingBatch(row_id, file_id, batch_id, [(k, r) for k, r in json.loads(keys)], status)
            for row_id, file_id, batch_id, keys, status in self.db.execute(
                "SELECT id, input_file_id, batch_id, keys, status FROM batches "
                "WHERE teacher = ? AND status IN ('submitting', 'submitted') ORDER BY id",
                (teacher,),
            )
        ]

    def set_batch_status(self, row_id: int, status: str, batch_id: str | None = None) -> None:
        """Mark a batch ``submitted`` (with the provider's ``batch_id`` once known) or ``abandoned`` (never
        created: its reservation ends). A collected batch goes through :meth:`collect_batch`."""
        if status not in ("submitted", "abandoned"):
            raise ProtegeError(f"batch status {status!r}: set 'submitted' or 'abandoned' here; a batch is "
                               "'collected' through Store.collect_batch, with its answers")
        cur = self.db.execute(
            "UPDATE batches SET status = ?, batch_id = COALESCE(?, batch_id), updated_at = ? WHERE id = ?",
            (status, batch_id, time.time(), row_id),
        )
        if cur.rowcount != 1:
            raise ProtegeError(f"no batch with row id {row_id} in store {str(self.path)!r}")

    def collect_batch(self, row_id: int, records: Iterable[CallRecord]) -> int:
        """Record a finished batch's answers (as :meth:`put`) and mark it ``collected``, in one transaction:
        the answers and the end of its reservation land together or not at all. Returns how many rows were new."""
        with self._transaction():
            changed = self._put(records)
            cur = self.db.execute(
                "UPDATE batches SET status = 'collected', updated_at = ? WHERE id = ?", (time.time(), row_id)
            )
            if cur.rowcount != 1:
                raise ProtegeError(f"no batch with row id {row_id} in store {str(self.path)!r}")
        return changed

    # ----------------------------------------------------------------------------------------------------------
    # the cost ledger

    def spent(self) -> float:
        """Teacher money this store has recorded (plus what may have been billed for calls that never
        answered, plus what pending batches have reserved): what a budget cap is checked against."""
        calls = self.db.execute("SELECT COALESCE(SUM(cost_usd + uncertain_usd), 0) FROM calls").fetchone()[0]
        pending = self.db.execute(
            "SELECT COALESCE(SUM(reserved_usd), 0) FROM batches WHERE status IN ('submitting', 'submitted')"
        ).fetchone()[0]
        return calls + pending

    def teacher_totals(self, teacher: str | None = None, include_served: bool = True) -> dict[str, float]:
        """Calls, failures, tokens, money and compute seconds spent on the teacher (all teachers: None) so far.

        ``include_served=False`` leaves out the calls a serving cascade made (new calls behind a served
        answer), leaving what making the student cost.
        """
        conditions, args = [], []
        if teacher:
            conditions.append("teacher = ?")
            args.append(teacher)
        if not include_served:
            conditions.append("key NOT IN (SELECT call_key FROM served WHERE cached = 0 AND call_key IS NOT NULL)")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        row = self.db.execute(
            f"""SELECT COUNT(*), COALESCE(SUM(status = 'failed'), 0), COALESCE(SUM(input_tokens), 0),
                       COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0), COALESCE(SUM(uncertain_usd), 0),
                       COALESCE(SUM(attempts), 0), COALESCE(SUM(seconds), 0)
                FROM calls {where}""",
            args,
        ).fetchone()
        names = ("calls", "failed", "input_tokens", "output_tokens", "cost_usd", "uncertain_usd", "attempts", "seconds")
        return dict(zip(names, row))

    def answered_means(self, teacher: str) -> CallMeans:
        """Means of money, tokens and seconds over the teacher's answered calls: what one more call is
        expected to take."""
        return CallMeans(*self.db.execute(
            "SELECT COUNT(*), AVG(cost_usd), AVG(input_tokens), AVG(output_tokens), AVG(seconds) FROM calls "
            "WHERE teacher = ? AND status = 'ok'",
            (teacher,),
        ).fetchone())

    def log_compute(self, stage: str, seconds: float, cost_usd: float = 0.0, **detail: Any) -> None:
        """Add training or evaluation compute to the ledger."""
        self.db.execute(
            "INSERT INTO compute (stage, seconds, cost_usd, detail, created_at) VALUES (?, ?, ?, ?, ?)",
            (stage, seconds, cost_usd, json.dumps(detail, default=str), time.time()),
        )

    def compute_totals(self) -> dict[str, dict[str, float]]:
        """stage -> runs, seconds and money of the compute ledger."""
        return {
            stage: {"runs": n, "seconds": s, "cost_usd": c}
            for stage, n, s, c in self.db.execute(
                "SELECT stage, COUNT(*), SUM(seconds), SUM(cost_usd) FROM compute GROUP BY stage ORDER BY stage"
            )
        }

    def labeling_throughput(self) -> tuple[float, int]:
        """(seconds, rows called) summed over the labeling runs in the compute ledger; (0.0, 0) when none."""
        seconds, rows = self.db.execute(
            "SELECT COALESCE(SUM(seconds), 0.0), COALESCE(SUM(json_extract(detail, '$.rows')), 0) FROM compute "
            "WHERE stage = 'label'"
        ).fetchone()
        return seconds, rows

    # ----------------------------------------------------------------------------------------------------------
    # served traffic

    def record_served(self, records: Sequence[ServedRecord]) -> None:
        """Add served answers to the ledger, all in one transaction (the server batches them)."""
        now = time.time()
        rows = [
            (r.student, r.endpoint, r.answered_by, r.input_tokens, r.output_tokens, r.cost_usd, r.teacher_usd,
             r.seconds, r.confidence, r.call_key, None if r.cached is None else int(r.cached), r.error, now,
             r.version)
            for r in records
        ]
        if not rows:
            return
        with self._transaction():
            self.db.executemany(
                """INSERT INTO served (student, endpoint, answered_by, input_tokens, output_tokens, cost_usd,
                                       teacher_usd, seconds, confidence, call_key, cached, error, created_at,
                                       version)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                rows,
            )

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

    def served_by_version(self, student: str) -> dict[str | None, dict[str, float]]:
        """Served answers of ``student`` by version (card hash; None for rows from before versions were
        recorded), oldest version first: requests, answers by the student, and money (all, the teacher's part)."""
        return {
            version: {"requests": n, "student_answers": by_student, "cost_usd": cost, "teacher_usd": teacher}
            for version, n, by_student, cost, teacher in self.db.execute(
                """SELECT version, COUNT(*), SUM(answered_by = 'student'), SUM(cost_usd), SUM(teacher_usd)
                   FROM served WHERE student = ? GROUP BY version ORDER BY MIN(id)""",
                (student,),
            )
        }

    # ----------------------------------------------------------------------------------------------------------
    # captured traffic

    def record_captured(self, records: Sequence[CapturedRecord], max_rows: int | None = None,
                        max_days: float | None = None) -> int:
        """Add captured rows and, in the same transaction, delete the oldest past the limits: all but the newest
        ``max_rows`` rows, and rows answered more than ``max_days`` days ago (the limits hold over the whole
        table, whichever student wrote it). Deleted rows are overwritten on disk (secure_delete). Returns how
        many rows were deleted."""
        if not records:
            return 0
        rows = [
            (r.student, r.version, r.endpoint, r.answered_by, "text" if isinstance(r.input, str) else "messages",
             r.input if isinstance(r.input, str) else json.dumps(r.input, ensure_ascii=False), r.answer,
             r.confidence, r.call_key, r.received_at, r.answered_at)
            for r in records
        ]
        self.db.execute("PRAGMA secure_delete = ON")  # a deleted row's bytes do not stay in free pages
        before = self.db.total_changes
        with self._transaction():
            self.db.executemany(
                """INSERT INTO captured (student, version, endpoint, answered_by, input_kind, input, answer,
                                         confidence, call_key, received_at, answered_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                rows,
            )
            inserted = self.db.total_changes - before
            if max_rows is not None:
                self.db.execute("DELETE FROM captured WHERE id <= (SELECT id FROM captured ORDER BY id DESC "
                                "LIMIT 1 OFFSET ?)", (max_rows,))
            if max_days is not None:
                self.db.execute("DELETE FROM captured WHERE answered_at < ?", (time.time() - max_days * 86400,))
        return self.db.total_changes - before - inserted

    def captured(self, since: float | None = None, since_version: str | None = None,
                 after_id: int | None = None) -> list[CapturedRecord]:
        """Captured rows, oldest first: answered after ``since`` (Unix seconds), from the first row the student
        version ``since_version`` answered on (none: that version has answered nothing kept), and with an id
        above ``after_id``."""
        conditions: list[str] = []
        args: list[Any] = []
        if after_id is not None:
            conditions.append("id > ?")
            args.append(after_id)
        if since is not None:
            conditions.append("answered_at > ?")
            args.append(since)
        if since_version is not None:
            conditions.append("id >= (SELECT MIN(id) FROM captured WHERE version = ?)")
            args.append(since_version)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return [
            CapturedRecord(student, version, endpoint, by, text if kind == "text" else json.loads(text), answer,
                           confidence, call_key, received_at, answered_at, row_id)
            for row_id, student, version, endpoint, by, kind, text, answer, confidence, call_key, received_at,
            answered_at in self.db.execute(
                f"""SELECT id, student, version, endpoint, answered_by, input_kind, input, answer, confidence,
                           call_key, received_at, answered_at FROM captured {where} ORDER BY id""",
                args,
            )
        ]
