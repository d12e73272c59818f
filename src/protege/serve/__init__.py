"""Serve a trained student over HTTP as a drop-in replacement for an OpenAI-style API.

Endpoints (all JSON; errors always in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

* ``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model, ``owned_by: "protege"``.
* ``POST /v1/chat/completions``: OpenAI's chat completion format. The request's ``model`` may be any name; the
  response names the model that answered.

  - A classifier student classifies the content of the last ``user`` message (a string, or the ``text`` parts of
    a content list, joined by newlines); the answer's content is the predicted label. ``logprobs: true``
    returns one token, the label, whose ``top_logprobs`` are the labels with their log-probabilities (up to
    ``top_logprobs`` of them, most likely first). ``n`` > 1 is refused (a classifier has one answer); sampling
    settings (temperature, max_tokens, ...) are accepted and ignored.
  - A language-model student answers the conversation (see :mod:`protege.serve.lm`): ``max_tokens`` /
    ``max_completion_tokens`` (at most the server's ``max_new_tokens``), ``temperature``, ``top_p``, ``stop``,
    ``seed``, ``logprobs``/``top_logprobs`` and usage.

  ``stream: true`` answers with server-sent events in OpenAI's chunk format (``stream_options.include_usage``
  adds the usage chunk).
* ``POST /v1/classify`` (classifier students): ``{"input": "text" | ["text", ...], "model"?: str}`` ->
  ``{"object": "list", "model", "data": [{"index", "label", "probs": {label: p}, "confidence",
  "answered_by"}], "usage": {"prompt_tokens", "total_tokens"}}``.

Every answer says which model answered: the header ``x-protege-model`` (``student``, ``teacher``, or ``mixed``
for a ``/v1/classify`` list answered by both), ``answered_by`` per text in ``/v1/classify``, and a chat
completion's ``model``, which is the served model's id for the student and the teacher's (e.g.
``openai:gpt-4o-mini``) when the teacher answered.

Cascade (optional): with a threshold, the student answers when its confidence is at least the threshold and the
teacher otherwise, asked through labeling's code path and store (see :mod:`protege.serve.fallback`): an answer the store
holds costs nothing, the budget cap holds. A classifier's confidence is its top label probability; a teacher's
answer then has the logs of the teacher's label distribution as logprobs. A language-model student's confidence
is the geometric mean of the probabilities of the tokens it chose (exp of the mean token log-probability, the
end-of-answer token included): it decodes its whole answer first (so a streamed answer starts once the choice is
made), and an unsure answer is replaced by the teacher's answer to the same conversation, greedy, up to the
client's ``max_tokens`` (without one, the recipe's limit, so a conversation labeled before comes from the store),
cut at the client's stop strings. A teacher that fails or refuses gives a 502, a spent budget or a teacher slower
than ``teacher_timeout_s`` a 503, both in OpenAI's error format.

Ledger: with a store, every answered text or conversation becomes a row of its ``served`` table (who answered,
endpoint, tokens, cost, compute seconds, the student's confidence, the teacher's call key), written in batches
off the event loop; ``protege cost`` reads it. With ``capture``, each row's input and answer are kept too, redacted,
in its ``captured`` table, within a retention limit (see :mod:`protege.serve.capture`).

Metrics: ``GET /metrics`` answers Prometheus' text format from the app's own registry: requests by endpoint,
status and who answered, latency, requests in flight, answers as the ledger counts them, the student's confidence,
the teacher's spend and the served model (see :mod:`protege.serve.metrics`).

``app.openapi()`` declares every answer an operation can give (the 200's shape, text/event-stream for a streamed
chat, and each error status in OpenAI's format); the fuzz test holds the server to it. It is not served over HTTP.

A classifier gathers concurrent requests into one forward pass: each waits on an asyncio queue, a batcher task
takes what arrives within ``batch_wait_ms`` (or until ``max_batch`` texts) and runs the model in a worker
thread, so the event loop keeps accepting requests. Texts longer than the student's max length are truncated, as
in training and evaluation. A language model decodes one answer at a time in its own worker thread.

Safety: with an API key every request needs ``Authorization: Bearer <key>`` (compared in constant time);
:func:`serve` refuses a non-loopback host without one, and reads the key only from an environment variable.
Bodies over ``max_body_bytes`` get 413, more than ``max_concurrency`` requests in flight get 429, and bad
input gets 400 (never 500).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from ..errors import MissingExtra, ProtegeError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise MissingExtra(e.name or "fastapi", "serve", "`protege serve`") from None

from .app import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, create_app
from .workers import Classifier

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CONCURRENCY", "Classifier", "create_app",
           "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """True only for hosts that cannot be reached from another machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public interface


def serve(
    student_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    *,
    log_level: str = "info",
    graceful_timeout_s: float | None = 30.0,
    **options: Any,
) -> None:
    """Serve the student until interrupted; on SIGINT/SIGTERM uvicorn stops accepting connections and lets
    requests in flight finish (up to ``graceful_timeout_s``). ``options`` are :func:`create_app`'s settings
    (limits, batching, store, cascade).

    The API key, if any, is read from the environment variable named ``api_key_env`` (never from a flag or a
    file, so it stays out of shell history and process lists). A host other than loopback needs one."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env, "").strip()
        if not api_key:
            raise ProtegeError(f"the environment variable {api_key_env} (named by --api-key-env) is unset or empty; "
                               "export the key clients must send, then retry")
    if not is_loopback(host) and not api_key:
        raise ProtegeError(
            f"refusing to listen on {host!r} without an API key: anyone who can reach it could use the model. "
            "Export a key and pass --api-key-env NAME, or listen on 127.0.0.1"
        )
    try:
        import uvicorn
    except ImportError:
        raise MissingExtra("uvicorn", "serve", "`protege serve`") from None
    app = create_app(student_dir, api_key=api_key, **options)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                    server_header=False)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; stopping is the normal end
        pass
