"""The HTTP API's formats and rules for :mod:`protege.serve`: request and response models (they document the API
in its OpenAPI schema), OpenAI-format errors, the checks that turn a request into a model's input, and the ASGI
guard that enforces the API key, the body limit and the concurrency limit before the app sees a request."""

from __future__ import annotations

import hmac
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .lm import MAX_STOP, GenerationParams

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
    finish_reason: Literal["stop", "length"]


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
SSE_EVENT = {
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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
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


def check_text(text: str, param: str) -> str:
    if not text.strip():
        raise ApiError(400, f"'{param}' is empty; send the text to classify", param=param, code="empty_input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text", param=param, code="invalid_input") from None
    return text


def chat_text(req: ChatCompletionRequest) -> str:
    """The content of the last user message."""
    for i in range(len(req.messages) - 1, -1, -1):
        m = req.messages[i]
        if m.role != "user":
            continue
        param = f"messages[{i}].content"
        if m.content is None:
            raise ApiError(400, f"'{param}' is missing; the last user message holds the text to classify", param=param)
        if isinstance(m.content, str):
            return check_text(m.content, param)
        return check_text("\n".join(p.text for p in m.content if p.type == "text" and p.text is not None), param)
    raise ApiError(400, "'messages' has no user message; the last user message holds the text to classify",
                   param="messages")


def lm_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
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


def generation_params(req: ChatCompletionRequest, max_new_tokens: int) -> GenerationParams:
    """OpenAI's sampling settings, checked, as :class:`protege.serve.lm.GenerationParams`."""
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


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
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


class Guard:
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


