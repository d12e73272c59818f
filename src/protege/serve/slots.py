"""The students a server answers with, and how it changes them while serving.

A :class:`Slot` is one loaded student version: its model (a classifier with its batcher, or a language model
with its generation thread), its version (the card hash) and how many requests are using it now. The server has a
current slot and, with ``--canary``, a candidate's slot that gets a share of the requests.

Live reload: :class:`Reloader` looks at the served directory's ``protege.json`` every ``interval_s`` seconds; when
its hash changes (``protege improve``, ``promote`` or ``rollback`` replaced the directory in one rename), it loads
the new student in a worker thread while the old one keeps answering, checks that it does the same job (kind and
labels), then swaps it in. Requests already in flight finish on the old slot, which is closed once the last of
them is done (or after ``drain_s``); none is dropped or failed. A student that cannot be loaded is logged and
skipped until the directory changes again (to another version, or back and then to it again); the old one goes on
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ProtegeError
from ..students import student_kind
from ..students.card import card_version
from .workers import Batcher, Classifier

log = logging.getLogger(__name__)

__all__ = ["Reloader", "Slot", "load_slot"]


@dataclass
class Slot:
    """One loaded student version (see the module)."""

    path: Path
    version: str  # the card hash (protege.students.card.card_version)
    kind: str  # "classifier" or "lm"
    clf: Classifier | None = None
    lm: Any = None  # protege.serve.lm.LMGenerator
    batcher: Batcher | None = None
    active: int = 0  # requests using it now

    @property
    def labels(self) -> tuple[str, ...] | None:
        return None if self.clf is None else self.clf.labels

    async def start(self) -> None:
        if self.batcher is not None:
            await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.lm is not None:
            await asyncio.to_thread(self.lm.close)  # waits for the answer in progress

    async def drain(self, timeout_s: float) -> None:
        """Wait until no request uses this slot (at most ``timeout_s``), then stop it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("closing student %s with %d requests still using it after %.0f s", self.version,
                        self.active, timeout_s)
        await self.stop()


def load_slot(path: Path, max_length: int | None, max_batch: int, wait_s: float,
              hook: Callable[[list[str]], None] | None) -> Slot:
    """Load the student in ``path`` (blocking: run it in a thread while serving)."""
    path = Path(path)
    kind, _ = student_kind(path, "protege serve")  # a clear error for a directory that is no student
    version = card_version(path)
    if kind == "lm":
        from .lm import LMGenerator

        return Slot(path, version, kind, lm=LMGenerator(path))  # one answer at a time; no classifier batching
    clf = Classifier(path, max_length=max_length)
    return Slot(path, version, kind, clf=clf, batcher=Batcher(clf, max_batch=max_batch, wait_s=wait_s, hook=hook))


def check_same_job(old: Slot, new: Slot, what: str) -> None:
    """Refuse a student that does another job than the one served: the other kind, or other labels."""
    if new.kind != old.kind:
        raise ProtegeError(f"{what} {str(new.path)!r} is a {new.kind} student and the served one a {old.kind}")
    if new.labels != old.labels:
        raise ProtegeError(f"{what} {str(new.path)!r} has the labels {list(new.labels or [])}, the served student "
                           f"{list(old.labels or [])}; clients would get other answers than they expect")


class Router:
    """Which slot answers a request: the canary's with probability ``fraction``, else the current one; counts the
    requests using each."""

    def __init__(self, current: Slot, canary: Slot | None = None, fraction: float = 0.0, seed: int | None = None):
        self.current, self.canary, self.fraction = current, canary, fraction
        self._random = random.Random(seed)

    def acquire(self) -> Slot:
        slot = self.canary if self.canary is not None and self._random.random() < self.fraction else self.current
        slot.active += 1
        return slot

    @staticmethod
    def release(slot: Slot) -> None:
        slot.active -= 1


class Reloader:
    """Watches the served directory and swaps a changed student in (see the module)."""

    def __init__(self, router: Router, load: Callable[[Path], Slot], interval_s: float, drain_s: float = 120.0,
                 on_swap: Callable[[Slot], None] | None = None):
        self.router, self.load, self.interval_s, self.drain_s = router, load, interval_s, drain_s
        self.on_swap = on_swap
        self.path = router.current.path
        self.reloads = 0
        self._skipped: str | None = None  # a version that failed to load: not retried until it changes
        self._task: asyncio.Task[None] | None = None
        self._draining: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._draining):
            await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # noqa: BLE001  (a failed reload leaves the served student serving)
                log.exception("reloading the student from %s failed; the served one goes on", self.path)

    async def check(self) -> bool:
        """Swap in the directory's student if it changed; True if it did."""
        try:
            version = card_version(self.path)
        except OSError:  # mid-rename (the old directory moved away, the new not yet in): look again next time
            return False
        if version == self.router.current.version:
            self._skipped = None  # put back: a version skipped before is worth a try if it comes again
            return False
        if version == self._skipped:
            return False
        try:
            new = await asyncio.to_thread(self.load, self.path)
            check_same_job(self.router.current, new, "the reloaded student")
        except Exception as e:  # noqa: BLE001  (whatever failed, the served student goes on; tried once per version)
            log.error("not reloading %s (version %s): %s; the served student goes on", self.path, version, e)
            self._skipped = version
            return False
        await new.start()
        old, self.router.current = self.router.current, new
        retired = [old]
        canary = self.router.canary
        if canary is not None and canary.version == new.version:  # the candidate was promoted: no canary left
            self.router.canary = None
            retired.append(canary)
        self.reloads += 1
        log.info("serving student version %s from %s (was %s)", new.version, self.path, old.version)
        if self.on_swap is not None:
            self.on_swap(new)
        for slot in retired:
            task = asyncio.create_task(slot.drain(self.drain_s))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        return True
