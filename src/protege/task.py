"""The task: how an example becomes a teacher request, and how an answer is read back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .recipe import TaskConfig

__all__ = ["Request", "render_request", "CONTENT_FREE_INPUTS"]

# Inputs that carry no content, for contextual calibration (Zhao et al., 2021, "Calibrate Before Use").
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class Request:
    """One rendered teacher request: chat messages plus the label set the answer must come from.

    Everything that determines the teacher's answer is here or in the teacher's identity; the store's
    cache key is a hash of both.
    """

    messages: tuple[dict[str, str], ...]
    labels: tuple[str, ...]
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"messages": list(self.messages), "labels": list(self.labels)}


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
