"""The HTTP app: routes, the cascade's routing and the served-traffic ledger (see :mod:`protege.serve`)."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ProtegeError
from ..store import CallRecord
from .api import (
    SSE_EVENT,
    ApiError,
    ChatCompletion,
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    Guard,
    ModelCard,
    ModelList,
    chat_text,
    check_text,
    error_responses,
    generation_params,
    lm_messages,
    validation_message,
)
from .capture import Capture, Redactor
from .fallback import TeacherAnswer, TeacherFailure, TeacherFallback, default_store, log_probs, saved_compute_price
from .fallback import teacher_recipe as cascade_recipe
from .ledger import ServedLedger, served_record
from .lm import Generation, GenerationParams, chat_completion, generate, respond, stop_at, token_entry
from .metrics import METRICS_PATH, Metrics, MetricsMiddleware
from .slots import Reloader, Router, Slot, check_same_job, load_slot
from .workers import TeacherQueue

__all__ = ["create_app"]

DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_NEW_TOKENS = 1024  # the most tokens one LM answer may ask for (max_tokens above it gets 400)
DEFAULT_TEACHER_TIMEOUT_S = 60.0  # the longest a request waits for the cascade's teacher before a 503
DEFAULT_RELOAD_INTERVAL_S = 2.0  # how often the served directory is checked for a promoted student
STUDENT, TEACHER = "student", "teacher"
MODEL_HEADER = "x-protege-model"
VERSION_HEADER = "x-protege-version"  # the card hash of the student version that read the request
log = logging.getLogger(__name__)


@dataclass
class Answer:
    """One text's label, by the classifier student or the cascade's teacher."""

    label: str
    logp: list[float]  # log-probabilities over the labels, in the student's label order
    probs: list[float]
    by: str  # STUDENT or TEACHER
    prompt_tokens: int
    completion_tokens: int


class Service:
    """What the routes do: the student's answers (the current version's, or a canary's), the teacher's where the
    student is below the threshold, and a ledger row (also counted in the metrics) for every answered text or
    conversation."""

    def __init__(
        self,
        student_dir: Path,
        model_id: str,
        router: Router,
        teacher_queue: TeacherQueue | None,
        threshold: float | None,
        ledger: ServedLedger | None,
        usd_per_hour: float,
        max_new_tokens: int,
        metrics: Metrics,
        capture: Capture | None = None,
    ):
        self.name = student_dir.resolve().name
        self.model_id, self.router = model_id, router
        self.teacher_queue, self.threshold, self.ledger = teacher_queue, threshold, ledger
        self.usd_per_hour, self.max_new_tokens, self.metrics = usd_per_hour, max_new_tokens, metrics
        self.capture = capture

    async def answer(self, route: Any, *args: Any) -> Any:
        """``route(slot, *args)`` with the slot the router picks, held until the answer is sent (a streamed one
        included), so a reload closes a student only once nothing uses it."""
        slot = self.router.acquire()
        try:
            response = await route(slot, *args)
        except BaseException:
            self.router.release(slot)
            raise
        if isinstance(response, StreamingResponse):
            body = response.body_iterator

            async def held() -> AsyncIterator[Any]:
                try:
                    async for chunk in body:
                        yield chunk
                finally:  # sent, failed mid-stream or the client left: the slot is free either way
                    self.router.release(slot)

            response.body_iterator = held()
        else:
            self.router.release(slot)
        response.headers[VERSION_HEADER] = slot.version
        return response

    @property
    def teacher_name(self) -> str:
        assert self.teacher_queue is not None
        return self.teacher_queue.fallback.name

    def record(self, row: Any, read: str | list[dict[str, str]], answer: str | None, received_at: float) -> None:
        """The ledger row of one answer (and with capture, what was read and answered, redacted)."""
        self.metrics.record([row])
        if self.ledger is not None:
            captured = [] if self.capture is None else [self.capture.record(row, read, answer, received_at)]
            self.ledger.add([row], captured)

    async def ask_teacher(self, requests: list[Any]) -> list[TeacherAnswer | TeacherFailure]:
        """The teacher's answer or failure per request; a queue timeout or crash is a failure of each."""
        assert self.teacher_queue is not None
        try:
            return await self.teacher_queue.submit(requests)
        except ApiError as e:
            return [TeacherFailure(e.status, e.message, e.code or "teacher_failed")] * len(requests)

    # ---------------------------------------------------------------------------------------------------------
    # classifier students

    async def classify(self, slot: Slot, texts: list[str], endpoint: str) -> list[Answer]:
        """The student's label for each text, or the teacher's where the student's top probability is below the
        cascade's threshold; every text goes to the ledger. A teacher's failure fails the request."""
        assert slot.batcher is not None and slot.clf is not None
        received_at = time.time()
        logps, tokens, seconds = await slot.batcher.submit(texts)
        conf = [math.exp(max(lp)) for lp in logps]
        teacher: list[TeacherAnswer | TeacherFailure | None] = [None] * len(texts)
        if self.teacher_queue is not None:
            unsure = [i for i, c in enumerate(conf) if c < self.threshold]
            if unsure:
                requests = self.teacher_queue.fallback.requests([texts[i] for i in unsure])
                for i, reply in zip(unsure, await self.ask_teacher(requests)):
                    teacher[i] = reply
        completion = 1 if endpoint == "chat.completions" else 0  # a chat answer is one label token
        answers = []
        for i, logp in enumerate(logps):
            t = teacher[i]
            if isinstance(t, TeacherAnswer):
                a = Answer(t.label, log_probs(t.probs), list(t.probs), TEACHER, t.input_tokens, t.output_tokens)
            else:
                best = max(range(len(logp)), key=logp.__getitem__)
                a = Answer(slot.clf.labels[best], logp, [math.exp(x) for x in logp], STUDENT, tokens[i], completion)
            answers.append(a)
            self.record(served_record(self.name, endpoint, conf[i], seconds[i], self.usd_per_hour,
                                      (a.prompt_tokens, a.completion_tokens), t, slot.version),
                        texts[i], None if isinstance(t, TeacherFailure) else a.label, received_at)
        _raise_first_failure(teacher)
        return answers

    async def classify_response(self, slot: Slot, texts: list[str]) -> JSONResponse:
        """The /v1/classify answer: each text's label, every label's probability, and who answered."""
        answers = await self.classify(slot, texts, "classify")
        assert slot.clf is not None
        data = []
        for i, a in enumerate(answers):
            probs = dict(zip(slot.clf.labels, a.probs))
            data.append({"index": i, "label": a.label, "probs": probs, "confidence": probs[a.label],
                         "answered_by": a.by})
        n = sum(a.prompt_tokens for a in answers)
        total = n + sum(a.completion_tokens for a in answers)  # a teacher's answer has output tokens too
        by = {a.by for a in answers}
        return JSONResponse(
            {"object": "list", "model": self.model_id, "data": data,
             "usage": {"prompt_tokens": n, "total_tokens": total}},
            headers={MODEL_HEADER: by.pop() if len(by) == 1 else "mixed"},
        )

    async def classifier_chat(self, slot: Slot, req: ChatCompletionRequest) -> Any:
        """A chat completion whose content is the label (one token, whose alternatives are the other labels)."""
        assert slot.clf is not None
        if req.n is not None and req.n > 1:
            raise ApiError(400, "n > 1 is not supported: a classifier has exactly one answer", param="n",
                           code="unsupported_value")
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        (a,) = await self.classify(slot, [chat_text(req)], "chat.completions")
        logprobs = None
        if req.logprobs:
            order = sorted(range(len(a.logp)), key=lambda i: -a.logp[i])[: req.top_logprobs or 0]
            entry = token_entry(a.label, a.logp[slot.clf.labels.index(a.label)],
                                [(slot.clf.labels[i], a.logp[i]) for i in order])
            logprobs = {"content": [entry], "refusal": None}
        usage = {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                 "total_tokens": a.prompt_tokens + a.completion_tokens}
        # the model that answered: this student, or the cascade's teacher (also in the x-protege-model header)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id if a.by == STUDENT else self.teacher_name, "system_fingerprint": None}
        headers = {MODEL_HEADER: a.by}
        message = {"role": "assistant", "content": a.label, "refusal": None}
        if not req.stream:
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage},
                                headers=headers)
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": a.label},
                                   "logprobs": logprobs, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]},
        ]
        if req.stream_options and req.stream_options.include_usage:
            events.append({**chunk, "choices": [], "usage": usage})

        async def sse() -> AsyncIterator[str]:
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})

    # ---------------------------------------------------------------------------------------------------------
    # language-model students

    async def lm_chat(self, slot: Slot, req: ChatCompletionRequest) -> Any:
        """The student's answer, streamed as it is decoded; with a cascade, decoded whole first and sent only
        if its confidence clears the threshold, else the teacher's answer to the same conversation."""
        lm = slot.lm
        assert lm is not None
        messages, p = lm_messages(req), generation_params(req, self.max_new_tokens)
        received_at = time.time()
        out = {"stream": bool(req.stream), "include_usage": bool(req.stream_options and req.stream_options.include_usage)}

        def student_row(g: Generation, teacher: Any = None) -> Any:
            tokens = (g.prompt_tokens, g.completion_tokens)
            return served_record(self.name, "chat.completions", g.confidence, g.seconds, self.usd_per_hour, tokens,
                                 teacher, slot.version)

        if self.teacher_queue is None:
            return await chat_completion(lm, messages, p, model_id=self.model_id, headers={MODEL_HEADER: STUDENT},
                                         on_done=lambda g: self.record(student_row(g), messages, g.text, received_at),
                                         **out)
        g = await generate(lm, messages, p)
        assert self.threshold is not None
        if g.confidence >= self.threshold:
            self.record(student_row(g), messages, g.text, received_at)
            return respond(g, p, model_id=self.model_id, headers={MODEL_HEADER: STUDENT}, **out)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        request = self.teacher_queue.fallback.generation_request(messages, asked)
        (reply,) = await self.ask_teacher([request])
        answer = teacher_generation(reply, p) if isinstance(reply, TeacherAnswer) else None
        self.record(student_row(g, reply), messages, None if answer is None else answer.text, received_at)
        _raise_first_failure([reply])
        assert answer is not None
        return respond(answer, p, model_id=self.teacher_name, headers={MODEL_HEADER: TEACHER}, **out)


