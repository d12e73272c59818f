"""The teacher contract: what a request is, what a reply and its usage are, what a price is, what a teacher
declares it can do, and what a provider's batch adapter returns.

Everything below :mod:`protege.labeling` speaks these types; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..signals import TeacherSignal, TokenLogprobs


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
    # The task as structured data for teachers that do not read prompts (an 'embed:' teacher): each label's
    # description and the worked examples as (text, label). Both are rendered into ``messages`` too, so the
    # cache key (a hash of to_json) already covers them; they are not repeated in to_json, and two requests
    # with the same messages are the same request whether or not these copies are attached (compare=False):
    # a request rebuilt from the store (a batch resumed) has none, and only local teachers read them.
    label_descriptions: tuple[str, ...] = field(default=(), compare=False)
    examples: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        """What the cache key hashes and the store keeps; ``text`` is left out (it is inside the messages)."""
        d: dict[str, Any] = {"messages": list(self.messages), "labels": list(self.labels)}
        if self.generate is not None:
            d["generate"] = {"max_tokens": self.generate.max_tokens, "top_logprobs": self.generate.top_logprobs,
                             "rationale": self.generate.rationale}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], text: str = "") -> Request:
        """The request :meth:`to_json` wrote, so ``Request.from_json(r.to_json()).to_json() == r.to_json()``
        (and the call key is the same). ``text`` is not in the JSON: pass it where a teacher needs it (a
        local model cuts an over-long text from it); API teachers send only the messages."""
        try:
            gen = d.get("generate")
            return cls(
                messages=tuple(dict(m) for m in d["messages"]),
                labels=tuple(str(x) for x in d["labels"]),
                text=text,
                generate=None if gen is None else Generate(
                    max_tokens=int(gen["max_tokens"]), top_logprobs=int(gen["top_logprobs"]),
                    rationale=bool(gen["rationale"]),
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"not a stored request ({type(e).__name__}: {e}); expected what Request.to_json writes: "
                "{'messages': [{'role', 'content'}, ...], 'labels': [...], optionally 'generate': "
                "{'max_tokens', 'top_logprobs', 'rationale'}}"
            ) from None


@dataclass(frozen=True)
class Generate:
    """How a generation request is answered: greedy, up to ``max_tokens``, keeping the ``top_logprobs``
    most likely alternatives of every generated token (0: none) where the teacher can give them. With
    ``rationale`` the answer is expected after an explanation, on a last line 'Answer: ...'."""

    max_tokens: int
    top_logprobs: int
    rationale: bool = False


@dataclass(frozen=True)
class ScoreRequest:
    """Given tokens for a teacher to score: at every position i >= ``start``, log p(ids[i] | ids[:i]) with the
    ``top_logprobs`` likeliest alternatives (on-policy distillation: the student wrote ``ids[start:]``).

    ``tokenizer`` names the tokenizer the ids belong to (the student's); with the ids it is the whole request,
    so the cache key is a hash of the teacher's identity and the exact ids. ``text`` (the ids decoded together)
    and ``tokens`` (each id decoded alone) are derived from both, for servers that take text and tokenize it
    themselves (llama.cpp); they are not part of the key (compare=False).
    """

    ids: tuple[int, ...]
    start: int
    top_logprobs: int
    tokenizer: str
    text: str = field(default="", compare=False)
    tokens: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.start <= len(self.ids):
            raise ValueError(f"start {self.start} must be in [1, {len(self.ids)}]: the first token has no context")

    def to_json(self) -> dict[str, Any]:
        return {"score": {"ids": list(self.ids), "start": self.start, "top_logprobs": self.top_logprobs,
                          "tokenizer": self.tokenizer}}


@dataclass(frozen=True)
class Usage:
    """Tokens one or more calls were billed for; ``input_tokens`` includes the cached ones, as the APIs
    report it."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
        )

    def to_json(self) -> dict[str, int]:
        """The usage a signal carries (:attr:`TeacherSignal.usage`); cached tokens only where there were any."""
        d = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cached_input_tokens:
            d["cached_input_tokens"] = self.cached_input_tokens
        return d


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


def worst_case_tokens(request: Request) -> int:
    """An upper bound on a request's input tokens without its tokenizer: byte-level BPE and byte-fallback
    tokenizers spend at least one UTF-8 byte per token, plus chat-template tokens per message."""
    return sum(len(m["content"].encode("utf-8")) + 16 for m in request.messages) + 32


