"""An OpenAI chat completions API in-process: an ``httpx2.MockTransport`` handler the real ``openai`` SDK talks
to (``openai.AsyncOpenAI(http_client=httpx2.AsyncClient(transport=...))``), so engine tests run in
milliseconds and can assert exact distributions, costs and call counts.

Its answers follow OpenAI's documented formats and are deterministic and meaningful:

* A chat completion is ``{"id", "object": "chat.completion", "created", "model", "choices": [{"index",
  "message": {"role": "assistant", "content", "refusal": null}, "logprobs", "finish_reason"}], "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"},
  "completion_tokens_details": {"reasoning_tokens"}}, "system_fingerprint"}``; ``n`` > 1 gives n choices.
* A classification request (the prompt protege renders: a text between triple quotes, then "Answer with one
  of: a, b." or the rationale variant) is answered with the label ``choose(text, labels)`` picks. Replies
  are split into tokens at whitespace (the space goes with the next token, as in BPE vocabularies); with
  ``logprobs`` every token carries ``top_logprobs`` (``logprobs.content[].top_logprobs``). At the answer
  token the chosen label has probability ``CHOSEN`` (0.7), the other labels share ``OTHERS`` (0.2) evenly,
  and filler words take halves of the remaining 0.1 (0.05, 0.025, ...). So a logprob label distribution is
  exactly ``expected_probs(chosen, labels)``, with covered mass 0.9.
* Sampled answers (``temperature`` > 0) follow ``SAMPLE_CYCLE`` per text: the chosen label, the chosen
  label, the next label, an answer naming no label, round and round (whether the samples come as n choices
  of one call or one per call).
* A generation request (any other prompt) is answered ``"You wrote: <text>"`` (plus ``"\\nAnswer: <text>"``
  when the prompt asks for an answer line), cut at the request's token limit (``finish_reason``
  ``length``); every token's top alternative is itself at 0.6, fillers after it.
* Usage is exact: ``prompt_tokens`` is the number of whitespace-separated words in the messages
  (:func:`prompt_tokens`), ``completion_tokens`` the number of reply tokens over all choices.
  With ``cache_prefix`` the instruction block (everything before ``Text:``) counts as cached
  (``prompt_tokens_details.cached_tokens``) from the second request that shares it on.
* Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with its status codes; a 429
  carries ``retry-after`` and the ``x-ratelimit-*`` headers. Faults come from a plan (one per request, in
  arrival order; ``None`` lets one through): ``FAULT_KINDS``. Faults before the model ran (429, 5xx, 4xx,
  ``connect``) are not billed work; the others (``timeout``: the reply came too late; ``cut``: the
  connection dropped mid-body; ``malformed``, ``not-a-completion``, ``html``) happen after it, and
  :attr:`FakeOpenAI.answered` counts them, as a provider would bill them.
* ``limit_rpm`` emulates a requests-per-minute window with OpenAI's ``x-ratelimit-*`` headers.

Every request is recorded (``requests``, ``bodies``, ``log``, ``auth_headers``, ``times``), and the most
calls that were in flight at once (``max_in_flight``, with ``latency`` > 0) shows concurrency happened.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx2

__all__ = [
    "CHOSEN",
    "FAULT_KINDS",
    "FakeOpenAI",
    "OTHERS",
    "SAMPLE_CYCLE",
    "error_body",
    "expected_probs",
    "prompt_tokens",
    "split_tokens",
]

CHOSEN = 0.7  # probability of the chosen label at the answer token
OTHERS = 0.2  # shared evenly by the other labels; 0.1 is left for filler words, most of it shown
SAMPLE_CYCLE = ("chosen", "chosen", "next", "none")  # what the i-th sample of a text says
NO_LABEL = "I am not sure."
FILLERS = ("The", "I", "It", "This", "That", "Yes", "Maybe", "Well", "So", "Here", "Hmm", "Okay", "Sure",
           "Let", "We", "You", "They", "Our", "Your", "His", "Her")  # fmt: skip
FAULT_KINDS = ("429", "500", "503", "400", "401", "403", "404", "connect", "timeout", "cut", "malformed",
               "not-a-completion", "html")  # fmt: skip
_BEFORE_WORK = {"429", "500", "503", "400", "401", "403", "404", "connect"}
_ASK = re.compile(r"(?:Answer with one of|where <label> is one of): (.*?)\.\s*$", re.S)
_TEXT = re.compile(r'Text:\n"""\n(.*)\n"""', re.S)


def split_tokens(text: str) -> list[str]:
    """Tokens as a BPE vocabulary would have them: each word with the whitespace before it."""
    return re.findall(r"\s*\S+|\s+$", text)


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt size the fake reports: whitespace-separated words over all messages."""
    return sum(len(str(m.get("content") or "").split()) for m in body["messages"])