def teacher_generation(reply: TeacherAnswer, p: GenerationParams) -> Generation:
    """The teacher's answer as the client asked for it: cut before the first of the client's stop strings,
    with the teacher's token log-probabilities where its labeling recorded them for the whole reply (a
    rationale's final answer is only part of it, so it has none)."""
    text = reply.text or ""
    finish = "length" if reply.signal.truncated else "stop"
    cut = stop_at(text, p.stop)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    tokens: list[dict[str, Any]] = []
    tl = reply.signal.token_logprobs
    if p.logprobs and tl is not None and text == (reply.signal.text or "")[: len(text)]:
        length = 0
        for token, top in zip(tl.tokens, tl.top):
            if length >= len(text) or token not in top:
                break
            length += len(token)
            alternatives = sorted(top.items(), key=lambda kv: -kv[1])[: p.top_logprobs]
            tokens.append(token_entry(token, top[token], alternatives))
        if length < len(text):  # a token the teacher recorded without its own probability: none rather than some
            tokens = []
    return Generation(text=text, finish_reason=finish, prompt_tokens=reply.input_tokens,
                      completion_tokens=reply.output_tokens, tokens=tokens)


def _raise_first_failure(replies: list[Any]) -> None:
    failed = [t for t in replies if isinstance(t, TeacherFailure)]
    if failed:
        raise ApiError(failed[0].status, failed[0].message, type="server_error", code=failed[0].code)


