"""The labeling engine for API teachers: many calls in flight, none lost, none paid twice, never past the cap.

One coroutine per worker (``teacher.concurrency`` of them) takes the next row, and every HTTP call a row
needs goes through :class:`Call`, which

1. waits out any cooldown the provider asked for (Retry-After, an exhausted rate-limit window) and the
   client-side request and token limits (``aiolimiter`` leaky buckets);
2. reserves the call's worst-case cost against the budget, so the cap holds with hundreds of calls in flight;
3. sends it, retrying 429, 5xx, timeouts, dropped connections and malformed bodies with exponential backoff
   and jitter (``tenacity``), honouring Retry-After; 400/401/403/404 stop the run at once;
4. settles the reservation with the cost computed from the usage the provider returned.

Every finished row is committed to the store at once (one SQLite transaction), so kill -9 loses at most the
calls in flight. A row whose answer cannot be parsed is retried ``teacher.parse_retries`` times and then
recorded as failed with the raw reply and the reason; a later run retries failed rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tqdm.auto import tqdm

from ..errors import BudgetReached, PermanentError
from ..recipe import TeacherConfig
from ..signals import TeacherSignal
from ..store import CallRecord, Store
from ..teachers.base import ApiTeacher, Reply, Request, TransientError, Usage
from ..teachers.parse import ParseError

__all__ = ["Call", "EngineStats", "run_api"]  # the contract's types live in protege.teachers.base


class Budget:
    """Spent + possibly billed + reserved never exceeds the cap. Single-threaded (one event loop)."""

    def __init__(self, cap: float | None, spent: float):
        self.cap = cap
        self.spent = spent  # recorded in the store, this run and earlier ones
        self.uncertain = 0.0  # sent but unanswered (timeouts, cut connections): may have been billed
        self.reserved = 0.0

    def reserve(self, usd: float) -> None:
        if self.cap is not None and self.spent + self.uncertain + self.reserved + usd > self.cap + 1e-12:
            raise BudgetReached(
                f"budget reached: ${self.spent + self.uncertain:.4f} spent of the ${self.cap:.4f} cap, and the next "
                f"call could cost up to ${usd:.4f}. Everything answered so far is saved; rerun with a higher "
                "--teacher.budget_usd to continue where this run stopped"
            )
        self.reserved += usd

    def settle(self, reserved: float, spent: float, uncertain: float = 0.0) -> None:
        self.reserved -= reserved
        self.spent += spent
        self.uncertain += uncertain


def _duration(s: str) -> float | None:
    """OpenAI's reset format ('1s', '6m0s', '20ms', '1h2m3.5s') in seconds."""
    total, ok = 0.0, False
    for num, unit in re.findall(r"([\d.]+)(ms|h|m|s)", s):
        total += float(num) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        ok = True
    return total if ok else None


def _until(stamp: str) -> float | None:
    """Seconds from now until an RFC 3339 time ('2026-11-28T12:00:30Z'), or None if it does not parse."""
    try:
        when = datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class RateControl:
    """Client-side limits plus what the provider's headers say."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.rpm = None
        if requests_per_minute:
            # Evenly paced, no burst: one request every 60/(rpm-1) s puts at most rpm requests in ANY 60-second
            # window (1 at its start plus rpm-1 paced), which is how providers count.
            self.rpm = AsyncLimiter(1, 60.0 / max(requests_per_minute - 1, 1))
        self.tpm = AsyncLimiter(tokens_per_minute, 60.0) if tokens_per_minute else None
        self.cooldown_until = 0.0
        self.rate_limited = 0  # 429s seen

    async def wait(self, tokens: int) -> None:
        # A worker can queue on the limiters for a long time; a pause the provider asked for while it waited
        # (a 429 with Retry-After, a window reported empty) must hold it back too, or every queued worker sends
        # into the full window. So the pause is checked again after the limiters, and the slot is taken anew
        # once the pause ends, keeping requests paced rather than released in one burst.
        while True:
            while (delay := self.cooldown_until - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if self.rpm is not None:
                await self.rpm.acquire()
            if self.tpm is not None:
                await self.tpm.acquire(min(tokens, self.tpm.max_rate))
            if self.cooldown_until <= time.monotonic():
                return

    def pause(self, seconds: float) -> None:
        self.cooldown_until = max(self.cooldown_until, time.monotonic() + seconds)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Pause everyone when the provider says a window is used up: OpenAI-style ``x-ratelimit-remaining-*``
        with a duration in ``x-ratelimit-reset-*``, or Anthropic's ``anthropic-ratelimit-*-remaining`` with an
        RFC 3339 time in ``anthropic-ratelimit-*-reset``."""
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is not None and reset and remaining.strip() == "0":
                seconds = _duration(reset)
                if seconds:
                    self.pause(seconds)
        for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
            remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
            reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
            if remaining is not None and reset and remaining.strip() == "0":
                seconds = _until(reset)
                if seconds:
                    self.pause(seconds)


