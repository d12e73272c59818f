"""The workers behind the server: a classifier student with the batcher that gathers concurrent requests into one
forward pass, and the cascade's queue that gathers what the student was unsure of into one teacher run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ProtegeError
from .api import ApiError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# the model


class Classifier:
    """A loaded student: ``predict(texts)`` -> (log-probabilities per text, tokens read per text)."""

    def __init__(self, path: Path, max_length: int | None = None):
        from ..students.classifier import load_student

        path = Path(path)
        if not path.is_dir():
            raise ProtegeError(f"{str(path)!r} is not a directory; point `protege serve` at a trained student")
        self.model, self.tokenizer, self.card = load_student(path)
        assert self.card.labels is not None  # a classifier's card always lists them (2 or more)
        self.labels: tuple[str, ...] = self.card.labels  # in the order of the head (load_student checks)
        self.max_length = max_length or self.card.max_length  # the length it was trained with

    def predict(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        import torch

        from ..lean import classifier_logits, encode

        with torch.inference_mode():
            enc = encode(self.tokenizer, texts, self.max_length)
            logp = torch.log_softmax(classifier_logits(self.model)(**enc).float(), -1)
        return logp.tolist(), enc["attention_mask"].sum(1).tolist()


# --------------------------------------------------------------------------------------------------------------
# server-side batching


@dataclass
class Pending:
    texts: list[Any]  # texts for the student, or teacher requests for the cascade
    future: asyncio.Future[Any]


@dataclass
class Batcher:
    """Gathers concurrent requests into one forward pass, run in a single worker thread."""

    thread_name: ClassVar[str] = "protege-serve"

    classifier: Classifier | None
    max_batch: int
    wait_s: float
    hook: Callable[[list[str]], None] | None = None
    forward_passes: int = 0  # model calls so far (a measure of batching, read by tests and logs)
    queue: asyncio.Queue[Pending] | None = None
    _task: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, self.thread_name)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.queue is not None:  # anything left gets an answer, not a hang
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _wait(self, texts: list[str]) -> tuple[list[Any], ...]:
        """Queue ``texts`` for the next pass and wait for their share of its result."""
        if self.queue is None:
            raise ApiError(503, "The server is not ready.", type="server_error")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(texts, fut))
        return await fut

    async def submit(self, texts: list[str]) -> tuple[list[list[float]], list[int], list[float]]:
        """The student's answers for ``texts``: (log-probabilities, tokens read, compute seconds) per text. A
        failure is logged and becomes an OpenAI-format 500 (handled here, so uvicorn keeps the connection and
        the server keeps going)."""
        try:
            return await self._wait(texts)  # type: ignore[return-value]
        except ApiError:
            raise
        except Exception:
            log.exception("the student failed on a batch")
            raise ApiError(500, "The server had an error while processing your request.", type="server_error") from None

    def _forward(self, texts: list[str]) -> tuple[list[Any], ...]:
        """In the worker thread: the model over ``texts`` in chunks of at most max_batch. Returns parallel
        lists, one item per text: log-probabilities, tokens read, and the text's share of its chunk's time."""
        if self.hook is not None:
            self.hook(texts)
        logp: list[list[float]] = []
        tokens: list[int] = []
        seconds: list[float] = []
        for i in range(0, len(texts), self.max_batch):
            chunk = texts[i : i + self.max_batch]
            t0 = time.perf_counter()
            assert self.classifier is not None
            lp, nt = self.classifier.predict(chunk)
            seconds += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
            self.forward_passes += 1
            logp += lp
            tokens += nt
        return logp, tokens, seconds

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0].texts)
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                left = deadline - loop.time()
                try:
                    item = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                items.append(item)
                n += len(item.texts)
            items = [x for x in items if not x.future.done()]  # e.g. cancelled by a client that left
            if not items:
                continue
            texts = [t for x in items for t in x.texts]
            try:
                out = await loop.run_in_executor(self._executor, self._forward, texts)
            except asyncio.CancelledError:  # stopped mid-pass (a forced shutdown): nobody waits forever
                for x in items:
                    if not x.future.done():
                        x.future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:  # noqa: BLE001  (a model failure fails these requests, not the server)
                for x in items:
                    if not x.future.done():
                        x.future.set_exception(e)
                continue
            i = 0
            for x in items:
                k = len(x.texts)
                if not x.future.done():
                    x.future.set_result(tuple(part[i : i + k] for part in out))
                i += k


@dataclass
class TeacherQueue(Batcher):
    """The cascade's other half: the teacher requests (:class:`protege.teachers.base.Request`) of what the student was
    unsure of, gathered from concurrent requests into one labeling run of the teacher
    (:meth:`protege.serve.fallback.TeacherFallback.ask`) in its own worker thread."""

    thread_name: ClassVar[str] = "protege-teacher"

    fallback: Any = None  # protege.serve.fallback.TeacherFallback
    timeout_s: float = 60.0

    def _forward(self, requests: list[Any]) -> tuple[list[Any], ...]:
        self.forward_passes += 1
        return (self.fallback.ask(requests),)

    async def submit(self, requests: list[Any]) -> list[Any]:  # type: ignore[override]
        """The teacher's answers or failures (``TeacherAnswer | TeacherFailure``), one per request. Waiting longer
        than ``timeout_s`` is a 503 (the call goes on; its answer lands in the store for the next asker)."""
        try:
            (answers,) = await asyncio.wait_for(self._wait(requests), self.timeout_s)
        except ApiError:
            raise
        except asyncio.TimeoutError:
            raise ApiError(503, f"The teacher did not answer within {self.timeout_s:g} s; retry shortly.",
                           type="server_error", code="teacher_timeout") from None
        except Exception:
            log.exception("the teacher failed on a batch")
            raise ApiError(502, "The teacher failed on this request.", type="server_error",
                           code="teacher_failed") from None
        return answers


