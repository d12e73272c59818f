"""A saved student's card, ``protege.json``: everything serving, evaluation and export need to know about it.

Training writes it beside the weights; :meth:`StudentCard.read` is the one reader. The recipe saved beside the
student (``recipe.yaml``) is for people and for ``protege cost``; nothing that runs the student parses it.

The file is one JSON object: the card's fields, and the training summary's figures (distill mode, steps, loss,
seconds, input hashes ...) beside them at the top level, as ``protege train`` has always written them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import write_json_atomic
from ..errors import ProtegeError
from ..recipe import Recipe, TaskConfig, TeacherConfig, build_recipe
from .chat import ANSWER_PREFIX, ChatFormat

__all__ = ["CARD", "CARD_VERSION", "StudentCard", "card_version"]

CARD = "protege.json"
CARD_VERSION = 1
KINDS = ("classifier", "causal_lm")
RETRAIN = "retrain it with `protege train` (which writes a complete protege.json)"


def card_version(student_dir: Path | str) -> str:
    """A student's version: the hash of its ``protege.json``, written once by training, so two trainings never
    share one (the served model's ``version`` in its metrics and captured traffic)."""
    return hashlib.sha256((Path(student_dir) / CARD).read_bytes()).hexdigest()[:12]


@dataclass(frozen=True)
class StudentCard:
    """What a trained student is and how to run it."""

    kind: str  # "classifier" (a sequence classifier) or "causal_lm" (a language model)
    max_length: int  # student.max_length it was trained with, in tokens (a classifier truncates its input there)
    task: TaskConfig  # the task it learned: renders the teacher's prompts in the cascade
    teacher: TeacherConfig  # the teacher it learned from: the one the cascade asks
    compute_usd_per_hour: float  # eval.compute_usd_per_hour: the price of its compute time, for the served ledger
    labels: tuple[str, ...] | None = None  # a classifier's labels, in the order of its head
    chat: ChatFormat | None = None  # a language model's prompt format, answer prefix and stop tokens
    summary: dict[str, Any] = field(default_factory=dict)  # the training summary (figures for reports and hashes)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        lm = self.kind == "causal_lm"
        if lm == (self.labels is not None) or lm != (self.chat is not None):
            raise ValueError("a classifier's card has labels and no chat format; a language model's the reverse")
        if clash := sorted(set(self.summary) & set(_KEYS)):
            raise ValueError(f"the training summary repeats the card's own fields {clash}")

    # -- building (at training time) -------------------------------------------------------------------------

    @classmethod
    def for_classifier(cls, recipe: Recipe, labels: tuple[str, ...], summary: dict[str, Any]) -> StudentCard:
        return cls("classifier", labels=tuple(labels), summary=_without_fields(summary), **_from_recipe(recipe))

    @classmethod
    def for_lm(cls, recipe: Recipe, tokenizer: Any, model: Any, summary: dict[str, Any]) -> StudentCard:
        """A language model's card; a student distilled step by step (training.rationale_weight > 0) answers
        after :data:`~protege.students.chat.ANSWER_PREFIX`, as it was trained to."""
        prefix = ANSWER_PREFIX if recipe.training.rationale_weight > 0 else None
        return cls("causal_lm", chat=ChatFormat.of(tokenizer, model, prefix), summary=_without_fields(summary),
                   **_from_recipe(recipe))

    # -- the file ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The object written to protege.json (the summary's figures beside the card's fields)."""
        return {
            **self.summary,
            "card_version": CARD_VERSION,
            "kind": self.kind,
            "max_length": self.max_length,
            "labels": None if self.labels is None else list(self.labels),
            "chat": None if self.chat is None else self.chat.to_json(),
            "teacher_recipe": {"task": self.task.model_dump(mode="json"),
                               "teacher": self.teacher.model_dump(mode="json")},
            "compute_usd_per_hour": self.compute_usd_per_hour,
        }

    def write(self, student_dir: Path) -> None:
        write_json_atomic(Path(student_dir) / CARD, self.to_json())

    @classmethod
    def read(cls, student_dir: Path) -> StudentCard:
        """The card of the student in ``student_dir``; a missing, malformed or incomplete one is a ProtegeError
        that names the file and the fix (never a default: a step-by-step student served without its answer
        prefix would answer a question it was not trained on)."""
        path = Path(student_dir) / CARD
        if not path.is_file():
            raise ProtegeError(f"{str(Path(student_dir))!r} is not a trained protege student: it has no {CARD}. "
                               "Point at the directory `protege train` wrote, or train one")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProtegeError(f"{str(path)!r} is not valid JSON ({e}); the student directory is damaged: "
                               f"{RETRAIN}") from None
        if not isinstance(data, dict):
            raise ProtegeError(f"{str(path)!r} is not a JSON object; the student directory is damaged: {RETRAIN}")
        if "card_version" not in data:
            raise ProtegeError(
                f"{str(path)!r} was written by an older protege, before a student's card carried its chat format, "
                f"answer prefix, stop tokens, max length and teacher recipe; {RETRAIN}"
            )
        if data["card_version"] != CARD_VERSION:
            raise ProtegeError(f"{str(path)!r} is card version {data['card_version']!r}; this protege reads version "
                               f"{CARD_VERSION}: {RETRAIN}, or use the protege that trained it")
        try:
            return cls._parse(data)
        except (KeyError, TypeError, ValueError) as e:
            what = f"lacks {e}" if isinstance(e, KeyError) else f"has a bad value: {e}"
            raise ProtegeError(f"{str(path)!r} {what}; the student directory is damaged: {RETRAIN}") from None

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> StudentCard:
        kind = _typed(data, "kind", str)
        max_length = _typed(data, "max_length", int)
        if max_length < 1:
            raise ValueError(f"max_length {max_length} (a positive number of tokens)")
        price = _typed(data, "compute_usd_per_hour", (int, float))
        if price < 0:
            raise ValueError(f"compute_usd_per_hour {price} (0 or more)")
        recipe = _typed(data, "teacher_recipe", dict)
        try:  # the sections are validated as a recipe's are, so a hand-edited one fails here, not in the cascade
            task, teacher = TaskConfig.model_validate(recipe["task"]), TeacherConfig.model_validate(recipe["teacher"])
        except KeyError as e:
            raise KeyError(f"teacher_recipe.{e.args[0]}") from None
        except Exception as e:  # pydantic's ValidationError is a ValueError; say which section
            raise ValueError(f"teacher_recipe: {e}") from None
        labels, chat = data["labels"], data["chat"]  # both keys are always written (null where they do not apply)
        if kind == "classifier":
            if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
                raise ValueError(f"labels {labels!r} (a classifier's card lists its 2 or more label names)")
            labels = tuple(labels)
        if kind == "causal_lm":
            chat = _chat(_typed(data, "chat", dict))
        return cls(kind, max_length, task, teacher, float(price), labels, chat,
                   {k: v for k, v in data.items() if k not in _KEYS})

    # -- what the cascade needs --------------------------------------------------------------------------------

    def teacher_recipe(self, student_dir: Path) -> Recipe:
        """A recipe with the task and teacher this student learned from (what the cascade asks); its student
        section names ``student_dir``."""
        return build_recipe(
            {"task": self.task.model_dump(), "teacher": self.teacher.model_dump(),
             "student": {"model": str(student_dir), "max_length": self.max_length},
             "eval": {"compute_usd_per_hour": self.compute_usd_per_hour}},
            source=str(Path(student_dir) / CARD),
        )


def _from_recipe(recipe: Recipe) -> dict[str, Any]:
    return {"max_length": recipe.student.max_length, "task": recipe.task, "teacher": recipe.teacher,
            "compute_usd_per_hour": recipe.eval.compute_usd_per_hour}


def _without_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary less what the card states itself (a classifier's summary lists its labels too)."""
    return {k: v for k, v in summary.items() if k not in _KEYS}


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key} {value!r}")
    return value


def _chat(d: dict[str, Any]) -> ChatFormat:
    try:
        template, prefix, end, stops = d["template"], d["answer_prefix"], d["end_token_id"], d["stop_ids"]
    except KeyError as e:
        raise KeyError(f"chat.{e.args[0]}") from None
    if not isinstance(template, bool):
        raise ValueError(f"chat.template {template!r} (true or false)")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f"chat.answer_prefix {prefix!r} (a string, or null)")
    if not isinstance(end, int) or isinstance(end, bool) or end < 0:
        raise ValueError(f"chat.end_token_id {end!r} (a token id)")
    ids = isinstance(stops, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in stops)
    if not (ids and end in stops):
        raise ValueError(f"chat.stop_ids {stops!r} (token ids, the end token among them)")
    return ChatFormat(template, prefix, end, tuple(stops))


# the top-level keys the card itself writes; everything else in the file is the training summary
_KEYS = ("card_version", "kind", "max_length", "labels", "chat", "teacher_recipe", "compute_usd_per_hour")
