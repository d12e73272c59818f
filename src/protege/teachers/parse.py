"""Reading labels back out of a language model's answer: from its text, and from its token log-probabilities.

Nothing here guesses. An answer that names no label, or more than one, is a :class:`ParseError` carrying the
reason; the engine retries it a set number of times and then records it as failed with the raw text.
Probability mass that cannot be attributed to exactly one label is reported as uncovered, never hidden.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..signals import LabelDistribution

__all__ = ["ParseError", "TokenStep", "split_rationale", "parse_label", "distribution_from_logprobs"]

_DECOR = " \t\r\n\"'`*_.:;,!?()[]{}<>"
MIN_PREFIX = 4  # characters an off-path token must spell of a longer label to count for it
_ANSWER_LINE = re.compile(r"^[\s*#_>-]*(?:final\s+)?answer[\s*_]*[:\-][\s*_]*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


class ParseError(Exception):
    """The teacher answered, but the answer does not name exactly one label. ``raw`` is what it said."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


@dataclass(frozen=True)
class TokenStep:
    """One generated token: its text, log-probability, and the top alternatives at that position."""

    token: str
    logprob: float
    top: dict[str, float]


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip(_DECOR)).casefold()


def split_rationale(text: str) -> tuple[str, str, int]:
    """``(rationale, answer, answer_offset)`` of an 'explain, then answer' reply.

    The answer is what follows the last ``Answer:`` line; ``answer_offset`` is its character offset in ``text``.
    """
    matches = list(_ANSWER_LINE.finditer(text))
    if not matches:
        raise ParseError("the reply has no final line 'Answer: <label>'", text)
    m = matches[-1]
    return text[: m.start()].strip(), m.group(1), m.start(1)


def parse_label(answer: str, labels: Sequence[str]) -> str:
    """The one label ``answer`` names: an exact match ignoring case, spacing and quotes, else the only label
    that occurs in it as a whole word."""
    norm = _norm(answer)
    by_norm = {_norm(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    found = [
        label for n, label in by_norm.items() if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", norm) is not None
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ParseError(f"the answer {answer[:200]!r} names none of the labels {list(labels)}", answer)
    raise ParseError(f"the answer {answer[:200]!r} names several labels: {found}", answer)


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).casefold()


def _attribute(
    steps: Sequence[TokenStep], pos: int, cands: dict[str, str], mass: float, out: dict[str, float], first: bool
) -> None:
    """Spread ``mass`` (the probability of reaching ``pos`` on the generated path) over the labels in
    ``cands`` (label -> the part of it still to be spelled) using the alternatives at ``pos``.

    Alternatives consistent with exactly one label go to it, except a prefix shorter than ``MIN_PREFIX``
    characters off the generated path. An alternative consistent with several labels is followed down the
    generated path when it is the token the teacher produced; otherwise its mass stays unattributed, because
    the API shows nothing beyond the generated path.
    """
    step = steps[pos]
    top = dict(step.top)
    top.setdefault(step.token, step.logprob)
    for alt, lp in top.items():
        p = mass * math.exp(lp)
        n = _squash(alt.lstrip(_DECOR) if first else alt)
        if not n or not n[0].isalnum():
            done = [label for label, rest in cands.items() if rest == ""]
            if len(done) == 1:
                out[done[0]] += p
            continue
        match = {}
        for label, rest in cands.items():
            if rest.startswith(n):
                match[label] = rest[len(n) :]
            elif rest and n.startswith(rest) and not n[len(rest)].isalnum():
                match[label] = ""
        on_path = alt == step.token
        if len(match) == 1:
            label, rest = next(iter(match.items()))
            # A short prefix off the generated path ('A' for 'account', 'B' for 'billing') is more likely a
            # word of its own than the start of the label: leave its mass unattributed.
            if on_path or not rest or len(n) >= min(MIN_PREFIX, len(cands[label])):
                out[label] += p
        elif len(match) > 1 and on_path and pos + 1 < len(steps):
            _attribute(steps, pos + 1, match, p, out, first=False)
        elif len(match) > 1 and on_path:  # the reply ended on a shared prefix
            done = [label for label, rest in match.items() if rest == ""]
            if len(done) == 1:
                out[done[0]] += p


def distribution_from_logprobs(
    steps: Sequence[TokenStep], labels: Sequence[str], answer_offset: int = 0
) -> LabelDistribution:
    """The label distribution at the answer position of a generated reply.

    The answer position is the first token at or after character ``answer_offset`` that is not whitespace or
    decoration (a quote, an asterisk). Token strings are matched to labels ignoring case and whitespace (so
    ' Billing' and 'billing' both count); a label spelled by several tokens is followed down the generated
    path. ``covered_mass`` is the probability that landed on a label; the rest is reported, not spread.
    """
    offset = 0
    pos = None
    for i, step in enumerate(steps):
        end = offset + len(step.token)
        if end > answer_offset and step.token[max(0, answer_offset - offset) :].strip(_DECOR):
            pos = i
            break
        offset = end
    if pos is None:
        raise ParseError("the reply has no answer token", "".join(s.token for s in steps))
    out = {label: 0.0 for label in labels}
    _attribute(steps, pos, {label: _squash(label) for label in labels}, 1.0, out, first=True)
    covered = math.fsum(out.values())
    if covered <= 0.0:
        alts = sorted(steps[pos].top.items(), key=lambda kv: -kv[1])[:5]
        raise ParseError(
            f"no label among the top alternatives at the answer position: {[a for a, _ in alts]}",
            "".join(s.token for s in steps),
        )
    return LabelDistribution(
        labels=tuple(labels),
        probs=tuple(out[label] / covered for label in labels),
        method="label_logprobs",
        covered_mass=min(1.0, covered),
    )
