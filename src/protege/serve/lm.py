"""Chat completions from a causal LM student, for :mod:`protege.serve`.

The decoding loop is written out (prompt once, then one token at a time on the KV cache) so that every
OpenAI setting maps onto it exactly: ``max_tokens`` (the server's ``max_new_tokens`` caps it), ``temperature``
(0 is greedy), ``top_p``, ``stop`` (up to 4 strings, never part of the answer), ``seed``, ``logprobs`` and
``top_logprobs`` (the model's own log-probabilities, temperature 1, of the chosen token and its most likely
alternatives), streaming (a token's text is sent as soon as no stop string can still begin in it), and usage.
Generations run one at a time in a worker thread: a CPU has no spare capacity to batch them, and the event
loop keeps accepting requests (beyond the concurrency limit they get 429).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GenerationParams", "Generation", "LMGenerator", "chat_completion", "generate", "respond", "stop_at",
           "token_entry"]

MAX_STOP = 4  # as OpenAI
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0
    logprobs: bool = False


@dataclass
class Generation:
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[dict[str, Any]] = field(default_factory=list)  # OpenAI logprobs.content entries
    confidence: float = 0.0  # the student's sequence-level confidence (see LMGenerator.generate)
    seconds: float = 0.0  # compute time of the decoding
    deltas: list[str] = field(default_factory=list)  # the text as streamed, piece by piece


def token_entry(token: str, lp: float, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """One OpenAI ``logprobs.content`` entry; with ``top``, its ``top_logprobs`` alternatives."""
    e: dict[str, Any] = {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}
    if top is not None:
        e["top_logprobs"] = [token_entry(t, v) for t, v in top]
    return e


def stop_at(text: str, stop: tuple[str, ...]) -> int:
    """Where the first of the ``stop`` strings begins in ``text`` (-1: none does); the answer ends there."""
    return min((i for s in stop if (i := text.find(s)) >= 0), default=-1)


class LMGenerator:
    """A loaded causal LM student that answers chat messages, in the chat format of its card."""

    def __init__(self, path: Path | str):
        import torch

        from ..students.lm import load_lm_student

        self.model, self.tokenizer, self.card = load_lm_student(Path(path))
        assert self.card.chat is not None  # a causal_lm card always has one
        self.chat = self.card.chat  # prompt format, answer prefix (a step-by-step student) and stop tokens
        self._torch = torch
        self._lock = threading.Lock()
        # the one thread the server decodes answers in, owned here so that close() stops it with the generator
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protege-generate")

    def close(self) -> None:
        """Stop the generation thread once the answer in progress is done (the server's shutdown)."""
        self.executor.shutdown(wait=True)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.chat.prompt_ids(self.tokenizer, messages)

    def generate(
        self, messages: list[dict[str, str]], p: GenerationParams, on_text: Callable[[str], None] | None = None
    ) -> Generation:
        """Decode an answer; ``on_text(delta)`` receives the text as it becomes final (for streaming).

        Decoding is :func:`protege.students.generate.decode`, the loop evaluation's sweep runs too; the
        answer's ``confidence`` is :func:`protege.students.generate.confidence` of its chosen tokens (the
        end-of-answer token included when the model stopped by itself), so at temperature 0 it is the figure
        ``protege eval`` recorded for the same prompt."""
        from ..students.generate import confidence, decode

        torch = self._torch
        tok = self.tokenizer
        ids = self.prompt(messages)
        out = Generation(prompt_tokens=len(ids))
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        pick = None if p.temperature == 0 else (lambda logits: self._pick(logits, p, gen))
        hold = max((len(s) for s in p.stop), default=1) - 1  # characters that may still start a stop string
        produced: list[int] = []
        sent = 0  # characters of the answer already handed to on_text
        chosen: list[float] = []  # log-probability of each chosen token
        with self._lock:
            t0 = time.perf_counter()
            for step in decode(self.model, ids, self.chat.stop_ids, p.max_tokens, pick):
                chosen.append(step.logprob)
                if step.stop:
                    out.finish_reason = "stop"
                    break
                produced.append(step.token)
                out.completion_tokens += 1
                if p.logprobs:
                    top = None
                    if p.top_logprobs:
                        v, i = step.logprobs.topk(p.top_logprobs)
                        top = [(tok.decode([a]), b) for a, b in zip(i.tolist(), v.tolist())]
                    out.tokens.append(token_entry(tok.decode([step.token]), step.logprob, top))
                text = tok.decode(produced, skip_special_tokens=True)
                cut = stop_at(text, p.stop)
                if cut >= 0:
                    out.text, out.finish_reason = text[:cut], "stop"
                    break
                out.text = text
                ready = len(text) - hold
                if ready > sent and not text.endswith("\ufffd"):
                    self._emit(out, text[sent:ready], on_text)
                    sent = ready
            out.seconds = time.perf_counter() - t0
        if len(out.text) > sent:
            self._emit(out, out.text[sent:], on_text)
        out.confidence = confidence(chosen)
        return out

    @staticmethod
    def _emit(out: Generation, delta: str, on_text: Callable[[str], None] | None) -> None:
        out.deltas.append(delta)
        if on_text is not None:
            on_text(delta)

    def _pick(self, logits: Any, p: GenerationParams, gen: Any) -> int:
        torch = self._torch
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # the smallest set reaching top_p (at least one)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


async def generate(gen: LMGenerator, messages: list[dict[str, str]], p: GenerationParams) -> Generation:
    """A whole answer, decoded in the generation worker thread (the event loop goes on meanwhile)."""
    return await asyncio.get_running_loop().run_in_executor(gen.executor, gen.generate, messages, p, None)


def _usage(g: Generation) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


class _Completion:
    """One chat completion's response, as JSON or as OpenAI's server-sent chunks."""

    def __init__(self, model_id: str, p: GenerationParams, include_usage: bool):
        self.p, self.include_usage = p, include_usage
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
                     "system_fingerprint": None}

    def logprobs(self, g: Generation) -> dict[str, Any] | None:
        return {"content": g.tokens, "refusal": None} if self.p.logprobs else None

    def json(self, g: Generation, headers: dict[str, str]) -> Any:
        from fastapi.responses import JSONResponse

        choice = {"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None},
                  "logprobs": self.logprobs(g), "finish_reason": g.finish_reason}
        return JSONResponse({**self.base, "object": "chat.completion", "choices": [choice], "usage": _usage(g)},
                            headers=headers)

    def event(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return "data: " + json.dumps({**self.base, "object": "chat.completion.chunk", "choices": [choice]}) + "\n\n"

    def first(self) -> str:
        return self.event({"role": "assistant", "content": ""})

    def last(self, g: Generation) -> list[str]:
        """The final chunk (finish reason, logprobs), the usage chunk if asked for, and [DONE]."""
        out = [self.event({}, g.finish_reason, self.logprobs(g))]
        if self.include_usage:
            chunk = {**self.base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(g)}
            out.append("data: " + json.dumps(chunk) + "\n\n")
        return out + ["data: [DONE]\n\n"]

    @staticmethod
    def stream(events: AsyncIterator[str], headers: dict[str, str]) -> Any:
        from fastapi.responses import StreamingResponse

        return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def respond(
    g: Generation, p: GenerationParams, *, model_id: str, stream: bool, include_usage: bool, headers: dict[str, str]
) -> Any:
    """The response for a finished answer (the cascade decides who answers before anything is sent): JSON, or
    its text replayed as server-sent chunks in the pieces it was produced in."""
    c = _Completion(model_id, p, include_usage)
    if not stream:
        return c.json(g, headers)

    async def sse() -> AsyncIterator[str]:
        yield c.first()
        for delta in g.deltas or ([g.text] if g.text else []):
            yield c.event({"content": delta})
        for event in c.last(g):
            yield event

    return c.stream(sse(), headers)


async def chat_completion(
    gen: LMGenerator, messages: list[dict[str, str]], p: GenerationParams, *, model_id: str, stream: bool,
    include_usage: bool, headers: dict[str, str], on_done: Callable[[Generation], None] | None = None,
) -> Any:
    """The response (JSON, or server-sent events sent as the text is decoded) for one chat completion from an
    LM student; ``on_done(generation)`` runs once the answer is complete (the served-traffic ledger)."""
    loop = asyncio.get_running_loop()
    c = _Completion(model_id, p, include_usage)
    if not stream:
        g = await generate(gen, messages, p)
        if on_done is not None:
            on_done(g)
        return c.json(g, headers)

    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_text(delta: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

    def work() -> None:
        try:
            g = gen.generate(messages, p, on_text)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", g))
        except Exception as e:  # logged, and reported to the client as a final error event
            log.exception("the student failed while generating")
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    future = loop.run_in_executor(gen.executor, work)

    async def sse() -> AsyncIterator[str]:
        yield c.first()
        while (item := await queue.get())[0] == "text":
            yield c.event({"content": item[1]})
        await future
        kind, value = item
        if kind == "error":
            err = {"error": {"message": "The server had an error while generating.", "type": "server_error",
                             "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if on_done is not None:
            on_done(value)
        for event in c.last(value):
            yield event

    return c.stream(sse(), headers)
