"""The cascade's teacher side: what a served student was unsure of goes to the teacher, and what that costs.

* :class:`TeacherFallback` answers what a served student was unsure of (a text, or a conversation) with the
  teacher, through :func:`protege.labeling.labeler.label_requests`: the same backends, the same store as cache
  (a text labeled before, or asked before, costs nothing), the same budget cap and the same cost records as
  labeling.
* the ledger (:mod:`protege.serve.ledger`) records every served answer; the threshold is chosen by
  :mod:`protege.evaluation.sweep` on held-out answers.

A student answers when its confidence (a classifier's top label probability; an LM's geometric mean token
probability, see :mod:`protege.serve`) is at least the threshold: threshold 0 sends nothing to the teacher,
any threshold above 1 sends everything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BudgetReached, PermanentError, ProtegeError
from ..labeling.data import Example
from ..recipe import Recipe, load_recipe
from ..signals import TeacherSignal
from ..store import CallRecord, Store, call_key
from ..students.card import CARD, StudentCard
from ..teachers.base import Request

__all__ = [
    "TeacherAnswer",
    "TeacherFailure",
    "TeacherFallback",
    "default_store",
    "saved_compute_price",
    "teacher_recipe",
]

log = logging.getLogger(__name__)


def default_store(student_dir: Path) -> Path | None:
    """The store of the run that made the student (``protege run`` puts the student beside it), if any."""
    path = Path(student_dir).resolve().parent / "protege.db"
    return path if path.is_file() else None


def saved_compute_price(path: Path) -> float:
    """``eval.compute_usd_per_hour`` the student was trained with, from its card."""
    return StudentCard.read(path).compute_usd_per_hour


def teacher_recipe(student_dir: Path, path: Path | str | None, labels: tuple[str, ...] | None) -> Recipe:
    """The recipe whose teacher (and task, which renders the teacher's prompt) the cascade asks: ``path``, or
    the teacher and task in the student's card. A classifier student's (``labels``) must have its labels in the
    same order; a language-model student's (``labels`` None) must be a generation task."""
    if path is None:
        recipe_path = Path(student_dir) / CARD
        recipe = StudentCard.read(student_dir).teacher_recipe(student_dir)
    else:
        recipe_path = Path(path)
        if not recipe_path.is_file():
            raise ProtegeError(f"the cascade needs the teacher's recipe and {str(recipe_path)!r} does not exist; "
                               "pass --teacher-recipe PATH")
        recipe = load_recipe(recipe_path)
    if labels is None:
        if recipe.task.kind != "generation":
            raise ProtegeError(f"the teacher's recipe {str(recipe_path)!r} is a classification task and the student a "
                               "language model; a cascade needs the recipe of the generation task it learned")
    elif recipe.task.kind != "classification" or recipe.task.label_names != labels:
        raise ProtegeError(
            f"the teacher's recipe {str(recipe_path)!r} has labels {list(recipe.task.label_names)}, the student "
            f"{list(labels)}; a cascade needs the same labels in the same order"
        )
    return recipe


# --------------------------------------------------------------------------------------------------------------
# the teacher behind a served student


@dataclass(frozen=True)
class TeacherAnswer:
    signal: TeacherSignal  # as labeling stores it: a label distribution, or a generated reply
    call_key: str
    cached: bool  # the store already held this answer: no call was made for it
    cost_usd: float  # what asking cost now: API money, or a local teacher's compute at the compute price
    seconds: float  # the teacher call's time (0 when cached)
    input_tokens: int  # the teacher call's usage (what the answer took, even when it came from the store)
    output_tokens: int
    # a generation's answer: the final answer where the task asks for a rationale first (what a student distilled
    # step by step answers), else the whole reply
    text: str | None = None

    @property
    def label(self) -> str:
        assert self.signal.distribution is not None
        return self.signal.distribution.top

    @property
    def probs(self) -> tuple[float, ...]:
        """The label distribution in the task's label order."""
        assert self.signal.distribution is not None
        return self.signal.distribution.probs


@dataclass(frozen=True)
class TeacherFailure:
    """The teacher did not answer: ``status`` 502 (it failed or refused) or 503 (the budget cap is reached)."""

    status: int
    message: str
    code: str
    call_key: str | None = None
    cost_usd: float = 0.0  # spent on the failed attempts (they may still have been billed)


class TeacherFallback:
    """The teacher of ``recipe``, asked through labeling's code path with ``store_path`` as cache and ledger.

    A classification recipe's requests are the task's rendering of each text (:meth:`requests`), exactly as
    labeling sends them, so a text labeled before costs nothing. A generation recipe's are the served
    conversation itself (:meth:`generation_request`): the student learned from the teacher's rendered prompts,
    so a client sending one gets labeling's answer from the store. Batch APIs are not used here: a served
    request cannot wait hours.

    :meth:`ask` blocks (an API teacher runs the labeling engine's event loop; a local one runs its model), so
    the server calls it in a worker thread; it opens its own store connection each time.
    """

    def __init__(self, recipe: Recipe, store_path: Path, compute_usd_per_hour: float,
                 scrub: Callable[[CallRecord], CallRecord] | None = None):
        from ..teachers import make_teacher

        if recipe.teacher.batch_api:
            recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"batch_api": False})})
        self.recipe = recipe
        self.store_path = Path(store_path)
        self.compute_usd_per_hour = compute_usd_per_hour
        self.scrub = scrub  # what the store keeps of a call (--capture: redacted)
        self.teacher = make_teacher(recipe.teacher)
        self.api = self.teacher.kind == "api"
        if self.teacher.kind == "api":
            self.teacher.check_key()  # a missing key fails before the server listens, not on the first unsure text
        else:
            self.teacher.load()  # now: missing weights fail at start, and no request pays the load time
        self.name = recipe.teacher.model

    def requests(self, texts: Sequence[str]) -> list[Request]:
        """The teacher's requests for classifying ``texts``, as labeling renders them."""
        from ..labeling.labeler import requests_for

        return requests_for(self.recipe, [Example(f"served-{i}", t, None, "served") for i, t in enumerate(texts)])

    def generation_request(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Request:
        """The teacher's request for a served conversation: greedy, up to ``max_tokens`` (None: the recipe's
        limit, the one labeling used), with the recipe's top-logprobs and answer format."""
        from ..labeling.prompts import conversation_request

        t = self.recipe.teacher
        request = conversation_request(self.recipe.task, messages, t.max_tokens, t.top_logprobs)
        assert request.generate is not None
        if max_tokens is None:
            return request
        return replace(request, generate=replace(request.generate, max_tokens=max_tokens))

    def ask(self, requests: Sequence[Request]) -> list[TeacherAnswer | TeacherFailure]:
        """The teacher's answer for each request, in order; never raises for a teacher's failure."""
        from ..labeling.labeler import label_requests

        requests = list(requests)
        # the keys labeling will use, to see what each request cost (before vs after)
        keys = [call_key(self.teacher.identity, r.to_json()) for r in requests]
        failure: TeacherFailure | None = None
        with Store(self.store_path, scrub=self.scrub) as store:
            before = store.call_usage(keys)
            try:
                signals, keys, _ = label_requests(self.teacher, self.recipe, requests, store, quiet=True, desc="cascade")
            except BudgetReached as e:
                failure = TeacherFailure(503, f"The teacher's budget is spent: {e}", "teacher_budget_reached")
            except PermanentError as e:
                failure = TeacherFailure(502, f"The teacher refused the request: {e}", "teacher_refused")
            except ProtegeError as e:
                failure = TeacherFailure(502, f"The teacher failed: {e}", "teacher_failed")
            except Exception:  # a teacher's bug fails these requests, not the server
                log.exception("the teacher failed on a cascade batch")
                failure = TeacherFailure(502, "The teacher failed on this request.", "teacher_failed")
            if failure is not None:  # what finished before the error is in the store
                held = store.get_signals(keys)
                signals = [held.get(k) for k in keys]
            after = store.call_usage(keys)
            reasons = store.failures([k for k, s in zip(keys, signals) if s is None])
        out: list[TeacherAnswer | TeacherFailure] = []
        charged: set[str] = set()  # identical requests share one call: its cost goes to the first
        for key, sig, req in zip(keys, signals, requests):
            spent, seconds, new = 0.0, 0.0, False
            if key not in charged and key in after:
                b = before.get(key)
                new = b is None or b.status != "ok"
                if new:
                    spent = after[key].spent_usd - (b.spent_usd if b else 0.0)
                    seconds = after[key].seconds - (b.seconds if b else 0.0)
                    if not self.api:  # a local model's cost is its compute time
                        spent = seconds / 3600 * self.compute_usd_per_hour
            charged.add(key)
            answered = sig is not None and (sig.text is not None if req.generate else sig.distribution is not None)
            if not answered:
                if failure is None:  # this row failed on its own (retries or parse retries used up)
                    reason = reasons.get(key, ("not answered", None))[0]
                    failure_here = TeacherFailure(502, f"The teacher failed: {reason}", "teacher_failed")
                else:
                    failure_here = failure
                out.append(TeacherFailure(failure_here.status, failure_here.message, failure_here.code, key, spent))
                continue
            assert sig is not None
            tin, tout = after[key].input_tokens, after[key].output_tokens
            text = None
            if req.generate is not None:
                text = sig.answer if req.generate.rationale and sig.answer is not None else sig.text
            out.append(TeacherAnswer(sig, key, not new, spent, seconds, tin, tout, text))
        return out


# --------------------------------------------------------------------------------------------------------------
# answers in OpenAI's format


def log_probs(probs: Sequence[float]) -> list[float]:
    """Log-probabilities for an OpenAI-style answer; a zero becomes -9999.0, as OpenAI writes it."""
    return [math.log(p) if p > 0 else -9999.0 for p in probs]