class Call:
    """Sends one row's HTTP calls with limits, budget, retries and cost accounting. One per row attempt set."""

    def __init__(self, engine: _Engine):
        self.engine = engine
        self.cost = 0.0
        self.uncertain = 0.0
        self.attempts = 0
        self.usage = Usage()

    async def __call__(self, send: Callable[[], Awaitable[Reply]], input_tokens: int, output_tokens: int) -> Reply:
        e = self.engine
        worst = e.price.cost(input_tokens, output_tokens, factor=e.price_factor)

        def wait(state: Any) -> float:
            exc = state.outcome.exception()
            backoff = e.backoff(state)
            after = getattr(exc, "retry_after", None)
            return max(backoff, after) if after is not None else backoff

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(e.cfg.max_retries + 1),
            wait=wait,
            reraise=True,
        ):
            with attempt:
                await e.rate.wait(input_tokens + output_tokens)
                e.budget.reserve(worst)
                self.attempts += 1
                e.stats.attempts += 1
                try:
                    reply = await send()
                except PermanentError:
                    e.budget.settle(worst, 0.0)  # refused before any work: not billed
                    raise
                except TransientError as exc:
                    billed = worst if exc.maybe_billed else 0.0
                    e.budget.settle(worst, 0.0, billed)
                    self.uncertain += billed
                    if exc.retry_after is not None:
                        e.rate.rate_limited += 1
                        e.rate.pause(exc.retry_after)
                    raise
                except BaseException:
                    e.budget.settle(worst, 0.0, worst)  # unknown outcome: assume it was billed
                    self.uncertain += worst
                    raise
                u = reply.usage
                cost = e.price.cost(u.input_tokens, u.output_tokens, u.cached_input_tokens, factor=e.price_factor)
                e.budget.settle(worst, cost)
                e.rate.observe(reply.headers)
                self.cost += cost
                self.usage += u
                return reply
        raise AssertionError("unreachable")  # pragma: no cover  (tenacity re-raises the last error)


@dataclass
class EngineStats:
    rows: int = 0
    ok: int = 0
    failed: int = 0
    attempts: int = 0  # HTTP calls sent, retries included
    parse_retries: int = 0
    cost_usd: float = 0.0
    uncertain_usd: float = 0.0
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended early, if it did

    @property
    def retries(self) -> int:
        return self.attempts - (self.ok + self.failed)


