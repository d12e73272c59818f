"""``openai:MODEL``: any OpenAI-compatible chat completions API, through the official ``openai`` SDK (async).

One backend serves OpenAI, DeepSeek, Moonshot, MiniMax, OpenRouter, Together, vLLM, llama.cpp's server and
Ollama; ``teacher.provider`` picks a preset (base URL, key variable, prices, capabilities). The SDK's own
retries are off: the engine retries, so every attempt passes the rate limits and the budget and is counted.

Label distributions come, by ``teacher.label_method``:

- ``logprobs``: the ``top_logprobs`` at the answer position (see :mod:`.parse`), greedy decoding;
- ``samples``: n sampled answers, with ``n`` in one call where the provider honours it, else repeated calls;
- ``hard_label``: one greedy answer, one-hot.

The top-k log-probabilities of every generated token are kept with the signal when the API returns them.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..errors import MissingExtra, PermanentError, ProtegeError, RecipeError
from ..recipe import TeacherConfig
from ..signals import LabelDistribution, TeacherSignal, TokenLogprobs
from ._api import (
    answer_and_rationale,
    api_key,
    default_max_tokens,
    generation_signal,
    no_logprobs_error,
    permanent_message,
    retry_after,
    sampled_distribution,
    scrub,
)
from ._scoring import from_echo, from_prompt_logprobs
from .base import (
    BATCH_DISCOUNT,
    Caller,
    Outcome,
    Price,
    Progress,
    Reply,
    Request,
    ScoreRequest,
    TransientError,
    Usage,
    worst_case_tokens,
)
from .parse import ParseError, TokenStep, distribution_from_logprobs, parse_label
from .presets import PRESETS, resolve_price

__all__ = ["OpenAITeacher"]

_TRANSIENT_STATUS = {408, 409, 425, 429}


class OpenAITeacher:
    kind: Literal["api"] = "api"
    backend = "openai"

    def __init__(self, model: str, cfg: TeacherConfig, *, http_client: Any = None):
        """``http_client``: an ``httpx2.AsyncClient`` for the SDK to send through (tests inject one with a
        mock transport). The caller owns it: :meth:`aclose` leaves it open."""
        provider = cfg.provider or "openai"
        if provider not in PRESETS:
            raise RecipeError(f"teacher.provider {provider!r} is not a known preset; use one of {sorted(PRESETS)}")
        preset = PRESETS[provider]
        if not model:
            raise RecipeError("teacher.model 'openai:' names no model; write e.g. 'openai:gpt-4o-mini'")
        self.cfg = cfg
        self.provider = provider
        self.preset = preset
        self.model = model
        self.base_url = (cfg.base_url or preset.base_url).rstrip("/")
        self.key_env = cfg.api_key_env or preset.key_env
        self.method = cfg.label_method if cfg.label_method != "auto" else ("logprobs" if preset.logprobs else "samples")
        self.max_tokens = default_max_tokens(cfg.max_tokens, cfg.rationale)
        self.price: Price = resolve_price(cfg, preset, provider, model)
        self.price_factor = 1.0
        self.identity: dict[str, Any] = {
            "backend": "openai",
            "provider": provider,
            "model": model,
            "method": self.method,
            "rationale": cfg.rationale,
            "max_tokens": self.max_tokens,
        }
        if self.method == "logprobs":
            self.identity["top_logprobs"] = cfg.top_logprobs
        if self.method == "samples":
            self.identity |= {"n_samples": cfg.n_samples, "temperature": cfg.sample_temperature}
        self.can_score = preset.scores is not None  # given-token scores on its completions endpoint
        self._http_client = http_client
        self._client: Any = None
        self._key: str | None = None

    # -- plumbing ------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import openai
            except ImportError:
                raise MissingExtra("openai", "api", "an 'openai:' teacher") from None
            self._key = api_key(self.key_env, self.provider)
            kwargs: dict[str, Any] = {}
            if self._http_client is not None:
                kwargs["http_client"] = self._http_client
            self._client = openai.AsyncOpenAI(
                api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self.cfg.timeout_s, **kwargs
            )
        return self._client

    def check_key(self) -> None:
        """Fail before any work if the key is missing (the dry run and the engine call this first)."""
        api_key(self.key_env, self.provider)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            if self._http_client is None:  # an injected HTTP client belongs to the caller
                await client.close()

    def worst_case(self, request: Request) -> tuple[int, int, int]:
        if request.generate is not None:
            return worst_case_tokens(request), request.generate.max_tokens, 1
        calls = self.cfg.n_samples if self.method == "samples" and not self.preset.n else 1
        per_call_out = self.max_tokens * (self.cfg.n_samples if self.method == "samples" and self.preset.n else 1)
        return worst_case_tokens(request), per_call_out, calls

    def batches(self) -> OpenAIBatches:
        """OpenAI's Batch API (any OpenAI-compatible server that has its Files and Batches routes)."""
        if self.method == "samples" and not self.preset.n:
            # A batch line is one call; without n a request's samples would need several lines per key.
            raise ProtegeError(
                f"provider {self.provider!r} does not honour n, so label_method 'samples' cannot go through "
                "its batch API; use label_method 'logprobs' or 'hard_label', or turn teacher.batch_api off"
            )
        return OpenAIBatches(self)

    def batch_body(self, request: Request) -> dict[str, Any]:
        """The chat completion request body for ``request`` (also one line of a Batch API file)."""
        if request.generate is not None:
            return self._params(request, n=1)
        return self._params(request, n=self.cfg.n_samples if self.method == "samples" else 1)

    def _generate_params(self, request: Request) -> dict[str, Any]:
        """A generation request: greedy, its own length limit, top-k logprobs where the provider has them."""
        gen = request.generate
        assert gen is not None
        params: dict[str, Any] = {"model": self.model, "messages": list(request.messages), "temperature": 0.0, "seed": 0}
        params["max_completion_tokens" if self.provider == "openai" else "max_tokens"] = gen.max_tokens
        if gen.top_logprobs and self.preset.logprobs:
            params |= {"logprobs": True, "top_logprobs": min(gen.top_logprobs, 20)}
        return params

    def _params(self, request: Request, n: int) -> dict[str, Any]:
        if request.generate is not None:
            return self._generate_params(request)
        params: dict[str, Any] = {"model": self.model, "messages": list(request.messages)}
        # OpenAI's own API takes max_completion_tokens (its reasoning models refuse max_tokens, and it caps their
        # hidden reasoning too, which the budget must bound); other servers know max_tokens.
        params["max_completion_tokens" if self.provider == "openai" else "max_tokens"] = self.max_tokens
        if self.method == "samples":
            params["temperature"] = self.cfg.sample_temperature
            if n > 1:
                params["n"] = n
        else:
            params["temperature"] = 0.0
            params["seed"] = 0
        if self.method == "logprobs":
            params |= {"logprobs": True, "top_logprobs": self.cfg.top_logprobs}
        return params

    async def _send(self, params: dict[str, Any], completions: bool = False) -> Reply:
        """One call to chat completions (or, ``completions``, the legacy completions endpoint that scores)."""
        import openai

        api = self.client.completions if completions else self.client.chat.completions
        try:
            raw = await api.with_raw_response.create(**params)
        except openai.APITimeoutError:
            raise TransientError(f"timed out after {self.cfg.timeout_s:g}s", maybe_billed=True) from None
        except openai.APIConnectionError as e:
            raise TransientError(f"connection failed: {scrub(str(e.__cause__ or e), self._key)}", maybe_billed=True) from None
        except openai.APIStatusError as e:
            status = e.status_code
            message = scrub(_error_message(e), self._key)
            if status >= 500 or status in _TRANSIENT_STATUS:
                wait = retry_after(e.response.headers)
                if status == 429 and wait is None:
                    wait = 1.0  # rate limited without a hint: everyone pauses a moment
                raise TransientError(f"HTTP {status}: {message}", retry_after=wait) from None
            raise PermanentError(
                permanent_message(self.provider, self.model, self.base_url, status, message, self.key_env)
            ) from None
        try:
            body = raw.parse()
            choices = body.choices  # a body that parsed into nothing usable is malformed too
            if not isinstance(choices, list):
                raise ValueError("no choices")
        except (ValueError, TypeError, AttributeError, openai.APIResponseValidationError) as e:
            text = _safe_text(raw)
            raise TransientError(f"malformed response body ({type(e).__name__})", maybe_billed=True, raw=text) from None
        return Reply(body, usage_of(body), dict(raw.headers))

    # -- signals -------------------------------------------------------------------------------------
    async def answer(self, request: Request, call: Caller) -> TeacherSignal:
        if request.generate is not None:
            params = self._params(request, n=1)
            reply = await call(lambda: self._send(params), worst_case_tokens(request), request.generate.max_tokens)
            return self.signal_from_completion(reply.body, request)
        if self.method == "samples":
            return await self._samples(request, call)
        params = self._params(request, n=1)
        reply = await call(lambda: self._send(params), worst_case_tokens(request), self.max_tokens)
        return self.signal_from_completion(reply.body, request)

    async def score(self, request: ScoreRequest, call: Caller) -> TokenLogprobs:
        """The server's log-probabilities of ``request.ids[start:]`` (see :mod:`._scoring`): one completion call
        with ``max_tokens`` 1 whose prompt is the given tokens; its prompt tokens are priced as input tokens,
        the one generated token as output."""
        if self.preset.scores is None:
            raise PermanentError(
                f"provider {self.provider!r} has no endpoint that scores given tokens; serve the teacher with vLLM "
                "(teacher.provider 'vllm') or llama.cpp ('llamacpp'), or use a local 'hf:' teacher"
            )
        params: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if self.preset.scores == "prompt_logprobs":
            params |= {"prompt": list(request.ids), "extra_body": {"prompt_logprobs": request.top_logprobs}}
            worst_in = len(request.ids)
        else:
            params |= {"prompt": request.text, "echo": True, "logprobs": request.top_logprobs}
            worst_in = len(request.text.encode("utf-8")) + 16  # re-tokenized: at most a token a byte, plus BOS/EOS
        reply = await call(lambda: self._send(params, completions=True), worst_in, 1)
        body, name = reply.body, f"{self.provider}:{self.model}"
        if not body.choices:
            raise TransientError("the response has no choices", maybe_billed=True)
        choice = body.choices[0]
        if self.preset.scores == "prompt_logprobs":
            entries = getattr(choice, "prompt_logprobs", None) or (choice.model_extra or {}).get("prompt_logprobs")
            if entries is None:
                raise PermanentError(f"{self.provider} returned no prompt_logprobs for {self.model!r}")
            return from_prompt_logprobs(entries, request, name)
        if choice.logprobs is None or not choice.logprobs.tokens:
            raise PermanentError(
                f"{self.provider} returned no echoed logprobs for {self.model!r}; start llama.cpp's server with "
                "--logits_all true"
            )
        usage = body.usage
        return from_echo(choice.logprobs, usage.prompt_tokens, usage.completion_tokens, request, name)

    def signal_from_completion(self, body: Any, request: Request) -> TeacherSignal:
        """A signal from one chat completion (the SDK's object; a Batch API line's body is validated into one)."""
        if request.generate is not None:
            return self._generation_signal(body, request)
        if self.method == "samples":
            texts = [c.message.content or "" for c in body.choices]
            dist = sampled_distribution(texts, request.labels, self.cfg.rationale)
            return TeacherSignal(distribution=dist, text=texts[0] if texts else None)
        if not body.choices:
            raise TransientError("the response has no choices", maybe_billed=True)
        choice = body.choices[0]
        text = choice.message.content or ""
        answer, why, offset = answer_and_rationale(text, self.cfg.rationale)
        tokens = None
        if self.method == "logprobs":
            content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
            if not content:
                raise no_logprobs_error(self.provider, self.model)
            steps = [TokenStep(c.token, c.logprob, {t.token: t.logprob for t in c.top_logprobs or []}) for c in content]
            dist = distribution_from_logprobs(steps, request.labels, offset)
            tokens = self._token_logprobs(steps)
        else:
            dist = LabelDistribution.one_hot(request.labels, parse_label(answer, request.labels))
        return TeacherSignal(distribution=dist, text=answer, rationale=why, token_logprobs=tokens)

    def _token_logprobs(self, steps: list[TokenStep]) -> TokenLogprobs:
        # The API's logprobs are the model's own log-probabilities (temperature 1) whatever the sampling
        # temperature; tokens are strings (no ids), mapped onto a student's vocabulary at training time.
        return TokenLogprobs(
            tokens=tuple(s.token for s in steps),
            top=tuple(s.top for s in steps),
            tail_mass=tuple(max(0.0, 1.0 - sum(math.exp(v) for v in s.top.values())) for s in steps),
            tokenizer=f"{self.provider}:{self.model}",
            temperature=1.0,
        )

    def _generation_signal(self, body: Any, request: Request) -> TeacherSignal:
        assert request.generate is not None
        if not body.choices:
            raise TransientError("the response has no choices", maybe_billed=True)
        choice = body.choices[0]
        tokens = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            tokens = self._token_logprobs(
                [TokenStep(c.token, c.logprob, {t.token: t.logprob for t in c.top_logprobs or []}) for c in content]
            )
        truncated = choice.finish_reason == "length"
        return generation_signal(choice.message.content or "", request.generate, truncated=truncated, token_logprobs=tokens)

    async def _samples(self, request: Request, call: Caller) -> TeacherSignal:
        """n answers: ``n`` in one call where the preset says the provider honours it (topped up with more
        calls if it returns fewer choices), otherwise one call per sample."""
        want = self.cfg.n_samples
        texts: list[str] = []
        while len(texts) < want:
            n = want - len(texts) if self.preset.n else 1
            params = self._params(request, n=n)
            reply = await call(lambda p=params: self._send(p), worst_case_tokens(request), self.max_tokens * n)
            got = [c.message.content or "" for c in reply.body.choices][:n]
            if not got:
                raise TransientError("the response has no choices", maybe_billed=True)
            texts += got
        dist = sampled_distribution(texts, request.labels, self.cfg.rationale)
        return TeacherSignal(distribution=dist, text=texts[0])


