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
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GenerationParams", "Generation", "LMGenerator", "chat_completion"]

MAX_STOP = 4  # as OpenAI


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


def _entry(token: str, lp: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    e: dict[str, Any] = {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}
    if top is not None:
        e["top_logprobs"] = [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top]
    return e


class LMGenerator:
    """A loaded causal LM student that answers chat messages."""

    def __init__(self, path: Path | str):
        import torch

        from .lm_students import load_lm_student
        from .train_lm import ANSWER_PREFIX, prompt_ids

        self.model, self.tokenizer, self.meta = load_lm_student(Path(path))
        self._prompt_ids = prompt_ids
        # a student distilled step-by-step answers after this prefix on the last user turn
        self.answer_prefix = ANSWER_PREFIX if _rationale_weight(Path(path)) > 0 else None
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        self.stops = set(ids)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self._torch = torch
        self._lock = threading.Lock()
        from .teachers.hf import _cache_kwarg

        self._cache_kw = _cache_kwarg(self.model)  # transformers 5 renamed past_key_values to cache

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.answer_prefix:
            from .train_lm import _prefixed

            messages = list(_prefixed(tuple(messages), self.answer_prefix))
        return self._prompt_ids(self.tokenizer, messages)

    def generate(
        self, messages: list[dict[str, str]], p: GenerationParams, on_text: Callable[[str], None] | None = None
    ) -> Generation:
        """Decode an answer; ``on_text(delta)`` receives the text as it becomes final (for streaming)."""
        torch = self._torch
        tok = self.tokenizer
        ids = self.prompt(messages)
        out = Generation(prompt_tokens=len(ids))
        budget = min(p.max_tokens, max(0, self.context - len(ids)))
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        hold = max((len(s) for s in p.stop), default=1) - 1  # characters that may still start a stop string
        produced: list[int] = []
        sent = 0  # characters of the answer already handed to on_text
        with self._lock, torch.inference_mode():
            past = None
            step_ids = torch.tensor([ids])
            for _ in range(budget):
                kw = {} if past is None else {self._cache_kw: past}
                res = self.model(input_ids=step_ids, use_cache=True, **kw)
                past = getattr(res, "cache", None) or res.past_key_values
                logits = res.logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                nxt = self._pick(logits, p, gen)
                if nxt in self.stops:
                    out.finish_reason = "stop"
                    break
                produced.append(nxt)
                out.completion_tokens += 1
                if p.logprobs:
                    top = None
                    if p.top_logprobs:
                        v, i = logp.topk(p.top_logprobs)
                        top = [(tok.decode([a]), b) for a, b in zip(i.tolist(), v.tolist())]
                    out.tokens.append(_entry(tok.decode([nxt]), float(logp[nxt]), top))
                text = tok.decode(produced, skip_special_tokens=True)
                cut = min((i for s in p.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    out.text, out.finish_reason = text[:cut], "stop"
                    break
                out.text = text
                ready = len(text) - hold
                if on_text is not None and ready > sent and not text.endswith("\ufffd"):
                    on_text(text[sent:ready])
                    sent = ready
                step_ids = torch.tensor([[nxt]])
        if on_text is not None and len(out.text) > sent:
            on_text(out.text[sent:])
        return out

    def _pick(self, logits: Any, p: GenerationParams, gen: Any) -> int:
        torch = self._torch
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # the smallest set reaching top_p (at least one)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


def _rationale_weight(path: Path) -> float:
    """training.rationale_weight of the recipe saved beside the student (0 when there is none)."""
    import yaml

    try:
        saved = yaml.safe_load((path / "recipe.yaml").read_text())
        return float(saved.get("training", {}).get("rationale_weight") or 0)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return 0.0


_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protege-generate")


async def chat_completion(
    gen: LMGenerator, messages: list[dict[str, str]], p: GenerationParams, *, model_id: str, stream: bool,
    include_usage: bool, headers: dict[str, str],
) -> Any:
    """The response (JSON, or server-sent events) for one chat completion from an LM student."""
    from fastapi.responses import JSONResponse, StreamingResponse

    loop = asyncio.get_running_loop()
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
            "system_fingerprint": None}

    def usage(g: Generation) -> dict[str, int]:
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    if not stream:
        g = await loop.run_in_executor(_pool, gen.generate, messages, p, None)
        return JSONResponse(
            {
                **base,
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": g.text, "refusal": None},
                    "logprobs": {"content": g.tokens, "refusal": None} if p.logprobs else None,
                    "finish_reason": g.finish_reason,
                }],
                "usage": usage(g),
            },
            headers=headers,
        )

    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_text(delta: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ("text", delta))

    def work() -> None:
        try:
            g = gen.generate(messages, p, on_text)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", g))
        except Exception as e:  # reported to the client as a final error event, never swallowed
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    future = loop.run_in_executor(_pool, work)
    chunk = {**base, "object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        return "data: " + json.dumps(
            {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        ) + "\n\n"

    async def sse() -> AsyncIterator[str]:
        yield event({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield event({"content": value})
            elif kind == "error":
                err = {"error": {"message": "The server had an error while generating.", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            else:
                g: Generation = value
                logprobs = {"content": g.tokens, "refusal": None} if p.logprobs else None
                yield event({}, g.finish_reason, logprobs)
                if include_usage:
                    yield "data: " + json.dumps({**chunk, "choices": [], "usage": usage(g)}) + "\n\n"
                break
        await future
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
