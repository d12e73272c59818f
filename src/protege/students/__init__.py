"""Students: the small models protege trains, saved as Hugging Face model directories with a card.

``classifier`` (an encoder with a classification head), ``lm`` (a causal language model), ``chat`` (the one
prompt format and stop tokens training, evaluation, serving and export share), ``generate`` (the one decoding
loop evaluation and serving share), ``card`` (``protege.json``: what running a saved student needs)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ProtegeError
from .card import CARD, StudentCard

__all__ = ["CARD", "StudentCard", "student_kind"]


def student_kind(student_dir: Path, command: str) -> tuple[str, str]:
    """("classifier" | "lm", architecture name) of a saved student, from its config.json's ``architectures``;
    ``command`` (e.g. "protege serve") names what the user ran, in the errors."""
    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise ProtegeError(f"{str(student_dir)!r} is not a directory; point `{command}` at a trained student")
    cfg_path = student_dir / "config.json"
    if not cfg_path.is_file():
        raise ProtegeError(
            f"{str(student_dir)!r} is not a trained protege student: it has no config.json. Point `{command}` at "
            "the student directory `protege train` wrote (a Hugging Face model directory)"
        )
    try:
        archs = json.loads(cfg_path.read_text(encoding="utf-8")).get("architectures") or []
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise ProtegeError(f"{str(cfg_path)!r} is not a JSON object; the student directory is damaged") from None
    for arch in archs:
        if isinstance(arch, str) and arch.endswith("ForSequenceClassification"):
            return "classifier", arch
        if isinstance(arch, str) and arch.endswith("ForCausalLM"):
            return "lm", arch
    raise ProtegeError(
        f"{str(cfg_path)!r} names architectures {archs}; `{command}` supports sequence classifiers "
        "(*ForSequenceClassification) and causal LMs (*ForCausalLM)"
    )