def _cascade(
    student_dir: Path, labels: tuple[str, ...] | None, threshold: float, teacher_recipe: Path | str | None,
    store_path: Path | None, usd_per_hour: float, max_batch: int, wait_s: float, timeout_s: float,
    scrub: Callable[[CallRecord], CallRecord] | None = None,
) -> TeacherQueue:
    if not threshold >= 0:
        raise ProtegeError(f"--cascade-threshold must be 0 or more (0: the student answers everything; above 1: "
                           f"the teacher does), not {threshold}")
    if store_path is None:
        raise ProtegeError(
            f"the cascade keeps the teacher's answers in the run's store, and there is none at "
            f"{str(student_dir.resolve().parent / 'protege.db')!r}; pass --store PATH"
        )
    fallback = TeacherFallback(cascade_recipe(student_dir, teacher_recipe, labels), store_path, usd_per_hour, scrub)
    return TeacherQueue(None, max_batch=max(max_batch, 64), wait_s=wait_s, fallback=fallback, timeout_s=timeout_s)


def _canary(student_dir: Path, current: Slot, fraction: float | None, candidate: Path | str | None,
            load: Any) -> tuple[Slot | None, float]:
    """(the canary's slot, its share of the requests), or (None, 0) without a canary."""
    if fraction is None:
        if candidate is not None:
            raise ProtegeError("--candidate names the student a canary serves; add --canary FRACTION (or drop it)")
        return None, 0.0
    if not 0 < fraction < 1:
        raise ProtegeError(f"--canary is the share of requests the candidate answers, above 0 and below 1, not "
                           f"{fraction}")
    if candidate is None:
        from ..versions import Versions

        run_dir = student_dir.resolve().parent
        name = Versions.load(run_dir).candidate
        if name is None:
            raise ProtegeError(f"{str(run_dir)!r} has no staged candidate for the canary; run `protege improve "
                               f"{run_dir} --stage`, or pass --candidate DIR")
        candidate = Versions(run_dir).path(name)
    slot = load(Path(candidate))
    check_same_job(current, slot, "the canary's candidate")
    if slot.version == current.version:
        raise ProtegeError(f"the canary's candidate {str(candidate)!r} is the served student itself")
    return slot, fraction


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI's schema without the 422 it adds to every route: validation errors are 400 here (declared)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format: ours, validation (400), routing (404/405) and crashes (500, logged)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
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
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "The server had an error while processing your request.", type="server_error").response()


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
    capture: bool = False,
    capture_max_rows: int | None = None,
    capture_max_days: float | None = None,
    redact: Sequence[str] = (),
    reload_interval_s: float | None = DEFAULT_RELOAD_INTERVAL_S,
    canary: float | None = None,
    candidate: Path | str | None = None,
    canary_seed: int | None = None,
) -> FastAPI:
    """The HTTP app serving the student in ``student_dir`` (loaded now, so a bad directory fails before anything
    listens). ``forward_hook(texts)``, if given, runs in a classifier's worker thread before each batch (tests use
    it to slow the model down); ``app.state.batcher.forward_passes`` counts model calls.

    Every answer is recorded in the ``served`` table of ``store`` (default: the ``protege.db`` of the run that made
    the student, when there is one; without a store nothing is recorded), the student's answers priced at their
    measured compute time times ``compute_usd_per_hour`` (default: the ``eval.compute_usd_per_hour`` in the
    student's card). With ``cascade_threshold`` the teacher of ``teacher_recipe`` (default: the teacher and task
    in the student's card) answers where the student's confidence is below it (see :mod:`protege.serve`).

    With ``capture`` every answer's input and answer are also kept, redacted (the defaults plus the regexes in
    ``redact``), in the store's ``captured`` table, the oldest deleted past ``capture_max_rows`` rows or
    ``capture_max_days`` days (see :mod:`protege.serve.capture`).

    Every ``reload_interval_s`` seconds (None or 0: never) the student directory's card is checked, and a changed
    student (promoted or rolled back) is loaded and swapped in with no request dropped (see
    :mod:`protege.serve.slots`). With ``canary`` that share of the requests goes to the student in ``candidate``
    (default: the run's staged candidate, ``versions/`` beside the student directory); the ``x-protege-version``
    header and the ledger say which version answered."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_concurrency", max_concurrency),
                        ("max_batch", max_batch), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ProtegeError(f"{name} must be at least 1, not {value}")
    student_dir = Path(student_dir)
    wait_s = max(0.0, batch_wait_ms) / 1000

    def load(path: Path) -> Slot:
        return load_slot(path, max_length, max_batch, wait_s, forward_hook)

    current = load(student_dir)
    clf, lm, batcher = current.clf, current.lm, current.batcher  # the first version's, for app.state
    router = Router(current, *_canary(student_dir, current, canary, candidate, load), seed=canary_seed)
    model_id = model_name or student_dir.resolve().name
    created = int(time.time())

    store_path = Path(store) if store is not None else default_store(student_dir)
    kept = None
    if capture:
        if store_path is None:
            raise ProtegeError(f"--capture keeps the traffic in the run's store, and there is none at "
                               f"{str(student_dir.resolve().parent / 'protege.db')!r}; pass --store PATH")
        kept = Capture(student_dir.resolve().name, current.version, Redactor(redact), capture_max_rows,
                       capture_max_days)
    elif capture_max_rows is not None or capture_max_days is not None or redact:
        raise ProtegeError("--capture-max-rows, --capture-max-days and --redact apply to captured traffic; "
                           "add --capture (or drop them)")
    # the captured rows' retention limits, as Capture checked them (without --capture none are set)
    ledger = (ServedLedger(store_path, max_rows=kept and kept.max_rows, max_days=kept and kept.max_days)
              if store_path is not None else None)
    usd_per_hour = compute_usd_per_hour if compute_usd_per_hour is not None else saved_compute_price(student_dir)
    teacher_queue = None
    if cascade_threshold is not None:
        teacher_queue = _cascade(student_dir, clf.labels if clf is not None else None, cascade_threshold,
                                 teacher_recipe, store_path, usd_per_hour, max_batch, wait_s, teacher_timeout_s,
                                 kept.redactor.call if kept is not None else None)
    metrics = Metrics(student_dir, model_id, cascade_threshold)
    metrics.serving(current.version, router.canary and router.canary.version, canary)
    service = Service(student_dir, model_id, router, teacher_queue, cascade_threshold, ledger, usd_per_hour,
                      max_new_tokens, metrics, kept)
    reloader = None
    if reload_interval_s:
        reloader = Reloader(router, load, reload_interval_s, on_swap=lambda slot: metrics.serving(
            slot.version, router.canary and router.canary.version, canary))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        slots = [router.current] + ([router.canary] if router.canary is not None else [])
        for part in (*slots, teacher_queue, ledger, reloader):
            if part is not None:
                await part.start()
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.stop()  # and the students it retired
            slots = [router.current] + ([router.canary] if router.canary is not None else [])
            for part in (*slots, teacher_queue):
                if part is not None:
                    await part.stop()
            if ledger is not None:
                await ledger.close()  # after the workers: the last answers are recorded too

    app = FastAPI(title="protege student", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  responses=error_responses(401, 413, 429, 500))  # the guard's answers, on every route
    _openapi_without_422(app)
    _error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_concurrency=max_concurrency, max_body_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last, so outermost: the guard's refusals count
    app.state.classifier, app.state.generator, app.state.batcher = clf, lm, batcher
    app.state.teacher_queue, app.state.ledger, app.state.model_id = teacher_queue, ledger, model_id
    app.state.metrics, app.state.router, app.state.reloader = metrics, router, reloader

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "protege"}

    @app.get(METRICS_PATH, include_in_schema=False)  # Prometheus' text format, not part of the OpenAI-style API
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", response_model=None, responses={200: {"model": ModelCard},
                                                                       **error_responses(404)})
    async def get_model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'.",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", responses={
        200: {"model": ChatCompletion, "description": "The answer; with stream: true, OpenAI's chunks as server-sent "
              "events.", "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        **error_responses(400, 502, 503),
    })
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        return await service.answer(service.lm_chat if lm is not None else service.classifier_chat, req)

    @app.post("/v1/classify", responses={200: {"model": ClassifyResponse}, **error_responses(400, 502, 503)})
    async def classify(req: ClassifyRequest) -> Any:
        if lm is not None:
            raise ApiError(400, "this server serves a language-model student; /v1/classify is for classifier "
                           "students (use /v1/chat/completions)", code="unsupported_endpoint")
        if isinstance(req.input, str):
            texts = [check_text(req.input, "input")]
        else:
            if not req.input:
                raise ApiError(400, "'input' is an empty list; send at least one text", param="input",
                               code="empty_input")
            texts = [check_text(t, f"input[{i}]") for i, t in enumerate(req.input)]
        return await service.answer(service.classify_response, texts)

    return app
