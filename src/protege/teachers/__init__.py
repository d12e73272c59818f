"""Teachers turn rendered requests into teacher signals.

Backends live in a plain dict keyed by the prefix of the teacher spec (``hf:``, ``embed:``, ``openai:``,
``anthropic:``).
A teacher's ``kind`` says which protocol it follows (:mod:`protege.teachers.base`): ``"local"`` teachers answer
a batch at once (``signals``); ``"api"`` teachers answer one request at a time through the engine
(``answer``) or in a provider batch (``batches``). A backend is a
factory ``(spec_without_prefix, TeacherConfig) -> Teacher``; constructing one must be cheap (no weights
loaded) so a fully cached run never loads the model.
"""

from __future__ import annotations

from collections.abc import Callable

from ..recipe import TeacherConfig
from .base import ApiTeacher, LocalTeacher, Teacher

__all__ = ["Teacher", "LocalTeacher", "ApiTeacher", "BACKENDS", "make_teacher"]


def _hf(spec: str, cfg: TeacherConfig) -> Teacher:
    from .hf import make_hf_teacher

    return make_hf_teacher(spec, cfg)


def _embed(spec: str, cfg: TeacherConfig) -> Teacher:
    from .embed import EmbeddingTeacher

    return EmbeddingTeacher(spec, cfg)


def _openai(spec: str, cfg: TeacherConfig) -> Teacher:
    from .openai_api import OpenAITeacher

    return OpenAITeacher(spec, cfg)


def _anthropic(spec: str, cfg: TeacherConfig) -> Teacher:
    from .anthropic_api import AnthropicTeacher

    return AnthropicTeacher(spec, cfg)


BACKENDS: dict[str, Callable[[str, TeacherConfig], Teacher]] = {
    "hf": _hf, "embed": _embed, "openai": _openai, "anthropic": _anthropic,
}


def make_teacher(cfg: TeacherConfig) -> Teacher:
    prefix, spec = cfg.model.split(":", 1)
    if cfg.kind == "ensemble":
        from ..errors import ProtegeError

        raise ProtegeError(
            f"teacher {cfg.model!r} is an ensemble, not one model: its members answer "
            "(protege.labeling.ensemble); where one teacher must answer (a served cascade), use one of teacher.members"
        )
    return BACKENDS[prefix](spec, cfg)
