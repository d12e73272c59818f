"""The one chat format of an LM student: how a conversation becomes prompt token ids, the prefixes a step-by-step
student is trained with, and which tokens end its answer. Training, evaluation, serving and export all encode
through here; a trained student's format is saved in its card (:mod:`protege.students.card`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ProtegeError

__all__ = ["ANSWER_PREFIX", "EXPLAIN_PREFIX", "ChatFormat", "prefixed", "prompt_ids", "prompt_text"]

# distilling step-by-step's task prefixes (Hsieh et al., 2023): one model, asked for the answer or the rationale
ANSWER_PREFIX = "[answer] "
EXPLAIN_PREFIX = "[explain] "

Messages = Sequence[dict[str, str]]


def prefixed(messages: Messages, prefix: str) -> tuple[dict[str, str], ...]:
    """The messages with ``prefix`` before the last user turn."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ProtegeError("a conversation for an LM student needs a user turn to answer")
    return tuple({**m, "content": prefix + m["content"]} if i == users[-1] else dict(m) for i, m in enumerate(messages))


def prompt_text(tokenizer: Any, messages: Messages, prefix: str | None = None, template: bool | None = None) -> str:
    """The prompt as text: the chat template with the assistant's turn opened, or, without one, the turns as plain
    text and an answer cue. ``prefix`` goes before the last user turn; ``template`` None: use the tokenizer's
    template when it has one (a trained student's card says which it was trained with)."""
    if prefix:
        messages = prefixed(messages, prefix)
    if template is None:
        template = bool(tokenizer.chat_template)
    if template:
        if not tokenizer.chat_template:
            raise ProtegeError("the student was trained with its tokenizer's chat template and the tokenizer has none "
                               "now; the student directory is damaged (retrain it with `protege train`)")
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\nAnswer: "


def prompt_ids(
    tokenizer: Any, messages: Messages, prefix: str | None = None, template: bool | None = None
) -> list[int]:
    """Token ids of :func:`prompt_text` (the template writes any special tokens it needs, so none are added)."""
    return tokenizer(prompt_text(tokenizer, messages, prefix, template), add_special_tokens=False)["input_ids"]


def _ids(value: Any) -> list[int]:
    return [] if value is None else [int(x) for x in value] if isinstance(value, (list, tuple)) else [int(value)]


@dataclass(frozen=True)
class ChatFormat:
    """How a student is prompted and where its answer ends."""

    template: bool  # the turns go through the tokenizer's chat template (else plain text and an "Answer: " cue)
    answer_prefix: str | None  # put before the last user turn when asking for an answer (a step-by-step student)
    end_token_id: int  # the end of turn training appends to every answer (and teacher-forced evaluation scores)
    stop_ids: tuple[int, ...]  # tokens that end a generated answer: the end token, then the model's other eos ids

    @classmethod
    def of(cls, tokenizer: Any, model: Any, answer_prefix: str | None = None) -> ChatFormat:
        """The format of ``tokenizer`` and ``model`` as they are now: what training records in the card, and what
        a local teacher (which has no card) is evaluated with."""
        eos = _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (eos[0] if eos else None)
        if end is None:
            raise ProtegeError("the model's tokenizer has no end-of-sequence token, so an answer could never end; "
                               "set one (tokenizer.eos_token)")
        return cls(bool(tokenizer.chat_template), answer_prefix, int(end), tuple(dict.fromkeys([int(end), *eos])))

    def prompt_ids(self, tokenizer: Any, messages: Messages) -> list[int]:
        """The prompt that asks this student for an answer (its answer prefix applied)."""
        return prompt_ids(tokenizer, messages, self.answer_prefix, self.template)

    def prompt_text(self, tokenizer: Any, messages: Messages) -> str:
        return prompt_text(tokenizer, messages, self.answer_prefix, self.template)

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "answer_prefix": self.answer_prefix, "end_token_id": self.end_token_id,
                "stop_ids": list(self.stop_ids)}
