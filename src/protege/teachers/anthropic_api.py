"""``anthropic:MODEL``: Anthropic's Messages API, through the official ``anthropic`` SDK (async).

The SDK's own retries are off: the engine retries, so every attempt passes the rate limits and the budget and
is counted. The key is read from ``teacher.api_key_env`` (default ``ANTHROPIC_API_KEY``) and sent only in the
``x-api-key`` header, as the API documents (the 2.x SDK would send it as a bearer token); it never enters the
teacher's identity, a request body, the store or an error message.

The 2.x SDK speaks API version ``2026-10-21``, pinned here and recorded in the identity. That version takes no
sampling parameters: ``temperature``, ``top_p`` and ``top_k`` are refused with HTTP 400 at any value, and
the SDK no longer has them. Every answer is therefore drawn at the API's default sampling; a hard label is
one such answer, not a greedy one. Anthropic returns no log-probabilities either, so label distributions
come, by ``teacher.label_method``:

- ``samples`` (also what ``auto`` means here): ``n_samples`` separate calls (the API has no ``n``), the
  empirical distribution of the answers;
- ``hard_label``: one answer, one-hot.

With ``teacher.thinking_tokens`` the calls use extended thinking (``{"type": "enabled", "budget_tokens": N}``,
which models before Claude 4.6 take; later ones want adaptive thinking and refuse a budget). Thinking needs
temperature 1, which is the API's default, so nothing else changes; ``max_tokens`` sent is the answer's
budget plus the thinking budget. The thinking text is kept in :attr:`TeacherSignal.thinking`, apart from the
answer and any rationale.

:class:`AnthropicBatches` is the Message Batches API for the batch runner (:mod:`protege.labeling.batch`):
it builds the batch requests and turns result lines into signals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._io import content_hash
from ..errors import MissingExtra, PermanentError, RecipeError
from ..recipe import TeacherConfig
from ..signals import LabelDistribution, TeacherSignal
from ._api import (
    answer_and_rationale,
    api_key,
    default_max_tokens,
    generation_signal,
    permanent_message,
    retry_after,
    sampled_distribution,
    scrub,
)
from .base import (
    BATCH_DISCOUNT,
    Caller,
    Outcome,
    Price,
    Progress,
    Reply,
    Request,
    TransientError,
    Usage,
    worst_case_tokens,
)
from .parse import ParseError, parse_label
from .presets import ANTHROPIC, resolve_price

__all__ = ["AnthropicBatches", "AnthropicTeacher", "BatchStatus", "message_parts", "usage_of"]

PROVIDER = "anthropic"
API_VERSION = "2026-10-21"  # the anthropic-version header: what the request and response formats mean
# 408 request timeout, 409 conflict, 425 too early, 429 rate limited; every 5xx (529 is "overloaded").
_TRANSIENT_STATUS = {408, 409, 425, 429}


class AnthropicTeacher:
    kind: Literal["api"] = "api"
    can_score = False  # no endpoint gives log-probabilities of given tokens
    backend = "anthropic"
    provider = PROVIDER

    def __init__(self, model: str, cfg: TeacherConfig, *, http_client: Any = None):
        """``http_client``: an ``httpx2.AsyncClient`` for the SDK to send through (tests inject one with a
        mock transport). The caller owns it: :meth:`aclose` leaves it open."""
        if not model:
            raise RecipeError("teacher.model 'anthropic:' names no model; write e.g. 'anthropic:claude-haiku-4-5'")
        if cfg.provider not in (None, PROVIDER):
            raise RecipeError(
                f"teacher.provider {cfg.provider!r} applies to 'openai:' teachers; leave it unset for an "
                "'anthropic:' teacher"
            )
        if cfg.label_method == "logprobs":
            raise RecipeError(
                "Anthropic's API returns no logprobs; set teacher.label_method to 'samples' or 'hard_label'"
            )
        if "sample_temperature" in cfg.model_fields_set and cfg.sample_temperature != 1.0:
            raise RecipeError(
                f"teacher.sample_temperature {cfg.sample_temperature:g} cannot be honoured: Anthropic's Messages API "
                f"(version {API_VERSION}, the one the anthropic SDK 2.x speaks) accepts no temperature, and samples "
                "are drawn at its default; remove teacher.sample_temperature"
            )
        self.cfg = cfg
        self.model = model
        self.base_url = (cfg.base_url or ANTHROPIC.base_url).rstrip("/")
        self.key_env = cfg.api_key_env or ANTHROPIC.key_env
        self.method = "samples" if cfg.label_method == "auto" else cfg.label_method
        self.thinking_tokens = cfg.thinking_tokens
        self.answer_tokens = default_max_tokens(cfg.max_tokens, cfg.rationale)
        # Thinking tokens count toward max_tokens, and the API wants max_tokens above the thinking budget.
        self.max_tokens = self.answer_tokens + (self.thinking_tokens or 0)
        self.calls_per_request = cfg.n_samples if self.method == "samples" else 1
        self.price: Price = resolve_price(cfg, ANTHROPIC, PROVIDER, model)
        self.price_factor = 1.0
        self.identity: dict[str, Any] = {
            "backend": "anthropic",
            "model": model,
            "method": self.method,
            "rationale": cfg.rationale,
            "max_tokens": self.answer_tokens,
            "thinking_tokens": self.thinking_tokens,
            "api_version": API_VERSION,
            # No temperature is sent (the API version refuses one): every answer, a hard label too, is drawn at
            # the API's default, which is also the temperature 1 that extended thinking requires.
            "temperature": "api-default",
        }
        if self.method == "samples":
            self.identity["n_samples"] = cfg.n_samples
        self._http_client = http_client
        self._client: Any = None
        self._key: str | None = None

    # -- plumbing ------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import anthropic
            except ImportError:
                raise MissingExtra("anthropic", "api", "an 'anthropic:' teacher") from None
            self._key = api_key(self.key_env, PROVIDER)
            kwargs: dict[str, Any] = {}
            if self._http_client is not None:
                kwargs["http_client"] = self._http_client
            self._client = anthropic.AsyncAnthropic(
                # An explicit key: the SDK then reads no credential from the environment or a profile file.
                api_key=self._key,
                base_url=self.base_url,
                max_retries=0,
                timeout=self.cfg.timeout_s,
                # The API documents the x-api-key header; send the key there and nowhere else, whatever header
                # this SDK version would put it in by default.
                default_headers={
                    "x-api-key": self._key,
                    "Authorization": anthropic.omit,
                    "anthropic-version": API_VERSION,
                },
                **kwargs,
            )
        return self._client

    def check_key(self) -> None:
        """Fail before any work if the key is missing (the dry run and the engine call this first)."""
        api_key(self.key_env, PROVIDER)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            if self._http_client is None:  # an injected HTTP client belongs to the caller
                await client.close()

    def worst_case(self, request: Request) -> tuple[int, int, int]:
        return worst_case_tokens(request), self._max_tokens(request), self.calls_for(request)

    def batches(self) -> AnthropicBatches:
        return AnthropicBatches(self)

    def calls_for(self, request: Request) -> int:
        """Calls one request takes: n for a sampled label distribution, else one (a generation request too)."""
        return 1 if request.generate is not None else self.calls_per_request

    def _max_tokens(self, request: Request) -> int:
        """The answer's limit plus any thinking budget (thinking counts toward max_tokens)."""
        if request.generate is None:
            return self.max_tokens
        return request.generate.max_tokens + (self.thinking_tokens or 0)

    def params(self, request: Request) -> dict[str, Any]:
        """The Messages API parameters for one call (also the ``params`` of a Message Batches request)."""
        system, messages = split_system(request.messages)
        params: dict[str, Any] = {"model": self.model, "max_tokens": self._max_tokens(request), "messages": messages}
        if system:
            params["system"] = system
        if self.thinking_tokens:
            params["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_tokens}
        return params

    async def _send(self, params: dict[str, Any]) -> Reply:
        import anthropic

        try:
            raw = await self.client.messages.with_raw_response.create(**params)
        except anthropic.APITimeoutError:
            raise TransientError(f"timed out after {self.cfg.timeout_s:g}s", maybe_billed=True) from None
        except anthropic.APIConnectionError as e:
            reason = scrub(str(e.__cause__ or e), self._key)
            raise TransientError(f"connection failed: {reason}", maybe_billed=True) from None
        except anthropic.APIStatusError as e:
            raise self._status_error(e) from None
        try:
            body = await raw.parse()
            _check_message(body)
        except (ValueError, TypeError, AttributeError, KeyError, anthropic.APIResponseValidationError) as e:
            text = await _safe_text(raw)
            raise TransientError(
                f"malformed response body ({type(e).__name__})", maybe_billed=True, raw=scrub(text, self._key)
            ) from None
        return Reply(body, usage_of(body), dict(raw.headers))

    def _status_error(self, e: Any) -> Exception:
        status = e.status_code
        message = scrub(_error_message(e), self._key)
        code = getattr(e, "error_code", None) or ""
        if status == 429 and code.endswith("spend_limit_reached"):
            # A spend cap, not a rate limit: retrying cannot help until the cap is raised or resets.
            return PermanentError(
                f"anthropic refused the request with HTTP 429 ({code}): {message}. Fix: the organisation's "
                "spend limit is reached; raise it in the Anthropic console or wait until it resets"
            )
        if status >= 500 or status in _TRANSIENT_STATUS:
            wait = retry_after(e.response.headers)
            if status == 429 and wait is None:
                wait = 1.0  # rate limited without a hint: everyone pauses a moment
            kind = getattr(e, "type", None)
            label = f"HTTP {status} {kind}" if kind else f"HTTP {status}"
            return TransientError(f"{label}: {message}", retry_after=wait)
        text = permanent_message(PROVIDER, self.model, self.base_url, status, message, self.key_env)
        if status == 400 and self.thinking_tokens:
            text += (
                "; with teacher.thinking_tokens set, note that Claude 4.6 and later models take adaptive thinking "
                "and refuse a thinking budget: unset teacher.thinking_tokens for them"
            )
        return PermanentError(text)

    # -- signals -------------------------------------------------------------------------------------
    async def answer(self, request: Request, call: Caller) -> TeacherSignal:
        params = self.params(request)
        worst_in = worst_case_tokens(request)
        if self.method == "samples" and request.generate is None:
            bodies = []
            for _ in range(self.cfg.n_samples):  # one call per sample: the API has no n
                reply = await call(lambda: self._send(params), worst_in, self.max_tokens)
                bodies.append(reply.body)
            return self.signal_from_messages(bodies, request)
        reply = await call(lambda: self._send(params), worst_in, self._max_tokens(request))
        return self.signal_from_message(reply.body, request)

    def signal_from_message(self, body: Any, request: Request) -> TeacherSignal:
        """A hard-label signal from one Message (an SDK object, or the dict a batch result line holds)."""
        text, thinking = message_parts(body)
        if not text.strip():
            raise ParseError(_no_text_reason(body), thinking or "")
        if request.generate is not None:  # Anthropic's API returns no logprobs: the text is the signal
            truncated = _get(body, "stop_reason") == "max_tokens"
            return generation_signal(text, request.generate, truncated=truncated, thinking=thinking)
        answer, why, _ = answer_and_rationale(text, self.cfg.rationale)
        dist = LabelDistribution.one_hot(request.labels, parse_label(answer, request.labels))
        return TeacherSignal(distribution=dist, text=answer, rationale=why, thinking=thinking)

    def signal_from_messages(self, bodies: Sequence[Any], request: Request) -> TeacherSignal:
        """A samples signal from n Messages: the empirical distribution of their answers. The text (whole
        reply) and thinking of the first sample are kept, as for an OpenAI-compatible teacher."""
        parts = [message_parts(b) for b in bodies]
        if not parts:
            raise TransientError("no samples were returned", maybe_billed=True)
        texts = [text for text, _ in parts]
        dist = sampled_distribution(texts, request.labels, self.cfg.rationale)
        return TeacherSignal(distribution=dist, text=texts[0], thinking=parts[0][1])

    def signal(self, bodies: Sequence[Any], request: Request) -> TeacherSignal:
        """The signal for a request from the Messages of all its calls (one, or n samples)."""
        if self.method == "samples" and request.generate is None:
            return self.signal_from_messages(bodies, request)
        if len(bodies) != 1:
            raise TransientError(f"expected one answer, got {len(bodies)}", maybe_billed=True)
        return self.signal_from_message(bodies[0], request)


# -- helpers -------------------------------------------------------------------------------------------
def split_system(messages: Iterable[Mapping[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, the other messages): the Messages API takes the system prompt apart."""
    system, rest = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        else:
            rest.append({"role": m["role"], "content": m["content"]})
    return "\n\n".join(system), rest


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def message_parts(body: Any) -> tuple[str, str | None]:
    """(text, thinking) of a Message: its text blocks joined, and its thinking blocks joined (None if there
    are none). Redacted thinking is encrypted and is left out; so are tool blocks, which this never asks for."""
    content = _get(body, "content")
    if not isinstance(content, list):
        raise TransientError("the response has no content list", maybe_billed=True)
    texts, thoughts = [], []
    for block in content:
        kind = _get(block, "type")
        if kind == "text":
            texts.append(_get(block, "text") or "")
        elif kind == "thinking":
            thoughts.append(_get(block, "thinking") or "")
    thinking = "\n\n".join(t for t in thoughts if t)
    return "".join(texts), thinking or None


def _no_text_reason(body: Any) -> str:
    stop = _get(body, "stop_reason")
    if stop == "max_tokens":
        return (
            "the reply was cut at max_tokens before it gave an answer (thinking and answer share the limit); "
            "raise teacher.max_tokens"
        )
    if stop == "refusal":
        return "the model declined to answer (stop_reason 'refusal')"
    return f"the reply has no text (stop_reason {stop!r})"


def usage_of(body: Any) -> Usage:
    """Engine usage of a Message (an SDK object or a dict). Anthropic's ``input_tokens`` leaves out the tokens
    read from and written to the prompt cache; the engine's input count includes them, with the cache reads
    as the cached part."""
    u = _get(body, "usage")
    if u is None:
        return Usage()
    cache_read = _get(u, "cache_read_input_tokens") or 0
    cache_write = _get(u, "cache_creation_input_tokens") or 0
    fresh = _get(u, "input_tokens") or 0
    return Usage(fresh + cache_read + cache_write, _get(u, "output_tokens") or 0, cache_read)


def _check_message(body: Any) -> None:
    """Raise TypeError unless ``body`` is a Message with a content list and token counts (the SDK builds
    models from any JSON without validating it)."""
    from anthropic.types import Message

    if not isinstance(body, Message):
        raise TypeError(f"not a message: {type(body).__name__}")
    if not isinstance(body.content, list):
        raise TypeError("no content list")
    usage = body.usage
    if not isinstance(usage.input_tokens, int) or not isinstance(usage.output_tokens, int):
        raise TypeError("no token counts")


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "api_message", None) or getattr(e, "message", e))


async def _safe_text(raw: Any) -> str:
    try:
        return str(await raw.text())[:4000]
    except Exception as e:  # noqa: BLE001  (the body itself may be unreadable; say so rather than hide it)
        return f"<unreadable body: {type(e).__name__}>"


# -- Message Batches -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    state: str  # in_progress, canceling, ended
    done: bool
    succeeded: int
    errored: int
    canceled: int
    expired: int
    processing: int


_CUSTOM_ID_PREFIX = 56  # custom_id is at most 64 characters of [A-Za-z0-9_-]


class AnthropicBatches:
    """Anthropic's Message Batches API for an :class:`AnthropicTeacher`: half price, results within 24 hours.

    Every call a request needs is one batch request: one for a hard label, ``n_samples`` for samples. A
    request's custom_id is its call key (64 hex characters); a sample's is the key's first 56 characters
    and the sample's number. :meth:`outcomes_of` maps results back to keys, so the runner never parses ids.

    Unlike OpenAI's, a batch is created directly from its requests (no input file) and carries no metadata,
    so a batch whose id was not recorded before a crash cannot be found again (:meth:`find` finds nothing);
    the runner records the id the moment :meth:`create` returns, which leaves only that instant exposed.
    """

    provider = PROVIDER
    discount = BATCH_DISCOUNT

    def __init__(self, teacher: AnthropicTeacher):
        self.teacher = teacher

    @property
    def client(self) -> Any:
        return self.teacher.client  # built lazily inside the running event loop

    def custom_ids(self, key: str, request: Request) -> list[str]:
        calls = self.teacher.calls_for(request)
        if calls == 1:
            return [key]
        if len(key) > _CUSTOM_ID_PREFIX:
            key = key[:_CUSTOM_ID_PREFIX]
        return [f"{key}-{i:03d}" for i in range(calls)]

    def requests(self, items: Sequence[tuple[str, Request]]) -> list[dict[str, Any]]:
        """``[{"custom_id", "params"}, ...]`` for ``client.messages.batches.create(requests=...)``."""
        out = []
        for key, request in items:
            params = self.teacher.params(request)
            out += [{"custom_id": cid, "params": params} for cid in self.custom_ids(key, request)]
        return out

    async def prepare(self, items: Sequence[tuple[str, Request]]) -> str:
        """No upload: the reference recorded before creation is a hash of the batch's keys."""
        return "anthropic:" + content_hash([k for k, _ in items])[:32]

    async def create(self, ref: str, items: Sequence[tuple[str, Request]]) -> str:
        batch = await self.client.messages.batches.create(requests=self.requests(items))
        return str(batch.id)

    async def find(self, ref: str) -> str | None:
        return None  # a Message Batch carries nothing that ties it to ``ref``

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self.client.messages.batches.retrieve(batch_id)
        c = b.request_counts
        return BatchStatus(
            batch_id=str(b.id),
            state=b.processing_status,
            done=b.processing_status == "ended",
            succeeded=c.succeeded,
            errored=c.errored,
            canceled=c.canceled,
            expired=c.expired,
            processing=c.processing,
        )

    async def progress(self, batch_id: str) -> Progress:
        st = await self.status(batch_id)
        return Progress(st.state, st.done, st.succeeded + st.errored + st.canceled + st.expired)

    async def results(self, batch_id: str) -> list[dict[str, Any]]:
        """The result lines of an ended batch, as dicts (``{"custom_id", "result": {"type", ...}}``)."""
        lines = []
        decoder = await self.client.messages.batches.results(batch_id)
        async for line in decoder:
            lines.append(line.model_dump(mode="json") if hasattr(line, "model_dump") else dict(line))
        return lines

    async def outcomes(self, batch_id: str, requests: Mapping[str, Request]) -> list[Outcome]:
        return self.outcomes_of(await self.results(batch_id), requests)

    def outcomes_of(self, lines: Iterable[Mapping[str, Any]], requests: Mapping[str, Request]) -> list[Outcome]:
        """One outcome per request of ``requests`` (key -> Request) that has at least one line in ``lines``;
        lines for other custom_ids are ignored. A request whose samples did not all come back fails (a rerun
        resubmits it) but its answered samples' usage is still counted."""
        owner: dict[str, tuple[str, int]] = {}
        for key, request in requests.items():
            for i, cid in enumerate(self.custom_ids(key, request)):
                owner[cid] = (key, i)
        got: dict[str, dict[int, Mapping[str, Any]]] = {}
        for line in lines:
            hit = owner.get(str(line.get("custom_id")))
            if hit is not None:
                got.setdefault(hit[0], {})[hit[1]] = line
        return [self._outcome(key, got[key], requests[key]) for key in requests if key in got]

    def _outcome(self, key: str, lines: Mapping[int, Mapping[str, Any]], request: Request) -> Outcome:
        bodies, errors = [], []
        usage = Usage()
        for i in sorted(lines):
            result = lines[i].get("result") or {}
            kind = result.get("type")
            if kind == "succeeded" and isinstance(result.get("message"), Mapping):
                message = result["message"]
                usage += usage_of(message)
                bodies.append(message)
            else:
                errors.append(_line_error(result))
        want = self.teacher.calls_for(request)
        if errors or len(bodies) < want:
            missing = want - len(bodies) - len(errors)
            reason = errors[0] if errors else f"{missing} of {want} answers missing from the batch results"
            return Outcome(key, None, usage, reason)
        try:
            signal = self.teacher.signal(bodies, request)
        except (ParseError, TransientError) as e:
            raw = getattr(e, "raw", None) or None
            return Outcome(key, None, usage, f"unparseable batch answer: {e}", raw)
        return Outcome(key, signal, usage)


def _line_error(result: Mapping[str, Any]) -> str:
    kind = result.get("type")
    if kind == "errored":
        err = result.get("error") or {}
        inner = err.get("error", err) if isinstance(err, Mapping) else {}
        etype = inner.get("type", "error") if isinstance(inner, Mapping) else "error"
        msg = inner.get("message", "") if isinstance(inner, Mapping) else str(inner)
        return scrub(f"batch request errored: {etype}: {msg}", None)
    if kind == "canceled":
        return "batch request canceled before it was processed"
    if kind == "expired":
        return "batch request expired: the batch did not reach it within 24 hours"
    if kind == "succeeded":
        return "batch request succeeded without a message"
    return f"batch result of unknown type {kind!r}"
