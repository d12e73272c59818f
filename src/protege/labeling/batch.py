"""Provider batch APIs (OpenAI's Batch API, Anthropic's Message Batches: half price, results within
24 hours), crash-safe.

The order of events makes a crash at any point cheap:

1. upload the input file (OpenAI), then record the batch as ``submitting`` with the file id and the
   worst-case cost reserved, before creating it;
2. create the batch (its metadata names the input file), then record its id as ``submitted``;
3. poll; when it ends, record every answer and mark the batch ``collected`` in one transaction.

A rerun first settles what an earlier run left: a ``submitting`` batch is looked up by its input file (found:
adopted; not found: it was never created, and is dropped), a ``submitted`` one is polled and collected. Rows
are submitted only when no pending batch holds them, so no answer is bought twice. Pending reservations count
against ``teacher.budget_usd`` across processes (:meth:`Store.spent`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from ..errors import BudgetReached, ProtegeError
from ..recipe import TeacherConfig
from ..signals import TeacherSignal
from ..store import CallRecord, Store
from ..teachers.base import ApiTeacher, BatchAdapter, Progress, Request
from .engine import EngineStats

__all__ = ["run_batch", "batch_adapter"]


def batch_adapter(teacher: ApiTeacher) -> BatchAdapter:
    """The teacher's batch API, or an error saying to turn ``teacher.batch_api`` off."""
    api = teacher.batches()
    if api is None:
        raise ProtegeError(f"teacher {teacher.identity.get('model')!r} has no batch API; turn teacher.batch_api off")
    return api


class _BatchRun:
    def __init__(self, teacher: ApiTeacher, cfg: TeacherConfig, store: Store, name: str, quiet: bool):
        self.teacher = teacher
        self.cfg = cfg
        self.store = store
        self.name = name
        self.quiet = quiet
        self.stats = EngineStats()
        self.done: dict[str, TeacherSignal] = {}
        self.api = batch_adapter(teacher)

    def _pending(self) -> list[tuple[int, str, str | None, dict[str, Request], str]]:
        """Unfinished batches of this teacher, with the requests they hold (whatever split they came from)."""
        return [
            (b.id, b.input_file_id, b.batch_id, {k: Request.from_json(r) for k, r in b.requests}, b.status)
            for b in self.store.pending_batches(self.name)
        ]

    def _set(self, row_id: int, status: str, batch_id: str | None = None) -> None:
        self.store.set_batch_status(row_id, status, batch_id)

    async def _wait(self, batch_id: str, total: int) -> Progress:
        with tqdm(total=total, desc=f"batch {batch_id}", unit="row", disable=self.quiet) as bar:
            while True:
                st = await self.api.progress(batch_id)
                bar.n = min(total, st.finished)
                bar.set_postfix(status=st.state, refresh=False)
                bar.refresh()
                if st.done:
                    return st
                await asyncio.sleep(self.cfg.batch_poll_s)

    async def _collect(self, row_id: int, batch_id: str, requests: dict[str, Request]) -> None:
        st = await self._wait(batch_id, len(requests))
        records = []
        for o in await self.api.outcomes(batch_id, requests):
            u = o.usage
            cost = self.teacher.price.cost(
                u.input_tokens, u.output_tokens, u.cached_input_tokens, factor=self.api.discount
            )
            signal = None if o.signal is None else dataclasses.replace(o.signal, usage=u.to_json())
            records.append(
                CallRecord(
                    key=o.key,
                    teacher=self.name,
                    request=requests[o.key].to_json(),
                    signal=signal,
                    error=o.error,
                    raw=o.raw,
                    input_tokens=u.input_tokens,
                    output_tokens=u.output_tokens,
                    cost_usd=cost,
                )
            )
        # The answers and the end of the reservation land together, or not at all.
        self.store.collect_batch(row_id, records)
        for r in records:
            self.stats.cost_usd += r.cost_usd
            if r.signal is not None:
                self.stats.ok += 1
                self.done[r.key] = r.signal
            else:
                self.stats.failed += 1
        if len(records) < len(requests):
            missing = len(requests) - len(records)
            self.stats.stopped = f"batch {batch_id} ended {st.state}; {missing} rows unanswered (a rerun resubmits them)"

    async def run(self, items: Sequence[tuple[str, Request]]) -> EngineStats:
        t0 = time.perf_counter()
        try:
            handled: set[str] = set()
            for row_id, file_id, batch_id, keys, status in self._pending():
                if status == "submitting":
                    batch_id = await self.api.find(file_id)
                    if batch_id is None:  # the crash came before the batch was created
                        self._set(row_id, "abandoned")
                        continue
                    self._set(row_id, "submitted", batch_id)
                assert batch_id is not None
                handled |= set(keys)
                await self._collect(row_id, batch_id, keys)
            todo = [(k, r) for k, r in items if k not in handled]
            if todo:
                await self._submit(todo)
        finally:
            await self.teacher.aclose()
        self.stats.rows = len(items)
        self.stats.attempts = self.stats.ok + self.stats.failed
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    async def _submit(self, todo: list[tuple[str, Request]]) -> None:
        price = self.teacher.price
        left = None if self.cfg.budget_usd is None else self.cfg.budget_usd - self.store.spent()
        chosen, reserved = [], 0.0
        for key, request in todo:
            worst_in, worst_out, calls = self.teacher.worst_case(request)
            worst = calls * price.cost(worst_in, worst_out, factor=self.api.discount)
            if left is not None and reserved + worst > left + 1e-12:
                break
            chosen.append((key, request))
            reserved += worst
        if not chosen:
            raise BudgetReached(
                f"budget reached: ${self.store.spent():.4f} of the ${self.cfg.budget_usd:.4f} cap is spent or "
                "reserved; rerun with a higher --teacher.budget_usd to continue"
            )
        file_id = await self.api.prepare(chosen)
        rows = [(k, r.to_json()) for k, r in chosen]
        row_id = self.store.add_batch(self.api.provider, self.name, file_id, rows, reserved)
        batch_id = await self.api.create(file_id, chosen)
        self._set(row_id, "submitted", batch_id)
        await self._collect(row_id, batch_id, dict(chosen))
        if len(chosen) < len(todo):
            raise BudgetReached(
                f"budget reached: submitted {len(chosen)} of {len(todo)} rows within the "
                f"${self.cfg.budget_usd:.4f} cap; rerun with a higher --teacher.budget_usd to continue"
            )


def run_batch(
    teacher: ApiTeacher,
    cfg: TeacherConfig,
    store: Store,
    items: Sequence[tuple[str, Request]],
    teacher_name: str,
    quiet: bool = False,
    desc: str = "label",
) -> tuple[dict[str, TeacherSignal], EngineStats]:
    """Answer ``items`` through the provider's batch API; same contract as :func:`protege.labeling.engine.run_api`."""
    run = _BatchRun(teacher, cfg, store, teacher_name, quiet)
    asyncio.run(run.run(items))
    return run.done, run.stats
