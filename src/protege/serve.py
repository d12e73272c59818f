"""Serve a trained classifier student over HTTP as a drop-in replacement for an OpenAI-style API.

Endpoints (all JSON; errors always in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

* ``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model, ``owned_by: "protege"``.
* ``POST /v1/chat/completions``: OpenAI's chat completion format. The text classified is the content of the
  last ``user`` message (a string, or the ``text`` parts of a content list, joined by newlines); the answer's
  content is the predicted label. ``logprobs: true`` returns one token, the label, whose ``top_logprobs`` are
  the labels with their log-probabilities (up to ``top_logprobs`` of them, most likely first). ``stream: true``
  answers with server-sent events in OpenAI's chunk format. ``n`` > 1 is refused (a classifier has one answer);
  sampling settings (temperature, max_tokens, ...) are accepted and ignored. The request's ``model`` may be
  any name; the response names the model that answered.
* ``POST /v1/classify``: ``{"input": "text" | ["text", ...], "model"?: str}`` ->
  ``{"object": "list", "model", "data": [{"index", "label", "probs": {label: p}, "confidence",
  "answered_by"}], "usage": {"prompt_tokens", "total_tokens"}}``.

Every answer says which model answered: the header ``x-protege-model`` (``student``, ``teacher``, or ``mixed``
for a ``/v1/classify`` list answered by both), ``answered_by`` per text in ``/v1/classify``, and a chat
completion's ``model``, which is the served model's id for the student and the teacher's (e.g.
``openai:gpt-4o-mini``) when the teacher answered.

Cascade (classifier students, optional): with a threshold, a text whose top label probability under the
student is below it goes to the teacher, through labeling's code path and store (see :mod:`protege.cascade`):
an answer the store holds costs nothing, the budget cap holds, and a teacher answer's logprobs are the logs of
the teacher's label distribution. A teacher that fails or refuses gives a 502, a spent budget or a teacher
slower than ``teacher_timeout_s`` a 503, both in OpenAI's error format.

Ledger: with a store, every answered text becomes a row of its ``served`` table (who answered, endpoint,
tokens, cost, compute seconds, the student's confidence, the teacher's call key), written in batches off the
event loop; ``protege cost`` reads it.

``app.openapi()`` declares every answer an operation can give (the 200's shape, text/event-stream for a streamed
chat, and each error status in OpenAI's format); the fuzz test holds the server to it. It is not served over HTTP.

Concurrent requests are gathered into one forward pass: each waits on an asyncio queue, a batcher task takes
what arrives within ``batch_wait_ms`` (or until ``max_batch`` texts) and runs the model in a worker thread,
so the event loop keeps accepting requests. Texts longer than the student's max length are truncated, as in
training and evaluation.

Safety: with an API key every request needs ``Authorization: Bearer <key>`` (compared in constant time);
:func:`serve` refuses a non-loopback host without one, and reads the key only from an environment variable.
Bodies over ``max_body_bytes`` get 413, more than ``max_concurrency`` requests in flight get 429, and bad
input gets 400 (never 500).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import MissingExtra, ProtegeError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingExtra(e.name or "fastapi", "serve", "`protege serve`") from None

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CONCURRENCY", "Classifier", "create_app", "serve"]

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_NEW_TOKENS = 1024  # the most tokens one LM answer may ask for (max_tokens above it gets 400)
DEFAULT_TEACHER_TIMEOUT_S = 60.0  # the longest a request waits for the cascade's teacher before a 503
ANSWERED_BY = "student"
MODEL_HEADER = "x-protege-model"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# the model


def _max_length(path: Path, meta: dict[str, Any], model: Any, tok: Any) -> int:
    """The length the student was trained with: protege.json, else the recipe saved beside it, else what the
    model can take."""
    if isinstance(meta.get("max_length"), int):
        return meta["max_length"]
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        import yaml

        from .recipe import StudentConfig

        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
            student = data.get("student") or {}
            value = student.get("max_length", StudentConfig.model_fields["max_length"].default)
            if isinstance(value, int) and value > 0:
                return value
        except (yaml.YAMLError, AttributeError):
            pass
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tok, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


class Classifier:
    """A loaded student: ``predict(texts)`` -> (log-probabilities per text, tokens read per text)."""

    def __init__(self, path: Path, max_length: int | None = None):
        from .students import load_student

        path = Path(path)
        if not path.is_dir():
            raise ProtegeError(f"{str(path)!r} is not a directory; point `protege serve` at a trained student")
        self.model, self.tokenizer, self.meta = load_student(path)
        cfg = self.model.config
        id2label = {int(k): v for k, v in (cfg.id2label or {}).items()}
        self.labels: tuple[str, ...] = tuple(id2label.get(i, f"LABEL_{i}") for i in range(cfg.num_labels))
        if len(self.labels) < 2:
            raise ProtegeError(f"{str(path)!r} is not a classifier student: it has {len(self.labels)} label(s)")
        self.max_length = max_length or _max_length(path, self.meta, self.model, self.tokenizer)

    def predict(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        import torch

        with torch.inference_mode():
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            logp = torch.log_softmax(self.model(**enc).logits.float(), -1)
        return logp.tolist(), enc["attention_mask"].sum(1).tolist()


# --------------------------------------------------------------------------------------------------------------
# server-side batching


@dataclass
class _Answer:
    """One text's answer, by the student or the cascade's teacher."""

    label: str
    logp: list[float]  # log-probabilities over the labels, in the student's label order
    probs: list[float]
    by: str  # 'student' or 'teacher'
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[Any]


@dataclass
class _Batcher:
    """Gathers concurrent requests into one forward pass, run in a single worker thread."""

    thread_name: ClassVar[str] = "protege-serve"

    classifier: Classifier
    max_batch: int
    wait_s: float
    hook: Callable[[list[str]], None] | None = None
    forward_passes: int = 0  # model calls so far (a measure of batching, read by tests and logs)
    queue: asyncio.Queue[_Pending] | None = None
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
        await self.queue.put(_Pending(texts, fut))
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
class _TeacherQueue(_Batcher):
    """The cascade's other half: texts the student was unsure of, gathered from concurrent requests into one
    labeling run of the teacher (:class:`protege.cascade.TeacherFallback`) in its own worker thread."""

    thread_name: ClassVar[str] = "protege-teacher"

    fallback: Any = None  # protege.cascade.TeacherFallback
    timeout_s: float = 60.0

    def _forward(self, texts: list[str]) -> tuple[list[Any], ...]:
        self.forward_passes += 1
        return (self.fallback.answer(texts),)

    async def submit(self, texts: list[str]) -> list[Any]:  # type: ignore[override]
        """The teacher's answers or failures (``TeacherAnswer | TeacherFailure``), one per text. Waiting longer
        than ``timeout_s`` is a 503 (the call goes on; its answer lands in the store for the next asker)."""
        try:
            (answers,) = await asyncio.wait_for(self._wait(texts), self.timeout_s)
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


# --------------------------------------------------------------------------------------------------------------
# request formats


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields a classifier ignores


class ContentPart(_Loose):
    type: str
    text: str | None = None


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Loose):
    include_usage: bool | None = None


class ChatCompletionRequest(_Loose):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # sampling: used by language-model students, accepted and ignored by classifiers (one answer each)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str]
    model: str | None = None


# --------------------------------------------------------------------------------------------------------------
# response formats: they document the API in its OpenAPI schema (handlers build plain dicts of this shape, and
# the fuzz test checks every answer against them)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[Choice]
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str
    probs: dict[str, float]
    confidence: float
    answered_by: str


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[Classification]
    usage: ClassifyUsage


# One server-sent event of a streamed chat completion (how schemathesis and OpenAPI 3.2's itemSchema read it).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A chat.completion.chunk as JSON; the last is [DONE]."}},
}

_ERRORS = {
    400: "The body or a parameter is invalid.",
    401: "The API key is missing or wrong (only when the server has one).",
    404: "No such model.",
    413: "The body is larger than the server's limit.",
    429: "More requests in flight than the server's limit; retry after Retry-After seconds.",
    500: "The model failed on this request.",
    502: "Cascade only: the teacher failed or refused the request.",
    503: "Cascade only: the teacher's budget is spent, or it did not answer in time.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all in OpenAI's error format."""
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


