"""The served-traffic ledger: one :class:`protege.store.ServedRecord` per served answer (and with ``--capture`` one
:class:`protege.store.CapturedRecord`), written in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from ..store import CapturedRecord, ServedRecord, Store
from .fallback import TeacherAnswer, TeacherFailure

log = logging.getLogger(__name__)


class _CaptureFailed(Exception):
    """The served rows were written, the captured ones were not (a retry must not write the served ones twice)."""


class ServedLedger:
    """Collects served answers and writes them to the store in one transaction every ``interval_s`` (and at
    :meth:`close`), off the event loop, so recording costs a request nothing it would wait for."""

    def __init__(self, store_path: Path, interval_s: float = 0.25, max_rows: int | None = None,
                 max_days: float | None = None):
        self.store_path = Path(store_path)
        self.interval_s = interval_s
        self.max_rows, self.max_days = max_rows, max_days  # the captured rows' retention limits
        self.pending: list[ServedRecord] = []
        self.captured: list[CapturedRecord] = []
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        with Store(self.store_path):  # create or migrate it now: a bad path fails before the server listens
            pass

    def add(self, records: Sequence[ServedRecord], captured: Sequence[CapturedRecord] = ()) -> None:
        self.pending.extend(records)
        self.captured.extend(captured)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def flush(self) -> None:
        rows, self.pending = self.pending, []
        captured, self.captured = self.captured, []
        if not rows and not captured:
            return
        try:
            await asyncio.to_thread(self._write, rows, captured)
        except _CaptureFailed:  # the served rows are in; keep the captured ones for the next flush
            log.exception("could not write %d captured rows to %s", len(captured), self.store_path)
            self.captured[:0] = captured
        except Exception:  # keep them for the next flush; serving goes on
            log.exception("could not write %d served rows to %s", len(rows), self.store_path)
            self.pending[:0] = rows
            self.captured[:0] = captured
            return
        self.written += len(rows)

    def _write(self, rows: list[ServedRecord], captured: list[CapturedRecord]) -> None:
        with Store(self.store_path) as store:
            store.record_served(rows)
            try:
                store.record_captured(captured, self.max_rows, self.max_days)
            except Exception as e:
                raise _CaptureFailed from e

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def close(self) -> None:
        """Stop the periodic writes and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()


def served_record(
    student: str,
    endpoint: str,
    confidence: float,
    student_seconds: float,
    usd_per_hour: float,
    tokens: tuple[int, int],
    teacher: TeacherAnswer | TeacherFailure | None = None,
    version: str | None = None,
) -> ServedRecord:
    """The ledger row of one served text: the student's compute share always (it read the text), plus what the
    teacher cost when it was asked. ``tokens``: (input, output) of the model that answered; ``version``: the card
    hash of the student version that read it."""
    student_usd = student_seconds / 3600 * usd_per_hour
    if teacher is None:
        return ServedRecord(student, endpoint, "student", tokens[0], tokens[1], student_usd, 0.0, student_seconds,
                            confidence, version=version)
    if isinstance(teacher, TeacherFailure):
        return ServedRecord(student, endpoint, "none", 0, 0, student_usd + teacher.cost_usd, teacher.cost_usd,
                            student_seconds, confidence, teacher.call_key, False, teacher.message, version)
    return ServedRecord(student, endpoint, "teacher", teacher.input_tokens, teacher.output_tokens,
                        student_usd + teacher.cost_usd, teacher.cost_usd, student_seconds + teacher.seconds,
                        confidence, teacher.call_key, teacher.cached, version=version)