def usage_of(body: Any) -> Usage:
    """Usage of a chat completion; cached prompt tokens where the provider reports them."""
    u = body.usage
    if u is None:
        return Usage()
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(u.prompt_tokens or 0, u.completion_tokens or 0, cached)


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))


def _safe_text(raw: Any) -> str:
    try:
        return str(raw.text)[:4000]
    except Exception as e:  # the body itself may be unreadable; say so rather than hide it
        return f"<unreadable body: {type(e).__name__}>"


_DONE = {"completed", "failed", "expired", "cancelled"}  # batch states after which nothing changes


class OpenAIBatches:
    """OpenAI's Batch API through the SDK: files.create, batches.create / retrieve / list, files.content.
    The input file is uploaded first and named in the batch's metadata, so a batch whose id was never recorded
    can be found again by its file."""

    provider = "openai"
    discount = BATCH_DISCOUNT

    def __init__(self, teacher: OpenAITeacher):
        self.teacher = teacher

    @property
    def client(self) -> Any:
        return self.teacher.client  # built lazily inside the running event loop

    async def prepare(self, items: Sequence[tuple[str, Request]]) -> str:
        lines = [
            {"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": self.teacher.batch_body(r)}
            for k, r in items
        ]
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        f = await self.client.files.create(file=("protege-batch.jsonl", io.BytesIO(data)), purpose="batch")
        return str(f.id)

    async def create(self, ref: str, items: Sequence[tuple[str, Request]]) -> str:
        b = await self.client.batches.create(
            input_file_id=ref, endpoint="/v1/chat/completions", completion_window="24h", metadata={"protege_input": ref}
        )
        return str(b.id)

    async def find(self, ref: str) -> str | None:
        async for b in self.client.batches.list(limit=100):
            if b.input_file_id == ref:
                return str(b.id)
        return None

    async def progress(self, batch_id: str) -> Progress:
        b = await self.client.batches.retrieve(batch_id)
        counts = b.request_counts
        return Progress(b.status, b.status in _DONE, (counts.completed + counts.failed) if counts else 0)

    async def outcomes(self, batch_id: str, requests: Mapping[str, Request]) -> list[Outcome]:
        b = await self.client.batches.retrieve(batch_id)
        out = []
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.text.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    if line.get("custom_id") in requests:
                        out.append(self._outcome(line, requests[line["custom_id"]]))
        return out

    def _outcome(self, line: dict[str, Any], request: Request) -> Outcome:
        key = line["custom_id"]
        response = line.get("response") or {}
        if line.get("error"):
            return Outcome(key, None, Usage(), f"batch error: {line['error']}")
        body = response.get("body")
        if response.get("status_code") != 200 or not isinstance(body, dict):
            return Outcome(key, None, Usage(), f"HTTP {response.get('status_code')}: {str(body)[:500]}")
        import openai.types.chat as t
        import pydantic

        try:
            completion = t.ChatCompletion.model_validate(body)
        except pydantic.ValidationError as e:
            reason = f"malformed batch answer: {e.error_count()} fields are not a chat completion's"
            return Outcome(key, None, Usage(), reason, json.dumps(body)[:4000])
        usage = usage_of(completion)
        try:
            signal = self.teacher.signal_from_completion(completion, request)
        except (ParseError, TransientError, PermanentError) as e:
            return Outcome(key, None, usage, f"unparseable batch answer: {e}", getattr(e, "raw", None) or None)
        return Outcome(key, signal, usage)