class _Engine:
    def __init__(self, teacher: ApiTeacher, cfg: TeacherConfig, store: Store, teacher_name: str, quiet: bool):
        self.teacher = teacher
        self.cfg = cfg
        self.store = store
        self.teacher_name = teacher_name
        self.quiet = quiet
        self.price = teacher.price
        self.price_factor = teacher.price_factor
        self.budget = Budget(cfg.budget_usd, store.spent())
        self.rate = RateControl(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.stats = EngineStats()
        self.backoff = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=1.0)
        self.stop: BaseException | None = None
        self.in_flight = 0
        self.done: dict[str, TeacherSignal] = {}

    def _record(
        self,
        key: str,
        request: Request,
        call: Call,
        signal: TeacherSignal | None,
        error: str = "",
        raw: str = "",
        seconds: float = 0.0,
    ) -> None:
        """Commit one finished row (one transaction) before anything else happens."""
        if signal is not None:
            signal = dataclasses.replace(signal, usage=call.usage.to_json())
        record = CallRecord(
            key=key,
            teacher=self.teacher_name,
            request=request.to_json(),
            signal=signal,
            error=error or None,
            raw=raw or None,
            input_tokens=call.usage.input_tokens,
            output_tokens=call.usage.output_tokens,
            cost_usd=call.cost,
            uncertain_usd=call.uncertain,
            attempts=call.attempts,
            seconds=seconds,
        )
        self.store.put([record])
        self.stats.cost_usd += call.cost
        self.stats.uncertain_usd += call.uncertain
        if signal is not None:
            self.stats.ok += 1
            self.done[key] = signal
        else:
            self.stats.failed += 1

    async def _row(self, key: str, request: Request) -> None:
        call = Call(self)
        t0 = time.perf_counter()
        last: ParseError | None = None
        try:
            for _ in range(self.cfg.parse_retries + 1):
                try:
                    signal = await self.teacher.answer(request, call)
                except ParseError as e:
                    last = e
                    self.stats.parse_retries += 1
                    continue
                self._record(key, request, call, signal, seconds=time.perf_counter() - t0)
                return
            self.stats.parse_retries -= 1  # the last failure was not followed by a retry
            assert last is not None
            tries = self.cfg.parse_retries + 1
            self._record(key, request, call, None, f"unparseable after {tries} tries: {last.reason}", last.raw)
        except TransientError as e:
            self._record(key, request, call, None, f"gave up after {call.attempts} attempts: {e.reason}", e.raw)
        except (BudgetReached, PermanentError) as e:
            self.stop = self.stop or e
            if call.attempts:  # money was spent on this row; keep the record (a rerun retries it)
                self._record(key, request, call, None, f"stopped: {e}")

    async def _worker(self, queue: deque[tuple[str, Request]], bar: tqdm) -> None:
        while queue and self.stop is None:
            key, request = queue.popleft()
            self.in_flight += 1
            try:
                await self._row(key, request)
            except BaseException as e:  # a bug or a cancel: stop the others, keep what is committed
                self.stop = self.stop or e
                raise
            finally:
                self.in_flight -= 1
            bar.update(1)
            self._postfix(bar)

    def _postfix(self, bar: tqdm) -> None:
        s = self.stats
        finished = s.ok + s.failed
        projected = s.cost_usd / finished * s.rows if finished else 0.0
        bar.set_postfix(
            failed=s.failed, in_flight=self.in_flight, spent=f"${s.cost_usd:.4f}", projected=f"${projected:.4f}",
            refresh=False,
        )

    async def run(self, items: Sequence[tuple[str, Request]], desc: str) -> EngineStats:
        self.stats.rows = len(items)
        if items:
            self.teacher.check_key()  # a missing key is an error before the first call, not a failure per row
        queue = deque(items)
        t0 = time.perf_counter()
        with tqdm(total=len(items), desc=desc, unit="row", disable=self.quiet or not items) as bar:
            workers = [self._worker(queue, bar) for _ in range(min(self.cfg.concurrency, len(items)))]
            try:
                results = await asyncio.gather(*workers, return_exceptions=True)
            finally:
                await self.teacher.aclose()
        self.stats.seconds = time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        if self.stop is not None:
            self.stats.stopped = str(self.stop)
        return self.stats


def run_api(
    teacher: ApiTeacher,
    cfg: TeacherConfig,
    store: Store,
    items: Sequence[tuple[str, Request]],
    teacher_name: str,
    quiet: bool = False,
    desc: str = "label",
) -> tuple[dict[str, TeacherSignal], EngineStats]:
    """Answer ``items`` (key, request) through an API teacher; returns the signals that succeeded by key.

    Raises :class:`BudgetReached` or :class:`PermanentError` after recording everything that finished.
    """
    engine = _Engine(teacher, cfg, store, teacher_name, quiet)
    asyncio.run(engine.run(items, desc))
    if engine.stop is not None:
        raise engine.stop
    return engine.done, engine.stats
