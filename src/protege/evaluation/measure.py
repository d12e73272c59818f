"""Figures every report shares: the latency summary, cost per 1,000 requests, calibration, and what an API
teacher's calls cost and took, from the store. Export (:mod:`protege.export`) times its runtimes with the same
:func:`time_calls` and :func:`summarize_latency`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtegeError
from ..recipe import Recipe
from ..store import Store


def _api_teacher_figures(recipe: Recipe, keys: list[str]) -> tuple[Speed, dict[str, Any]]:
    """An API teacher's latency and price per 1,000 texts, from what labeling recorded: each held-out row's
    wall time (retries and rate-limit waits included, as the user waited for them), its recorded spend, and
    the rows per second the labeling runs achieved."""
    with Store(recipe.store_path) as store:
        recorded = [(u.seconds, u.cost_usd) for u in store.call_usage(keys).values() if u.status == "ok"]
        runs = store.labeling_throughput()
    if not recorded:
        raise ProtegeError("the store holds none of the held-out answers; run `protege label` first")
    lat = summarize_latency([s for s, _ in recorded])
    seconds, labeled = runs
    throughput = labeled / seconds if seconds and labeled else recipe.teacher.concurrency / (lat.mean / 1e3)
    speed = Speed(lat, throughput)
    per_row = statistics.mean(c for _, c in recorded)
    return speed, {"usd_per_1k": 1000 * per_row, "price_source": "recorded API spend"}


def expected_calibration_error(probs: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over equal-width confidence bins.

    probs: (N, C) predicted distributions; correct: (N,) bool, whether the top label was right.
    """
    conf = probs.max(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


# --------------------------------------------------------------------------------------------------------------
# latency and cost: one definition each, for evaluation, export, benchmarks and `protege cost`


@dataclass(frozen=True)
class LatencySummary:
    """Wall times of single calls, in milliseconds: p50 is the median, p95 the 19th of the 20-quantiles
    (``statistics.quantiles``, its default "exclusive" method), mean the arithmetic mean; ``runs`` calls."""

    runs: int
    p50: float
    p95: float
    mean: float

    def as_ms(self) -> dict[str, float]:
        """{"p50", "p95", "mean"}: the export report's form (``pytorch_ms``, ``onnxruntime_ms``, ...)."""
        return {"p50": self.p50, "p95": self.p95, "mean": self.mean}

    def report_fields(self) -> dict[str, float]:
        """{"latency_ms_p50", "latency_ms_p95"}: the evaluation report's form (one row per model)."""
        return {"latency_ms_p50": self.p50, "latency_ms_p95": self.p95}


def summarize_latency(seconds: Sequence[float]) -> LatencySummary:
    """The :class:`LatencySummary` of per-call wall times given in seconds; a single call is its own p50 and p95."""
    if not seconds:
        raise ValueError("no timings to summarize: time at least one call")
    ms = [1e3 * s for s in seconds]
    p95 = statistics.quantiles(ms, n=20)[18] if len(ms) > 1 else ms[0]
    return LatencySummary(len(ms), statistics.median(ms), p95, statistics.fmean(ms))


def time_calls(calls: Sequence[Callable[[int], object]], runs: int, warmup: int = 0) -> list[list[float]]:
    """Wall seconds of each of ``calls`` in each of ``runs`` rounds, after ``warmup`` untimed rounds.

    ``call(i)`` gets the round number (0 is the first warm-up round), to pick its input. Within a round the
    calls run one after the other, so when comparing runtimes each sees the same state of the machine (a
    burst of other work slows both, not one)."""
    times: list[list[float]] = [[] for _ in calls]
    for i in range(warmup + runs):
        for call, out in zip(calls, times):
            t0 = time.perf_counter()
            call(i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                out.append(dt)
    return times


@dataclass(frozen=True)
class Speed:
    """How fast a model answers on this machine: the latency of one request at a time, and the requests per
    second it gets through the way it is served (batched for a classifier, one at a time for an LM)."""

    latency: LatencySummary
    throughput_per_s: float

    def report_fields(self) -> dict[str, float]:
        return {**self.latency.report_fields(), "throughput_per_s": self.throughput_per_s}


def compute_cost(throughput_per_s: float, usd_per_hour: float) -> dict[str, Any]:
    """Cost per 1,000 requests of a model run on this machine, priced by the hour:

        compute_seconds_per_1k = 1000 / throughput_per_s,   usd_per_1k = compute_seconds_per_1k / 3600 * usd_per_hour

    The machine time 1,000 requests occupy at the rate the model gets through them as it is served, not one
    request's latency: a batched classifier shares each pass among its batch (as the served-traffic ledger
    charges each text its share, :mod:`protege.serve.ledger`); an LM answers one request at a time, so there
    1000 / throughput_per_s = 1,000 x its mean latency."""
    if throughput_per_s <= 0:
        raise ValueError(f"throughput_per_s must be > 0 to price it, not {throughput_per_s}")
    seconds = 1000 / throughput_per_s
    return {"compute_seconds_per_1k": seconds, "usd_per_1k": seconds / 3600 * usd_per_hour, "price_source": "compute"}