def expected_probs(chosen: str, labels: Sequence[str]) -> list[float]:
    """The label distribution a logprobs teacher must read from the fake's answer token."""
    other = OTHERS / (len(labels) - 1)
    covered = CHOSEN + OTHERS
    return [(CHOSEN if x == chosen else other) / covered for x in labels]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _by_hash(text: str, labels: Sequence[str]) -> str:
    return labels[sum(text.encode()) % len(labels)]


def _fillers(avoid: Sequence[str], n: int) -> list[str]:
    """Filler words that spell no label, nor the start of one."""
    taken = [a.strip().casefold() for a in avoid]
    ok = [f for f in FILLERS if not any(t.startswith(f.casefold()) or f.casefold().startswith(t) for t in taken if t)]
    return ok[:n]


def _entry(token: str, p: float) -> dict[str, Any]:
    return {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}


class FakeOpenAI:
    """The ``httpx2.MockTransport`` handler for ``/v1/chat/completions`` (see the module docstring).

    ``choose(text, labels)``: the label a classification text gets (default: one picked by a checksum of the
    text); returning ``None`` makes the teacher answer ``NO_LABEL``, with no label among its alternatives.
    ``model``: when set, another model name is a 404 ``model_not_found``. ``key``: when set, any other
    bearer token is a 401 ``invalid_api_key``. ``logprobs``: False for a provider that ignores the
    parameter. ``honour_n``: False for one that ignores ``n`` (one choice per call). ``latency``: seconds
    each answer takes (so several calls are in flight at once). ``retry_after``: the 429's header.
    """

    def __init__(
        self,
        choose: Callable[[str, Sequence[str]], str | None] = _by_hash,
        *,
        faults: Sequence[str | None] = (),
        model: str | None = None,
        key: str | None = None,
        logprobs: bool = True,
        honour_n: bool = True,
        cache_prefix: bool = False,
        latency: float = 0.0,
        retry_after: str = "0",
    ):
        self.choose = choose
        self.faults: collections.deque[str | None] = collections.deque()
        self.plan(faults)
        self.model, self.key = model, key
        self.logprobs, self.honour_n, self.cache_prefix = logprobs, honour_n, cache_prefix
        self.latency, self.retry_after = latency, retry_after
        self.requests: list[httpx2.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.log: list[str | None] = []  # the fault each request met (None: answered normally)
        self.auth_headers: list[str | None] = []
        self.times: list[float] = []  # time.monotonic() at each arrival
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.answered = 0  # requests the model worked on (what a provider bills), faults after the work included
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0  # over the answered requests
        self.rate_limited = 0  # 429s from limit_rpm
        self.in_flight = self.max_in_flight = 0
        self._samples: collections.Counter[str] = collections.Counter()
        self._prefixes: set[str] = set()
        self._rpm: int | None = None
        self._window = 60.0
        self._admitted: collections.deque[float] = collections.deque()
        self._clients: list[httpx2.AsyncClient] = []

    # -- set-up --------------------------------------------------------------------------------------
    def plan(self, faults: Sequence[str | None]) -> FakeOpenAI:
        unknown = [f for f in faults if f is not None and f not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {FAULT_KINDS}")
        self.faults.extend(faults)
        return self

    def limit_rpm(self, rpm: int | None, window: float = 60.0) -> FakeOpenAI:
        """A sliding-window request limit, as OpenAI counts it (``None`` turns it off)."""
        self._rpm, self._window = rpm, float(window)
        self._admitted.clear()
        return self

    def client(self) -> httpx2.AsyncClient:
        """An HTTP client whose requests this fake answers (closed by :meth:`close`)."""
        c = httpx2.AsyncClient(transport=httpx2.MockTransport(self))
        self._clients.append(c)
        return c

    def teacher(self, model: str, cfg: Any) -> Any:
        """An ``openai:`` teacher that sends through this fake."""
        from protege.teachers.openai_api import OpenAITeacher

        return OpenAITeacher(model, cfg, http_client=self.client())

    def install(self, monkeypatch: Any) -> FakeOpenAI:
        """Every ``openai:`` teacher protege builds (``make_teacher``: the CLI, ``label``, ``run``) sends
        through this fake for the rest of the test."""
        from protege.teachers import BACKENDS

        monkeypatch.setitem(BACKENDS, "openai", self.teacher)
        return self

    def close(self) -> None:
        for c in self._clients:
            asyncio.run(c.aclose())
        self._clients.clear()

    @property
    def received(self) -> int:
        return len(self.requests)

    # -- the endpoint --------------------------------------------------------------------------------
    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        auth = request.headers.get("authorization")
        self.auth_headers.append(auth)
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            body = {}
        self.bodies.append(body)
        fault = self.faults.popleft() if self.faults else None
        self.log.append(fault)
        if fault is not None:
            self.by_kind[fault] += 1
        if fault in _BEFORE_WORK:
            return self._fault(fault, request)
        refusal = self._refuse(request, body, auth)
        if refusal is not None:
            return refusal
        admitted, limit_headers = self._rate_limit()
        if not admitted:
            self.rate_limited += 1
            self.log[-1] = "rpm_429"
            return self._error(429, error_body(
                f"Rate limit reached for {body.get('model')} on requests per min (RPM): Limit {self._rpm}, "
                f"Used {self._rpm}, Requested 1.", "requests", "rate_limit_exceeded"), limit_headers)  # fmt: skip
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            completion = self.completion(body)
        finally:
            self.in_flight -= 1
        self.answered += 1
        u = completion["usage"]
        self.prompt_tokens += u["prompt_tokens"]
        self.completion_tokens += u["completion_tokens"]
        self.cached_tokens += u["prompt_tokens_details"]["cached_tokens"]
        headers = {"x-request-id": f"req_{len(self.requests):032d}", **dict(limit_headers)}
        if fault == "timeout":
            raise httpx2.ReadTimeout("The read operation timed out", request=request)
        if fault == "cut":
            raise httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body (incomplete chunked read)",
                request=request,
            )
        if fault == "malformed":
            text = json.dumps(completion)
            return httpx2.Response(200, content=text[: len(text) // 2].encode(),
                                   headers={"content-type": "application/json", **headers})  # fmt: skip
        if fault == "not-a-completion":
            return httpx2.Response(200, json={"ok": True}, headers=headers)
        if fault == "html":
            return httpx2.Response(200, text="<html><body>502 Bad Gateway</body></html>",
                                   headers={"content-type": "text/html", **headers})  # fmt: skip
        return httpx2.Response(200, json=completion, headers=headers)

    def _refuse(self, request: httpx2.Request, body: dict[str, Any], auth: str | None) -> httpx2.Response | None:
        """What OpenAI refuses before any work: a wrong key, an unknown model, a bad parameter."""
        if request.url.path.rstrip("/") != "/v1/chat/completions" or request.method != "POST":
            return self._error(404, error_body(f"Invalid URL ({request.method} {request.url.path})",
                                               "invalid_request_error"))  # fmt: skip
        if self.key is not None and auth != f"Bearer {self.key}":
            given = (auth or "").removeprefix("Bearer ")
            return self._error(401, error_body(
                f"Incorrect API key provided: {given[:3]}***{given[-4:]}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"))
        if self.model is not None and body.get("model") != self.model:
            return self._error(404, error_body(
                f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found"))  # fmt: skip
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400, error_body("Missing required parameter: 'messages'.", "invalid_request_error",
                                               "missing_required_parameter", "messages"))  # fmt: skip
        top = body.get("top_logprobs")
        if top is not None and not (0 <= top <= 20):
            return self._error(400, error_body(
                f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got {top} "
                "instead.", "invalid_request_error", "integer_above_max_value", "top_logprobs"))  # fmt: skip
        return None

    def _rate_limit(self) -> tuple[bool, list[tuple[str, str]]]:
        if self._rpm is None:
            return True, []
        from servers import format_duration  # one definition of OpenAI's duration format

        now = time.monotonic()
        while self._admitted and self._admitted[0] <= now - self._window:
            self._admitted.popleft()
        full = len(self._admitted) >= self._rpm
        if not full:
            self._admitted.append(now)
        wait = self._admitted[0] + self._window - now
        headers = [
            ("x-ratelimit-limit-requests", str(self._rpm)),
            ("x-ratelimit-remaining-requests", str(max(0, self._rpm - len(self._admitted)))),
            # rounded up to the millisecond: a client waiting that long finds the slot free
            ("x-ratelimit-reset-requests", format_duration(math.ceil(wait * 1000) / 1000)),
        ]
        if full:  # OpenAI's whole seconds, and the exact wait in milliseconds (which the SDKs read first)
            headers += [("retry-after", str(max(1, math.ceil(wait)))), ("retry-after-ms", str(round(wait * 1000)))]
        return not full, headers

    def _fault(self, kind: str, request: httpx2.Request) -> httpx2.Response:
        if kind == "connect":
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if kind == "429":
            return self._error(429, error_body(
                "Rate limit reached for requests. Please try again later.", "requests", "rate_limit_exceeded"
            ), [("retry-after", self.retry_after), ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "120ms"),
                ("x-ratelimit-limit-tokens", "200000"), ("x-ratelimit-remaining-tokens", "199000"),
                ("x-ratelimit-reset-tokens", "300ms")])  # fmt: skip
        bodies = {
            "500": error_body("The server had an error while processing your request. Sorry about that!",
                              "server_error"),
            "503": error_body("The engine is currently overloaded, please try again later.", "server_error"),
            "400": error_body("Invalid value for 'temperature': must be between 0 and 2.", "invalid_request_error",
                              "invalid_value", "temperature"),
            "401": error_body("Incorrect API key provided: sk-te***4242. You can find your API key at "
                              "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                              "invalid_api_key"),
            "403": error_body("You are not allowed to sample from this model", "invalid_request_error",
                              "model_not_allowed"),
            "404": error_body("The model `gpt-9` does not exist or you do not have access to it.",
                              "invalid_request_error", "model_not_found"),
        }  # fmt: skip
        return self._error(int(kind), bodies[kind])

    def _error(self, status: int, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()) -> httpx2.Response:
        return httpx2.Response(status, json=body, headers=[("x-request-id", f"req_{len(self.requests):032d}"),
                                                           *headers])  # fmt: skip

    # -- answers -------------------------------------------------------------------------------------
    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion this fake answers ``body`` with (no faults, no counters but the samples')."""
        content = str(body["messages"][-1].get("content") or "")
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        want_lp = bool(body.get("logprobs")) and self.logprobs
        top_k = int(body.get("top_logprobs") or 0)
        n = int(body.get("n") or 1) if self.honour_n else 1
        ask, text = _ASK.search(content), _TEXT.search(content)
        choices = []
        for i in range(n):
            if ask and text:
                labels = [x.strip() for x in ask.group(1).split(",")]
                chosen = self.choose(text.group(1), labels)
                sampled = (body.get("temperature") or 0.0) > 0
                if sampled:
                    chosen = self._sample(text.group(1), labels, chosen)
                rationale = "where <label> is one of" in content
                tokens, answer_at = self._label_reply(chosen, rationale)
                steps = [self._label_step(t, chosen, labels, top_k) if j == answer_at else self._plain_step(t, top_k)
                         for j, t in enumerate(tokens)]  # fmt: skip
            else:
                tokens = split_tokens(self._generation_reply(content))
                steps = [self._plain_step(t, top_k) for t in tokens]
            finish = "length" if len(tokens) > limit else "stop"
            tokens, steps = tokens[:limit], steps[:limit]
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": "".join(tokens), "refusal": None, "annotations": []},
                "logprobs": {"content": steps, "refusal": None} if want_lp else None,
                "finish_reason": finish,
            })  # fmt: skip
        prompt = prompt_tokens(body)
        cached = 0
        if self.cache_prefix and "Text:" in content:
            prefix = content.split("Text:")[0]
            if prefix in self._prefixes:
                cached = len(prefix.split())
            self._prefixes.add(prefix)
        completion = sum(len(split_tokens(c["message"]["content"])) for c in choices)
        return {
            "id": f"chatcmpl-{len(self.bodies):029d}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body.get("model"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            },  # fmt: skip
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    @staticmethod
    def _generation_reply(content: str) -> str:
        """'You wrote: <text>' for protege's generation prompt (instruction, blank line, text), with an
        'Answer:' line when the prompt asks for one."""
        paragraphs = content.split("\n\n")
        if "'Answer: <answer>'" in content and len(paragraphs) > 1:
            text = paragraphs[-2]
            return f"You wrote: {text}\nAnswer: {text}"
        return f"You wrote: {paragraphs[-1]}"

    def _sample(self, text: str, labels: Sequence[str], chosen: str | None) -> str | None:
        i = self._samples[text]
        self._samples[text] += 1
        kind = SAMPLE_CYCLE[i % len(SAMPLE_CYCLE)]
        if kind == "none" or chosen is None:
            return None
        return chosen if kind == "chosen" else labels[(labels.index(chosen) + 1) % len(labels)]

    @staticmethod
    def _label_reply(chosen: str | None, rationale: bool) -> tuple[list[str], int | None]:
        """The reply's tokens and which of them is the answer token (None: the reply names no label)."""
        if chosen is None:
            return split_tokens(NO_LABEL), None
        head = f"The text reads as {chosen}.\nAnswer:" if rationale else ""
        tokens = split_tokens(head)
        answer = split_tokens((" " if head else "") + chosen)
        return tokens + answer, len(tokens)

    @staticmethod
    def _label_step(token: str, chosen: str, labels: Sequence[str], k: int) -> dict[str, Any]:
        space = token[: len(token) - len(token.lstrip())]
        firsts = {x: space + split_tokens(x)[0] for x in labels}
        other = OTHERS / (len(labels) - 1)
        alts = [(firsts[chosen], CHOSEN)] + [(firsts[x], other) for x in labels if x != chosen]
        alts += [(space + f, 0.1 * 0.5 ** (i + 1)) for i, f in enumerate(_fillers(labels, 20))]
        entry = _entry(token, CHOSEN)
        entry["top_logprobs"] = [_entry(t, p) for t, p in sorted(alts, key=lambda a: -a[1])[:k]]
        return entry

    @staticmethod
    def _plain_step(token: str, k: int) -> dict[str, Any]:
        space = token[: len(token) - len(token.lstrip())]
        alts = [(token, 0.6)] + [(space + f, 0.4 * 0.5 ** (i + 1)) for i, f in enumerate(_fillers([token], 20))]
        entry = _entry(token, 0.6)
        entry["top_logprobs"] = [_entry(t, p) for t, p in alts[:k]]
        return entry
