"""Teachers turn rendered requests into teacher signals.

Backends live in a plain dict keyed by the prefix of the teacher spec (``hf:``, ``openai:``, ``anthropic:``).
Local teachers answer a batch at once (``signals``); API teachers answer one request at a time through the
engine (``answer``, see :class:`protege.engine.ApiTeacher`). A backend is a
factory ``(spec_without_prefix, TeacherConfig) -> Teacher``; constructing one must be cheap (no weights
loaded) so a fully cached run never loads the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..recipe import TeacherConfig
from ..signals import TeacherSignal
from ..task import Request

__all__ = ["Teacher", "LocalTeacher", "BACKENDS", "make_teacher"]


class Teacher(Protocol):
    """``identity`` is everything about the teacher that determines its answers; it enters every cache key
    (never a key or a URL). A local teacher also has ``signals`` (below); an API teacher has ``answer``
    (:class:`protege.engine.ApiTeacher`)."""

    identity: dict[str, Any]


class LocalTeacher(Teacher, Protocol):
    """A model in this process: answers a batch of requests at once."""

    def signals(self, requests: Sequence[Request]) -> list[TeacherSignal]: ...


def _hf(spec: str, cfg: TeacherConfig) -> Teacher:
    from .hf import make_hf_teacher

    return make_hf_teacher(spec, cfg)


def _openai(spec: str, cfg: TeacherConfig) -> Teacher:
    from .openai_api import OpenAITeacher

    return OpenAITeacher(spec, cfg)


def _anthropic(spec: str, cfg: TeacherConfig) -> Teacher:
    from .anthropic_api import AnthropicTeacher

    return AnthropicTeacher(spec, cfg)


BACKENDS: dict[str, Callable[[str, TeacherConfig], Teacher]] = {"hf": _hf, "openai": _openai, "anthropic": _anthropic}


def make_teacher(cfg: TeacherConfig) -> Teacher:
    prefix, spec = cfg.model.split(":", 1)
    return BACKENDS[prefix](spec, cfg)
