"""The one latency summary and the one definition of cost per 1,000 requests (protege.evaluation.measure), and
that no command or server leaves state behind it (the hub's offline switch, the LM's generation thread)."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
from click.testing import CliRunner

from protege.cli import cli
from protege.evaluation.measure import LatencySummary, Speed, compute_cost, summarize_latency, time_calls
from protege.serve.ledger import served_record

# --------------------------------------------------------------------------------------------------------------
# the latency summary


def test_latency_summary_pinned_and_against_numpy():
    seconds = [i / 1000 for i in range(20, 0, -1)]  # 20 ms down to 1 ms, in no particular order of arrival
    s = summarize_latency(seconds)
    # exclusive method: p95 at rank 0.95 * (n + 1) = 19.95, between 19 and 20 ms
    assert s == LatencySummary(runs=20, p50=pytest.approx(10.5), p95=pytest.approx(19.95), mean=pytest.approx(10.5))
    ms = np.array(seconds) * 1e3
    assert s.p95 == pytest.approx(np.percentile(ms, 95, method="weibull"))  # numpy's name for the same rule
    assert s.p50 == pytest.approx(np.median(ms)) and s.mean == pytest.approx(ms.mean())
    assert s.as_ms() == {"p50": s.p50, "p95": s.p95, "mean": s.mean}
    assert s.report_fields() == {"latency_ms_p50": s.p50, "latency_ms_p95": s.p95}


def test_latency_summary_of_one_call_and_of_none():
    assert summarize_latency([0.004]) == LatencySummary(1, 4.0, 4.0, 4.0)
    with pytest.raises(ValueError, match="no timings"):
        summarize_latency([])


def test_time_calls_alternates_and_leaves_out_the_warm_up():
    order: list[tuple[str, int]] = []

    def fast(i: int) -> None:
        order.append(("fast", i))

    def slow(i: int) -> None:
        order.append(("slow", i))
        time.sleep(0.02)

    fast_s, slow_s = time_calls([fast, slow], runs=3, warmup=2)
    assert order == [(name, i) for i in range(5) for name in ("fast", "slow")]  # run by run, not block by block
    assert len(fast_s) == len(slow_s) == 3  # the two warm-up rounds are not timed
    assert min(slow_s) >= 0.02


# --------------------------------------------------------------------------------------------------------------
# cost per 1,000 requests


def test_cost_per_1k_is_machine_time_at_the_served_rate():
    # 50 requests per second at $3.60/hour: 1,000 requests take 20 s, which cost 20 / 3600 * 3.6 = $0.02
    c = compute_cost(50.0, 3.6)
    assert c == {"compute_seconds_per_1k": pytest.approx(20.0), "usd_per_1k": pytest.approx(0.02),
                 "price_source": "compute"}
    # the served-traffic ledger (`protege cost`) charges a text its share of the machine's time: the same figure
    row = served_record("student", "classify", 0.9, 1 / 50, 3.6, (5, 0))
    assert 1000 * row.cost_usd == pytest.approx(c["usd_per_1k"])
    with pytest.raises(ValueError, match="throughput_per_s must be > 0"):
        compute_cost(0.0, 3.6)


def test_lm_cost_is_its_mean_latency_not_its_median():
    """An LM answers one request at a time: its rate is 1 / the mean latency, so one slow answer counts in full."""
    seconds = [0.1, 0.1, 0.1, 1.0]
    speed = Speed(summarize_latency(seconds), len(seconds) / sum(seconds))
    c = compute_cost(speed.throughput_per_s, 3.6)
    assert c["compute_seconds_per_1k"] == pytest.approx(1000 * statistics.fmean(seconds))  # 325 s, not 100 s
    assert c["usd_per_1k"] == pytest.approx(1000 * statistics.fmean(seconds) / 3600 * 3.6)
    assert speed.report_fields()["throughput_per_s"] == pytest.approx(1 / 0.325)


# --------------------------------------------------------------------------------------------------------------
# no state outlives a command


def test_serve_sets_hub_offline_only_while_it_runs(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("protege.serve.serve", lambda *a, **kw: seen.append(os.environ.get("HF_HUB_OFFLINE")))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert seen == ["1"] and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's own choice is kept, during and after
    assert CliRunner().invoke(cli, ["serve", str(tmp_path)]).exit_code == 0
    assert seen == ["1", "0"] and os.environ["HF_HUB_OFFLINE"] == "0"


def test_hub_offline_is_restored_when_the_command_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path)])  # not a student: exit 2 from inside the command
    assert r.exit_code == 2 and "has no config.json" in r.output
    assert "HF_HUB_OFFLINE" not in os.environ


def test_latency_times_every_sample_text_once_after_an_untimed_pass_over_them():
    from protege.evaluation.classifier import _latencies, _sample

    seen: list[str] = []
    batched: list[list[str]] = []
    texts = ["a", "bb", "ccc"]
    lat, per_s = _latencies(seen.append, batched.append, texts, 7)
    sample = _sample(texts, 7)
    assert sample == ["a", "bb", "ccc", "a", "bb", "ccc", "a"]
    assert seen == sample + sample  # the warm-up pass, then the timed one, in the same order
    assert len(lat) == 7 and all(t >= 0 for t in lat)
    assert batched == [sample] and per_s > 0
