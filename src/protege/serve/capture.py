"""Traffic capture (``protege serve --capture``): each served input and answer, redacted, kept in the run's store
(table ``captured``, see :class:`protege.store.CapturedRecord`) for ``protege improve``.

Only the text a model read is captured (a classifier's text; a language model's conversation) and its answer,
never a header, so the API key and bearer tokens cannot reach the store. Before anything is written,
:class:`Redactor` replaces

* e-mail addresses with ``<EMAIL>``;
* card numbers, 13 to 19 digits (bare, or grouped by spaces or dashes) whose Luhn check holds, with ``<CARD>``:
  an order or tracking number of the same length fails the check (nine in ten do) and is kept;
* phone numbers with ``<PHONE>``: a number written with a leading ``+`` and 8 to 15 digits (E.164), or one of
  10 to 12 digits written in groups (``(415) 555-0132``, ``020 7946 0958``, ``01 23 45 67 89``, or after a ``00``
  international prefix up to 17: ``0044 20 7946 0958``); a bare run of
  digits without ``+`` is left (it reads the same as an order number), and so is an ISO date;
* every match of the user's patterns (``--redact REGEX``, repeatable) with ``<REDACTED>``.

A run of digits is judged whole (a 16-digit number that fails the Luhn check is not cut into a phone number).

The cascade's teacher calls are kept in the same store (they are its cache and ledger). With ``--capture`` they
pass through :meth:`Redactor.call` before they are written: every string of the request, the teacher's written
answer, rationale and thinking, and a failure's message and raw reply are redacted. The key is the hash of the
request as sent, so a repeated text is still answered from the store. A generated reply that redaction changed
loses its token log-probabilities and logits (a token cannot be redacted by itself), and the cascade serves the
reply as kept, redacted: what the client reads is what the store holds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ProtegeError
from ..signals import TeacherSignal
from ..store import CallRecord, CapturedRecord, ServedRecord

__all__ = ["Capture", "Redactor", "luhn_valid"]

EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")
# a run of digits with the separators numbers are written with; judged whole by _number
NUMBER = re.compile(r"(?<![\w+])\+?(?:\(\d+\)|\d)(?:[ .\-]{0,2}(?:\(\d+\)|\d))*(?!\w)")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def luhn_valid(digits: str) -> bool:
    """The Luhn check of a card number (digits only): from the right, every second digit doubled (minus 9 when
    above 9), the sum a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _number(match: re.Match[str]) -> str:
    run = match.group(0)
    digits = re.sub(r"\D", "", run)
    grouped = digits != run
    if 13 <= len(digits) <= 19 and not re.search(r"[+().]", run) and luhn_valid(digits):
        return "<CARD>"
    if run.startswith("+") and 8 <= len(digits) <= 15:
        return "<PHONE>"
    if grouped and (10 <= len(digits) <= 12 or run.startswith("00") and len(digits) <= 17) and not ISO_DATE.match(run):
        return "<PHONE>"
    return run


class Redactor:
    """Replaces e-mails, card numbers, phone numbers and the user's patterns in a text (see the module)."""

    def __init__(self, patterns: Sequence[str] = ()):
        self.patterns = []
        for p in patterns:
            try:
                self.patterns.append(re.compile(p))
            except re.error as e:
                raise ProtegeError(f"--redact {p!r} is not a valid regular expression ({e}); fix or drop it") from None

    def __call__(self, text: str) -> str:
        for p in self.patterns:  # first: a user's pattern may span what the defaults would cut
            text = p.sub("<REDACTED>", text)
        text = EMAIL.sub("<EMAIL>", text)
        return NUMBER.sub(_number, text)

    def call(self, record: CallRecord) -> CallRecord:
        """A teacher call as the store may keep it (see the module): its texts redacted, its key and numbers kept."""
        return replace(
            record,
            request=self._strings(record.request),
            signal=None if record.signal is None else self._signal(record.signal),
            error=None if record.error is None else self(record.error),
            raw=None if record.raw is None else self(record.raw),
        )

    def _strings(self, value: Any) -> Any:
        """Every string inside a JSON value redacted (the keys of its objects are protege's own names)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self._strings(v) for v in value]
        if isinstance(value, dict):
            return {k: self._strings(v) for k, v in value.items()}
        return value

    def _signal(self, signal: TeacherSignal) -> TeacherSignal:
        texts = {f: getattr(signal, f) for f in ("text", "answer", "rationale", "thinking")}
        redacted = {f: None if t is None else self(t) for f, t in texts.items()}
        if redacted == texts:
            return signal
        if redacted["text"] == texts["text"]:
            return replace(signal, **redacted)
        # the reply's tokens (and a local teacher's dense logits, whose likeliest tokens spell it) would keep what
        # redaction took out of its text
        return replace(signal, **redacted, token_logprobs=None, logits=None)


@dataclass(frozen=True)
class Capture:
    """What ``--capture`` writes: the served student's name and version (a row's own version, when the ledger row
    names one: a reloaded student or a canary), the redactor, and the retention limits
    (``max_rows``: the newest rows kept; ``max_days``: rows older than this are deleted; None: no limit)."""

    student: str
    version: str
    redactor: Redactor
    max_rows: int | None = None
    max_days: float | None = None

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ProtegeError(f"--capture-max-rows must be at least 1, not {self.max_rows}")
        if self.max_days is not None and not self.max_days > 0:
            raise ProtegeError(f"--capture-max-days must be above 0, not {self.max_days}")

    def record(self, row: ServedRecord, read: str | list[dict[str, str]], answer: str | None,
               received_at: float) -> CapturedRecord:
        """The captured row of one served answer: ``read`` is the text (classifier) or conversation (language
        model) the student read, ``answer`` what was sent back (None: no one answered), both redacted here."""
        redacted: Any = (self.redactor(read) if isinstance(read, str)
                         else [{**m, "content": self.redactor(m["content"])} for m in read])
        return CapturedRecord(
            student=self.student, version=row.version or self.version, endpoint=row.endpoint, answered_by=row.answered_by,
            input=redacted, answer=None if answer is None else self.redactor(answer), confidence=row.confidence,
            call_key=row.call_key, received_at=received_at, answered_at=time.time(),
        )
