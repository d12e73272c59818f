"""The one decoding loop of an LM student, shared by evaluation (the threshold sweep's confidences) and serving
(the confidence the cascade routes by), so the two cannot disagree on the same prompt.

The prompt goes through the model once, then one token at a time on the KV cache. Every step yields the chosen
token with its log-probability under the model (temperature 1, whatever picked the token), so an answer's
:func:`confidence` is the same figure wherever it is computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..sources import cache_kwarg

__all__ = ["Decoded", "Step", "confidence", "decode", "greedy"]


@dataclass(frozen=True)
class Step:
    token: int  # the chosen token
    logprob: float  # its log-probability under the model, temperature 1
    logprobs: torch.Tensor  # (V,) the whole next-token distribution as log-probabilities, temperature 1
    stop: bool  # a stop token: the model ended its answer here (the token is not part of the text)


def confidence(logprobs: Sequence[float]) -> float:
    """An answer's sequence-level confidence: the geometric mean of the probabilities of its chosen tokens,
    exp(1/n · Σ log p(token_i)), in (0, 1] like a classifier's top label probability; 0 for an empty decoding.
    The end token counts when the model stopped by itself (choosing to stop is part of the answer)."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


def decode(
    model: Any,
    prompt: Sequence[int],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], int] | None = None,
) -> Iterator[Step]:
    """The answer to ``prompt`` one :class:`Step` at a time, until a stop token (yielded, with ``stop`` set) or
    ``max_new_tokens`` (capped by the model's context). ``pick(logits)`` chooses each token from the (V,) float32
    logits; None is greedy (argmax). The caller may stop early (a stop string); nothing is left running."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = min(max_new_tokens, max(0, context - len(prompt)))
    stops, cache_kw = set(stop_ids), cache_kwarg(model)
    device = next(model.parameters()).device  # a model on a GPU (on-policy training samples on one)
    past, ids = None, torch.tensor([list(prompt)], device=device)  # (1, T): the prompt, then one new token per step
    for _ in range(budget):
        with torch.inference_mode():  # per step, not across the yield: the caller's code runs in its own mode
            res = model(input_ids=ids, use_cache=True, **({} if past is None else {cache_kw: past}))
            past = getattr(res, "cache", None) or res.past_key_values
            logits = res.logits[0, -1].float()  # (V,)
            logp = torch.log_softmax(logits, -1)  # (V,)
            token = int(logits.argmax()) if pick is None else pick(logits)
        stop = token in stops
        yield Step(token, float(logp[token]), logp, stop)
        if stop:
            return
        ids = torch.tensor([[token]], device=device)  # (1, 1)


@dataclass(frozen=True)
class Decoded:
    ids: list[int]  # the answer's tokens, without the stop token
    logprobs: list[float]  # each chosen token's log-probability, the stop token's last when the model stopped
    stopped: bool  # the model chose a stop token (else it ran out of tokens)
    seconds: float  # decoding time

    @property
    def confidence(self) -> float:
        return confidence(self.logprobs)


def greedy(model: Any, prompt: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int) -> Decoded:
    """The greedy answer to ``prompt`` and its per-token log-probabilities (see :func:`decode`)."""
    t0 = time.perf_counter()
    steps = list(decode(model, prompt, stop_ids, max_new_tokens))
    seconds = time.perf_counter() - t0
    stopped = bool(steps) and steps[-1].stop
    return Decoded([s.token for s in steps if not s.stop], [s.logprob for s in steps], stopped, seconds)
