"""The one chat format of an LM student: how a conversation becomes prompt token ids, and the prefixes a
step-by-step student is trained with. Training, evaluation and serving all encode through here."""

from __future__ import annotations

from typing import Any

ANSWER_PREFIX = "[answer] "


EXPLAIN_PREFIX = "[explain] "


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> list[int]:
    """Token ids of the prompt: the chat template with the assistant's turn opened (plain text without one)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\nAnswer: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefixed(messages: tuple[dict[str, str], ...], prefix: str) -> tuple[dict[str, str], ...]:
    """The messages with ``prefix`` before the last user turn (distilling step-by-step's task prefixes)."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    return tuple({**m, "content": prefix + m["content"]} if i == last else m for i, m in enumerate(messages))