class ApiError(Exception):
    """An OpenAI-format error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _check_text(text: str, param: str) -> str:
    if not text.strip():
        raise ApiError(400, f"'{param}' is empty; send the text to classify", param=param, code="empty_input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text", param=param, code="invalid_input") from None
    return text


def _chat_text(req: ChatCompletionRequest) -> str:
    """The content of the last user message."""
    for i in range(len(req.messages) - 1, -1, -1):
        m = req.messages[i]
        if m.role != "user":
            continue
        param = f"messages[{i}].content"
        if m.content is None:
            raise ApiError(400, f"'{param}' is missing; the last user message holds the text to classify", param=param)
        if isinstance(m.content, str):
            return _check_text(m.content, param)
        return _check_text("\n".join(p.text for p in m.content if p.type == "text" and p.text is not None), param)
    raise ApiError(400, "'messages' has no user message; the last user message holds the text to classify",
                   param="messages")


def _lm_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as plain {role, content} turns for a chat template (text parts joined)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function"):
            raise ApiError(400, f"'messages[{i}].role' {m.role!r} is not supported: this student has no tools",
                           param=f"messages[{i}].role", code="unsupported_value")
        content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(
            p.text for p in m.content if p.type == "text" and p.text is not None)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise ApiError(400, "'messages' has no user message with text", param="messages")
    return out


def _generation_params(req: ChatCompletionRequest, max_new_tokens: int) -> Any:
    """OpenAI's sampling settings, checked, as :class:`protege.serve_lm.GenerationParams`."""
    from .serve_lm import MAX_STOP, GenerationParams

    if req.n is not None and req.n > 1:
        raise ApiError(400, "n > 1 is not supported; send one request per answer", param="n", code="unsupported_value")
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if limit is not None and not 1 <= limit <= max_new_tokens:
        raise ApiError(400, f"'{name}' must be between 1 and {max_new_tokens} (this server's limit), not {limit}",
                       param=name, code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, not {temperature}", param="temperature",
                       code="invalid_value")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be above 0 and at most 1, not {top_p}", param="top_p", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"'stop' takes up to {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs > 20:
        raise ApiError(400, f"'top_logprobs' must be at most 20, not {req.top_logprobs}", param="top_logprobs",
                       code="invalid_value")
    return GenerationParams(
        max_tokens=limit or min(256, max_new_tokens), temperature=temperature, top_p=top_p, stop=tuple(stop),
        seed=req.seed, top_logprobs=req.top_logprobs or 0, logprobs=bool(req.logprobs),
    )


def student_kind(student_dir: Path) -> str:
    """'causal_lm' or 'classifier', from the student's protege.json."""
    try:
        meta = json.loads((Path(student_dir) / "protege.json").read_text())
    except (OSError, ValueError):
        return "classifier"  # Classifier() then says what is missing
    return "causal_lm" if isinstance(meta, dict) and meta.get("kind") == "causal_lm" else "classifier"


def _is_union_tag(part: Any) -> bool:
    """Pydantic names the member of a union it tried in the error location (``str``, ``list[str]``,
    ``ContentPart``); the client's field names never look like that."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or part[:1].isupper())


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    out = ""
    for p in loc:
        if p == "body" and not out or _is_union_tag(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """One message for FastAPI's validation errors: the error that got deepest into the body (for a union, the
    member that matched furthest), with the alternatives at that depth."""
    if not errors:
        return "The request is invalid.", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "The request body is not valid JSON.", None
    params = [_param(tuple(e.get("loc", ()))) for e in errors]
    depth = [len([p for p in e.get("loc", ()) if not _is_union_tag(p)]) for e in errors]
    deepest = max(range(len(errors)), key=lambda i: depth[i])
    param = params[deepest]
    if param is None:
        if errors[deepest].get("type") == "missing":
            return "The request body is empty; send a JSON object.", None
        return "The request body must be a JSON object.", None
    msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e, p in zip(errors, params) if p == param))
    return f"{param}: {'; or '.join(msgs)}", param


# --------------------------------------------------------------------------------------------------------------
# ASGI guard: API key, concurrency limit and body size, before the app sees a request


class _Guard:
    def __init__(self, app: Any, api_key: str | None, max_concurrency: int, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    def _authorized(self, headers: dict[bytes, bytes]) -> ApiError | None:
        if self.api_key is None:
            return None
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return ApiError(
                401, "You didn't provide an API key. Send it as a bearer token: 'Authorization: Bearer KEY'.",
                headers={"www-authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip(), self.api_key):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                            headers={"www-authenticate": "Bearer"})
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        err = self._authorized(headers)
        if err is None and self.in_flight >= self.max_concurrency:
            err = ApiError(
                429, f"Too many requests in flight (the limit is {self.max_concurrency}); retry shortly.",
                type="rate_limit_error", code="rate_limit_exceeded", headers={"retry-after": "1"},
            )
        if err is None:
            try:
                declared = int(headers.get(b"content-length", b"0"))
            except ValueError:
                declared = 0
            if declared > self.max_body_bytes:
                err = self._too_large()
        if err is not None:
            return await err.response()(scope, receive, send)

        self.in_flight += 1
        try:
            # read the body here, bounded, and hand it to the app whole (a chunked body has no content-length)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > self.max_body_bytes:
                    return await self._too_large().response()(scope, receive, send)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than the limit of {self.max_body_bytes} bytes.",
                        code="request_too_large")


# --------------------------------------------------------------------------------------------------------------
# the app


def create_app(
    student_dir: Path | str,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_batch: int = DEFAULT_MAX_BATCH,
    model_name: str | None = None,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_length: int | None = None,
    forward_hook: Callable[[list[str]], None] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    store: Path | str | None = None,
    compute_usd_per_hour: float | None = None,
    cascade_threshold: float | None = None,
    teacher_recipe: Path | str | None = None,
    teacher_timeout_s: float = DEFAULT_TEACHER_TIMEOUT_S,
) -> FastAPI:
    """The HTTP app serving the classifier student in ``student_dir`` (loaded now, so a bad directory fails
    before anything listens). ``forward_hook(texts)``, if given, runs in the worker thread before each batch
    (tests use it to slow the model down); ``app.state.batcher.forward_passes`` counts model calls.

    Classifier students record every answered text in the ``served`` table of ``store`` (default: the
    ``protege.db`` of the run that made the student, when there is one; without a store nothing is recorded),
    the student's answers priced at their measured compute time times ``compute_usd_per_hour`` (default: the
    student's saved recipe's ``eval.compute_usd_per_hour``). With ``cascade_threshold`` the teacher of
    ``teacher_recipe`` (default: the recipe saved with the student) answers the texts whose top label
    probability is below it (see :mod:`protege.cascade`)."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_concurrency", max_concurrency),
                        ("max_batch", max_batch)):
        if value < 1:
            raise ProtegeError(f"{name} must be at least 1, not {value}")
    student_dir = Path(student_dir)
    lm = None
    if student_kind(student_dir) == "causal_lm":
        from .serve_lm import LMGenerator

        lm = LMGenerator(student_dir)  # generates one answer at a time; no classifier batching
        clf: Any = None
        batcher: Any = None
    else:
        clf = Classifier(student_dir, max_length=max_length)
        batcher = _Batcher(clf, max_batch=max_batch, wait_s=max(0.0, batch_wait_ms) / 1000, hook=forward_hook)
    model_id = model_name or student_dir.resolve().name
    created = int(time.time())

    # the ledger and the cascade (classifier students)
    from .cascade import (
        ServedLedger,
        TeacherAnswer,
        TeacherFailure,
        TeacherFallback,
        default_store,
        log_probs,
        saved_compute_price,
        served_record,
    )
    from .cascade import teacher_recipe as cascade_recipe  # the name teacher_recipe is this function's argument

    store_path = Path(store) if store is not None else default_store(student_dir)
    ledger = ServedLedger(store_path) if store_path is not None and lm is None else None
    usd_per_hour = compute_usd_per_hour if compute_usd_per_hour is not None else saved_compute_price(student_dir)
    teacher_queue: _TeacherQueue | None = None
    if cascade_threshold is not None:
        if lm is not None:
            raise ProtegeError("the cascade is for classifier students (a threshold on the top label probability); "
                               "serve this language-model student without --cascade-threshold")
        if not cascade_threshold >= 0:
            raise ProtegeError(f"--cascade-threshold must be 0 or more (0: the student answers everything; above 1: "
                               f"the teacher does), not {cascade_threshold}")
        if store_path is None:
            raise ProtegeError(
                f"the cascade keeps the teacher's answers in the run's store, and there is none at "
                f"{str(student_dir.resolve().parent / 'protege.db')!r}; pass --store PATH"
            )
        fallback = TeacherFallback(cascade_recipe(student_dir, teacher_recipe, clf.labels), store_path, usd_per_hour)
        teacher_queue = _TeacherQueue(clf, max_batch=max(max_batch, 64), wait_s=max(0.0, batch_wait_ms) / 1000,
                                      fallback=fallback, timeout_s=teacher_timeout_s)
    student_name = student_dir.resolve().name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for part in (batcher, teacher_queue, ledger):
            if part is not None:
                await part.start()
        try:
            yield
        finally:
            for part in (batcher, teacher_queue):
                if part is not None:
                    await part.stop()
            if ledger is not None:
                await ledger.close()  # after the batchers: the last answers are recorded too

    app = FastAPI(title="protege student", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  responses=_errors(401, 413, 429, 500))  # the guard's answers, on every route
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without the 422 it adds to every route: validation errors are 400 here (declared)."""
        if app.openapi_schema is None:
            schema = build_openapi()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.classifier = clf
    app.state.generator = lm
    app.state.batcher = batcher
    app.state.teacher_queue = teacher_queue
    app.state.ledger = ledger
    app.state.model_id = model_id
    app.add_middleware(_Guard, api_key=api_key, max_concurrency=max_concurrency, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors())
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({request.method} {request.url.path})"
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, "The server had an error while processing your request.", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "protege"}

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", response_model=None, responses={200: {"model": ModelCard}, **_errors(404)})
    async def get_model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")
        return model_card()

    def top(logp: list[float], k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(logp)), key=lambda i: -logp[i])[:k]
        return [(clf.labels[i], logp[i]) for i in order]

    def token_logprob(label: str, lp: float) -> dict[str, Any]:
        return {"token": label, "logprob": lp, "bytes": list(label.encode("utf-8"))}

    async def answer(texts: list[str], endpoint: str) -> list[_Answer]:
        """The student's answer for each text, or the teacher's where the student's top probability is below
        the cascade's threshold; every text goes to the ledger. A teacher's failure fails the request."""
        logps, tokens, seconds = await batcher.submit(texts)
        conf = [math.exp(max(lp)) for lp in logps]
        teacher: list[Any] = [None] * len(texts)
        if teacher_queue is not None:
            unsure = [i for i, c in enumerate(conf) if c < cascade_threshold]
            if unsure:
                try:
                    replies = await teacher_queue.submit([texts[i] for i in unsure])
                except ApiError as e:
                    replies = [TeacherFailure(e.status, e.message, e.code or "teacher_failed")] * len(unsure)
                for i, reply in zip(unsure, replies):
                    teacher[i] = reply
        completion = 1 if endpoint == "chat.completions" else 0  # a chat answer is one label token
        answers, records = [], []
        for i, logp in enumerate(logps):
            t = teacher[i]
            if isinstance(t, TeacherAnswer):
                a = _Answer(t.label, log_probs(t.probs), list(t.probs), "teacher", t.input_tokens, t.output_tokens)
            else:
                best = max(range(len(logp)), key=logp.__getitem__)
                a = _Answer(clf.labels[best], logp, [math.exp(x) for x in logp], ANSWERED_BY, tokens[i], completion)
            answers.append(a)
            records.append(served_record(student_name, endpoint, conf[i], seconds[i], usd_per_hour,
                                         (a.prompt_tokens, a.completion_tokens), t))
        if ledger is not None:
            ledger.add(records)
        failed = [t for t in teacher if isinstance(t, TeacherFailure)]
        if failed:
            raise ApiError(failed[0].status, failed[0].message, type="server_error", code=failed[0].code)
        return answers

    @app.post("/v1/chat/completions", responses={
        200: {"model": ChatCompletion, "description": "The label; with stream: true, OpenAI's chunks as server-sent events.",
              "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
        **_errors(400, 502, 503),
    })
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        if lm is not None:
            from .serve_lm import chat_completion

            return await chat_completion(
                lm, _lm_messages(req), _generation_params(req, max_new_tokens), model_id=model_id,
                stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
                headers={MODEL_HEADER: ANSWERED_BY},
            )
        if req.n is not None and req.n > 1:
            raise ApiError(400, "n > 1 is not supported: a classifier has exactly one answer", param="n",
                           code="unsupported_value")
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        text = _chat_text(req)
        (a,) = await answer([text], "chat.completions")
        label, logp = a.label, a.logp
        best = clf.labels.index(label)
        logprobs = None
        if req.logprobs:
            entry = token_logprob(label, logp[best])
            entry["top_logprobs"] = [token_logprob(lab, lp) for lab, lp in top(logp, req.top_logprobs or 0)]
            logprobs = {"content": [entry], "refusal": None}
        usage = {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                 "total_tokens": a.prompt_tokens + a.completion_tokens}
        # the model that answered: this student, or the cascade's teacher (also in the x-protege-model header)
        answered_model = model_id if a.by == ANSWERED_BY else teacher_queue.fallback.name
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": answered_model,
                "system_fingerprint": None}
        headers = {MODEL_HEADER: a.by}
        if not req.stream:
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": label, "refusal": None},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }],
                    "usage": usage,
                },
                headers=headers,
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": label},
                                   "logprobs": logprobs, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]},
        ]
        if include_usage:
            events.append({**chunk, "choices": [], "usage": usage})

        async def sse() -> AsyncIterator[str]:
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    @app.post("/v1/classify", responses={200: {"model": ClassifyResponse}, **_errors(400, 502, 503)})
    async def classify(req: ClassifyRequest) -> Any:
        if lm is not None:
            raise ApiError(400, "this server serves a language-model student; /v1/classify is for classifier "
                           "students (use /v1/chat/completions)", code="unsupported_endpoint")
        if isinstance(req.input, str):
            texts = [_check_text(req.input, "input")]
        else:
            if not req.input:
                raise ApiError(400, "'input' is an empty list; send at least one text", param="input",
                               code="empty_input")
            texts = [_check_text(t, f"input[{i}]") for i, t in enumerate(req.input)]
        answers = await answer(texts, "classify")
        data = []
        for i, a in enumerate(answers):
            probs = dict(zip(clf.labels, a.probs))
            data.append({"index": i, "label": a.label, "probs": probs, "confidence": probs[a.label],
                         "answered_by": a.by})
        n = sum(a.prompt_tokens for a in answers)
        total = n + sum(a.completion_tokens for a in answers)  # a teacher's answer has output tokens too
        by = {a.by for a in answers}
        return JSONResponse(
            {"object": "list", "model": model_id, "data": data, "usage": {"prompt_tokens": n, "total_tokens": total}},
            headers={MODEL_HEADER: by.pop() if len(by) == 1 else "mixed"},
        )

    return app


# --------------------------------------------------------------------------------------------------------------
# running it


def is_loopback(host: str) -> bool:
    """True only for hosts that cannot be reached from another machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public interface


