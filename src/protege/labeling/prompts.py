"""The task: how an example becomes a teacher request, and how an answer is read back."""

from __future__ import annotations

from collections.abc import Sequence

from ..recipe import FewShotExample, TaskConfig
from ..teachers.base import Generate, Request

__all__ = ["conversation_request", "render_request", "render_generation", "instruction_block"]

GENERATION_MAX_TOKENS = 256  # default answer length of a generation task (512 with a rationale)


def instruction_block(task: TaskConfig) -> str:
    """The instruction and the label list, identical for every text (so a teacher can cache it)."""
    lines = [task.instruction.strip(), "", "Labels:"]
    for label in task.labels:
        lines.append(f"- {label.name}: {label.description}" if label.description else f"- {label.name}")
    return "\n".join(lines)


def _canonical_label(task: TaskConfig, label: str) -> str:
    by_key = {name.strip().casefold(): name for name in task.label_names}
    return by_key.get(label.strip().casefold(), label)


def render_request(
    task: TaskConfig, text: str, rationale: bool = False, examples: Sequence[FewShotExample] = ()
) -> Request:
    """One user turn: instruction and labels first (shared by every text), then the text, then the answer
    format. Small chat models answer the text itself when it stands alone in a turn; framed like this they
    classify it. With ``rationale`` the teacher is asked to explain first and answer on a last line
    ``Answer: <label>`` (what :func:`protege.teachers.parse.split_rationale` reads).

    Worked examples (``task.examples`` and those drawn by ``teacher.few_shot``) come first, each a user turn
    (the instruction and labels only in the first) answered by an assistant turn with its label, so the
    teacher sees the task done before it does it. Without examples the request is exactly what it was before examples existed (same cache key).
    """
    names = ", ".join(label.name for label in task.labels)
    if rationale:
        ask = (
            "Which label fits the text? First explain your reasoning in a few sentences. Then give the final "
            f"answer on its own last line, exactly as 'Answer: <label>', where <label> is one of: {names}."
        )
    else:
        ask = f"Which label fits the text? Answer with one of: {names}."

    block = instruction_block(task)

    def turn(t: str, first: bool) -> dict[str, str]:
        head = f"{block}\n\n" if first else ""  # said once, in the first turn
        return {"role": "user", "content": f"{head}Text:\n\"\"\"\n{t}\n\"\"\"\n\n{ask}"}

    shots = [(e.text, _canonical_label(task, e.label)) for e in examples]
    messages: list[dict[str, str]] = []
    for t, label in shots:
        answer = f"Answer: {label}" if rationale else label
        messages += [turn(t, not messages), {"role": "assistant", "content": answer}]
    messages.append(turn(text, not messages))
    return Request(
        messages=tuple(messages),
        labels=task.label_names,
        text=text,
        label_descriptions=tuple(label.description for label in task.labels),
        examples=tuple(shots),
    )


def render_generation(
    task: TaskConfig, text: str, max_tokens: int | None, top_logprobs: int, examples: Sequence[FewShotExample] = ()
) -> Request:
    """One user turn for a generation task: the instruction, a blank line, the text; with
    ``task.answer_format: rationale`` a request to explain first and answer on a last line 'Answer: ...'.
    Worked examples come first as the same turn answered by the example's answer."""
    rationale = task.answer_format == "rationale"

    def turn(t: str) -> dict[str, str]:
        content = f"{task.instruction.strip()}\n\n{t}"
        if rationale:
            content += (
                "\n\nFirst explain your reasoning briefly. Then give the final answer on its own last line, "
                "exactly as 'Answer: <answer>'."
            )
        return {"role": "user", "content": content}

    messages: list[dict[str, str]] = []
    for e in examples:
        messages += [turn(e.text), {"role": "assistant", "content": f"Answer: {e.label}" if rationale else e.label}]
    messages.append(turn(text))
    limit = max_tokens or (2 * GENERATION_MAX_TOKENS if rationale else GENERATION_MAX_TOKENS)
    return Request(
        messages=tuple(messages),
        labels=(),
        text=text,
        generate=Generate(max_tokens=limit, top_logprobs=top_logprobs, rationale=rationale),
    )


def conversation_request(
    task: TaskConfig, messages: Sequence[dict[str, str]], max_tokens: int | None, top_logprobs: int
) -> Request:
    """The teacher's request for a served conversation (the cascade's fallback, and ``protege improve`` reading
    captured traffic, so the two share cache keys): the conversation as the client sent it, greedy, up to
    ``max_tokens`` (None: the task's limit, the one labeling used), with the task's answer format."""
    from dataclasses import replace

    user = [m["content"] for m in messages if m["role"] == "user"]
    labeled = render_generation(task, user[-1] if user else "", max_tokens, top_logprobs)
    assert labeled.generate is not None
    return Request(messages=tuple(dict(m) for m in messages), labels=(), text=labeled.text, generate=labeled.generate)