def expected_tokens(request: Request) -> int:
    """A typical estimate of input tokens (about 4 characters per token in English), for dry runs."""
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in request.messages) + 3


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


BATCH_DISCOUNT = 0.5  # OpenAI's Batch API and Anthropic's Message Batches both bill half the usual price


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


class BatchAdapter(Protocol):
    """A provider's batch API as the runner (:mod:`protege.labeling.batch`) drives it.

    ``prepare`` gives a reference to a batch's input before the batch exists (OpenAI: the uploaded file's id),
    which the runner records before ``create``; after a crash between the two, ``find`` looks the batch up by
    it (None: never created, or the provider cannot tell).
    """

    provider: str
    discount: float  # the batch price as a fraction of the usual one

    async def prepare(self, items: Sequence[tuple[str, Request]]) -> str: ...

    async def create(self, ref: str, items: Sequence[tuple[str, Request]]) -> str: ...

    async def find(self, ref: str) -> str | None: ...

    async def progress(self, batch_id: str) -> Progress: ...

    async def outcomes(self, batch_id: str, requests: Mapping[str, Request]) -> list[Outcome]:
        """One outcome per request of ``requests`` (key -> request) the ended batch answered or failed."""
        ...


# -- the teacher protocols -----------------------------------------------------------------------------------
# Callers tell the two kinds apart by ``kind`` and by nothing else (no isinstance on a protocol, no probing
# for methods): a teacher declares what it is, and each kind declares everything callers may use.


class LocalTeacher(Protocol):
    """A model in this process: answers a batch of requests at once (``signals``). Constructing one is cheap;
    the weights load on ``load`` or the first ``signals``, so a fully cached run never loads them."""

    kind: Literal["local"]
    identity: dict[str, Any]  # everything that determines the answers; enters every cache key
    method: str  # how a signal is made: 'label_logprobs' (a causal LM scoring each label) or 'logits'
    can_score: bool  # gives log-probabilities of given tokens (``score``): a causal LM does

    def load(self) -> None:
        """Load the weights now (idempotent): missing weights fail here, not on the first request."""
        ...

    @property
    def num_parameters(self) -> int:
        """Parameters of the model (loads it)."""
        ...

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        """The loaded ``transformers`` model and tokenizer, for evaluation to time as it times a student."""
        ...

    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenLogprobs]:
        """Where ``can_score``: the teacher's log-probabilities of each request's given tokens, one
        :class:`TokenLogprobs` per request over positions ``start..`` (see :meth:`ApiTeacher.score`)."""
        ...


class ApiTeacher(Protocol):
    """A teacher behind an API. ``answer`` makes one or more calls through ``call`` and returns the signal,
    or raises :class:`ParseError` when the reply names no label."""

    kind: Literal["api"]
    identity: dict[str, Any]  # everything that determines the answers (never a key or a URL)
    method: str  # 'logprobs', 'samples' or 'hard_label'
    can_score: bool  # gives log-probabilities of given tokens (``score``): where the server has an endpoint for it
    price: Price
    price_factor: float
    key_env: str | None  # the environment variable that holds the key; None: the server needs none

    def check_key(self) -> None:
        """Raise :class:`RecipeError` naming the variable when the key is not set (before any work)."""
        ...

    def worst_case(self, request: Request) -> tuple[int, int, int]:
        """(input tokens, output tokens, calls) a request can cost at most."""
        ...

    async def answer(self, request: Request, call: Caller) -> TeacherSignal: ...

    async def score(self, request: ScoreRequest, call: Caller) -> TokenLogprobs:
        """Where ``can_score``: the teacher's log-probabilities of the given tokens ``ids[start:]``, one entry per
        position: ``tokens``/``ids`` the given token, ``top`` its top alternatives and the given token itself
        (token string -> log-probability), ``tail_mass`` the rest, with ``top_ids``/``top_logprobs`` where the
        teacher names ids. A position the teacher could not score (a server that tokenized the text otherwise
        there) has an empty ``top``: a position is scored exactly when its token is in its ``top``."""
        ...

    def batches(self) -> BatchAdapter | None:
        """The provider's batch API for this teacher's requests; None where it has none. Raises
        :class:`ProtegeError` with the fix where this teacher's settings cannot go through it."""
        ...

    async def aclose(self) -> None: ...


Teacher = LocalTeacher | ApiTeacher
"""Either kind; ``teacher.kind`` says which (and narrows the type)."""