def serve(
    student_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_batch: int = DEFAULT_MAX_BATCH,
    model_name: str | None = None,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    log_level: str = "info",
    graceful_timeout_s: float | None = 30.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    store: Path | str | None = None,
    compute_usd_per_hour: float | None = None,
    cascade_threshold: float | None = None,
    teacher_recipe: Path | str | None = None,
    teacher_timeout_s: float = DEFAULT_TEACHER_TIMEOUT_S,
) -> None:
    """Serve the student until interrupted; on SIGINT/SIGTERM uvicorn stops accepting connections and lets
    requests in flight finish (up to ``graceful_timeout_s``).

    The API key, if any, is read from the environment variable named ``api_key_env`` (never from a flag or a
    file, so it stays out of shell history and process lists). A host other than loopback needs one."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env, "").strip()
        if not api_key:
            raise ProtegeError(f"the environment variable {api_key_env} (named by --api-key-env) is unset or empty; "
                               "export the key clients must send, then retry")
    if not is_loopback(host) and not api_key:
        raise ProtegeError(
            f"refusing to listen on {host!r} without an API key: anyone who can reach it could use the model. "
            "Export a key and pass --api-key-env NAME, or listen on 127.0.0.1"
        )
    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("uvicorn", "serve", "`protege serve`") from None
    app = create_app(
        student_dir, api_key=api_key, max_body_bytes=max_body_bytes, max_concurrency=max_concurrency,
        max_batch=max_batch, model_name=model_name, batch_wait_ms=batch_wait_ms, max_new_tokens=max_new_tokens,
        store=store, compute_usd_per_hour=compute_usd_per_hour, cascade_threshold=cascade_threshold,
        teacher_recipe=teacher_recipe, teacher_timeout_s=teacher_timeout_s,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                    server_header=False)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; stopping is the normal end
        pass
