"""Teacher scores of given tokens (on-policy distillation), through labeling's store and engine.

The student's samples are scored by the teacher (``teacher.score``, where it declares ``can_score``): a local
teacher in batches, an API teacher one call per sequence through :mod:`.engine` (concurrency, retries, rate
limits, and the budget reserved before each call). Every score is a row of the store keyed by the teacher's
identity and the exact token ids, so a rerun (a resumed run redraws the same samples) makes no call; prompt
tokens are priced as input tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import ProtegeError
from ..recipe import TeacherConfig
from ..signals import TeacherSignal, TokenLogprobs
from ..store import CallRecord, Store, call_key
from ..teachers.base import ApiTeacher, Caller, ScoreRequest, Teacher
from .engine import run_api

__all__ = ["score_tokens"]


class _Scores:
    """An API teacher as the engine drives one: its answer to a request is its score of the given tokens."""

    kind: Literal["api"] = "api"

    def __init__(self, teacher: ApiTeacher):
        self.teacher = teacher
        self.price, self.price_factor = teacher.price, teacher.price_factor

    def check_key(self) -> None:
        self.teacher.check_key()

    async def answer(self, request: Any, call: Caller) -> TeacherSignal:
        return TeacherSignal(token_logprobs=await self.teacher.score(request, call))

    async def aclose(self) -> None:
        await self.teacher.aclose()


def score_tokens(
    teacher: Teacher, cfg: TeacherConfig, store: Store, requests: Sequence[ScoreRequest], quiet: bool = True
) -> tuple[list[TokenLogprobs | None], int]:
    """The teacher's scores of each request's given tokens (None where the call failed after its retries), and
    how many calls were made (0 when the store held them all). Raises BudgetReached or PermanentError after
    recording what finished, as labeling does."""
    if not teacher.can_score:
        raise ProtegeError(
            f"teacher {cfg.model!r} cannot score given tokens; use a local 'hf:' causal LM or a server that can "
            "(teacher.provider 'vllm' or 'llamacpp')"
        )
    keys = [call_key(teacher.identity, r.to_json()) for r in requests]
    done = store.get_signals(keys)
    todo: dict[str, ScoreRequest] = {}
    for k, r in zip(keys, requests):
        if k not in done:
            todo.setdefault(k, r)  # the same sample twice is scored once
    if todo:
        if teacher.kind == "api":
            scorer: Any = _Scores(teacher)  # the engine's teacher, as far as the engine looks
            run_api(scorer, cfg, store, list(todo.items()), cfg.model, quiet, desc="score")
        else:
            t0 = time.perf_counter()
            scores = teacher.score(list(todo.values()))
            dt = (time.perf_counter() - t0) / len(todo)
            store.put(
                CallRecord(key=k, teacher=cfg.model, request=r.to_json(), signal=TeacherSignal(token_logprobs=s),
                           input_tokens=len(r.ids), seconds=dt)
                for (k, r), s in zip(todo.items(), scores)
            )
        done.update(store.get_signals(list(todo)))  # as the store keeps them (rounded), so a rerun reads the same
    return [done[k].token_logprobs if k in done else None for k in keys], len(todo)
