"""The task: how an example becomes a teacher request, and how an answer is read back."""

from __future__ import annotations

from ..recipe import TaskConfig
from ..teachers.base import Generate, Request

__all__ = ["render_request", "render_generation", "instruction_block"]

GENERATION_MAX_TOKENS = 256  # default answer length of a generation task (512 with a rationale)


def instruction_block(task: TaskConfig) -> str:
    """The instruction and the label list, identical for every text (so a teacher can cache it)."""
    lines = [task.instruction.strip(), "", "Labels:"]
    for label in task.labels:
        lines.append(f"- {label.name}: {label.description}" if label.description else f"- {label.name}")
    return "\n".join(lines)


def render_request(task: TaskConfig, text: str, rationale: bool = False) -> Request:
    """One user turn: instruction and labels first (shared by every text), then the text, then the answer
    format. Small chat models answer the text itself when it stands alone in a turn; framed like this they
    classify it. With ``rationale`` the teacher is asked to explain first and answer on a last line
    ``Answer: <label>`` (what :func:`protege.teachers.parse.split_rationale` reads)."""
    names = ", ".join(task.label_names)
    if rationale:
        ask = (
            "Which label fits the text? First explain your reasoning in a few sentences. Then give the final "
            f"answer on its own last line, exactly as 'Answer: <label>', where <label> is one of: {names}."
        )
    else:
        ask = f"Which label fits the text? Answer with one of: {names}."
    content = f"{instruction_block(task)}\n\nText:\n\"\"\"\n{text}\n\"\"\"\n\n{ask}"
    return Request(messages=({"role": "user", "content": content},), labels=task.label_names, text=text)


def render_generation(task: TaskConfig, text: str, max_tokens: int | None, top_logprobs: int) -> Request:
    """One user turn for a generation task: the instruction, a blank line, the text; with
    ``task.answer_format: rationale`` a request to explain first and answer on a last line 'Answer: ...'."""
    rationale = task.answer_format == "rationale"
    content = f"{task.instruction.strip()}\n\n{text}"
    if rationale:
        content += (
            "\n\nFirst explain your reasoning briefly. Then give the final answer on its own last line, exactly "
            "as 'Answer: <answer>'."
        )
    limit = max_tokens or (2 * GENERATION_MAX_TOKENS if rationale else GENERATION_MAX_TOKENS)
    return Request(
        messages=({"role": "user", "content": content},),
        labels=(),
        text=text,
        generate=Generate(max_tokens=limit, top_logprobs=top_logprobs, rationale=rationale),
    )
