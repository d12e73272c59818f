"""Figures every report shares: calibration, and what an API teacher's calls cost and took, from the store."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from ..errors import ProtegeError
from ..recipe import Recipe
from ..store import Store


def _api_teacher_figures(recipe: Recipe, keys: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """An API teacher's latency and price per 1,000 texts, from what labeling recorded: each held-out row's
    wall time (retries and rate-limit waits included, as the user waited for them), its recorded spend, and
    the rows per second the labeling runs achieved."""
    with Store(recipe.store_path) as store:
        recorded = [(u.seconds, u.cost_usd) for u in store.call_usage(keys).values() if u.status == "ok"]
        runs = store.labeling_throughput()
    if not recorded:
        raise ProtegeError("the store holds none of the held-out answers; run `protege label` first")
    lat = sorted(1e3 * s for s, _ in recorded)
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [lat[0]] * 19
    seconds, labeled = runs
    throughput = labeled / seconds if seconds and labeled else recipe.teacher.concurrency / (statistics.mean(lat) / 1e3)
    speed = {"latency_ms_p50": statistics.median(lat), "latency_ms_p95": q[18], "throughput_per_s": throughput}
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
