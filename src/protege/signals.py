"""Teacher signals: the typed unit every stage after labeling consumes.

A signal records what the teacher said and how it was produced. One kind is never silently turned into
another: a hard label stays a hard label (a one-hot distribution whose ``method`` says so), and the method
travels with the signal into the training data and the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import TeacherError

__all__ = [
    "DistributionMethod",
    "LabelDistribution",
    "TokenLogprobs",
    "TeacherSignal",
]

DistributionMethod = Literal["logits", "label_logprobs", "samples", "hard_label", "embedding", "ensemble"]
"""How a label distribution was obtained.

- ``logits``: softmax of a classifier's own logits over the labels (full information).
- ``label_logprobs``: log-probabilities a language model gives each label string as its answer.
- ``samples``: the empirical distribution of n sampled answers.
- ``hard_label``: a single answer; the distribution is one-hot and carries no uncertainty.
- ``embedding``: softmax of a sentence-embedding model's cosine similarities to each label's prototype.
- ``ensemble``: a (weighted) mean of several teachers' distributions.
"""

_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class LabelDistribution:
    """A probability distribution over the task's labels, in the task's label order.

    ``covered_mass`` is the probability the teacher put on any of the labels before renormalising (1.0 for
    a classifier; below 1 for a language model that also wanted to say something else). It is reported, not
    hidden. ``raw_probs`` holds the distribution before contextual calibration, when calibration was applied.
    """

    labels: tuple[str, ...]
    probs: tuple[float, ...]
    method: DistributionMethod
    covered_mass: float = 1.0
    calibrated: bool = False
    raw_probs: tuple[float, ...] | None = None
    n_samples: int | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.probs):
            raise TeacherError(
                f"teacher returned {len(self.probs)} probabilities for {len(self.labels)} labels"
            )
        bad = [p for p in self.probs if not math.isfinite(p) or p < 0.0]
        if bad:
            raise TeacherError(
                f"teacher returned an invalid probability {bad[0]!r} (NaN, infinite or negative) over labels "
                f"{list(self.labels)}; check the teacher model and its inputs"
            )
        total = math.fsum(self.probs)
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise TeacherError(
                f"teacher's label distribution sums to {total:.6f}, not 1, over labels {list(self.labels)}"
            )
        if not (0.0 <= self.covered_mass <= 1.0 + _SUM_TOLERANCE) or not math.isfinite(self.covered_mass):
            raise TeacherError(f"teacher's covered probability mass {self.covered_mass!r} is not in [0, 1]")

    @property
    def top(self) -> str:
        """The most probable label (ties go to the earlier label)."""
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]

    @classmethod
    def one_hot(cls, labels: tuple[str, ...], label: str) -> LabelDistribution:
        return cls(labels, tuple(1.0 if x == label else 0.0 for x in labels), method="hard_label")


@dataclass(frozen=True)
class TokenLogprobs:
    """Top-k log-probabilities for every generated token, with the probability left in the tail.

    ``tokens[i]`` is the token the teacher produced at position i; ``top[i]`` maps token strings to
    log-probabilities (natural log) at that position; ``tail_mass[i] = 1 - sum(exp(top[i].values()))``.
    The tokenizer identity and sampling temperature are required to re-temper or map them later.
    ``temperature`` is that of the distribution the log-probabilities describe (1.0: the model's own), not
    of the sampling that chose the tokens.

    A local teacher also records token ids: ``ids[i]`` is the id of ``tokens[i]`` and ``top_ids[i]`` the ids
    of the alternatives, most likely first, with ``top_logprobs[i]`` their log-probabilities (a token string can
    stand for several ids, so a student with the same tokenizer trains on ids, not strings). API teachers
    return strings only; those are mapped onto a student's vocabulary at training time.
    """

    tokens: tuple[str, ...]
    top: tuple[dict[str, float], ...]
    tail_mass: tuple[float, ...]
    tokenizer: str
    temperature: float
    ids: tuple[int, ...] | None = None
    top_ids: tuple[tuple[int, ...], ...] | None = None
    top_logprobs: tuple[tuple[float, ...], ...] | None = None


@dataclass(frozen=True)
class TeacherSignal:
    """Everything one teacher call produced for one example.

    Which fields are set depends on the task and the teacher: classification fills ``distribution`` (and
    ``text`` with the answer an API teacher wrote, ``rationale`` with its explanation); generation fills
    ``text`` with the whole reply as generated (what ``token_logprobs`` describe, token by token), ``answer``
    with the final answer (the text itself, or with a rationale format what follows 'Answer:'; None when
    the reply has no such line) and ``rationale`` with the explanation before it. ``thinking`` holds a
    reasoning model's own thinking text where the API returns it, kept apart from all of these. A local
    teacher with the student's vocabulary may add ``logits`` (dense, per token).
    """

    distribution: LabelDistribution | None = None
    text: str | None = None
    answer: str | None = None
    rationale: str | None = None
    thinking: str | None = None
    truncated: bool = False  # generation: the reply was cut at the length limit (it did not end by itself)
    token_logprobs: TokenLogprobs | None = None
    logits: list[list[float]] | None = None
    usage: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_json` turns back into an equal signal."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {}) and not (k == "truncated" and not v)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TeacherSignal:
        dist = d.get("distribution")
        tl = d.get("token_logprobs")
        return cls(
            distribution=None
            if dist is None
            else LabelDistribution(
                labels=tuple(dist["labels"]),
                probs=tuple(dist["probs"]),
                method=dist["method"],
                covered_mass=dist.get("covered_mass", 1.0),
                calibrated=dist.get("calibrated", False),
                raw_probs=None if dist.get("raw_probs") is None else tuple(dist["raw_probs"]),
                n_samples=dist.get("n_samples"),
            ),
            text=d.get("text"),
            answer=d.get("answer"),
            rationale=d.get("rationale"),
            thinking=d.get("thinking"),
            truncated=d.get("truncated", False),
            token_logprobs=None
            if tl is None
            else TokenLogprobs(
                tokens=tuple(tl["tokens"]),
                top=tuple(tl["top"]),
                tail_mass=tuple(tl["tail_mass"]),
                tokenizer=tl["tokenizer"],
                temperature=tl["temperature"],
                ids=None if tl.get("ids") is None else tuple(tl["ids"]),
                top_ids=None if tl.get("top_ids") is None else tuple(tuple(x) for x in tl["top_ids"]),
                top_logprobs=None if tl.get("top_logprobs") is None else tuple(tuple(x) for x in tl["top_logprobs"]),
            ),
            logits=d.get("logits"),
            usage=d.get("usage", {}),
        )
