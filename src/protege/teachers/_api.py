"""What every API teacher shares: the key from the environment, secret scrubbing, error classification,
and building a signal from parsed answers."""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..errors import PermanentError, RecipeError
from ..signals import LabelDistribution, TeacherSignal, TokenLogprobs
from .base import Generate
from .parse import ParseError, parse_label, split_rationale

__all__ = [
    "api_key",
    "scrub",
    "retry_after",
    "permanent_message",
    "answer_and_rationale",
    "sampled_distribution",
    "default_max_tokens",
    "no_logprobs_error",
    "generation_signal",
]

_KEYLIKE = re.compile(r"\b(sk|key|pk|rk)-[A-Za-z0-9_\-*.]{4,}")


def api_key(env: str | None, provider: str) -> str:
    """The key from the environment variable ``env`` (never from a file, never logged)."""
    if env is None:
        return "not-needed"  # a local server; the SDKs insist on a non-empty key
    value = os.environ.get(env, "").strip()
    if not value:
        raise RecipeError(
            f"the {provider} API key is not set: export {env}=... in the environment "
            "(or name another variable in teacher.api_key_env)"
        )
    return value


def scrub(text: str, key: str | None) -> str:
    """``text`` with the key, and anything shaped like a key, masked. Error bodies sometimes echo keys."""
    if key and len(key) >= 4 and key != "not-needed":
        text = text.replace(key, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "-***", text)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


def public_url(url: str | None) -> str | None:
    """``url`` as it may be shown or written: without a user:password part or a query string (where some servers
    take a key)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None and not parts.query:
        return url
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def permanent_message(provider: str, model: str, base_url: str, status: int, message: str, key_env: str | None) -> str:
    """What went wrong and what to change, for errors a retry cannot fix (the base URL without credentials: the
    message is printed, and `protege compare` writes it into its report)."""
    base_url = public_url(base_url) or ""
    fix = {
        400: "the provider rejected the request; check teacher.max_tokens, teacher.top_logprobs and "
        "teacher.label_method against what this model supports",
        401: f"the API key was refused; check the key in ${key_env}" if key_env else "the server wants an API key; "
        "set teacher.api_key_env to the variable that holds it",
        403: f"the key has no access to {model!r}; check the account's permissions or pick another model",
        404: f"model {model!r} (or the endpoint) was not found at {base_url}; check teacher.model and teacher.base_url",
        422: "the provider could not process the request; check the teacher settings",
    }.get(status, "check the teacher settings")
    return f"{provider} refused the request with HTTP {status}: {message}. Fix: {fix}"


def default_max_tokens(max_tokens: int | None, rationale: bool) -> int:
    return max_tokens or (512 if rationale else 16)


def answer_and_rationale(text: str, rationale: bool) -> tuple[str, str | None, int]:
    """(answer text, rationale, offset of the answer in ``text``)."""
    if not rationale:
        return text.strip(), None, 0
    why, answer, offset = split_rationale(text)
    return answer, why or None, offset


def sampled_distribution(texts: Sequence[str], labels: Sequence[str], rationale: bool) -> LabelDistribution:
    """The empirical distribution of sampled answers; unparseable samples are left out and counted in
    ``covered_mass`` (parsed / sampled). No parseable sample at all is a ParseError."""
    counts = dict.fromkeys(labels, 0)
    reasons = []
    for text in texts:
        try:
            counts[parse_label(answer_and_rationale(text, rationale)[0], labels)] += 1
        except ParseError as e:
            reasons.append(e.reason)
    parsed = sum(counts.values())
    if parsed == 0:
        raise ParseError(f"none of {len(texts)} samples named a label (first: {reasons[0]})", "\n---\n".join(texts))
    return LabelDistribution(
        labels=tuple(labels),
        probs=tuple(counts[x] / parsed for x in labels),
        method="samples",
        covered_mass=parsed / len(texts),
        n_samples=parsed,
    )


def no_logprobs_error(provider: str, model: str) -> PermanentError:
    return PermanentError(
        f"{provider} returned no logprobs for {model!r}, so teacher.label_method 'logprobs' cannot work; "
        "set teacher.label_method to 'samples' (n sampled answers) or 'hard_label'"
    )


def generation_signal(
    text: str,
    gen: Generate,
    *,
    truncated: bool,
    thinking: str | None = None,
    token_logprobs: TokenLogprobs | None = None,
) -> TeacherSignal:
    """The signal of a generation request: the whole reply, and with a rationale format the explanation and
    the final answer apart. An empty reply is a ParseError (retried, then recorded as a failure); a reply with
    no 'Answer:' line keeps its text with ``answer`` None, which the signal dataset reports."""
    if not text.strip():
        raise ParseError("the reply is empty", text)
    answer: str | None = text.strip()
    why = None
    if gen.rationale:
        try:
            why, answer, _ = split_rationale(text)
        except ParseError:
            answer = None
    return TeacherSignal(
        text=text, answer=answer, rationale=why or None, thinking=thinking, truncated=truncated,
        token_logprobs=token_logprobs,
    )
