"""Prometheus metrics for a served student, at ``GET /metrics`` (the text exposition format).

Every app has its own :class:`prometheus_client.CollectorRegistry`, so two apps in one process (tests, a canary
beside the incumbent) never share or collide on a counter. Two sources feed it:

* :class:`MetricsMiddleware`, outside everything else (the API-key guard included, so its 401/413/429 count),
  sees each HTTP request: its endpoint, status, who answered (the ``x-protege-model`` header), how long it took
  until the last byte of the body was sent (a streamed answer included) and how many are in flight.
* :meth:`Metrics.record`, called with the rows the served ledger gets (one per answered text or conversation),
  counts answers by who answered, the student's confidence and the teacher's spend, so the counters add up to the
  store's ``served`` table.

Scrapes of ``/metrics`` itself are not counted. The names, types and labels (the README lists them for Grafana):

=======================================  =========  ==================================  ==============================
name                                     type       labels                              what
=======================================  =========  ==================================  ==============================
protege_requests_total                   counter    endpoint, status, answered_by       HTTP requests answered
protege_request_duration_seconds         histogram  endpoint, answered_by               request to last byte sent
protege_requests_in_flight               gauge      (none)                              requests being answered now
protege_answers_total                    counter    endpoint, answered_by               ledger rows: texts/conversations
protege_student_confidence               histogram  endpoint                            the student's confidence
protege_teacher_spend_usd_total          counter    (none)                              the cascade's teacher spend
protege_model_info                       gauge (1)  model, student, kind, version,      the served student (the version
                                                    cascade_threshold, canary_version,  changes on a live reload)
                                                    canary_fraction
=======================================  =========  ==================================  ==============================

``endpoint`` is ``chat.completions``, ``classify``, ``models`` or ``other`` (any other path: a 404's path is not
a label value, so a scanner cannot grow the series without bound); ``answered_by`` is ``student``, ``teacher``,
``mixed`` (a ``/v1/classify`` list answered by both) or ``none`` (an error, or a request no model answers);
an answer's ``answered_by`` is the ledger's: ``student``, ``teacher`` or ``none`` (the teacher was asked and
failed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from ..store import ServedRecord
from ..students.card import StudentCard, card_version

__all__ = ["METRICS_PATH", "Metrics", "MetricsMiddleware", "endpoint_of"]

METRICS_PATH = "/metrics"
MODEL_HEADER = b"x-protege-model"
# seconds: a student answers in milliseconds, a teacher behind the cascade in seconds (up to its timeout, 60 s)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


def endpoint_of(path: str) -> str:
    """The ``endpoint`` label of a request path (the ledger's names for the two that answer)."""
    if path == "/v1/chat/completions":
        return "chat.completions"
    if path == "/v1/classify":
        return "classify"
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return "models"
    return "other"


class Metrics:
    """The served student's metrics, in a registry of their own (:attr:`registry`)."""

    def __init__(self, student_dir: Path, model_id: str, cascade_threshold: float | None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("protege_requests", "HTTP requests answered, by endpoint, status and who answered.",
                                ["endpoint", "status", "answered_by"], registry=r)
        self.latency = Histogram("protege_request_duration_seconds",
                                 "Seconds from a request's arrival to the last byte of its answer.",
                                 ["endpoint", "answered_by"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("protege_requests_in_flight", "Requests being answered now.", registry=r)
        self.answers = Counter("protege_answers", "Answered texts (a /v1/classify list counts each) and "
                               "conversations, as the served ledger records them.", ["endpoint", "answered_by"],
                               registry=r)
        self.confidence = Histogram("protege_student_confidence", "The student's confidence in each answer it "
                                    "read (what the cascade routes by).", ["endpoint"], buckets=CONFIDENCE_BUCKETS,
                                    registry=r)
        self.teacher_spend = Counter("protege_teacher_spend_usd", "USD the cascade's teacher cost (API money, or a "
                                     "local teacher's compute); answers from the store cost nothing.", registry=r)
        card = StudentCard.read(student_dir)
        self.info = Info("protege_model", "The served student: its id, directory name, kind, card hash (version), "
                         "cascade threshold, and a canary's version and share of requests.", registry=r)
        self._model = {
            "model": model_id,
            "student": Path(student_dir).resolve().name,
            "kind": card.kind,
            "version": card_version(student_dir),
            "cascade_threshold": "" if cascade_threshold is None else f"{cascade_threshold:g}",
        }
        self.serving(self._model["version"])

    def serving(self, version: str, canary_version: str | None = None, canary_fraction: float | None = None) -> None:
        """Say which version serves now (after a reload) and which, if any, answers a canary's share."""
        self.info.info({**self._model, "version": version, "canary_version": canary_version or "",
                        "canary_fraction": "" if not canary_version or canary_fraction is None
                        else f"{canary_fraction:g}"})

    def record(self, rows: Sequence[ServedRecord]) -> None:
        """Count the ledger's rows: answers, the student's confidence, the teacher's spend."""
        for row in rows:
            self.answers.labels(row.endpoint, row.answered_by).inc()
            if row.confidence is not None:
                self.confidence.labels(row.endpoint).observe(row.confidence)
            if row.teacher_usd:
                self.teacher_spend.inc(row.teacher_usd)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Times and counts every HTTP request but the scrapes of ``/metrics`` (pure ASGI, so a streamed answer is
    timed to its last chunk and nothing is buffered)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            return await self.app(scope, receive, send)
        m, start = self.metrics, time.perf_counter()
        status: int | None = None
        by = "none"

        async def sending(message: Any) -> None:
            nonlocal status, by
            if message["type"] == "http.response.start":
                status = message["status"]
                by = dict(message.get("headers") or []).get(MODEL_HEADER, b"none").decode("latin-1")
            await send(message)

        m.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500  # uvicorn answers a crash that escaped every handler with a 500
            raise
        finally:
            m.in_flight.dec()
            endpoint = endpoint_of(scope.get("path", ""))
            # the app returns after its last body chunk is sent, so this times a streamed answer whole; no answer
            # started means the client went away first (nginx's 499)
            m.requests.labels(endpoint, str(status or 499), by).inc()
            m.latency.labels(endpoint, by).observe(time.perf_counter() - start)
