"""The teacher contract: what a request is, what a reply and its usage are, what a price is, what a teacher
declares it can do, and what a provider's batch adapter returns.

Everything below :mod:`protege.labeling` speaks these types; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..signals import TeacherSignal


@dataclass(frozen=True)
class Request:
    """One rendered teacher request: chat messages plus the label set the answer must come from.

    Everything that determines the teacher's answer is here or in the teacher's identity; the store's
    cache key is a hash of both.
    """

    messages: tuple[dict[str, str], ...]
    labels: tuple[str, ...]
    text: str
    generate: Generate | None = None  # set for generation tasks: the teacher writes an answer

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"messages": list(self.messages), "labels": list(self.labels)}
        if self.generate is not None:
            d["generate"] = {"max_tokens": self.generate.max_tokens, "top_logprobs": self.generate.top_logprobs,
                             "rationale": self.generate.rationale}
        return d


@dataclass(frozen=True)
class Generate:
    """How a generation request is answered: greedy, up to ``max_tokens``, keeping the ``top_logprobs``
    most likely alternatives of every generated token (0: none) where the teacher can give them. With
    ``rationale`` the answer is expected after an explanation, on a last line 'Answer: ...'."""

    max_tokens: int
    top_logprobs: int
    rationale: bool = False


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0


@dataclass
class Reply:
    """One successful HTTP call: the parsed body, its usage and the response headers."""

    body: Any
    usage: Usage
    headers: Mapping[str, str] = field(default_factory=dict)


class TransientError(Exception):
    """A call that may succeed if sent again (429, 5xx, timeout, dropped connection, malformed body).

    ``maybe_billed``: the request reached the provider and may have been charged (a timeout or a connection
    cut after sending), so its worst-case cost stays counted against the budget.
    """

    def __init__(self, reason: str, retry_after: float | None = None, maybe_billed: bool = False, raw: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.maybe_billed = maybe_billed
        self.raw = raw


class Caller(Protocol):
    """Sends one HTTP call of a row through the engine's limits, budget and retries (see
    :class:`protege.labeling.engine.Call`): ``send`` makes the call; the token counts are its worst case."""

    async def __call__(self, send: Callable[[], Awaitable[Reply]], input_tokens: int, output_tokens: int) -> Reply: ...


@runtime_checkable
class ApiTeacher(Protocol):
    """A teacher behind an API. ``answer`` makes one or more calls through ``call`` and returns the signal,
    or raises :class:`ParseError` when the reply names no label."""

    identity: dict[str, Any]
    price: Price
    price_factor: float

    def worst_case(self, request: Request) -> tuple[int, int, int]:
        """(input tokens, output tokens, calls) a request can cost at most."""
        ...

    async def answer(self, request: Request, call: Caller) -> TeacherSignal: ...

    async def aclose(self) -> None: ...


def worst_case_tokens(request: Request) -> int:
    """An upper bound on a request's input tokens without its tokenizer: byte-level BPE and byte-fallback
    tokenizers spend at least one UTF-8 byte per token, plus chat-template tokens per message."""
    return sum(len(m["content"].encode("utf-8")) + 16 for m in request.messages) + 32


def expected_tokens(request: Request) -> int:
    """A typical estimate of input tokens (about 4 characters per token in English), for dry runs."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in request.messages) + 3


class Teacher(Protocol):
    """``identity`` is everything about the teacher that determines its answers; it enters every cache key
    (never a key or a URL). A local teacher also has ``signals`` (below); an API teacher has ``answer``
    (:class:`protege.teachers.base.ApiTeacher`)."""

    identity: dict[str, Any]


class LocalTeacher(Teacher, Protocol):
    """A model in this process: answers a batch of requests at once."""

    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]: ...


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0, factor: float = 1.0) -> float:
        """Cost of one call from its usage. ``input_tokens`` includes the cached ones, as the APIs report it."""
        fresh = max(0, input_tokens - cached_input_tokens)
        usd = fresh * self.input + cached_input_tokens * self.cached_input + output_tokens * self.output
        return factor * usd / 1e6

    @property
    def free(self) -> bool:
        return self.input == self.cached_input == self.output == 0


BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Outcome:
    """What a batch made of one request: a signal, or the reason there is none; ``usage`` is billed either way."""

    key: str
    signal: TeacherSignal | None
    usage: Usage
    error: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class Progress:
    state: str
    done: bool
    finished: int
